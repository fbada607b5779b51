"""The compiled backends: "cuda" (csrc/cuda) and "cpp" (csrc/cpu), from the extension taps_fast._C.

Both serve the forward of the gated linear (single task, ``linear_fwd``) and of the mixed-batch
linear (``mt_linear_fwd``) with GEMV-style kernels for few rows (M ≤ 16 / 32): the memory-bound
serving case, where the time is the bytes of W and of each open ΔW read once, and a tiled matmul
wastes most of its work. Every other op and shape goes to the next backend; ``why_not`` says why.

- "cuda" sits first (ahead of "triton"): CUDA tensors, fp32 / fp16 / bf16, M ≤ CUDA_MAX_ROWS.
- "cpp" sits just ahead of "reference": CPU tensors, fp32 / fp64 / fp16 / bf16, M ≤ CPP_MAX_ROWS.
  Where it is faster than the reference path is measured by ``taps-fast bench --suite small``;
  see CPP_* below for the measured numbers behind each rule.

Like the Triton kernels, the compiled kernels read the gate on the device and never sync the
host; on the CPU the ids are checked by the kernel itself.
"""
from __future__ import annotations

from typing import Optional

import torch

from .. import _ext
from ._common import INT32_MAX, gate_is_open
from ._mt_common import open_tasks, row_task_ids

# Rows (M, after flattening the leading dimensions) up to which each backend's GEMV kernels are
# picked. CUDA: 16, the case the kernels are written for (a GEMV streams the weights once with
# up to 16 accumulators per output; past it a tensor-core tile reuses each weight load more).
# CPU: 32, measured (a 2-core x86_64 machine with AVX2, no GPU, torch 2.14.1; fp32, kernel op vs
# the reference path, 2026-11-26): at
# N = K = 3072 the kernel is 1.9x (closed gate) / 4.7x (open) faster at M = 16, 1.3x / 2.9x at
# M = 32, and 0.97x / 1.5x at M = 64; at 768, 2.2x / 2.9x at M = 16 and parity (closed) at
# M = 64. Where the reference path forms W + ΔW (an open gate) the kernel wins further out, but
# one limit per backend keeps the choice independent of the gate (read on the device).
CUDA_MAX_ROWS = 16
CPP_MAX_ROWS = 32
# M of the few-row serving call that `python -m taps_fast.info` and `bench --suite small` report on
SERVING_ROWS = CUDA_MAX_ROWS


def _available(need_cuda: bool) -> Optional[str]:
    mod, why = _ext.load()
    if mod is None:
        return why
    if need_cuda and not _ext.build_info().get("cuda"):
        return "taps_fast._C was built without its CUDA part (no nvcc at build time, or TAPS_FAST_NO_CUDA=1)"
    return None


def available_cuda() -> Optional[str]:
    return _available(True)


def available_cpp() -> Optional[str]:
    return _available(False)


def _rows_reason(rows: Optional[int], limit: int) -> Optional[str]:
    if rows is None:
        return "the row count is unknown"
    if rows > limit:
        return (f"M={rows} rows > {limit}: past the small-batch case a tiled matmul reuses each "
                "weight load (triton / reference serve it)")
    return None


def why_not_cuda(op: str, device: torch.device, dtype: torch.dtype, rows: Optional[int] = None,
                 numel: int = 0, forced: bool = False, **_) -> Optional[str]:
    device = torch.device(device)
    if device.type != "cuda":
        return f"CUDA tensors only (got {device.type}; the C++ CPU kernels are the 'cpp' backend)"
    if not torch.cuda.is_available():
        return "no CUDA device is available"
    arch = _ext.cuda_arch_reason(torch.cuda.get_device_capability(device))
    if arch is not None:  # e.g. a GPU newer than the build without PTX: "no kernel image" otherwise
        return arch
    if dtype not in (torch.float32, torch.float16, torch.bfloat16):
        return f"dtype {dtype} is not supported (fp32, fp16, bf16)"
    if numel > INT32_MAX:
        return f"a tensor has {numel} elements, over the kernels' int32 row indexing limit"
    return _rows_reason(rows, CUDA_MAX_ROWS)


