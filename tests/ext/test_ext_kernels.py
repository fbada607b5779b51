"""The compiled kernels (csrc/): torch.ops.taps_fast.small_linear and small_mt_linear against a
float64 reference in plain torch, on odd shapes, gates open and closed, every output NaN-poisoned
before the call (taps_fast._C._set_poison_outputs), for each kernel copy: the CPU's AVX2 copy, its
portable DEFAULT copy (forced with TAPS_FAST_CPU_CAPABILITY=default) and, on a GPU, the CUDA one.
The relative error bounds are helpers.RTOL's."""
import itertools

import pytest
import torch

from taps_fast import _ext

from helpers import RTOL

if _ext.load()[0] is None:
    pytest.skip(f"the compiled extension is not loaded: {_ext.load()[1]}", allow_module_level=True)

ops = torch.ops.taps_fast
HAS_CUDA_PART = bool(_ext.build_info().get("cuda"))


@pytest.fixture(params=["cpu-avx2", "cpu-default",
                        pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(
                            not torch.cuda.is_available() or not HAS_CUDA_PART,
                            reason="needs a CUDA device and the extension's CUDA part")])])
def dev(request, monkeypatch):
    """The device the kernels run on (and, on the CPU, which kernel copy)."""
    if request.param == "cpu-default":
        monkeypatch.setenv("TAPS_FAST_CPU_CAPABILITY", "default")
    else:
        monkeypatch.delenv("TAPS_FAST_CPU_CAPABILITY", raising=False)
    return torch.device("cuda" if request.param == "cuda" else "cpu")


@pytest.fixture(autouse=True)
def _poisoned_outputs():
    _ext.load()[0]._set_poison_outputs(True)
    yield
    _ext.load()[0]._set_poison_outputs(False)


ALL_DTYPES = [torch.float64, torch.float32, torch.float16, torch.bfloat16]
DTYPES = pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)


def skip_unsupported(dev, dtype):
    if dev.type == "cuda" and dtype == torch.float64:
        pytest.skip("float64 is CPU-only (the CUDA kernels refuse it: tested below)")


def assert_close(y, ref, dtype):
    assert y.dtype == dtype and y.shape == ref.shape and y.is_contiguous()
    if ref.numel() == 0:
        return
    y = y.cpu()
    assert not y.isnan().any(), "NaN in the output: an element the kernel did not write (outputs are poisoned)"
    scale = max(ref.abs().max().item(), 1e-30)
    err = (y.double() - ref).abs().max().item()
    assert err <= RTOL[dtype] * scale, f"max error {err:.3g} > {RTOL[dtype]:.0e} x {scale:.3g}"


