"""The eager paths around the ops (taps_fast/ops/_common.py, dispatch.py): the cached backend
choice, the one-read gate, the fast input check, and the eager autograd.Function against the
custom op it stands in for."""
import os

import pytest
import torch
import torch.nn.functional as F

import taps_fast
from taps_fast import dispatch
from taps_fast.modules import TAPSConv2d, TAPSLinear
from taps_fast.ops import _common, conv, linear
from helpers import tf32_allowed
from taps_fast.ops._common import AUTOGRAD, CUSTOM_OP, DIRECT, FORMULA, common_ok, eager_path, gate_is_open

D = torch.float64


# ----------------------------------------------------------------------------- the cached choice
def _metas():
    cpu = torch.device("cpu")
    for dtype in (torch.float32, torch.float64, torch.float16, torch.bfloat16):
        for rows in (1, 16, 32, 33, 4096):
            yield "linear_fwd", dict(device=cpu, dtype=dtype, rows=rows, numel=rows * 64)
            yield "mt_linear_fwd", dict(device=cpu, dtype=dtype, rows=rows, numel=rows * 64)
        yield "conv2d_fwd", dict(device=cpu, dtype=dtype, groups=1, numel=10)
        yield "conv2d_bwd", dict(device=cpu, dtype=dtype, groups=4, numel=10)


def test_cached_choice_is_the_uncached_one():
    for op, meta in _metas():
        first = dispatch.select(op, **meta)
        assert first is dispatch._select(op, meta), (op, meta)
        assert dispatch.select(op, **meta) is first  # served from the cache


def test_forcing_a_backend_takes_effect_at_the_next_call(monkeypatch):
    meta = dict(device=torch.device("cpu"), dtype=torch.float32, rows=1, numel=64)
    auto = dispatch.select("linear_fwd", **meta).name
    with dispatch.use_backend("reference"):
        assert dispatch.select("linear_fwd", **meta).name == "reference"
    assert dispatch.select("linear_fwd", **meta).name == auto
    monkeypatch.setenv("TAPS_FAST_BACKEND", "reference")
    assert dispatch.select("linear_fwd", **meta).name == "reference"
    monkeypatch.setenv("TAPS_FAST_BACKEND", "nope")
    with pytest.raises(dispatch.NoBackendError, match="unknown taps_fast backend 'nope'"):
        dispatch.select("linear_fwd", **meta)
    monkeypatch.delenv("TAPS_FAST_BACKEND")
    assert dispatch.select("linear_fwd", **meta).name == auto


def test_environment_reader_sees_every_change(monkeypatch):
    read = dispatch._env_reader("TAPS_FAST_TEST_VARIABLE")
    monkeypatch.delenv("TAPS_FAST_TEST_VARIABLE", raising=False)
    assert read() is None
    monkeypatch.setenv("TAPS_FAST_TEST_VARIABLE", "a")
    assert read() == "a"
    os.environ["TAPS_FAST_TEST_VARIABLE"] = "b"
    assert read() == "b"
    monkeypatch.delenv("TAPS_FAST_TEST_VARIABLE")
    assert read() is None


def test_registry_and_torch_flags_invalidate_the_choice():
    """A backend whose answer depends on the TF32 flag (as the Triton backend's does for fp32 on
    CUDA), forced: flipping the flag changes the answer at once; unregistering drops it."""
    probe = dispatch.Backend(
        "probe", kernels={"linear_fwd": None},
        why_not=lambda op, **m: None if torch.backends.cuda.matmul.allow_tf32 else "TF32 is off")
    dispatch.register_backend(probe)
    cuda = dict(device=torch.device("cuda"), dtype=torch.float32, rows=100, numel=6400)
    try:
        with dispatch.use_backend("probe"):
            with tf32_allowed(True):
                assert dispatch.select("linear_fwd", **cuda) is probe
            with tf32_allowed(False):
                with pytest.raises(dispatch.NoBackendError, match="probe: TF32 is off"):
                    dispatch.select("linear_fwd", **cuda)
            with tf32_allowed(True):
                assert dispatch.select("linear_fwd", **cuda) is probe
    finally:
        dispatch.unregister_backend("probe")
    assert "probe" not in dispatch.backend_names()
    with pytest.raises(dispatch.NoBackendError, match="unknown taps_fast backend 'probe'"):
        with dispatch.use_backend("probe"):
            pass


