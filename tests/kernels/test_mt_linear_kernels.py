"""The multi-task gated linear kernels (kernels/mt_linear.py) against a float64 oracle.

Without a GPU this runs under TRITON_INTERPRET=1 (tests/conftest.py): small odd shapes whose tiles
are partial, fp32, fp16 and bf16 (tests/interpreter_bf16.py). Every buffer the
launchers allocate is NaN-filled first (POISON_OUTPUTS), so an element no kernel writes fails.

The task table of most cases (T = 5, S = 5 delta slots):
    task 0  open,   slot 2        task 3  open, slot 1, no rows
    task 1  closed, slot 0        task 4  open, slot 3
    task 2  open score, no slot   slot 4  belongs to no task
plus base rows (-1); the rows' ids are interleaved (not sorted by task).
"""
import contextlib
import math

import pytest
import torch

from taps_fast import dispatch
from taps_fast.ops import triton_backend
from helpers import assert_scaled_close, check_prune_by_dtype, tf32_allowed, triton_dtypes

CUDA = torch.cuda.is_available()
DEV = torch.device("cuda" if CUDA else "cpu")
if triton_backend.available() is not None or (not CUDA and not triton_backend._interpret()):
    pytest.skip(f"triton backend unavailable: {triton_backend.available()}", allow_module_level=True)

from taps_fast.kernels import _common as kcommon  # noqa: E402  (imports triton)
from taps_fast.kernels import mt_linear as kmt  # noqa: E402

DTYPES = triton_dtypes()
TABLE = dict(slot=[2, 0, -1, 1, 3], opens=[True, False, True, True, True], S=5, ids=[-1, 0, 1, 2, 4])


@pytest.fixture(autouse=True)
def _triton_poisoned(monkeypatch):
    monkeypatch.setattr(kcommon, "POISON_OUTPUTS", True)
    # on a GPU fp32 through the kernels is TF32; the fp32 bound below accounts for it
    with tf32_allowed(True) if CUDA else contextlib.nullcontext(), dispatch.use_backend("triton"):
        yield


def _bound_dtype(dtype):
    """On a GPU fp32 runs in TF32 (10-bit mantissa, like fp16's)."""
    return torch.float16 if (CUDA and dtype == torch.float32) else dtype


