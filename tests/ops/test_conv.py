"""TAPSConv2d: every nn.Conv2d option, layouts, gradients against the autograd formula."""
import itertools

import pytest
import torch
import torch.nn as nn

from taps_fast import TAPSConv2d, taps_conv2d, taps_conv2d_ref
from helpers import assert_rel_close

D = torch.float64

# (in, out, kernel, stride, padding, dilation, groups)
GEOMS = [
    (4, 6, 3, 1, 1, 1, 1),
    (4, 6, 1, 1, 0, 1, 1),
    (3, 5, 7, 2, 3, 1, 1),
    (4, 6, (3, 2), (2, 1), (1, 2), (2, 1), 2),
    (6, 6, 3, 1, 1, 1, 6),        # depthwise
    (4, 8, 3, 1, 2, 2, 4),
    (4, 6, (2, 4), 1, "same", 1, 1),   # even kernel: asymmetric 'same'
    (4, 6, 3, 1, "same", 2, 2),
    (4, 6, 3, 1, "valid", 1, 1),
    (4, 6, 3, 2, "same", 1, 1),   # rejected by nn.Conv2d: strided 'same'
]
MODES = ["zeros", "reflect", "replicate", "circular"]


def _cases():
    for geom, mode, bias in itertools.product(GEOMS, MODES, [True, False]):
        yield pytest.param(geom, mode, bias, id=f"{geom}-{mode}-{'b' if bias else 'nob'}")


def _pair(conv_kwargs):
    """An nn.Conv2d and a TAPSConv2d built with the same arguments, or None if nn.Conv2d refuses."""
    try:
        ref = nn.Conv2d(**conv_kwargs, dtype=D)
    except (ValueError, RuntimeError) as e:
        with pytest.raises(type(e)):
            TAPSConv2d(**conv_kwargs, dtype=D)
        return None
    return ref


@pytest.mark.parametrize("geom,mode,bias", list(_cases()))
def test_conv_options_forward_and_grads(geom, mode, bias):
    cin, cout, k, s, p, d, g = geom
    kw = dict(in_channels=cin, out_channels=cout, kernel_size=k, stride=s, padding=p, dilation=d,
              groups=g, bias=bias, padding_mode=mode)
    torch.manual_seed(0)
    ref = _pair(kw)
    if ref is None:
        return
    t = TAPSConv2d.from_module(ref)
    x = torch.randn(2, cin, 11, 10, dtype=D)
    assert torch.equal(t(x), ref(x)), "zero delta must reproduce nn.Conv2d exactly"

    with torch.no_grad():
        t.delta.normal_()
    for score in (0.2, 0.05):
        with torch.no_grad():
            t.score.fill_(score)
        gate = float(score >= 0.1)
        hand = nn.Conv2d(**kw, dtype=D)
        with torch.no_grad():
            hand.weight.copy_(ref.weight + gate * t.delta)
            if bias:
                hand.bias.copy_(ref.bias)
        for xin in (x, x.contiguous(memory_format=torch.channels_last),
                    torch.randn(2, cin, 22, 10, dtype=D)[:, :, ::2]):  # non-contiguous
            xa = xin.clone().requires_grad_(True)
            xb = xin.clone().requires_grad_(True)
            t.zero_grad()
            y = t(xa)
            assert torch.allclose(y, hand(xb), rtol=1e-12, atol=1e-12)
            dy = torch.randn_like(y)
            y.backward(dy)
            hand.zero_grad()
            hand(xb).backward(dy)
            G = hand.weight.grad
            assert torch.allclose(xa.grad, xb.grad, rtol=1e-10, atol=1e-12)
            assert torch.allclose(t.delta.grad, gate * G, rtol=1e-10, atol=1e-12)
            assert torch.allclose(t.score.grad, (G * t.delta).sum(), rtol=1e-9, atol=1e-12)
            if bias:
                assert torch.allclose(t.bias.grad, hand.bias.grad, rtol=1e-10, atol=1e-12)
            assert t.weight.grad is None


def test_channels_last_layout_kept():
    t = TAPSConv2d(4, 6, 3, padding=1)
    x = torch.randn(2, 4, 8, 8).contiguous(memory_format=torch.channels_last).requires_grad_(True)
    y = t(x)
    assert y.is_contiguous(memory_format=torch.channels_last)
    y.sum().backward()
    assert x.grad.is_contiguous(memory_format=torch.channels_last)


def test_unbatched_input():
    ref = nn.Conv2d(3, 4, 3, padding=1)
    t = TAPSConv2d.from_module(ref)
    x = torch.randn(3, 9, 9)
    assert torch.equal(t(x), ref(x))


