"""The test helpers that decide where and how a test runs (tests/helpers.py)."""
import pytest
import torch

import helpers
from taps_fast.ops import triton_backend


def test_tf32_allowed_restores_torch_flags():
    """Inside: both TF32 switches as asked; after: as before, even when the block raises (what
    pytest's monkeypatch fails to do for torch.backends.cuda.matmul under pytest 9)."""
    flags = (torch.backends.cuda.matmul, torch.backends.cudnn)
    before = [f.allow_tf32 for f in flags]
    for on in (True, False):
        with pytest.raises(KeyError):
            with helpers.tf32_allowed(on):
                assert [f.allow_tf32 for f in flags] == [on, on]
                raise KeyError("inside")
        assert [f.allow_tf32 for f in flags] == before


def test_triton_device_follows_the_machine(monkeypatch):
    """The GPU where there is one (the interpreter is then off and the backend refuses CPU
    tensors), the CPU under the interpreter, else nowhere: a test forcing "triton" on CPU tensors
    would fail on a GPU machine."""
    if triton_backend.available() is not None:
        assert helpers.triton_device() is None
        return
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert helpers.triton_device() == torch.device("cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert helpers.triton_device() == torch.device("cpu")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert helpers.triton_device() is None


def test_interpreter_bf16_rounds_as_torch():
    """tests/interpreter_bf16.py's fp32 -> bf16 rounding is torch's (to nearest even), NaN and
    infinities included, and its widening is exact."""
    import numpy as np

    import interpreter_bf16 as ib

    g = torch.Generator().manual_seed(0)
    x = torch.cat([torch.randn(10000, generator=g) * 10 ** torch.randint(-30, 30, (10000,), generator=g),
                   torch.tensor([0.0, -0.0, float("inf"), float("-inf"), float("nan"), 3.4e38, 1e-40])])
    bits = ib.to_bf16(x.numpy())
    want = x.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    same = (bits == want) | (np.isnan(x.numpy()) & ((bits & 0x7FFF) > 0x7F80))
    assert same.all(), x[~torch.from_numpy(same)][:5]
    assert np.array_equal(ib.to_f32(want), x.to(torch.bfloat16).float().numpy(), equal_nan=True)


def test_triton_backend_serves_bf16_under_the_interpreter_only_where_the_probe_passes():
    if not triton_backend._interpret() or triton_backend.available() is not None:
        pytest.skip("needs the Triton interpreter (TRITON_INTERPRET=1)")
    import interpreter_bf16 as ib
    from taps_fast.kernels._probe import interpreter_bf16_ok

    assert ib.applied() and interpreter_bf16_ok(), "conftest.py applies the patch; the probe must pass"
    why = triton_backend.why_not("linear_fwd", device=torch.device("cpu"), dtype=torch.bfloat16,
                                 rows=4, numel=64, forced=True)
    assert why is None, why