def _case(M, N, K, dtype, slot, opens, S, ids=None, rt=None, bias=True, seed=0):
    """Inputs of one mixed batch. Rows get the ids cycled then shuffled (interleaved; every id
    present when M >= len(ids)), unless rt is given. Scores and thresholds in the input dtype."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(M, K, generator=g).to(dtype)
    w = (torch.randn(N, K, generator=g) / math.sqrt(K)).to(dtype)
    d = (torch.randn(S, N, K, generator=g) / math.sqrt(K)).to(dtype)
    b = torch.randn(N, generator=g).to(dtype) if bias else None
    dy = torch.randn(M, N, generator=g).to(dtype)
    if rt is None:
        ids = torch.tensor(ids)
        rt = ids[torch.arange(M) % len(ids)][torch.randperm(M, generator=g)]
    s = torch.tensor([0.15 if o else 0.05 for o in opens], dtype=dtype)
    thr = torch.full((len(opens),), 0.1, dtype=dtype)
    slot = torch.tensor(slot, dtype=torch.int32)
    return [t if t is None else t.to(DEV) for t in (x, rt, w, d, slot, s, thr, b, dy)]


def _reference(x, rt, w, d, slot, s, thr, b, dy, absolute=False):
    """float64 (y, dx, ddeltas, dscores) by looping over the tasks; with absolute, the same sums
    over absolute values (the error scale of each element, see helpers.assert_scaled_close)."""
    f = (lambda t: t.double().abs()) if absolute else (lambda t: t.double())  # noqa: E731
    x, w, d, dy = f(x), f(w), f(d), f(dy)
    y = x @ w.t() + (f(b) if b is not None else 0.0)
    dx = dy @ w
    dd = torch.zeros_like(d)
    ds = torch.zeros(slot.numel(), dtype=torch.float64, device=x.device)
    for t in range(slot.numel()):
        sl, rows = int(slot[t]), rt == t
        if sl < 0:
            continue
        G = dy[rows].t() @ x[rows]
        ds[t] = (G * d[sl]).sum()  # straight-through: open or closed
        if bool(s[t] >= thr[t]):  # compared in the scores' dtype, as torch does
            y[rows] += x[rows] @ d[sl].t()
            dx[rows] += dy[rows] @ d[sl]
            dd[sl] = G
    return y, dx, dd, ds


def _run(x, rt, w, d, slot, s, thr, b, dy):
    y = kmt.mt_linear_fwd(x, rt, w, d, slot, s, thr, b)
    dx = kmt.mt_linear_fwd(dy, rt, w, d, slot, s, thr, None, transpose_weight=True)
    dd, ds = kmt.mt_linear_wgrad(dy, x, rt, d, slot, s, thr, True, True)
    return y, dx, dd, ds


def _check(case, tag):
    x, rt, w, d, slot, s, thr, b, dy = case
    dtype, bd = x.dtype, _bound_dtype(x.dtype)
    y, dx, dd, ds = _run(*case)
    want = _reference(*case)
    scale = _reference(*case, absolute=True)
    assert y.shape == (x.shape[0], w.shape[0]) and dx.shape == x.shape and y.dtype == dx.dtype == dtype
    assert dd.shape == d.shape and dd.dtype == d.dtype and ds.shape == s.shape and ds.dtype == s.dtype
    assert_scaled_close(y, want[0], scale[0], bd, f"{tag} y")
    assert_scaled_close(dx, want[1], scale[1], bd, f"{tag} dx")
    owners = {int(slot[t]): t for t in range(slot.numel()) if int(slot[t]) >= 0}
    for sl in range(d.shape[0]):
        t = owners.get(sl)
        if t is not None and bool(s[t] >= thr[t]) and bool((rt == t).any()):
            assert_scaled_close(dd[sl], want[2][sl], scale[2][sl], bd, f"{tag} dΔW slot {sl}")
        else:  # a slot of no task, of a closed task, or of a task without rows
            assert torch.count_nonzero(dd[sl]) == 0, f"{tag}: dΔW of slot {sl} (task {t}) must be 0"
    for t in range(slot.numel()):
        if int(slot[t]) < 0 or not bool((rt == t).any()):
            assert ds[t] == 0, f"{tag}: ds of task {t} (no slot or no rows) must be 0"
        else:
            if not bool(s[t] >= thr[t]):
                assert ds[t] != 0, f"{tag}: closed task {t}'s ds is straight-through, not 0"
            assert_scaled_close(ds[t:t + 1], want[3][t:t + 1], scale[3][t:t + 1], bd, f"{tag} ds[{t}]")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("M,N,K", [(129, 17, 65), (17, 129, 17), (1, 17, 129), (67, 65, 33)])
def test_mixed_batch(M, N, K, dtype):
    """Forward, dx, dΔW and ds of the five-task table; tiles partial in every dimension."""
    _check(_case(M, N, K, dtype, **TABLE), f"mixed M={M} N={N} K={K} {dtype}")


def test_rows_alternate_between_tasks():
    """Ids that alternate row by row (int32 ids; the kernels gather and scatter through order)."""
    M = 70
    rt = torch.tensor([[0, 4, -1, 1][i % 4] for i in range(M)], dtype=torch.int32)
    _check(_case(M, 33, 40, torch.float32, rt=rt, **{k: v for k, v in TABLE.items() if k != "ids"}),
           "alternating")


def test_all_rows_base():
    """Only base rows: y = x·Wᵀ + b, every dΔW and ds 0."""
    case = _case(40, 17, 17, torch.float16, [1, 0, -1], [True, True, False], 2, ids=[-1])
    _check(case, "all base")
    y, dx, dd, ds = _run(*case)
    assert torch.count_nonzero(dd) == 0 and torch.count_nonzero(ds) == 0


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_single_task(dtype):
    """T = 1, every row the task's (one segment; base and the rest empty)."""
    _check(_case(65, 17, 33, dtype, [0], [True], 1, ids=[0]), f"single {dtype}")