def make(M, N, K, dtype, dev, S=1, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(M, K, generator=g).to(dev, dtype)
    w = torch.randn(N, K, generator=g).to(dev, dtype)
    d = torch.randn(S, N, K, generator=g).to(dev, dtype)
    b = torch.randn(N, generator=g).to(dev, dtype)
    return x, w, d, b


def ref_single(x, w, d, b, is_open):
    weff = w.double().cpu() + (d.double().cpu() if is_open else 0)
    y = x.double().cpu() @ weff.T
    return y + b.double().cpu() if b is not None else y


def ref_mt(x, tasks, w, deltas, slot, scores, thr, b):
    x, w, deltas = x.double().cpu(), w.double().cpu(), deltas.double().cpu()
    tasks, slot, scores, thr = tasks.cpu(), slot.cpu(), scores.cpu(), thr.cpu()
    y = torch.empty(x.shape[0], w.shape[0], dtype=torch.float64)
    for m, t in enumerate(tasks.tolist()):
        weff = w
        poison = 0.0
        if t >= 0:
            s, th = float(scores[t]), float(thr[t])
            poison = (s - s) + (th - th)
            if slot[t] >= 0 and s >= th:
                weff = weff + deltas[slot[t]]
        y[m] = x[m] @ weff.T + poison
    return y + b.double().cpu() if b is not None else y


# ---------------------------------------------------------------------------------- small_linear
SHAPES = [(M, N, K) for M, N, K in itertools.product([0, 1, 3, 16, 17], [0, 1, 7, 33],
                                                     [0, 1, 5, 9, 31, 130])]


@DTYPES
def test_small_linear_shapes(dtype, dev):
    skip_unsupported(dev, dtype)
    for i, (M, N, K) in enumerate(SHAPES):
        x, w, d, b = make(M, N, K, dtype, dev, seed=i)
        for is_open, with_bias in itertools.product([True, False], [True, False]):
            bias = b if with_bias else None
            score = torch.tensor(0.5 if is_open else 0.05, device=dev)
            y = ops.small_linear(x, w, d[0], score, bias, 0.1)
            assert_close(y, ref_single(x, w, d[0], bias, is_open), dtype)


@DTYPES
@pytest.mark.parametrize("M,N,K", [(1, 768, 768), (16, 64, 3072), (5, 131, 1000), (4, 300, 3080)])
def test_small_linear_layer_sizes(dtype, M, N, K, dev):
    skip_unsupported(dev, dtype)
    x, w, d, b = make(M, N, K, dtype, dev)
    y = ops.small_linear(x, w, d[0], torch.tensor(0.2, device=dev), b, 0.1)
    assert_close(y, ref_single(x, w, d[0], b, True), dtype)


def test_small_linear_unaligned_views(dev):
    """Rows whose start is not 16-byte aligned (a view at an odd offset): the vector loads must
    not assume alignment."""
    x, w, d, b = make(3, 9, 131, torch.float16, dev)
    big = torch.randn(9 * 131 + 1, device=dev, dtype=torch.float16)
    w_off = big[1:].view(9, 131).copy_(w)
    y = ops.small_linear(x, w_off, d[0], torch.tensor(0.5, device=dev), b, 0.1)
    assert_close(y, ref_single(x, w, d[0], b, True), torch.float16)


def test_small_linear_k0_gives_bias(dev):
    x, w, d, b = make(3, 5, 0, torch.float32, dev)
    one = torch.tensor(1.0, device=dev)
    assert torch.equal(ops.small_linear(x, w, d[0], one, b, 0.1), b.expand(3, 5))
    assert torch.equal(ops.small_linear(x, w, d[0], one, None, 0.1), torch.zeros(3, 5, device=dev))


@DTYPES
def test_small_linear_gate_at_threshold_and_score_dtypes(dtype, dev):
    skip_unsupported(dev, dtype)
    x, w, d, b = make(4, 9, 37, dtype, dev)
    for sdt in [torch.float32, torch.float64, torch.float16, torch.bfloat16]:
        y = ops.small_linear(x, w, d[0], torch.tensor(0.25, dtype=sdt, device=dev), b, 0.25)  # s >= τ: open
        assert_close(y, ref_single(x, w, d[0], b, True), dtype)


@DTYPES
def test_small_linear_closed_never_reads_delta(dtype, dev):
    skip_unsupported(dev, dtype)
    x, w, d, b = make(3, 17, 45, dtype, dev)
    nan_delta = torch.full_like(d[0], float("nan"))
    y = ops.small_linear(x, w, nan_delta, torch.tensor(0.0, device=dev), b, 0.1)
    assert_close(y, ref_single(x, w, d[0], b, False), dtype)


def test_small_linear_nan_score_poisons(dev):
    """A NaN score or threshold makes the output NaN (never a silently closed gate); infinities
    compare as torch compares them: an infinite score is open, an infinite threshold closed."""
    x, w, d, b = make(3, 7, 9, torch.float32, dev)
    y = ops.small_linear(x, w, d[0], torch.tensor(float("nan"), device=dev), b, 0.1)
    assert y.isnan().all()
    y = ops.small_linear(x, w, d[0], torch.tensor(0.5, device=dev), b, float("nan"))
    assert y.isnan().all()
    y = ops.small_linear(x, w, d[0], torch.tensor(float("inf"), device=dev), b, 0.1)
    assert_close(y, ref_single(x, w, d[0], b, True), torch.float32)
    y = ops.small_linear(x, w, d[0], torch.tensor(0.5, device=dev), b, float("inf"))
    assert_close(y, ref_single(x, w, d[0], b, False), torch.float32)


@pytest.mark.parametrize("sdt", [torch.float16, torch.bfloat16, torch.float32], ids=str)
def test_small_linear_threshold_rounds_to_the_score_dtype(sdt, dev):
    """torch compares `score >= threshold` in the score's dtype: a score equal to the threshold
    rounded to that dtype is open even when the rounding went down."""
    x, w, d, b = make(2, 5, 8, torch.float32, dev)
    tau = 0.100300001  # rounds down in fp16, bf16 and fp32
    s = torch.tensor(tau, dtype=sdt)
    assert float(s) < tau and bool(s >= tau)  # torch: open
    y = ops.small_linear(x, w, d[0], s.to(dev), b, tau)
    assert_close(y, ref_single(x, w, d[0], b, True), torch.float32)


# ------------------------------------------------------------------------------- small_mt_linear
def mt_inputs(M, N, K, dtype, dev, T, S, seed=0, tasks=None, slot=None):
    x, w, deltas, b = make(M, N, K, dtype, dev, S=S, seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    if tasks is None:
        tasks = torch.randint(-1, T, (M,), generator=g)
    if slot is None:
        slot = torch.randint(-1, S, (T,), generator=g) if S > 0 else torch.full((T,), -1)
    scores = torch.rand(T, generator=g)
    thr = torch.full((T,), 0.3)
    return x, tasks.to(dev), w, deltas, slot.to(dev), scores.to(dev), thr.to(dev), b


@DTYPES
@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64], ids=str)
def test_mt_shapes(dtype, index_dtype, dev):
    skip_unsupported(dev, dtype)
    for i, (M, N, K) in enumerate(SHAPES):
        for T, S in [(1, 1), (3, 2), (6, 4)]:
            x, tasks, w, deltas, slot, scores, thr, b = mt_inputs(M, N, K, dtype, dev, T, S, seed=i)
            for bias in [b, None]:
                y = ops.small_mt_linear(x, tasks.to(index_dtype), w, deltas, slot.to(index_dtype),
                                        scores, thr, bias)
                assert_close(y, ref_mt(x, tasks, w, deltas, slot, scores, thr, bias), dtype)


