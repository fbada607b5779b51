"""TAPSLinear / taps_linear: the four gradient rules, gradcheck, dtypes, ops registration."""
import pytest
import torch
import torch.nn as nn

import taps_fast
from taps_fast import TAPSLinear, taps_linear, taps_linear_ref
from helpers import RTOL, assert_rel_close

D = torch.float64


def make(n_in=7, n_out=5, bias=True, score=0.15, dtype=D, seed=0):
    torch.manual_seed(seed)
    m = TAPSLinear(n_in, n_out, bias=bias, dtype=dtype, init_score=score)
    with torch.no_grad():
        m.delta.normal_()
    return m


@pytest.mark.parametrize("score", [0.15, 0.1, 0.05], ids=["open", "at_threshold", "closed"])
@pytest.mark.parametrize("bias", [True, False])
def test_gradcheck(score, bias):
    m = make(bias=bias, score=score)
    x = torch.randn(3, 4, 7, dtype=D, requires_grad=True)
    # The score is excluded: its gradient is the straight-through estimate, not a derivative
    # (the gate is a step, so finite differences see zero); it is checked by hand below.
    params = [x, m.delta] + ([m.bias] if bias else [])

    def f(x, delta, *b):
        return taps_linear(x, m.weight, delta, m.score, b[0] if b else None, m.threshold)

    assert m.is_open == (score >= 0.1)
    assert torch.autograd.gradcheck(f, params)


@pytest.mark.parametrize("score", [0.15, 0.05], ids=["open", "closed"])
def test_gradient_rules_by_hand(score):
    m = make(score=score)
    x = torch.randn(6, 7, dtype=D)
    dy = torch.randn(6, 5, dtype=D)
    xr = x.clone().requires_grad_(True)
    m(xr).backward(dy)
    g = 1.0 if score >= 0.1 else 0.0
    w_eff = m.weight + g * m.delta
    G = dy.t() @ x
    assert torch.allclose(xr.grad, dy @ w_eff, rtol=0, atol=1e-12)                 # dx = dy·W_eff
    assert torch.allclose(m.delta.grad, g * G, rtol=0, atol=1e-12)                 # dΔW = I(s)·G
    assert torch.allclose(m.score.grad, (G * m.delta).sum(), rtol=1e-12, atol=0)   # ds = <G, ΔW>
    assert m.score.grad.abs() > 0
    assert torch.allclose(m.bias.grad, dy.sum(0), rtol=0, atol=1e-12)              # db = Σ dy
    assert m.weight.grad is None and not m.weight.requires_grad                    # W frozen
    if g == 0:
        assert torch.count_nonzero(m.delta.grad) == 0


def test_closed_score_grad_blocked(monkeypatch):
    """The closed-gate ds reduction goes by blocks of G; force many small blocks."""
    import taps_fast.ops.linear as lin
    monkeypatch.setattr(lin, "DS_BLOCK_ELEMS", 8)
    m = make(n_in=7, n_out=13, score=0.0)
    x = torch.randn(5, 7, dtype=D)
    dy = torch.randn(5, 13, dtype=D)
    m(x).backward(dy)
    assert torch.allclose(m.score.grad, ((dy.t() @ x) * m.delta).sum(), rtol=1e-12, atol=0)


def test_unfrozen_weight_gets_full_gradient():
    m = make()
    m.weight.requires_grad_(True)
    x, dy = torch.randn(4, 7, dtype=D), torch.randn(4, 5, dtype=D)
    m(x).backward(dy)
    assert torch.allclose(m.weight.grad, dy.t() @ x)
    assert torch.allclose(m.delta.grad, dy.t() @ x)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("score", [0.15, 0.05], ids=["open", "closed"])
@pytest.mark.parametrize("shape", [(1, 17, 1), (17, 64, 129), (3, 5, 129, 17)], ids=str)
def test_matches_float64_oracle(dtype, score, shape):
    *lead, k, n = shape
    torch.manual_seed(1)
    w, d = torch.randn(n, k, dtype=D) / k**0.5, torch.randn(n, k, dtype=D) / k**0.5
    b, x, dy = torch.randn(n, dtype=D), torch.randn(*lead, k, dtype=D), torch.randn(*lead, n, dtype=D)
    s = torch.tensor(score, dtype=D)
    args64 = [t.clone().requires_grad_(True) for t in (x, d, s, b)]
    y64 = taps_linear_ref(args64[0], w, args64[1], args64[2], args64[3], 0.1)
    y64.backward(dy)
    args = [t.to(dtype).requires_grad_(True) for t in (x, d, s, b)]
    y = taps_linear(args[0], w.to(dtype), args[1], args[2], args[3], 0.1)
    y.backward(dy.to(dtype))
    assert y.dtype == dtype
    assert_rel_close(y, y64, dtype, "y")
    for name, a, e in zip(("dx", "ddelta", "dscore", "dbias"), args, args64):
        if name == "ddelta" and score < 0.1:
            assert torch.count_nonzero(a.grad) == 0
            continue
        assert_rel_close(a.grad, e.grad, dtype, name)


