"""pytest set-up. Without a GPU the Triton kernels are tested under Triton's interpreter,
which must be switched on before the kernels are defined, i.e. before taps_fast is imported."""
import os

if "TRITON_INTERPRET" not in os.environ:
    import torch  # does not import triton

    if not torch.cuda.is_available():
        os.environ["TRITON_INTERPRET"] = "1"


import pytest  # noqa: E402

if os.environ.get("TRITON_INTERPRET") == "1":
    # bf16 computed as the GPU does (tests/interpreter_bf16.py), so the kernels' bf16 paths run here.
    import interpreter_bf16  # noqa: E402

    interpreter_bf16.apply()


@pytest.fixture
def triton_poisoned(monkeypatch):
    """The Triton backend forced, every buffer its launchers allocate NaN-filled first (so an
    element a kernel fails to write fails the comparison) and, on a GPU, fp32 as TF32 (the tests'
    fp32 bound accounts for it)."""
    import contextlib

    import torch

    from taps_fast import dispatch
    from taps_fast.kernels import _common as kcommon  # imports triton

    from helpers import tf32_allowed

    monkeypatch.setattr(kcommon, "POISON_OUTPUTS", True)
    tf32 = tf32_allowed(True) if torch.cuda.is_available() else contextlib.nullcontext()
    with tf32, dispatch.use_backend("triton"):
        yield