def test_no_tasks():
    """T = 0 (an empty task table): every row is a base row."""
    x, rt, w, d, slot, s, thr, b, dy = _case(17, 9, 12, torch.float32, [], [], 1, ids=[-1])
    y = kmt.mt_linear_fwd(x, rt, w, d, slot, s, thr, b)
    assert_scaled_close(y, x.double() @ w.double().t() + b.double(),
                        x.double().abs() @ w.double().abs().t() + b.double().abs(), torch.float32, "T=0 y")
    dd, ds = kmt.mt_linear_wgrad(dy, x, rt, d, slot, s, thr, True, True)
    assert torch.count_nonzero(dd) == 0 and ds.shape == (0,)


def test_closed_task_reads_weight_only():
    """With NaN in the closed task's slot (and in the slot of no task), the closed task's rows and
    every dΔW stay finite: those ΔW loads are predicated off, not multiplied by 0. Its ds reads
    ΔW (straight-through), so only it turns NaN."""
    case = _case(70, 17, 33, torch.float32, **TABLE)
    x, rt, w, d, slot, s, thr, b, dy = case
    d[0] = float("nan")  # task 1 (closed)
    d[4] = float("nan")  # no task
    y = kmt.mt_linear_fwd(x, rt, w, d, slot, s, thr, b)
    dx = kmt.mt_linear_fwd(dy, rt, w, d, slot, s, thr, None, transpose_weight=True)
    assert torch.isfinite(y).all() and torch.isfinite(dx).all()
    d_ok = d.clone()
    d_ok[0] = 0.0
    d_ok[4] = 0.0
    want, scale = (_reference(x, rt, w, d_ok, slot, s, thr, b, dy, a) for a in (False, True))
    assert_scaled_close(y, want[0], scale[0], _bound_dtype(x.dtype), "closed y")
    assert_scaled_close(dx, want[1], scale[1], _bound_dtype(x.dtype), "closed dx")
    dd, none = kmt.mt_linear_wgrad(dy, x, rt, d, slot, s, thr, True, False)
    assert none is None and torch.isfinite(dd).all()
    assert torch.count_nonzero(dd[0]) == 0 and torch.count_nonzero(dd[4]) == 0
    none, ds = kmt.mt_linear_wgrad(dy, x, rt, d, slot, s, thr, False, True)
    assert none is None and torch.isnan(ds[1]) and torch.isfinite(ds[[0, 2, 3, 4]]).all()


def test_nan_score_poisons_only_its_task():
    """A NaN score (no host sync to raise) poisons its task's rows and ds, nothing else."""
    case = _case(70, 17, 33, torch.float32, **TABLE)
    x, rt, w, d, slot, s, thr, b, dy = case
    s[4] = float("nan")
    y, dx, dd, ds = _run(*case)
    rows = rt == 4
    assert rows.any() and torch.isnan(y[rows]).all() and torch.isnan(dx[rows]).all()
    assert torch.isfinite(y[~rows]).all() and torch.isfinite(dx[~rows]).all()
    assert torch.isnan(ds[4]) and torch.isfinite(ds[:4]).all() and torch.isfinite(dd).all()
    want, scale = (_reference(*case, absolute=a) for a in (False, True))  # NaN >= τ: closed
    assert_scaled_close(y[~rows], want[0][~rows], scale[0][~rows], _bound_dtype(x.dtype), "nan-score y")


def test_deterministic():
    """Two runs give bit-identical results (ds: per-tile partials summed in a fixed order)."""
    case = _case(129, 65, 129, torch.float32, **TABLE)
    a, b = _run(*case), _run(*case)
    assert all(torch.equal(u, v) for u, v in zip(a, b))


