"""TAPS ops: one file per op (oracle, reference kernels, launcher, custom op, autograd, functional API).

Two things are called "reference", and they are not the same:
- the oracles ``taps_linear_ref``, ``taps_conv2d_ref``, ``taps_mt_linear_ref`` and
  ``taps_mt_conv2d_ref``: autograd-differentiable formulas in plain PyTorch (the authors' style:
  W + gate·ΔW formed every call, the gate's straight-through estimator written out), with no
  custom op and no backend. The tests compare every backend with them (in float64), and the
  benchmarks use them as the baseline;
- the "reference" backend (``TAPS_FAST_BACKEND=reference``, ``use_backend("reference")``): the
  kernels ``linear_fwd_torch``, ``conv2d_bwd_torch``, ``mt_linear_fwd_torch``, ... that the ops'
  custom ops run when no faster backend serves the call. They are written with torch ops too, but
  branch on the gate (a closed layer reads W only), never form G for a closed gate, and serve
  every device, dtype and layout that F.linear / F.conv2d serve.

Importing this package registers the ``taps_fast::*`` custom ops and the backends of BACKENDS,
tried in that order. The compiled extension is loaded only when a call first asks the "cuda" or
"cpp" backend, so the import never depends on it.
"""
from .. import dispatch
from . import ext_backend, triton_backend
from .conv import conv2d_bwd_torch, conv2d_fwd_torch, taps_conv2d, taps_conv2d_ref
from .linear import linear_bwd_torch, linear_fwd_torch, taps_linear, taps_linear_ref
from .mt_conv import mt_conv2d_bwd_torch, mt_conv2d_fwd_torch, taps_mt_conv2d, taps_mt_conv2d_ref
from .mt_linear import mt_linear_bwd_torch, mt_linear_fwd_torch, taps_mt_linear, taps_mt_linear_ref

# The backends, in the order the dispatcher tries them (the first that can serve a call runs it):
BACKENDS = (
    # the compiled GEMV kernels for few rows on CUDA (ext_backend.py): ahead of "triton" for the
    # few-row case they are written for
    dispatch.Backend(
        name="cuda",
        kernels=ext_backend.KERNELS,
        why_not=ext_backend.why_not_cuda,
        available=ext_backend.available_cuda,
    ),
    # the fused Triton kernels (triton_backend.py): CUDA tensors (CPU only under the interpreter,
    # when forced)
    dispatch.Backend(
        name="triton",
        kernels=triton_backend.KERNELS,
        why_not=triton_backend.why_not,
        available=triton_backend.available,
    ),
    # the compiled kernels for few rows on the CPU (ext_backend.py)
    dispatch.Backend(
        name="cpp",
        kernels=ext_backend.KERNELS,
        why_not=ext_backend.why_not_cpp,
        available=ext_backend.available_cpp,
    ),
    # torch ops, last: serves every call (see the module docstring)
    dispatch.Backend(
        name="reference",
        kernels={
            "linear_fwd": linear_fwd_torch,
            "linear_bwd": linear_bwd_torch,
            "conv2d_fwd": conv2d_fwd_torch,
            "conv2d_bwd": conv2d_bwd_torch,
            "mt_linear_fwd": mt_linear_fwd_torch,
            "mt_linear_bwd": mt_linear_bwd_torch,
            "mt_conv2d_fwd": mt_conv2d_fwd_torch,
            "mt_conv2d_bwd": mt_conv2d_bwd_torch,
        },
        why_not=lambda op, **meta: None,
    ),
)
for _position, _backend in enumerate(BACKENDS):
    dispatch.register_backend(_backend, priority=_position)
del _position, _backend

__all__ = ["taps_linear", "taps_linear_ref", "taps_conv2d", "taps_conv2d_ref", "taps_mt_linear",
           "taps_mt_linear_ref", "taps_mt_conv2d", "taps_mt_conv2d_ref"]
