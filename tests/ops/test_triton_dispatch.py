"""The Triton backend through the public ops: opcheck, torch.compile of a converted timm model,
empty batches, autocast, and the dispatcher's choices and reasons. (Kernel numerics against the
float64 oracle: tests/kernels/test_triton.py.)"""

import pytest
import torch

import taps_fast
from taps_fast import dispatch
from helpers import skip_module_without_triton, assert_rel_close

CUDA = torch.cuda.is_available()
DEV = torch.device("cuda" if CUDA else "cpu")
skip_module_without_triton()


@pytest.fixture(autouse=True)
def _triton(triton_poisoned):  # tests/conftest.py: the backend forced, outputs poisoned
    yield



def test_opcheck_triton():
    torch.manual_seed(0)
    x = torch.randn(3, 17, device=DEV, requires_grad=True)
    w = torch.randn(5, 17, device=DEV)
    d = torch.randn(5, 17, device=DEV, requires_grad=True)
    b = torch.randn(5, device=DEV, requires_grad=True)
    xc = torch.randn(2, 3, 7, 7, device=DEV, requires_grad=True)
    wc = torch.randn(4, 3, 3, 3, device=DEV)
    dc = torch.randn(4, 3, 3, 3, device=DEV, requires_grad=True)
    for score in (0.15, 0.05):
        s = torch.tensor(score, device=DEV, requires_grad=True)
        torch.library.opcheck(torch.ops.taps_fast.linear.default, (x, w, d, s, b, 0.1))
        torch.library.opcheck(torch.ops.taps_fast.conv2d.default, (xc, wc, dc, s, b[:4], [2, 2], [1, 1], [1, 1], 1, 0.1))
        torch.library.opcheck(torch.ops.taps_fast.linear_backward.default,
                              (torch.randn(3, 5, device=DEV), x.detach(), w, d.detach(), s.detach(), 0.1,
                               True, True, True, True, True))
        torch.library.opcheck(torch.ops.taps_fast.conv2d_backward.default,
                              (torch.randn(2, 4, 4, 4, device=DEV), xc.detach(), wc, dc.detach(), s.detach(),
                               [2, 2], [1, 1], [1, 1], 1, 0.1, True, True, True, True, True))


# 16 px for the ResNet: its stem and stages still run every conv kind (7x7 s2, 3x3, 1x1, the
# strided downsample) and the interpreter's cost is per output tile (75 s at 32 px).
@pytest.mark.parametrize("name, res, kw", [("test_resnet", 16, {}), ("test_vit", 32, {"img_size": 32})],
                         ids=["test_resnet", "test_vit"])
def test_compiled_timm_model_matches_eager(name, res, kw):
    """Small inputs: under the interpreter every conv of the model runs as numpy tile loops."""
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = taps_fast.convert(timm.create_model(name, pretrained=False, num_classes=3, **kw)).to(DEV)
    for i, (_, layer) in enumerate(taps_fast.taps_layers(model)):
        with torch.no_grad():
            layer.delta.normal_(0, 0.02)
            layer.score.fill_(0.15 if i % 3 else 0.05)
    model.eval()
    x = torch.randn(2, 3, res, res, device=DEV)
    with dispatch.use_backend("reference"):
        want = model(x)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    got = compiled(x)
    eager = model(x)
    assert_rel_close(eager, want.double(), torch.float16 if CUDA else torch.float32, "triton eager")
    assert torch.allclose(got, eager, rtol=1e-5, atol=1e-5)
    compiled(x).sum().backward()  # the backward traces too


@pytest.mark.parametrize("layer", ["linear", "conv"])
def test_empty_batch(layer):
    """A zero-row batch launches nothing and gives zero gradients (the grid would be empty)."""
    torch.manual_seed(0)
    if layer == "linear":
        m, x = taps_fast.TAPSLinear(5, 3).to(DEV), torch.randn(0, 5, device=DEV, requires_grad=True)
    else:
        m, x = taps_fast.TAPSConv2d(3, 4, 3).to(DEV), torch.randn(0, 3, 6, 6, device=DEV, requires_grad=True)
    y = m(x)
    y.sum().backward()
    assert y.shape[0] == 0 and float(m.score.grad) == 0 and torch.count_nonzero(m.delta.grad) == 0


def test_autocast_matches_reference_under_autocast():
    """Under torch.autocast the op casts as autocast casts F.linear / F.conv2d; the Triton kernels
    then see fp16 inputs and must match the reference path under the same autocast."""
    torch.manual_seed(0)
    lin = taps_fast.TAPSLinear(17, 9).to(DEV)
    conv = taps_fast.TAPSConv2d(3, 5, 3, padding=1).to(DEV)
    for m in (lin, conv):
        with torch.no_grad():
            m.delta.normal_(0, 0.1)
    xs = (torch.randn(6, 17, device=DEV), torch.randn(2, 3, 7, 7, device=DEV))
    dt = torch.float16
    for m, x in zip((lin, conv), xs):
        with torch.autocast(DEV.type, dtype=dt):
            got = m(x)
            with dispatch.use_backend("reference"):
                want = m(x)
        assert got.dtype == want.dtype == dt
        assert_rel_close(got, want.double(), dt, f"autocast {type(m).__name__}")


def test_cpu_default_stays_reference():
    """Under the interpreter the triton backend serves CPU tensors only when forced."""
    with dispatch.use_backend(None):
        be = dispatch.select("linear_fwd", device=torch.device("cpu"), dtype=torch.float32)
        assert be.name == "reference"
        why = dispatch.reasons("linear_fwd", device=torch.device("cpu"), dtype=torch.float32)["triton"]
        assert why is not None and ("forced" in why or "TRITON_INTERPRET" in why)


@pytest.mark.parametrize("meta, words", [
    (dict(dtype=torch.float64), "float64"),
    (dict(dtype=torch.float32, groups=2), "groups=2"),
    (dict(dtype=torch.float32, numel=2**31), "int32"),
])
def test_forced_triton_says_why_not(meta, words):
    with pytest.raises(dispatch.NoBackendError) as e:
        dispatch.select("conv2d_fwd", device=DEV, **meta)
    assert "triton" in str(e.value) and words in str(e.value) and "reference: ok" in str(e.value)


@pytest.mark.skipif(CUDA, reason="the interpreter's bf16 (CPU tensors)")
def test_bf16_refused_under_an_interpreter_that_gets_it_wrong(monkeypatch):
    """A stock interpreter fails kernels/_probe.py (bf16 tl.dot on the bit patterns): then bf16
    is refused with the reason (tests/conftest.py's patched interpreter passes it)."""
    from taps_fast.ops import triton_backend

    monkeypatch.setattr(triton_backend, "_interpreter_bf16_ok", lambda: False)
    why = triton_backend.why_not("conv2d_fwd", device=DEV, dtype=torch.bfloat16, forced=True)
    assert why is not None and "bfloat16" in why and "tl.dot" in why, why
    monkeypatch.undo()
    assert triton_backend.why_not("conv2d_fwd", device=DEV, dtype=torch.bfloat16, forced=True) is None


def test_grouped_conv_falls_back_when_not_forced():
    t = taps_fast.TAPSConv2d(4, 4, 3, groups=2, padding=1).to(DEV)
    x = torch.randn(1, 4, 5, 5, device=DEV)
    with dispatch.use_backend(None):
        y = t(x)
    assert y.shape == (1, 4, 5, 5)