def test_empty_batch():
    """M = 0: nothing is launched; the gradients are zeros."""
    x, rt, w, d, slot, s, thr, b, dy = _case(0, 17, 9, torch.float32, **TABLE)
    y, dx, dd, ds = _run(x, rt, w, d, slot, s, thr, b, dy)
    assert y.shape == (0, 17) and dx.shape == (0, 9)
    assert dd.shape == d.shape and torch.count_nonzero(dd) == 0
    assert ds.shape == (5,) and ds.dtype == s.dtype and torch.count_nonzero(ds) == 0
    assert kmt.mt_linear_wgrad(dy, x, rt, d, slot, s, thr, False, False) == (None, None)


class _GridRecorder:
    """Stands in for an autotuned kernel: records the grid of each launch, then launches."""

    def __init__(self, kernel):
        self.kernel, self.grids = kernel, []

    def __getitem__(self, grid):
        self.grids.append(grid)
        return self.kernel[grid]


def test_grid_depends_on_shapes_only(monkeypatch):
    """The launch grids are the same for different task distributions of the same shapes (so a
    layer can be captured in a CUDA graph), at every config the autotuners may choose."""
    fwd = _GridRecorder(kmt._taps_mt_linear_fwd_kernel)
    wg = _GridRecorder(kmt._taps_mt_linear_wgrad_kernel)
    monkeypatch.setattr(kmt, "_taps_mt_linear_fwd_kernel", fwd)
    monkeypatch.setattr(kmt, "_taps_mt_linear_wgrad_kernel", wg)
    M = 20
    for ids in ([-1], [0], [4, -1, 0]):
        case = _case(M, 9, 11, torch.float32, ids=ids, **{k: v for k, v in TABLE.items() if k != "ids"})
        _run(*case)
    metas = [dict(c.kwargs) for c in kcommon.mm_configs(kmt.MT_FWD_TILES)]
    metas_wg = [dict(c.kwargs) for c in kcommon.mm_configs(kmt.MT_WGRAD_TILES, "BLOCK_N", "BLOCK_K", "BLOCK_R")]
    for rec, ms in ((fwd, metas), (wg, metas_wg)):
        assert len(rec.grids) == 3 * (2 if rec is fwd else 1)
        for m in ms:
            assert len({g(m) for g in rec.grids[::2 if rec is fwd else 1]}) == 1
    # the forward covers every tile a segment can need: cdiv(M, BM) + T row tiles
    assert fwd.grids[0]({"BLOCK_M": 64, "BLOCK_N": 64}) == ((1 + 5) * 1,)


def test_autotuners_prune_by_an_existing_argument():
    """As test_triton checks for the single-task kernels: the prune argument exists and keeps
    the configs of the input's element size; the G pass zeroes its ds partials between configs."""
    for at in (kmt._taps_mt_linear_fwd_kernel, kmt._taps_mt_linear_wgrad_kernel):
        prune = at.early_config_prune
        assert prune.arg in at.fn.arg_names
        check_prune_by_dtype(prune)
    assert kmt._taps_mt_linear_wgrad_kernel.reset_to_zero == ["part_ptr"]


@pytest.mark.skipif(not CUDA, reason="host synchronisation is only observable on a GPU")
def test_no_host_sync():
    case = _case(129, 65, 33, torch.float16, **TABLE)
    _run(*case)  # autotune first (benchmarking synchronises)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        _run(*case)
    finally:
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.skipif(not CUDA, reason="large shapes, every autotuned tile: GPU only")
@pytest.mark.parametrize("dtype", DTYPES)
def test_mixed_batch_gpu(dtype):
    """Tiles of every autotuned config, bf16 included."""
    _check(_case(1000, 384, 257, dtype, **TABLE), f"gpu {dtype}")


def test_one_row_per_segment():
    """Every segment (base and T = 4 tasks) holds one row: the forward then needs exactly
    cdiv(M, BLOCK_M) + T row tiles, the grid's bound (each segment wastes a partial tile)."""
    rt = torch.tensor([3, -1, 1, 0, 2])
    _check(_case(5, 17, 9, torch.float32, [1, 0, -1, 2], [True, False, True, True], 3, rt=rt), "one row each")