# ----------------------------------------------------------------------------- the gate
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
@pytest.mark.parametrize("tau", [0.1, 0.0, -0.3, 1e-8, 0.15, 1e5])
def test_gate_is_the_comparison_torch_makes(dtype, tau):
    """One host read, compared in the score's dtype: the same answer as ``score >= τ`` at τ and at
    the neighbouring representable scores (a float16 score of 0.1 is 0.0999755859375)."""
    t = torch.tensor(tau, dtype=dtype)
    for s in (t, torch.nextafter(t, torch.tensor(-float("inf"), dtype=dtype)),
              torch.nextafter(t, torch.tensor(float("inf"), dtype=dtype)), torch.tensor(0.1, dtype=dtype)):
        assert gate_is_open(s, tau, "test") == bool(s >= tau), (dtype, tau, float(s))
    with pytest.raises(ValueError, match="score is NaN"):
        gate_is_open(torch.tensor(float("nan"), dtype=dtype), tau, "test")


# ----------------------------------------------------------------------------- the input check
def test_fast_check_accepts_only_what_every_check_accepts():
    x, w = torch.randn(3, 4), torch.randn(5, 4)
    d, s, b = torch.zeros(5, 4), torch.tensor(0.2), torch.zeros(5)
    assert common_ok(x, w, d, s, b, 0.1) and common_ok(x, w, d, s, None, 1)
    bad = {
        "x not a tensor": (x.numpy(), w, d, s, b, 0.1),
        "weight not a tensor": (x, w.numpy(), d, s, b, 0.1),
        "delta not a tensor": (x, w, [1.0], s, b, 0.1),
        "score not a tensor": (x, w, d, 0.2, b, 0.1),
        "bias not a tensor": (x, w, d, s, 3, 0.1),
        "threshold NaN": (x, w, d, s, b, float("nan")),
        "threshold bool": (x, w, d, s, b, True),
        "threshold str": (x, w, d, s, b, "0.1"),
        "delta shape": (x, w, d[:1], s, b, 0.1),
        "delta dtype": (x, w, d.double(), s, b, 0.1),
        "bias dtype": (x, w, d, s, b.half(), 0.1),
        "x integer": (x.long(), w.long(), d.long(), s, None, 0.1),
        "score integer": (x, w, d, torch.tensor(1), b, 0.1),
        "score not 0-dim": (x, w, d, s.reshape(1), b, 0.1),
        "score on meta": (x, w, d, s.to("meta"), b, 0.1),
        "bias on meta": (x, w, d, s, b.to("meta"), 0.1),
    }
    for what, args in bad.items():
        assert not common_ok(*args), what


# ----------------------------------------------------------------------------- the paths
def test_each_call_takes_its_path():
    x, w = torch.randn(2, 3), torch.randn(4, 3)
    assert eager_path(x, w, None) == DIRECT
    assert eager_path(x.requires_grad_(), w, None) == AUTOGRAD
    with torch.no_grad():
        assert eager_path(x, w, None) == DIRECT
    seen = []
    torch.func.grad(lambda t: (seen.append(eager_path(t, w)), t.sum())[1])(torch.randn(3))
    torch.vmap(lambda t: (seen.append(eager_path(t, w)), t)[1])(torch.randn(2, 3))
    assert seen == [FORMULA, FORMULA]
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        assert eager_path(torch.empty(2, 3), torch.empty(4, 3)) == CUSTOM_OP


def _layers(score):
    torch.manual_seed(0)
    lin = TAPSLinear(7, 5, dtype=D)
    cv = TAPSConv2d(3, 4, 3, padding=1, dtype=D)
    for m in (lin, cv):
        with torch.no_grad():
            m.delta.normal_()
            m.score.fill_(score)
    return {"linear": (lin, torch.randn(2, 3, 7, dtype=D)), "conv": (cv, torch.randn(2, 3, 6, 5, dtype=D))}


def _custom_op(kind, m, x):
    if kind == "linear":
        return linear._linear_op(x, m.weight, m.delta, m.score, m.bias, m.threshold)
    return conv._conv2d_op(x, m.weight, m.delta, m.score, m.bias, list(m.stride), list(m.padding),
                           list(m.dilation), m.groups, m.threshold)


def _graph_nodes(y) -> set:
    """The names of every node of y's autograd graph."""
    seen, todo = set(), [y.grad_fn]
    while todo:
        node = todo.pop()
        if node is None or type(node).__name__ in seen:
            continue
        seen.add(type(node).__name__)
        todo += [n for n, _ in node.next_functions]
    return seen


EAGER_NODES = {"GatedWeightBackward", "_LinearFunctionBackward", "_Conv2dFunctionBackward"}


