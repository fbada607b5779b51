"""The precision contract (docs/precision.md): where each backend forms W + g·ΔW, in which dtype,
and so when a merged model's outputs equal the TAPS model's bit for bit and when only within
helpers.RTOL.

The contract, as the tests read it from the backend the dispatcher picks for a call:
- "reference" forms W + ΔW in memory in the layer dtype, then runs F.linear / F.conv2d: the very
  computation of the merged model, so the outputs are equal bit for bit.
- "cpp" (CPU, M <= 32 rows), "cuda" (M <= 16) and "triton" form W + ΔW in registers, rounded to
  the layer dtype (the rounding merge makes), and sum in their own order. One formation on every
  backend: an output does not jump where the dispatcher switches backends (32/33 rows on the CPU,
  16/17 on a GPU).
- The paths that are not bit for bit agree with the merged model within RTOL of |y| on ordinary
  data, and within RTOL of Σ_k |x_k|·|W + ΔW|_k on any data (outputs that cancel included).

The fp16 / bf16 formation tests use data on which the two formations disagree by far more than
RTOL: ΔW is a quarter of an ulp of W, so W + ΔW rounded to the layer dtype is W itself, and x is
built so that x·W cancels exactly while x·ΔW does not. A kernel that rounded W + ΔW to the layer
dtype loses x·ΔW entirely; one that kept it in fp32 would keep it.
"""
import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from taps_fast import (MultiTaskModel, _ext, convert, dispatch, merge, taps_linear, taps_mt_conv2d,
                       taps_mt_linear, use_backend)
from taps_fast.ops import triton_backend
from taps_fast.ops.ext_backend import CPP_MAX_ROWS

from helpers import RTOL, assert_rel_close, assert_scaled_close, rel_err

# Where each backend forms W + g·ΔW (docs/precision.md, the contract table): every one rounds it
# to the layer dtype, as merge does.
LAYER_DTYPE = {"reference", "triton", "cpp", "cuda"}
HAS_EXT = _ext.load()[0] is not None

