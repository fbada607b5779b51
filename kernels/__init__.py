"""Triton kernels of taps_fast, installed as ``taps_fast.kernels``.

Empty until the Triton issue lands: the fused gated linear and conv2d kernels (forward and
backward) and the multi-task kernels go here, one file per op, each beside its launcher.
Nothing here may import triton at package import time: the package must import without it.
"""
