"""TAPS ops: one file per op (kernels' launchers, custom op, autograd, functional API).

Importing this package registers the ``taps_fast::*`` custom ops and the backends, tried in this
order: "cuda" (the compiled GEMV kernels for few rows, ext_backend.py), "triton" (fused Triton
kernels, triton_backend.py), "cpp" (the compiled CPU kernels for few rows) and "reference"
(pure PyTorch, serves everything). The compiled extension is loaded only when a call first asks
the "cuda" or "cpp" backend, so the import never depends on it.
"""
from .. import dispatch
from . import ext_backend, triton_backend
from .conv import conv2d_bwd_reference, conv2d_fwd_reference, taps_conv2d, taps_conv2d_ref
from .linear import linear_bwd_reference, linear_fwd_reference, taps_linear, taps_linear_ref
from .multitask import (
    mt_conv2d_bwd_reference,
    mt_conv2d_fwd_reference,
    mt_linear_bwd_reference,
    mt_linear_fwd_reference,
    taps_mt_conv2d,
    taps_mt_conv2d_ref,
    taps_mt_linear,
    taps_mt_linear_ref,
)

dispatch.register_backend(
    dispatch.Backend(
        name="reference",
        kernels={
            "linear_fwd": linear_fwd_reference,
            "linear_bwd": linear_bwd_reference,
            "conv2d_fwd": conv2d_fwd_reference,
            "conv2d_bwd": conv2d_bwd_reference,
            "mt_linear_fwd": mt_linear_fwd_reference,
            "mt_linear_bwd": mt_linear_bwd_reference,
            "mt_conv2d_fwd": mt_conv2d_fwd_reference,
            "mt_conv2d_bwd": mt_conv2d_bwd_reference,
        },
        # Pure PyTorch: serves every device, dtype and layout that F.linear / F.conv2d serve.
        why_not=lambda op, **meta: None,
    )
)
dispatch.register_backend(  # ahead of "reference"
    dispatch.Backend(
        name="triton",
        kernels=triton_backend.KERNELS,
        why_not=triton_backend.why_not,
        available=triton_backend.available,
    )
)

dispatch.register_backend(  # first: ahead of "triton" for the few-row case it is written for
    dispatch.Backend(
        name="cuda",
        kernels=ext_backend.KERNELS,
        why_not=ext_backend.why_not_cuda,
        available=ext_backend.available_cuda,
    ),
    priority=0,
)
dispatch.register_backend(  # ahead of "reference"
    dispatch.Backend(
        name="cpp",
        kernels=ext_backend.KERNELS,
        why_not=ext_backend.why_not_cpp,
        available=ext_backend.available_cpp,
    )
)

__all__ = ["taps_linear", "taps_linear_ref", "taps_conv2d", "taps_conv2d_ref", "taps_mt_linear",
           "taps_mt_linear_ref", "taps_mt_conv2d", "taps_mt_conv2d_ref"]