@pytest.mark.parametrize("score", [0.15, 0.05], ids=["open", "closed"])
@pytest.mark.parametrize("groups", [1, 3])
def test_gradcheck(score, groups):
    torch.manual_seed(0)
    t = TAPSConv2d(6, 9, 3, stride=2, padding=1, dilation=1, groups=groups, dtype=D, init_score=score)
    with torch.no_grad():
        t.delta.normal_()
    x = torch.randn(2, 6, 7, 6, dtype=D, requires_grad=True)

    def f(x, delta, bias):
        return taps_conv2d(x, t.weight, delta, t.score, bias, 2, 1, 1, groups, 0.1)

    assert torch.autograd.gradcheck(f, (x, t.delta, t.bias))


@pytest.mark.parametrize("groups", [1, 2])
def test_closed_score_grad_blocked(monkeypatch, groups):
    import taps_fast.ops.conv as conv
    monkeypatch.setattr(conv, "DS_BLOCK_ELEMS", 20)
    torch.manual_seed(0)
    t = TAPSConv2d(4, 6, 3, padding=1, groups=groups, dtype=D, init_score=0.0)
    with torch.no_grad():
        t.delta.normal_()
    x = torch.randn(2, 4, 5, 5, dtype=D)
    y = t(x)
    dy = torch.randn_like(y)
    y.backward(dy)
    w = t.weight.detach().clone().requires_grad_(True)
    torch.nn.functional.conv2d(x, w, t.bias, 1, 1, 1, groups).backward(dy)
    assert torch.allclose(t.score.grad, (w.grad * t.delta).sum(), rtol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("score", [0.15, 0.05], ids=["open", "closed"])
@pytest.mark.parametrize("k,stride,dil,pad", [(1, 1, 1, 0), (3, 1, 1, 1), (7, 2, 1, 3), (3, 1, 2, "same")])
def test_matches_float64_oracle(dtype, score, k, stride, dil, pad):
    torch.manual_seed(2)
    cin, cout = 5, 7
    w = torch.randn(cout, cin, k, k, dtype=D) / (cin * k * k) ** 0.5
    d = torch.randn_like(w) / (cin * k * k) ** 0.5
    b, x = torch.randn(cout, dtype=D), torch.randn(2, cin, 13, 11, dtype=D)
    s = torch.tensor(score, dtype=D)
    a64 = [t.clone().requires_grad_(True) for t in (x, d, s, b)]
    y64 = taps_conv2d_ref(a64[0], w, a64[1], a64[2], a64[3], stride, pad, dil, 1, 0.1)
    dy = torch.randn_like(y64)
    y64.backward(dy)
    a = [t.to(dtype).requires_grad_(True) for t in (x, d, s, b)]
    y = taps_conv2d(a[0], w.to(dtype), a[1], a[2], a[3], stride, pad, dil, 1, 0.1)
    y.backward(dy.to(dtype))
    assert y.dtype == dtype
    assert_rel_close(y, y64, dtype, "y")
    for name, ai, ei in zip(("dx", "ddelta", "dscore", "dbias"), a, a64):
        if name == "ddelta" and score < 0.1:
            assert torch.count_nonzero(ai.grad) == 0
            continue
        assert_rel_close(ai.grad, ei.grad, dtype, name)


def test_opcheck():
    torch.manual_seed(0)
    t = TAPSConv2d(4, 6, 3, stride=2, padding=1, dtype=D)
    with torch.no_grad():
        t.delta.normal_()
    for x in (torch.randn(2, 4, 7, 7, dtype=D),
              torch.randn(2, 4, 7, 7, dtype=D).contiguous(memory_format=torch.channels_last)):
        x.requires_grad_(True)
        for score in (0.15, 0.05):
            s = torch.tensor(score, dtype=D, requires_grad=True)
            torch.library.opcheck(torch.ops.taps_fast.conv2d.default,
                                  (x, t.weight, t.delta, s, t.bias, [2, 2], [1, 1], [1, 1], 1, 0.1))


def test_compile_fullgraph_no_graph_break():
    t = TAPSConv2d(4, 6, 3, padding="same")
    x = torch.randn(2, 4, 8, 8)
    f = torch.compile(lambda x: t(x).square().sum(), fullgraph=True, backend="aot_eager")
    f(x).backward()
    assert t.delta.grad is not None and t.score.grad is not None


def test_module_api():
    t = TAPSConv2d(4, 8, 3, groups=4, bias=False, padding_mode="reflect", padding=1, threshold=0.3)
    assert isinstance(t, nn.Conv2d) and t.bias is None and t.groups == 4
    assert t.delta.shape == t.weight.shape == (8, 1, 3, 3) and t.threshold == 0.3
    assert not t.is_open  # 0.15 < 0.3
    assert "padding_mode=reflect" in repr(t) and "closed" in repr(t)
