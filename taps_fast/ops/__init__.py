"""TAPS ops: one file per op (kernels' launchers, custom op, autograd, functional API).

Importing this package registers the ``taps_fast::*`` custom ops and the "triton" and
"reference" backends (triton is tried first; see triton_backend.py for what it serves).
"""
from .. import dispatch
from . import triton_backend
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

__all__ = ["taps_linear", "taps_linear_ref", "taps_conv2d", "taps_conv2d_ref", "taps_mt_linear",
           "taps_mt_linear_ref", "taps_mt_conv2d", "taps_mt_conv2d_ref"]
