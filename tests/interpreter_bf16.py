"""A test-only patch of Triton's CPU interpreter (TRITON_INTERPRET=1) so that the kernels' bf16
paths compute what the GPU computes.

The interpreter keeps bf16 tensors as their uint16 bit patterns and runs numpy on them: tl.dot is
an integer matmul of the bits, and `w + d` an integer add. On a GPU, tl.dot of bf16 operands
multiplies them exactly and accumulates in fp32 (wgmma / mma), and a bf16 add, multiply or
compare is the fp32 operation rounded once to bf16 (to nearest even). The patch does the same:
bf16 operands are widened to fp32 (exact), the dot accumulates in fp32, and an elementwise
result is rounded back to bf16. Casts between bf16 and fp32 already work in the interpreter.

`apply()` patches InterpreterBuilder once per process; tests/conftest.py calls it when the
interpreter is on. The package itself never imports this file.
"""
from __future__ import annotations

import numpy as np

_APPLIED = [False]


def to_f32(bits: np.ndarray) -> np.ndarray:
    """bf16 bit patterns (uint16) -> their fp32 values (exact)."""
    return (bits.astype(np.uint32) << np.uint32(16)).view(np.float32)


def to_bf16(x: np.ndarray) -> np.ndarray:
    """fp32 values -> bf16 bit patterns, rounded to nearest even; NaN stays NaN (0x7fc0)."""
    x = np.asarray(x, dtype=np.float32)
    u = x.view(np.uint32).astype(np.uint64)
    r = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)
    return np.where(np.isnan(x), np.uint16(0x7FC0), r)


_ARITH = {np.add, np.subtract, np.multiply, np.divide, np.minimum, np.maximum, np.fmax, np.fmin, np.fmod}
_COMPARE = {np.less, np.greater, np.less_equal, np.greater_equal, np.equal, np.not_equal}


def apply() -> bool:
    """Patch the interpreter (idempotent). Returns False if this Triton has no interpreter of the
    expected shape (the bf16 tests then stay GPU-only)."""
    if _APPLIED[0]:
        return True
    try:
        import triton.language as tl
        from triton.runtime import interpreter as ti
        B = ti.InterpreterBuilder
        TensorHandle = ti.TensorHandle
        orig_binary, orig_unary, orig_dot, orig_fma = B.binary_op, B.unary_op, B.create_dot, B.create_fma
    except (ImportError, AttributeError):
        return False

    def is_bf16(h) -> bool:
        return h.dtype.scalar == tl.bfloat16

    def binary_op(self, lhs, rhs, op):
        if is_bf16(lhs) and is_bf16(rhs):
            if op in _ARITH:
                return TensorHandle(to_bf16(op(to_f32(lhs.data), to_f32(rhs.data))), tl.bfloat16)
            if op in _COMPARE:  # the interpreter's own result handling, on the values
                return orig_binary(self, TensorHandle(to_f32(lhs.data), tl.float32),
                                   TensorHandle(to_f32(rhs.data), tl.float32), op)
        return orig_binary(self, lhs, rhs, op)

    def unary_op(self, arg, op):
        if is_bf16(arg) and op is np.negative:
            return TensorHandle(arg.data ^ np.uint16(0x8000), tl.bfloat16)
        return orig_unary(self, arg, op)

    def create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        if is_bf16(a) and is_bf16(b):
            acc = np.matmul(to_f32(a.data), to_f32(b.data), dtype=np.float32)
            return TensorHandle(acc.astype(d.data.dtype) + d.data, d.dtype.scalar)
        return orig_dot(self, a, b, d, input_precision, max_num_imprecise_acc)

    def create_fma(self, x, y, z):
        if is_bf16(x) and is_bf16(y) and is_bf16(z):
            f = to_f32(x.data).astype(np.float64) * to_f32(y.data) + to_f32(z.data)
            return TensorHandle(to_bf16(f.astype(np.float32)), tl.bfloat16)
        return orig_fma(self, x, y, z)

    B.binary_op, B.unary_op, B.create_dot, B.create_fma = binary_op, unary_op, create_dot, create_fma
    _APPLIED[0] = True
    return True


def applied() -> bool:
    return _APPLIED[0]
