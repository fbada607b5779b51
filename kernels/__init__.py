"""Triton kernels of taps_fast, installed as ``taps_fast.kernels``.

- ``linear.py``: the gated linear forward (also dx on the transposed weight) and the one-pass
  weight-gradient kernel (dΔW, ds, dW, db), with their launchers;
- ``conv.py``: the implicit-GEMM conv2d forward, dx and weight-gradient kernels and launchers, and
  the reduction loops the multi-task conv kernels share;
- ``mt_linear.py`` / ``mt_conv.py``: the same for a mixed batch (each row or sample with its own
  task's delta), with the rows grouped by task on the device;
- ``_common.py``: the gate, the tile configs per element size, the shared weight-gradient
  epilogue, the split-reduction epilogue kernel, and the multi-task launchers' helpers.

The ops in taps_fast/ops reach these through the "triton" backend (taps_fast/ops/triton_backend.py);
the launchers take the conv geometry and layout helpers from taps_fast/ops/_common.py (torch
only). Nothing here is imported at package import time: taps_fast imports without triton, and
TRITON_INTERPRET must be set before these modules are first imported.
"""
