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