def why_not_cpp(op: str, device: torch.device, dtype: torch.dtype, rows: Optional[int] = None,
                forced: bool = False, **_) -> Optional[str]:
    device = torch.device(device)
    if device.type != "cpu":
        return f"CPU tensors only (got {device.type}; the CUDA kernels are the 'cuda' backend)"
    if dtype not in (torch.float32, torch.float64, torch.float16, torch.bfloat16):
        return f"dtype {dtype} is not supported (fp32, fp64, fp16, bf16)"
    return _rows_reason(rows, CPP_MAX_ROWS)


# ----------------------------------------------------------------------------- kernels
def _c(t):
    return None if t is None else t.contiguous()


_small_linear = []  # [how linear_fwd calls taps_fast::small_linear], resolved at the first call


def _small_linear_fn():
    """taps_fast::small_linear as the eager kernels call it: taps_fast._C.small_linear, the op
    through the C++ dispatcher without boxing its arguments (csrc/fast_call.cpp: 2.2 µs against
    3.5 µs through torch.ops for a 64x64 layer at M = 1, on a 2-core x86_64 machine without a
    GPU, torch 2.14.1); torch.ops' overload where an older build lacks it. Only the eager kernels
    call it; torch.compile sees the custom ops around them."""
    if not _small_linear:
        mod, _ = _ext.load()
        fn = getattr(mod, "small_linear", None)
        if fn is None:
            overload = torch.ops.taps_fast.small_linear.default
            fn = getattr(overload, "_op", overload)
        _small_linear.append(fn)
    return _small_linear[0]


def linear_fwd(x, weight, delta, score, bias, threshold):
    """taps_fast::small_linear on x flattened to [M, K]. On the CPU a NaN score raises the
    reference path's error first (reading it costs no sync there; the kernel, like the CUDA one,
    would return NaN rows). A closed gate runs the same kernel, which then reads W alone: faster
    than F.linear on W (MKL) at every size it serves. Measured on a 2-core x86_64 machine without
    a GPU, torch 2.14.1, kernel / F.linear: 2.1 / 3.1 µs a call of a 64x64 layer at M = 1; over
    layers of N = K = 768 0.59x at M = 1, 0.67x at M = 16, 0.82x at M = 32; of 3072, 0.65x at
    M = 1, 0.46x at M = 16, 0.54x at M = 32."""
    if x.is_cpu:
        gate_is_open(score, threshold, "taps_linear")
    op = _small_linear[0] if _small_linear else _small_linear_fn()
    if x.dim() == 2:  # no reshape in or out: a reshaped y would be a view (see not_a_view)
        return op(x.contiguous(), weight.contiguous(), delta.contiguous(), score, _c(bias), float(threshold))
    n, k = weight.shape
    y = op(x.reshape(-1, k).contiguous(), weight.contiguous(), delta.contiguous(), score, _c(bias),
           float(threshold))
    return y.reshape(tuple(x.shape[:-1]) + (n,))


def mt_linear_fwd(x, task_ids, weight, deltas, slot, scores, thresholds, bias):
    """taps_fast::small_mt_linear on x flattened to [M, K] (the rows of a sample share its task).
    On the CPU a NaN score of a task present raises, as on the reference path."""
    if x.device.type == "cpu" and bool(torch.isnan(scores.detach()).any()):
        open_tasks(task_ids, slot, scores, thresholds, "taps_mt_linear")
    n, k = weight.shape
    rows = row_task_ids(task_ids, x, k)
    y = torch.ops.taps_fast.small_mt_linear(x.reshape(-1, k).contiguous(), rows.contiguous(),
                                            weight.contiguous(), deltas.contiguous(), slot.contiguous(),
                                            scores.contiguous(), thresholds.contiguous(), _c(bias))
    return y.reshape(tuple(x.shape[:-1]) + (n,))


KERNELS = {"linear_fwd": linear_fwd, "mt_linear_fwd": mt_linear_fwd}