@pytest.mark.parametrize("score", [0.15, 0.05], ids=["open", "closed"])
@pytest.mark.parametrize("kind", ["linear", "conv"])
@pytest.mark.parametrize("backend", [None, "reference"])
@pytest.mark.parametrize("block", ["whole", "blocked"])
def test_eager_autograd_path_is_the_custom_op(kind, score, backend, block, monkeypatch):
    """The eager training path gives the custom op's outputs and gradients (x, ΔW, s, b) to fp64
    rounding, with the automatic choice and on the reference backend: F.linear / F.conv2d's own
    autograd on W_eff (GatedWeight), or, for a closed layer larger than one block of the blocked
    ds ("blocked": DS_BLOCK_ELEMS made smaller than the layer), the autograd.Function around the
    layer's kernels. Neither runs the custom op."""
    if block == "blocked":
        monkeypatch.setattr(linear, "DS_BLOCK_ELEMS", 8)
        monkeypatch.setattr(conv, "DS_BLOCK_ELEMS", 8)
    m, x = _layers(score)[kind]
    x.requires_grad_(True)
    composed = block == "whole" or score > m.threshold
    with dispatch.use_backend(backend):
        got = {}
        for name, fn in (("eager", lambda: m(x)), ("op", lambda: _custom_op(kind, m, x))):
            y = fn()
            nodes = _graph_nodes(y)
            if name == "op":
                assert not nodes & EAGER_NODES, nodes
            else:
                assert ("GatedWeightBackward" in nodes) == composed, nodes
                assert nodes & EAGER_NODES, nodes
            dy = torch.linspace(-1, 1, y.numel(), dtype=D).reshape(y.shape)
            grads = torch.autograd.grad(y, (x, m.delta, m.score, m.bias), dy)
            got[name] = (y,) + grads
    for a, b in zip(got["eager"], got["op"]):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_gated_weight_gives_the_taps_gradients_and_a_second_order():
    """GatedWeight alone: dΔW = g·G, ds = ⟨G, ΔW⟩ (in the score's dtype), dW = G only when W
    needs it (and not the same tensor as dΔW); create_graph=True differentiates ds again."""
    from taps_fast.ops._common import GatedWeight

    g = torch.Generator().manual_seed(0)
    w = torch.randn(4, 3, dtype=D, generator=g)
    d = torch.randn(4, 3, dtype=D, generator=g, requires_grad=True)
    G = torch.randn(4, 3, dtype=D, generator=g)
    for is_open in (True, False):
        s = torch.tensor(0.15 if is_open else 0.05, dtype=torch.float32, requires_grad=True)
        wr = w.clone().requires_grad_(True)
        w_eff = GatedWeight.apply(wr, d, s, is_open)
        assert torch.equal(w_eff, w + d if is_open else w)
        dw, dd, ds = torch.autograd.grad(w_eff, (wr, d, s), G)
        assert torch.equal(dw, G) and torch.equal(dd, G if is_open else torch.zeros_like(G))
        assert dd.data_ptr() != dw.data_ptr()
        assert ds.dtype == torch.float32 and torch.allclose(ds.double(), (G * d).sum(), rtol=1e-6)
    s = torch.tensor(0.15, dtype=D, requires_grad=True)
    (ds,) = torch.autograd.grad(GatedWeight.apply(w, d, s, True), (s,), G, create_graph=True)
    (dds_dd,) = torch.autograd.grad(ds, (d,))
    assert torch.equal(dds_dd, G)


@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_a_closed_layer_holds_no_weight_sized_tensor_for_the_backward(kind):
    """What the eager path keeps for the backward on the reference backend: an open layer W + ΔW
    (a W-sized tensor, saved by F.linear / F.conv2d's own autograd, as the authors' style keeps
    it), a closed one nothing beyond its inputs (W itself, as a view)."""
    for score, extra in ((0.15, 1), (0.05, 0)):
        m, x = _layers(score)[kind]
        x.requires_grad_(True)
        inputs = {t.untyped_storage().data_ptr() for t in (x, m.weight, m.delta, m.score)}
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t), \
                dispatch.use_backend("reference"):
            m(x)
        new = {t.untyped_storage().data_ptr() for t in saved} - inputs
        assert len(new) == extra, (score, len(new))
        if extra:
            w_eff = next(t for t in saved if t.untyped_storage().data_ptr() in new)
            want = m.weight + m.delta  # F.linear's autograd keeps it as W_effᵀ, a view
            assert torch.equal(w_eff if w_eff.shape == want.shape else w_eff.t(), want)


