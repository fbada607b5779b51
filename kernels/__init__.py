"""Triton kernels of taps_fast, installed as ``taps_fast.kernels``.

- ``linear.py``: the gated linear forward (also dx on the transposed weight) and the one-pass
  weight-gradient kernel (dΔW, ds, dW, db), with their launchers;
- ``conv.py``: the implicit-GEMM conv2d forward, dx and weight-gradient kernels and launchers;
- ``_common.py``: the gate, the tile configs per element size, the shared weight-gradient
  epilogue and the split-reduction epilogue kernel.

The ops in taps_fast/ops reach these through the "triton" backend (taps_fast/ops/triton_backend.py).
Nothing here is imported at package import time: taps_fast imports without triton, and
TRITON_INTERPRET must be set before these modules are first imported.
"""
