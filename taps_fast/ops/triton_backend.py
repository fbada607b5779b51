"""The "triton" backend: fused Triton kernels (kernels/, installed as taps_fast.kernels).

What it serves, and why not otherwise (``why_not`` returns the reason the dispatcher lists):
- CUDA tensors, chosen automatically ahead of the reference path. CPU tensors only under
  ``TRITON_INTERPRET=1`` (Triton's interpreter, for tests) and only when forced
  (``TAPS_FAST_BACKEND=triton`` or ``use_backend("triton")``): on the CPU the reference path
  stays the default, since the interpreter is orders of magnitude slower.
- fp16 and bf16; fp32 where torch itself would use TF32 (``torch.backends.cuda.matmul.allow_tf32``
  for linear, ``torch.backends.cudnn.allow_tf32`` for conv), because the kernels' fp32 product
  is TF32 on tensor cores, and exact-fp32 tl.dot runs on CUDA cores and spills (measured with
  the static check); float64 never. Under the interpreter fp32 is exact and served; bf16 only
  where the interpreter passes kernels/_probe.py (stock triton 3.6-3.8 computes bf16 tl.dot on
  the bit patterns, relative error ~1e10; tests/interpreter_bf16.py patches it for the tests).
- conv2d with groups = 1 (grouped and depthwise convs go to the reference path, whose cuDNN
  kernels handle them).
- tensors under 2^31 elements (the kernels index with int32).

Unlike the reference path the kernels never sync the host: the gate is read on the device. A
NaN score therefore cannot raise here; it makes the output (and ds) NaN instead.
"""
from __future__ import annotations

import functools
import os
from typing import Optional

import torch

from ._common import INT32_MAX, backward_outputs, mt_backward_outputs, out_format
from ._mt_common import row_task_ids


def _interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _interpreter_bf16_ok() -> bool:
    """The interpreter computes bf16 as a GPU does (kernels/_probe.py; one tiny kernel, cached)."""
    from ..kernels._probe import interpreter_bf16_ok

    return interpreter_bf16_ok()


@functools.lru_cache(maxsize=None)
def available() -> Optional[str]:
    try:
        import triton  # noqa: F401
    except ImportError:
        return "triton is not installed (pip install triton)"
    try:
        from .. import kernels  # noqa: F401
        from ..kernels import conv, linear, mt_conv, mt_linear  # noqa: F401
    except Exception as e:  # a broken triton install: report it rather than crash the import
        return f"the Triton kernels failed to import ({type(e).__name__}: {e})"
    return None


def why_not(op: str, device: torch.device, dtype: torch.dtype, groups: int = 1, numel: int = 0,
            forced: bool = False, **_) -> Optional[str]:
    device = torch.device(device)
    if device.type == "cuda":
        if _interpret():
            return "TRITON_INTERPRET=1 is set, so Triton runs kernels on the CPU, not on CUDA tensors"
    elif device.type == "cpu":
        if not _interpret():
            return "CPU tensors need TRITON_INTERPRET=1 (Triton's interpreter, for tests)"
        if not forced:
            return ("serves CPU tensors (TRITON_INTERPRET=1) only when forced: the reference path "
                    "is the CPU default")
    else:
        return f"no Triton kernels for device type {device.type!r}"
    if dtype == torch.float64:
        return "float64: no tensor-core path (the reference path serves it)"
    if dtype == torch.bfloat16 and _interpret() and not _interpreter_bf16_ok():
        return "bfloat16 under TRITON_INTERPRET=1: the interpreter's bf16 tl.dot is wrong"
    if dtype == torch.float32 and device.type == "cuda":
        conv = "conv" in op
        allowed = torch.backends.cudnn.allow_tf32 if conv else torch.backends.cuda.matmul.allow_tf32
        if not allowed:
            flag = "torch.backends.cudnn.allow_tf32" if conv else "torch.backends.cuda.matmul.allow_tf32"
            return (f"float32 with {flag}=False: the kernels compute fp32 in TF32; exact fp32 is "
                    "served by the reference path")
    if dtype not in (torch.float16, torch.bfloat16, torch.float32):
        return f"dtype {dtype} is not supported (fp16, bf16, fp32)"
    if "conv" in op and groups != 1:
        return (f"grouped/depthwise conv (groups={groups}): the implicit-GEMM kernels cover "
                "groups=1; the reference path (cuDNN) serves grouped convs")
    if numel > INT32_MAX:
        return f"a tensor has {numel} elements, over the kernels' int32 indexing limit (2^31 - 1)"
    return None


# ----------------------------------------------------------------------------- kernels
def linear_fwd(x, weight, delta, score, bias, threshold):
    from ..kernels.linear import linear_fwd as launch

    y = launch(x.reshape(-1, x.shape[-1]), weight, delta, score, bias, threshold)
    return y.reshape(tuple(x.shape[:-1]) + (weight.shape[0],))