@pytest.mark.parametrize("score", [0.15, 0.05], ids=["open", "closed"])
@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_torch_func_transforms_run_the_formula(kind, score):
    """torch.func.grad and vmap compose with the layers (through the *_ref formula): the same
    gradients as autograd on the eager path, and vmap over samples equals the batched call."""
    m, x = _layers(score)[kind]
    params = {"delta": m.delta.detach(), "score": m.score.detach()}

    def loss(p):
        return torch.func.functional_call(m, p, (x,)).square().sum()

    got = torch.func.grad(loss)(params)
    want = torch.autograd.grad(loss({"delta": m.delta, "score": m.score}), (m.delta, m.score))
    torch.testing.assert_close(got["delta"], want[0], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(got["score"], want[1], rtol=1e-12, atol=1e-12)
    if score < m.threshold:
        assert not got["delta"].any()  # closed: dΔW = 0, ds still flows
    assert got["score"] != 0
    with torch.no_grad():
        torch.testing.assert_close(torch.func.vmap(m)(x.unsqueeze(1)).squeeze(1), m(x), rtol=1e-12, atol=1e-12)


def test_closed_ds_forms_agree():
    """ds of a closed gate as ⟨dy, x·ΔWᵀ⟩ (few rows) and by blocks of G (many rows) agree."""
    torch.manual_seed(0)
    dy, x, d = torch.randn(9, 13, dtype=D), torch.randn(9, 7, dtype=D), torch.randn(13, 7, dtype=D)
    want = ((dy.t() @ x) * d).sum()
    assert torch.allclose(linear.linear_closed_ds(dy, x, d), want, rtol=1e-12, atol=0)
    old = linear.DS_BLOCK_ELEMS
    try:
        linear.DS_BLOCK_ELEMS = 8  # 9 x 13 > 8: the blocked form, in blocks of one row of G
        assert torch.allclose(linear.linear_closed_ds(dy, x, d), want, rtol=1e-12, atol=0)
    finally:
        linear.DS_BLOCK_ELEMS = old


def test_layout_helpers_match_torch():
    for shape in [(1, 16, 8, 8), (2, 3, 1, 1), (0, 3, 4, 5), (1, 1, 1, 1), (5,), (3, 0, 2), ()]:
        formats = [torch.contiguous_format] + ([torch.channels_last] if len(shape) == 4 else [])
        for fmt in formats:
            ref = torch.empty(shape, memory_format=fmt)
            assert _common.dense_strides(shape, fmt) == ref.stride()
            assert _common._empty_like_strides(ref) == torch.empty_like(ref, device="meta").stride()
    odd = torch.empty(4, 6)[:, ::2]  # neither format: torch decides
    assert _common._empty_like_strides(odd) == torch.empty_like(odd, device="meta").stride()


def test_functional_api_still_plain_without_delta():
    x, w, b = torch.randn(2, 3), torch.randn(4, 3), torch.randn(4)
    assert torch.equal(taps_fast.taps_linear(x, w, None, torch.tensor(0.0), b), F.linear(x, w, b))


# ----------------------------------------------------------------------------- TAPS_FAST_DISABLE
def test_disabled_backends_are_skipped_and_named(monkeypatch):
    """TAPS_FAST_DISABLE=cpp: a few-row CPU linear goes to the next backend (reference) at the next
    call, with the same values; every backend disabled: the error names the variable; a forced
    backend that is also disabled cannot serve; an unknown name is refused."""
    meta = dict(device=torch.device("cpu"), dtype=torch.float32, rows=1, numel=64)
    auto = dispatch.select("linear_fwd", **meta).name
    m, x = TAPSLinear(8, 4), torch.randn(1, 8)
    with torch.no_grad():
        m.delta.normal_()
    y_auto = m(x)
    monkeypatch.setenv("TAPS_FAST_DISABLE", f" {auto} ,")
    assert dispatch.select("linear_fwd", **meta).name != auto
    assert dispatch.reasons("linear_fwd", **meta)[auto] == "disabled by TAPS_FAST_DISABLE"
    torch.testing.assert_close(m(x), y_auto, rtol=1e-5, atol=1e-6)
    monkeypatch.setenv("TAPS_FAST_DISABLE", ",".join(dispatch.backend_names()))
    with pytest.raises(dispatch.NoBackendError, match="reference: disabled by TAPS_FAST_DISABLE"):
        m(x)
    monkeypatch.setenv("TAPS_FAST_DISABLE", "reference")
    with dispatch.use_backend("reference"), pytest.raises(dispatch.NoBackendError, match="disabled"):
        m(x)
    monkeypatch.setenv("TAPS_FAST_DISABLE", "cpp,nope")
    with pytest.raises(dispatch.NoBackendError, match="unknown taps_fast backend.*'nope' in TAPS_FAST_DISABLE"):
        dispatch.select("conv2d_fwd", device=torch.device("cpu"), dtype=torch.float64, groups=1, numel=1)
    monkeypatch.delenv("TAPS_FAST_DISABLE")
    assert dispatch.select("linear_fwd", **meta).name == auto