@DTYPES
def test_mt_interleaved_repeated_base_and_slotless(dtype, dev):
    skip_unsupported(dev, dtype)
    M, N, K, T, S = 16, 33, 130, 5, 3
    tasks = torch.tensor([0, 1, -1, 0, 2, 3, 1, 0, -1, 4, 2, 0, 3, 1, 0, 4])
    slot = torch.tensor([2, 0, -1, 1, 0])  # task 2 has no delta; tasks 1 and 4 share slot 0
    x, tasks, w, deltas, slot, scores, thr, b = mt_inputs(M, N, K, dtype, dev, T, S, tasks=tasks, slot=slot)
    scores = torch.tensor([0.5, 0.9, 0.7, 0.1, 0.3], device=dev)  # task 3 closed, task 4 exactly at τ (open)
    y = ops.small_mt_linear(x, tasks, w, deltas, slot, scores, thr, b)
    assert_close(y, ref_mt(x, tasks, w, deltas, slot, scores, thr, b), dtype)


@DTYPES
@pytest.mark.parametrize("M,N,K", [(16, 96, 768), (4, 300, 3080), (1, 257, 1032)])
def test_mt_layer_size(dtype, M, N, K, dev):
    skip_unsupported(dev, dtype)
    T = S = 8
    x, tasks, w, deltas, slot, scores, thr, b = mt_inputs(
        M, N, K, dtype, dev, T, S, tasks=torch.arange(M) % T, slot=torch.arange(T))
    scores = torch.full((T,), 0.5, device=dev)
    y = ops.small_mt_linear(x, tasks, w, deltas, slot, scores, thr, b)
    assert_close(y, ref_mt(x, tasks, w, deltas, slot, scores, thr, b), dtype)


@DTYPES
def test_mt_closed_and_base_never_read_delta(dtype, dev):
    skip_unsupported(dev, dtype)
    M, N, K, T, S = 7, 19, 41, 3, 3
    tasks = torch.tensor([0, -1, 1, 2, 0, -1, 2])
    slot = torch.tensor([0, 1, 2])
    x, tasks, w, deltas, slot, scores, thr, b = mt_inputs(M, N, K, dtype, dev, T, S, tasks=tasks, slot=slot)
    scores = torch.tensor([0.9, 0.0, 0.9], device=dev)  # task 1 closed: its delta (slot 1) is all NaN
    deltas[1] = float("nan")
    y = ops.small_mt_linear(x, tasks, w, deltas, slot, scores, thr, b)
    ref = ref_mt(x, tasks, w, torch.nan_to_num(deltas), slot, scores, thr, b)
    assert_close(y, ref, dtype)


