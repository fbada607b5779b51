"""Static checks of the compiled GPU code, with no GPU needed (``make check-kernels``):

- :mod:`.triton_sass`: every Triton kernel at every autotune config, compiled for sm_80/sm_90:
  no register spill, and wgmma (HGMMA) in every sm_90 matmul;
- :mod:`.ext_sass`: the compiled extension's CUDA kernels (taps_fast._C): no spill, and 128-bit
  global loads on every fast path.

Both read the code with cuobjdump (:mod:`._cuobjdump`). ``python -m taps_fast.checks`` runs both.
"""
