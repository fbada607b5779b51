"""Test-session setup. Without a GPU the Triton kernels are tested under Triton's interpreter,
which must be switched on before the kernels are defined, i.e. before taps_fast is imported."""
import os

if "TRITON_INTERPRET" not in os.environ:
    import torch  # does not import triton

    if not torch.cuda.is_available():
        os.environ["TRITON_INTERPRET"] = "1"
