"""Bad input: every error names the problem."""
import pytest
import torch
import torch.nn as nn

import taps_fast
from taps_fast import TAPSConv2d, TAPSLinear, convert, taps_linear


def test_linear_bad_shapes():
    m = TAPSLinear(5, 3)
    with pytest.raises(ValueError, match=r"input of shape \(2, 4\).*in_features=5"):
        m(torch.randn(2, 4))
    with pytest.raises(ValueError, match=r"delta has shape \(3, 4\).*weight has shape \(3, 5\)"):
        taps_linear(torch.randn(2, 5), m.weight, torch.zeros(3, 4), m.score)
    with pytest.raises(ValueError, match="score must be a 0-dim tensor"):
        taps_linear(torch.randn(2, 5), m.weight, m.delta, torch.zeros(2))
    with pytest.raises(ValueError, match=r"bias has shape \(4,\)"):
        taps_linear(torch.randn(2, 5), m.weight, m.delta, m.score, torch.zeros(4))


def test_conv_bad_shapes():
    c = TAPSConv2d(4, 6, 3, groups=2)
    with pytest.raises(ValueError, match=r"has 3 channels, but the layer expects in_channels=4"):
        c(torch.randn(1, 3, 8, 8))
    with pytest.raises(ValueError, match="must be 4-D"):
        c(torch.randn(8, 8))


def test_bad_dtypes():
    m = TAPSLinear(5, 3)
    with pytest.raises(TypeError, match="dtype mismatch: x is torch.float64 but weight is torch.float32"):
        m(torch.randn(2, 5, dtype=torch.float64))
    with pytest.raises(TypeError, match="floating-point"):
        m(torch.ones(2, 5, dtype=torch.int64))
    c = TAPSConv2d(2, 2, 1)
    with pytest.raises(TypeError, match="dtype mismatch"):
        c(torch.randn(1, 2, 3, 3, dtype=torch.float16))


def test_bad_device():
    m = TAPSLinear(5, 3)
    with pytest.raises(ValueError, match="device mismatch: x is on meta but weight is on cpu"):
        m(torch.randn(2, 5, device="meta"))


def test_nan_score():
    m = TAPSLinear(5, 3)
    with torch.no_grad():
        m.score.fill_(float("nan"))
    with pytest.raises(ValueError, match="score is NaN"):
        m(torch.randn(2, 5))
    model = convert(nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2)), head=None)
    with torch.no_grad():
        model[1].score.fill_(float("nan"))
    for f in (taps_fast.freeze_gates, taps_fast.merge):
        with pytest.raises(ValueError, match="NaN"):
            f(model)
    with pytest.raises(ValueError, match="NaN"):
        taps_fast.save_task(model, "/tmp/never_written.safetensors")


def test_nothing_to_convert():
    with pytest.raises(ValueError, match="found no nn.Linear or nn.Conv2d"):
        convert(nn.Sequential(nn.ReLU()))


def test_bad_threshold_and_init_score():
    with pytest.raises(ValueError, match="threshold"):
        TAPSLinear(2, 2, threshold=float("nan"))
    with pytest.raises(ValueError, match="init_score"):
        convert(nn.Linear(2, 2), init_score="high")


def test_unknown_backend(monkeypatch):
    m = TAPSLinear(5, 3)
    monkeypatch.setenv("TAPS_FAST_BACKEND", "warp-drive")
    with pytest.raises(taps_fast.NoBackendError, match="unknown taps_fast backend 'warp-drive'.*reference"):
        m(torch.randn(2, 5))
    monkeypatch.setenv("TAPS_FAST_BACKEND", "reference")
    m(torch.randn(2, 5))
    with pytest.raises(taps_fast.NoBackendError, match="unknown"):
        with taps_fast.use_backend("nope"):
            pass


def test_forced_backend_that_cannot_serve_lists_reasons(monkeypatch):
    from taps_fast import dispatch
    be = dispatch.Backend("picky", kernels={"linear_fwd": None}, why_not=lambda op, **meta: "only on Tuesdays")
    dispatch.register_backend(be)
    try:
        with taps_fast.use_backend("picky"):
            with pytest.raises(dispatch.NoBackendError, match="picky: only on Tuesdays; reference: ok"):
                TAPSLinear(5, 3)(torch.randn(2, 5))
        TAPSLinear(5, 3)(torch.randn(2, 5))  # automatic choice skips it
    finally:
        dispatch.unregister_backend("picky")


def test_threshold_is_a_finite_real_and_part_of_the_state_dict():
    """τ travels with the state_dict: a model converted at the default τ that loads the state
    of one converted at τ = 0.3 takes τ = 0.3 (its gates stay as they were trained), not 0.1.
    Booleans, NaN and ±inf are refused wherever τ is set."""
    src = convert(nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2)), threshold=0.3)
    with torch.no_grad():
        src[0].score.fill_(0.2)  # closed at 0.3, open at 0.1
    dst = convert(nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2)))
    dst.load_state_dict(src.state_dict())
    assert dst[0].threshold == 0.3 and not dst[0].is_open
    for bad in (True, float("nan"), float("inf"), "0.1"):
        with pytest.raises(ValueError, match="finite real"):
            TAPSLinear(2, 2, threshold=bad)
        with pytest.raises(ValueError, match="finite real"):
            dst[0].threshold = bad
    with pytest.raises(ValueError, match="finite real"):
        dst.load_state_dict({**src.state_dict(), "0._extra_state": torch.tensor(float("nan"), dtype=torch.float64)})