ROWS = [1, 16, 32, 33, 64]
DEVICES = ["cpu", pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA device")])]
K, N = 96, 40


def backend(op, device, dtype, rows):
    return dispatch.select(op, device=torch.device(device), dtype=dtype, rows=rows, numel=rows * K).name


def gated_linear(dtype, device, open_gate=True, k=K, n=N, seed=0):
    """A TAPSLinear with a random W, b and ΔW (drawn in fp64, then cast)."""
    torch.manual_seed(seed)
    layer = convert(nn.Linear(k, n, dtype=torch.float64))
    with torch.no_grad():
        layer.delta.normal_(0, 0.05)
        layer.score.fill_(0.5 if open_gate else 0.0)
    return layer.to(device=device, dtype=dtype)


# --------------------------------------------------------------------------- dispatch limits
def test_documented_row_limits():
    """docs/precision.md names the row counts up to which the compiled kernels serve."""
    if dispatch.forced_backend() is not None:
        pytest.skip(f"backend {dispatch.forced_backend()!r} is forced")
    assert CPP_MAX_ROWS == 32, "docs/precision.md and README.md say 32 rows: update them with the limit"
    for op in ("linear_fwd", "mt_linear_fwd"):
        assert backend(op, "cpu", torch.float32, 33) == "reference"
        assert backend(op, "cpu", torch.float32, 32) == ("cpp" if HAS_EXT else "reference")


# --------------------------------------------------------------------------- merged vs unmerged
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("open_gate", [True, False], ids=["open", "closed"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("M", ROWS)
def test_merged_vs_unmerged_linear(M, dtype, open_gate, device):
    layer = gated_linear(dtype, device, open_gate)
    plain = merge(layer)
    assert type(plain) is nn.Linear
    w_eff = layer.weight + layer.delta if open_gate else layer.weight
    assert torch.equal(plain.weight, w_eff), "merge folds W + ΔW in the layer dtype"
    x = torch.randn(M, K, dtype=torch.float64).to(device=device, dtype=dtype)
    with torch.no_grad():
        y, ym = layer(x), plain(x)
    be = backend("linear_fwd", device, dtype, M)
    if be == "reference":
        assert torch.equal(y, ym), f"{be}: the merged model's own computation, bit for bit"
    else:
        assert_rel_close(y, ym, dtype, f"{be}, M={M}: unmerged vs merged")


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("batch", [1, 4])
def test_merged_vs_unmerged_conv(dtype, batch):
    """No compiled conv kernel on the CPU: the reference path serves every batch, bit for bit."""
    torch.manual_seed(0)
    layer = convert(nn.Conv2d(6, 8, 3, padding=1, dtype=torch.float64))
    with torch.no_grad():
        layer.delta.normal_(0, 0.05)
    layer = layer.to(dtype)
    plain = merge(layer)
    x = torch.randn(batch, 6, 7, 7, dtype=torch.float64).to(dtype)
    with torch.no_grad():
        assert torch.equal(layer(x), plain(x))


def test_cpp_rows_do_not_depend_on_the_batch():
    """The cpp kernel computes each row alone (same operations whatever M and the other rows)."""
    if backend("linear_fwd", "cpu", torch.float32, CPP_MAX_ROWS) != "cpp":
        pytest.skip("the cpp backend does not serve here (no compiled extension, or a forced backend)")
    layer = gated_linear(torch.float32, "cpu")
    x = torch.randn(CPP_MAX_ROWS, K)
    with torch.no_grad():
        y = layer(x)
        for m in (0, 5, CPP_MAX_ROWS - 1):
            assert torch.equal(layer(x[m:m + 1]), y[m:m + 1]), m


def test_autocast_within_bound():
    """Under autocast the op rounds W and ΔW to bf16 separately; merge rounds their fp32 sum."""
    layer = gated_linear(torch.float32, "cpu")
    plain = merge(layer)
    for M in (8, 64):
        x = torch.randn(M, K)
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            y, ym = layer(x), plain(x)
        assert y.dtype == ym.dtype == torch.bfloat16
        assert_rel_close(y, ym, torch.bfloat16, f"autocast, M={M}")


# --------------------------------------------------------------------------- fp32 formation
def cancelling(dtype, device, rows, k=256, n=24, seed=0):
    """(x, W, ΔW, b) in `dtype` on which x·(W + ΔW) and x·round(W + ΔW) differ by far more than
    RTOL: W[:, 2j] = W[:, 2j+1] = w in (1, 2 - eps], ΔW[:, 2j] = -ΔW[:, 2j+1] = eps/4 (a quarter
    ulp of w: W ± ΔW rounds back to W), x[:, 2j] = -x[:, 2j+1] = a. Then x·W = 0 exactly and
    x·ΔW = (eps/2)·Σ_j a_j. Every product a·(w ± eps/4) is exact in fp32."""
    g = torch.Generator().manual_seed(seed)
    eps = torch.finfo(dtype).eps
    steps = round(1 / eps)
    w = 1 + eps * torch.randint(1, steps - 1, (n, k // 2), generator=g, dtype=torch.float64)
    a = 0.5 + (eps / 2) * torch.randint(0, steps, (rows, k // 2), generator=g, dtype=torch.float64)
    W = torch.stack([w, w], -1).reshape(n, k)
    D = torch.stack([torch.full_like(w, eps / 4), torch.full_like(w, -eps / 4)], -1).reshape(n, k)
    x = torch.stack([a, -a], -1).reshape(rows, k)
    b = (torch.rand(n, generator=g, dtype=torch.float64) * 2 - 1).to(dtype).double()
    out = [t.to(device=device, dtype=dtype) for t in (x, W, D, b)]
    assert all(torch.equal(t.double().cpu(), s) for t, s in zip(out, (x, W, D, b))), "not exact in dtype"
    return out


def oracles(x, W, D, b):
    """(exact, rounded): x·(W + ΔW)ᵀ + b in fp64 with W + ΔW formed exactly, and with W + ΔW
    rounded to the layer dtype first (as merge and the reference path form it)."""
    rounded_w = W + D
    assert torch.equal(rounded_w, W), "the data must make W + ΔW round back to W"
    exact = F.linear(x.double(), W.double() + D.double(), b.double())
    rounded = F.linear(x.double(), rounded_w.double(), b.double())
    dtype = x.dtype
    assert rel_err(exact, rounded) > 4 * RTOL[dtype], "the data do not separate the two formations"
    return exact, rounded


def assert_formed(y, exact, rounded, where, dtype, what):
    """y computed as `where` says ("acc": W + ΔW kept in fp32; "layer": rounded to the layer dtype;
    "linearity": x·W + x·ΔW, W + ΔW never formed): close to that oracle and far from the other."""
    want, other = (rounded, exact) if where == "layer" else (exact, rounded)
    how = {"acc": "W + ΔW formed in fp32", "layer": f"W + ΔW formed in {dtype}",
           "linearity": "x·W + x·ΔW (W + ΔW never formed)"}[where]
    assert_rel_close(y, want, dtype, f"{what}: {how}")
    assert rel_err(y, other) > RTOL[dtype], f"{what}: also within RTOL of the other formation"


def formation(be):
    assert be in LAYER_DTYPE, be
    return "layer"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("M", ROWS)
def test_where_w_plus_delta_is_formed(M, dtype, device):
    """Single-task linear: every backend, and merge, round W + ΔW to the layer dtype."""
    x, W, D, b = cancelling(dtype, device, M)
    exact, rounded = oracles(x, W, D, b)
    layer = convert(nn.Linear(W.shape[1], W.shape[0], device=device, dtype=dtype))
    with torch.no_grad():
        layer.weight.copy_(W), layer.bias.copy_(b), layer.delta.copy_(D), layer.score.fill_(0.5)
    plain = merge(layer)
    with torch.no_grad():
        y, ym = layer(x), plain(x)
    be = backend("linear_fwd", device, dtype, M)
    assert_formed(y, exact, rounded, formation(be), dtype, f"{be}, M={M}")
    if device == "cpu":  # (on a GPU the merged product follows cuBLAS's fp16 reduction settings)
        assert_formed(ym, exact, rounded, "layer", dtype, "merged")
    # What does hold between the two whatever the data: per output, the difference is within RTOL
    # of Σ_k |x_k|·|W + ΔW|_k (the size of what was summed), not of |y|, which cancels here.
    scale = x.double().abs() @ (W.double() + D.double()).abs().t()
    assert_scaled_close(y.cpu(), ym.cpu().double(), scale.cpu(), dtype, f"{be} vs merged, scaled")


BOUNDARY = [pytest.param("cpu", CPP_MAX_ROWS, id="cpu-cpp-to-reference"),
            pytest.param("cuda", 16, id="cuda-cuda-to-triton", marks=[pytest.mark.gpu, pytest.mark.skipif(
                not torch.cuda.is_available(), reason="needs a CUDA device")])]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("device,limit", BOUNDARY)
def test_no_jump_at_the_row_limit(device, limit, dtype):
    """The same rows computed in a call of `limit` rows (the compiled kernel) and of limit + 1
    rows (the next backend) agree within RTOL, on data where forming W + ΔW in fp32 instead of
    the layer dtype moves every output by far more than RTOL."""
    if device == "cpu" and not HAS_EXT:
        pytest.skip("taps_fast._C is not built: the reference path serves both sides")
    x, W, D, b = cancelling(dtype, device, limit + 1)
    score = torch.tensor(0.5, device=device)
    sides = {}
    for rows in (limit, limit + 1):
        sides[rows] = backend("linear_fwd", device, dtype, rows)
        with torch.no_grad():
            y = taps_linear(x[:rows], W, D, score, b, 0.1)
        sides[rows] = (sides[rows], y[:limit])
    (be_a, y_a), (be_b, y_b) = sides[limit], sides[limit + 1]
    assert be_a != be_b, f"{limit} and {limit + 1} rows are served by the same backend ({be_a})"
    assert_rel_close(y_b, y_a.double(), dtype, f"{be_a} at {limit} rows vs {be_b} at {limit + 1}")


def test_triton_forms_in_layer_dtype():
    """The Triton kernels add W and ΔW in the layer dtype (here under the interpreter on the CPU,
    or on a GPU)."""
    if torch.cuda.is_available() and not triton_backend._interpret():
        device = "cuda"
    elif triton_backend._interpret():
        device = "cpu"
    else:
        pytest.skip("no GPU and TRITON_INTERPRET is not set")
    if triton_backend.available() is not None:
        pytest.skip(triton_backend.available())
    x, W, D, b = cancelling(torch.float16, device, 16)
    exact, rounded = oracles(x, W, D, b)
    with torch.no_grad(), use_backend("triton"):
        y = taps_linear(x, W, D, torch.tensor(0.5, device=device), b, 0.1)
    assert_formed(y, exact, rounded, "layer", torch.float16, "triton")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("layout", ["sorted", "interleaved"])
@pytest.mark.parametrize("M", [16, 32, 33, 64])
def test_mixed_batch_formation(M, layout, dtype):
    """taps_mt_linear on the CPU: cpp (M <= 32) rounds W + ΔW_t to the layer dtype; the reference path forms
    W + ΔW_t in the layer dtype when each weight's rows are one run (a batch sorted by task),
    bit for bit the merged task model on those rows, and otherwise adds x·ΔW_t to x·W
    (linearity: W + ΔW_t is never formed, so the data here give the exact result)."""
    x, W, D, b = cancelling(dtype, "cpu", M)
    exact, rounded = oracles(x, W, D, b)
    ids = torch.arange(M) % 2  # task 0 open, task 1 has no delta on this layer (W only)
    if layout == "sorted":
        ids = torch.sort(ids).values
    slot, scores, thr = torch.tensor([0, -1]), torch.tensor([0.5, 0.5]), torch.tensor([0.1, 0.1])
    with torch.no_grad():
        y = taps_mt_linear(x, ids, W, D.unsqueeze(0), slot, scores, thr, b)
    be = backend("mt_linear_fwd", "cpu", dtype, M)
    rows = ids == 0
    if be == "cpp":
        where = "layer"
    elif layout == "sorted":
        where = "layer"
        assert torch.equal(y[rows], F.linear(x[rows], W + D, b)), "sorted batch: the merged model's product"
    else:
        where = "linearity"  # x·ΔW_t is kept whole here (x·W cancels exactly)
    assert_formed(y[rows], exact[rows], rounded[rows], where, dtype, f"{be}, {layout}, M={M}")
    assert_rel_close(y[~rows], rounded[~rows], dtype, "rows without a delta")


# --------------------------------------------------------------------------- MultiTaskModel
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_multitask_model_serving_path(dtype):
    """MultiTaskModel on the CPU (task-pure chunks of cpu_chunk = 8 samples): a chunk with an open
    gate runs the cpp kernel when it has <= 32 rows (W + ΔW rounded to the layer dtype in
    registers), else F.linear on W + ΔW formed in the layer dtype in memory: bit for bit the merged task model on the same chunk. Base rows
    run F.linear on W: bit for bit the base model."""
    half = dtype in (torch.float16, torch.bfloat16)
    many = 5  # tokens per sample: 8 samples x 1 token = 8 rows (cpp), x 5 = 40 rows (F.linear)
    if half:  # data that separate the two formations (see cancelling)
        x_all, W, D, b = cancelling(dtype, "cpu", 8 * many)
        exact, rounded = oracles(x_all, W, D, b)
    else:
        ref = gated_linear(dtype, "cpu")
        W, D, b = ref.weight.detach(), ref.delta.detach(), ref.bias.detach()
        x_all = torch.randn(8 * many, K, dtype=dtype)
    plain = nn.Linear(W.shape[1], W.shape[0], dtype=dtype)
    with torch.no_grad():
        plain.weight.copy_(W), plain.bias.copy_(b)
    task = convert(nn.Sequential(copy.deepcopy(plain)), head=None)
    with torch.no_grad():
        task[0].delta.copy_(D), task[0].score.fill_(0.5)
    mt = MultiTaskModel(nn.Sequential(copy.deepcopy(plain)), head=None).eval()
    assert mt.cpu_chunk == 8
    mt.add_task("a", task)
    merged = merge(task)
    for tokens in (1, many):
        x = x_all.reshape(8, many, -1)[:, :tokens].contiguous()
        with torch.no_grad():
            y, y_base, ym = mt(x, [0] * 8), mt(x, [-1] * 8), merged(x)
        assert torch.equal(y_base, plain(x)), "base rows: the base model, bit for bit"
        be = backend("linear_fwd", "cpu", dtype, 8 * tokens)
        what = f"MultiTaskModel, {8 * tokens} rows ({be})"
        if be == "reference":
            assert torch.equal(y, ym), f"{what}: the merged model's computation, bit for bit"
        elif not half:  # (in half precision these data separate the two on purpose)
            assert_rel_close(y, ym, dtype, what)
        if half:
            pick = (slice(None), slice(0, tokens))
            ex, ro = exact.reshape(8, many, -1)[pick], rounded.reshape(8, many, -1)[pick]
            assert_formed(y, ex, ro, formation(be), dtype, what)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_mixed_batch_conv_by_linearity(dtype):
    """taps_mt_conv2d's reference path adds conv(x_t, ΔW_t) to conv(x, W) + b (linearity): within
    RTOL of the merged task model, not its computation."""
    torch.manual_seed(0)
    W = torch.randn(8, 6, 3, 3, dtype=torch.float64).to(dtype)
    D = (0.05 * torch.randn(2, 8, 6, 3, 3, dtype=torch.float64)).to(dtype)
    b = torch.randn(8, dtype=torch.float64).to(dtype)
    x = torch.randn(5, 6, 7, 7, dtype=torch.float64).to(dtype)
    ids = torch.tensor([0, -1, 1, 0, 1])
    with torch.no_grad():
        y = taps_mt_conv2d(x, ids, W, D, torch.tensor([0, 1]), torch.tensor([0.5, 0.5]),
                           torch.tensor([0.1, 0.1]), b, 1, 1)
    for i, t in enumerate(ids.tolist()):
        w = W if t < 0 else W + D[t]
        assert_rel_close(y[i:i + 1], F.conv2d(x[i:i + 1], w, b, 1, 1), dtype, f"sample {i} (task {t})")
