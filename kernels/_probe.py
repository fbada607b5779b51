"""A probe of Triton's CPU interpreter (TRITON_INTERPRET=1): does it compute bf16 as a GPU does?

The interpreter of triton 3.6-3.8 keeps bf16 tensors as uint16 bit patterns and runs numpy on
them, so a bf16 tl.dot is an integer product of the bits (relative error ~1e10) and a bf16 add an
integer add. The triton backend serves bf16 under the interpreter only where this probe passes:
y = a·(b + c) on small integers, exact in bf16 and fp32, against torch. A patched or fixed
interpreter passes; a GPU never runs it.
"""
import functools

import torch
import triton
import triton.language as tl


@triton.jit
def _bf16_probe_kernel(a_ptr, b_ptr, c_ptr, y_ptr):
    r = tl.arange(0, 16)
    idx = r[:, None] * 16 + r[None, :]
    a = tl.load(a_ptr + idx)
    b = tl.load(b_ptr + idx)
    c = tl.load(c_ptr + idx)
    tl.store(y_ptr + idx, tl.dot(a, b + c, tl.zeros((16, 16), tl.float32)))


@functools.lru_cache(maxsize=None)
def interpreter_bf16_ok() -> bool:
    """Whether this process's interpreter gets bf16 tl.dot and add right (cached per process)."""
    g = torch.Generator().manual_seed(0)
    a, b, c = (torch.randint(-3, 4, (16, 16), generator=g).to(torch.bfloat16) for _ in range(3))
    y = torch.empty(16, 16)
    try:
        _bf16_probe_kernel[(1,)](a, b, c, y)
    except Exception:  # an interpreter that cannot run it at all serves no bf16 either
        return False
    return torch.equal(y, a.float() @ (b.float() + c.float()))