def linear_bwd(dy, x, weight, delta, score, threshold, needs_dx, needs_dweight, needs_ddelta,
               needs_dscore, needs_dbias):
    from ..kernels.linear import linear_fwd as launch_dx
    from ..kernels.linear import linear_wgrad

    n, k = weight.shape
    dy2 = dy.reshape(-1, n)
    x2 = x.reshape(-1, k)
    dx = dw = dd = ds = db = None
    if needs_dx:
        dx = launch_dx(dy2, weight, delta, score, None, threshold, transpose_weight=True).reshape(x.shape)
    if needs_dweight or needs_ddelta or needs_dscore or needs_dbias:
        dw, dd, ds, db = linear_wgrad(dy2, x2, weight, delta, score, threshold, needs_dweight,
                                      needs_ddelta, needs_dscore, needs_dbias)
    return backward_outputs(dy, x, weight, delta, score, dx, dw, dd, ds, db)


def conv2d_fwd(x, weight, delta, score, bias, stride, padding, dilation, groups, threshold):
    from ..kernels.conv import conv2d_fwd as launch

    return launch(x, weight, delta, score, bias, stride, padding, dilation, threshold,
                  memory_format=out_format(x))


def conv2d_bwd(dy, x, weight, delta, score, stride, padding, dilation, groups, threshold,
               needs_dx, needs_dweight, needs_ddelta, needs_dscore, needs_dbias):
    from ..kernels.conv import conv2d_dgrad, conv2d_wgrad

    dx = dw = dd = ds = db = None
    if needs_dx:
        dx = conv2d_dgrad(dy, x, weight, delta, score, stride, padding, dilation, threshold)
    if needs_dweight or needs_ddelta or needs_dscore or needs_dbias:
        dw, dd, ds, db = conv2d_wgrad(dy, x, weight, delta, score, stride, padding, dilation,
                                      threshold, needs_dweight, needs_ddelta, needs_dscore, needs_dbias)
    return backward_outputs(dy, x, weight, delta, score, dx, dw, dd, ds, db)


# ----------------------------------------------------------------------------- multi-task ops
def mt_linear_fwd(x, task_ids, weight, deltas, slot, scores, thresholds, bias):
    from ..kernels.mt_linear import mt_linear_fwd as launch

    n, k = weight.shape
    y = launch(x.reshape(-1, k), row_task_ids(task_ids, x, k), weight, deltas, slot.to(torch.int32),
               scores, thresholds, bias)
    return y.reshape(tuple(x.shape[:-1]) + (n,))


def mt_linear_bwd(dy, x, task_ids, weight, deltas, slot, scores, thresholds, needs_dx, needs_ddeltas,
                  needs_dscores):
    from ..kernels.mt_linear import mt_linear_fwd as launch_dx
    from ..kernels.mt_linear import mt_linear_wgrad

    n, k = weight.shape
    rows = row_task_ids(task_ids, x, k)
    slot32 = slot.to(torch.int32)
    dy2, x2 = dy.reshape(-1, n), x.reshape(-1, k)
    dx = dd = ds = None
    if needs_dx:
        dx = launch_dx(dy2, rows, weight, deltas, slot32, scores, thresholds, None,
                       transpose_weight=True).reshape(x.shape)
    if needs_ddeltas or needs_dscores:
        dd, ds = mt_linear_wgrad(dy2, x2, rows, deltas, slot32, scores, thresholds, needs_ddeltas, needs_dscores)
    return mt_backward_outputs(x, deltas, scores, dx, dd, ds)


def mt_conv2d_fwd(x, task_ids, weight, deltas, slot, scores, thresholds, bias, stride, padding, dilation, groups):
    from ..kernels.mt_conv import mt_conv2d_fwd as launch

    return launch(x, task_ids, weight, deltas, slot.to(torch.int32), scores, thresholds, bias, stride,
                  padding, dilation)


def mt_conv2d_bwd(dy, x, task_ids, weight, deltas, slot, scores, thresholds, stride, padding, dilation,
                  groups, needs_dx, needs_ddeltas, needs_dscores):
    from ..kernels.mt_conv import mt_conv2d_dgrad, mt_conv2d_wgrad

    slot32 = slot.to(torch.int32)
    dx = dd = ds = None
    if needs_dx:
        dx = mt_conv2d_dgrad(dy, x, task_ids, weight, deltas, slot32, scores, thresholds, stride, padding, dilation)
    if needs_ddeltas or needs_dscores:
        dd, ds = mt_conv2d_wgrad(dy, x, task_ids, deltas, slot32, scores, thresholds, stride, padding,
                                 dilation, needs_ddeltas, needs_dscores)
    return mt_backward_outputs(x, deltas, scores, dx, dd, ds)


KERNELS = {
    "mt_linear_fwd": mt_linear_fwd,
    "mt_linear_bwd": mt_linear_bwd,
    "mt_conv2d_fwd": mt_conv2d_fwd,
    "mt_conv2d_bwd": mt_conv2d_bwd,
    "linear_fwd": linear_fwd,
    "linear_bwd": linear_bwd,
    "conv2d_fwd": conv2d_fwd,
    "conv2d_bwd": conv2d_bwd,
}