def test_zero_delta_matches_nn_linear_exactly():
    """Bit for bit on the reference path (W + 0 then F.linear: the same GEMM); on the default
    path few rows go to the compiled GEMV kernel ("cpp"), which sums in another order: equal
    within the fp32 bound there."""
    torch.manual_seed(0)
    lin = nn.Linear(33, 17)
    t = TAPSLinear.from_module(lin)
    assert t.weight is lin.weight and t.bias is lin.bias  # reused, not copied
    for x in (torch.randn(17, 33), torch.randn(2, 3, 33), torch.randn(33), torch.randn(4, 66)[:, ::2]):
        with taps_fast.use_backend("reference"):
            assert torch.equal(t(x), lin(x))
        assert_rel_close(t(x), lin(x).double(), torch.float32, "default path")


def test_module_api():
    m = TAPSLinear(4, 3, bias=False, dtype=torch.float64, threshold=0.2, init_score=0.3)
    assert isinstance(m, nn.Linear) and m.bias is None
    assert m.delta.shape == m.weight.shape and torch.count_nonzero(m.delta) == 0
    assert m.score.dim() == 0 and m.score.dtype == torch.float64 and m.threshold == 0.2
    assert m.is_open and not m.weight.requires_grad
    with torch.no_grad():
        m.score.fill_(0.19)
    assert not m.is_open
    assert "threshold=0.2" in repr(m) and "closed" in repr(m)
    d = TAPSLinear(4, 3)
    assert d.threshold == 0.1 and abs(float(d.score.detach()) - 0.15) < 1e-7 and d.is_open


def test_opcheck():
    m = make()
    x = torch.randn(3, 7, dtype=D, requires_grad=True)
    for score in (0.15, 0.05):
        s = torch.tensor(score, dtype=D, requires_grad=True)
        torch.library.opcheck(torch.ops.taps_fast.linear.default, (x, m.weight, m.delta, s, m.bias, 0.1))
        torch.library.opcheck(torch.ops.taps_fast.linear.default, (x, m.weight, m.delta, s, None, 0.1))


def test_compile_fullgraph_no_graph_break():
    m = make(dtype=torch.float32)
    x = torch.randn(4, 7)
    f = torch.compile(lambda x: m(x).square().sum(), fullgraph=True, backend="aot_eager")
    f(x).backward()
    g_delta, g_score = m.delta.grad.clone(), m.score.grad.clone()
    m.zero_grad()
    m(x).square().sum().backward()
    assert torch.allclose(g_delta, m.delta.grad) and torch.allclose(g_score, m.score.grad)


def test_autocast_cpu_bf16():
    m = make(dtype=torch.float32)
    x = torch.randn(4, 7)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = m(x)
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert m.delta.grad.dtype == torch.float32 and m.score.grad is not None
    assert_rel_close(y.float(), m(x).detach(), torch.bfloat16, "autocast y")


def test_tolerances_defined_for_every_dtype():
    assert set(RTOL) == {torch.float64, torch.float32, torch.float16, torch.bfloat16}


@pytest.mark.parametrize("backend", ["reference", "cpp", "triton"])
def test_inplace_op_on_output(backend):
    """nn.ReLU(inplace=True) right after the layer. Backends that reshape their 2-D result used
    to return a view made inside the custom op, which autograd refuses to modify in place (and
    which FSDP2 warns about): the output must not be a view, and the gradients must be those of
    the out-of-place formula."""
    m = make(dtype=torch.float32)
    x = torch.randn(2, 3, 7)  # 6 rows: within the "cpp" backend's few-row range
    with taps_fast.use_backend(backend):
        try:
            y = m(x)
        except taps_fast.NoBackendError as e:
            pytest.skip(f"backend {backend!r} cannot serve here: {e}")
        assert not y._is_view()
        nn.ReLU(inplace=True)(y)
    y.sum().backward()  # by the default backends: "cpp" has forward kernels only
    d, s = m.delta.detach().clone().requires_grad_(), m.score.detach().clone().requires_grad_()
    taps_linear_ref(x, m.weight, d, s, m.bias, m.threshold).relu().sum().backward()
    assert_rel_close(m.delta.grad, d.grad, torch.float32, "dΔW")
    assert_rel_close(m.score.grad, s.grad, torch.float32, "ds")