def test_mt_unused_slot_never_read(dev):
    """A delta that no row's task opens is never read (NaN there does not show)."""
    x, tasks, w, deltas, slot, scores, thr, b = mt_inputs(
        4, 8, 20, torch.float32, dev, 2, 3, tasks=torch.tensor([0, -1, 0, 0]), slot=torch.tensor([0, 2]))
    scores = torch.tensor([0.9, 0.9], device=dev)
    deltas[1:] = float("nan")
    y = ops.small_mt_linear(x, tasks, w, deltas, slot, scores, thr, b)
    assert not y.isnan().any()


def test_mt_nan_score_poisons_only_its_rows(dev):
    M, N, K, T, S = 6, 11, 23, 3, 3
    tasks = torch.tensor([0, 1, 2, -1, 1, 0])
    x, tasks, w, deltas, slot, scores, thr, b = mt_inputs(
        M, N, K, torch.float32, dev, T, S, tasks=tasks, slot=torch.tensor([0, 1, -1]))
    nan = float("nan")
    for bad_scores, bad_thr, bad_task in [
        (torch.tensor([0.9, nan, 0.9]), thr, 1),
        (torch.tensor([0.9, 0.9, nan]), thr, 2),  # slot -1: poisoned all the same
        (torch.tensor([0.9, 0.9, 0.9]), torch.tensor([nan, 0.3, 0.3]), 0),
    ]:
        bad_scores, bad_thr = bad_scores.to(dev), bad_thr.to(dev)
        y = ops.small_mt_linear(x, tasks, w, deltas, slot, bad_scores, bad_thr, b).cpu()
        bad_rows = (tasks == bad_task).cpu()
        assert y[bad_rows].isnan().all()
        ref = ref_mt(x, tasks, w, deltas, slot, bad_scores, bad_thr, b)
        assert_close(y[~bad_rows].contiguous(), ref[~bad_rows], torch.float32)


def test_mt_score_dtypes(dev):
    x, tasks, w, deltas, slot, scores, thr, b = mt_inputs(5, 9, 17, torch.float32, dev, 3, 2)
    for sdt in [torch.float64, torch.float16, torch.bfloat16]:
        s, t = scores.to(sdt), thr.to(sdt)
        y = ops.small_mt_linear(x, tasks, w, deltas, slot, s, t, b)
        assert_close(y, ref_mt(x, tasks, w, deltas, slot, s.float(), t.float(), b), torch.float32)


@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64], ids=str)
def test_mt_bad_task_id(index_dtype, dev):
    """CPU: an error naming the row and the id. CUDA (no host sync): that row is NaN."""
    x, tasks, w, deltas, slot, scores, thr, b = mt_inputs(4, 5, 6, torch.float32, dev, 3, 2)
    for bad in [3, -2, 100]:
        t = torch.tensor([0, 1, bad, -1], dtype=index_dtype, device=dev)
        if dev.type == "cpu":
            with pytest.raises(RuntimeError, match=rf"task_ids\[2\] = {bad}\b"):
                ops.small_mt_linear(x, t, w, deltas, slot.to(index_dtype), scores, thr, b)
        else:
            y = ops.small_mt_linear(x, t, w, deltas, slot.to(index_dtype), scores, thr, b).cpu()
            assert y[2].isnan().all() and not y[[0, 1, 3]].isnan().any()


@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64], ids=str)
def test_mt_bad_slot(index_dtype, dev):
    x, tasks, w, deltas, slot, scores, thr, b = mt_inputs(4, 5, 6, torch.float32, dev, 3, 2)
    t = torch.tensor([0, 1, 2, -1], dtype=index_dtype, device=dev)
    for bad in [2, -2, 50]:
        s = torch.tensor([0, bad, 1], dtype=index_dtype, device=dev)
        if dev.type == "cpu":
            with pytest.raises(RuntimeError, match=rf"slot\[1\] = {bad}\b"):
                ops.small_mt_linear(x, t, w, deltas, s, scores, thr, b)
        else:
            y = ops.small_mt_linear(x, t, w, deltas, s, scores, thr, b).cpu()
            assert y[1].isnan().all() and not y[[0, 2, 3]].isnan().any()


def test_mt_empty_batch_and_no_deltas(dev):
    x, tasks, w, deltas, slot, scores, thr, b = mt_inputs(0, 5, 6, torch.float32, dev, 2, 0)
    y = ops.small_mt_linear(x, tasks[:0], w, deltas, slot, scores, thr, b)
    assert y.shape == (0, 5)
    x, tasks, w, deltas, slot, scores, thr, b = mt_inputs(
        3, 5, 6, torch.float32, dev, 2, 0, tasks=torch.tensor([0, -1, 1]))
    y = ops.small_mt_linear(x, tasks, w, deltas, slot, scores, thr, b)
    assert_close(y, ref_mt(x, tasks, w, deltas, slot, scores, thr, b), torch.float32)


def test_mt_matches_single(dev):
    x, w, d, b = make(5, 40, 77, torch.float32, dev)
    s = torch.tensor(0.5, device=dev)
    y1 = ops.small_linear(x, w, d[0], s, b, 0.1)
    y2 = ops.small_mt_linear(x, torch.zeros(5, dtype=torch.long, device=dev), w, d,
                             torch.tensor([0], device=dev), s.reshape(1), torch.tensor([0.1], device=dev), b)
    assert_close(y2, ref_single(x, w, d[0], b, True), torch.float32)
    if dev.type == "cpu":  # one kernel serves both ops there: bit for bit
        assert torch.equal(y1, y2)


# ------------------------------------------------------------------------------- bad input
def test_bad_input_names_the_problem():
    x, w, d, b = make(3, 5, 7, torch.float32, torch.device("cpu"))
    s = torch.tensor(0.5)
    cases = [
        ((x, w, d[0][:, :6], s, b, 0.1), "delta has shape"),
        ((x.double(), w, d[0], s, b, 0.1), "dtype mismatch"),
        ((x[:, :6], w, d[0], s, b, 0.1), "K=6 columns"),
        ((x, w, d[0], s.reshape(1), b, 0.1), "score must be a 0-dim"),
        ((x, w, d[0], s, b[:4], 0.1), "bias has shape"),
        ((x.t(), w[:, :3], d[0][:, :3], s, b, 0.1), "contiguous"),
        ((x.int(), w.int(), d[0].int(), s, None, 0.1), "x must be float32"),
    ]
    for args, msg in cases:
        with pytest.raises(RuntimeError, match=msg):
            ops.small_linear(*args)
    ids, slot, sc, th = torch.tensor([0, 1, -1]), torch.tensor([0, -1]), torch.tensor([0.5, 0.5]), torch.tensor([0.1, 0.1])
    mt = [
        ((x, ids[:2], w, d, slot, sc, th, b), "one task id per row"),
        ((x, ids.float(), w, d, slot, sc, th, b), "task_ids must be int32 or int64"),
        ((x, ids, w, d[0], slot, sc, th, b), "deltas must be"),
        ((x, ids, w, d, slot[:1], sc, th, b), "slot has 1 entries but scores has T=2"),
        ((x, ids, w, d, slot, sc, th.double(), b), "thresholds must be"),
    ]
    for args, msg in mt:
        with pytest.raises(RuntimeError, match=msg):
            ops.small_mt_linear(*args)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or not HAS_CUDA_PART, reason="needs a CUDA device")
def test_cuda_refuses_float64_and_mixed_devices():
    x, w, d, b = make(3, 5, 7, torch.float64, torch.device("cuda"))
    with pytest.raises(RuntimeError, match="float64"):
        ops.small_linear(x, w, d[0], torch.tensor(0.5, device="cuda"), b, 0.1)
    with pytest.raises(RuntimeError, match="device mismatch"):
        ops.small_linear(x.float(), w.float(), d[0].float(), torch.tensor(0.5), b.float(), 0.1)
