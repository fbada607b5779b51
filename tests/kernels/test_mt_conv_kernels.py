"""The multi-task gated conv2d kernels (kernels/mt_conv.py) against a float64 oracle.

A mixed batch: sample b runs task sample_task[b] (-1 = base), tasks share a stacked
deltas[S, OC, C, KH, KW] through slot[T], gated by scores[T] >= thresholds[T]. Without a GPU this
runs under TRITON_INTERPRET=1 (tests/conftest.py): small images (5x7), fp32 and fp16. Every buffer
the launchers allocate is NaN-filled first (POISON_OUTPUTS), so an element no kernel writes fails.
"""
import math

import pytest
import torch
import torch.nn.functional as F

from taps_fast.ops import triton_backend
from helpers import assert_scaled_close, triton_dtypes

CUDA = torch.cuda.is_available()
DEV = torch.device("cuda" if CUDA else "cpu")
if triton_backend.available() is not None or (not CUDA and not triton_backend._interpret()):
    pytest.skip(f"triton backend unavailable: {triton_backend.available()}", allow_module_level=True)

from taps_fast.kernels import _common as kcommon  # noqa: E402  (imports triton)
from taps_fast.kernels import mt_conv as kmt  # noqa: E402


@pytest.fixture(autouse=True)
def _poisoned(monkeypatch):
    monkeypatch.setattr(kcommon, "POISON_OUTPUTS", True)


def _bound_dtype(dtype):
    """On a GPU fp32 runs in TF32 (10-bit mantissa, fp16's bound)."""
    return torch.float16 if (CUDA and dtype == torch.float32) else dtype


# name: (B, C, H, W, OC, kernel, stride, padding, dilation)
CASES = {
    "1x1": (7, 5, 5, 7, 6, 1, 1, 0, 1),
    "3x3": (6, 3, 5, 7, 4, 3, 1, 1, 1),
    "3x3_s2": (6, 7, 7, 5, 5, 3, 2, 1, 1),
    "3x3_d2": (6, 4, 6, 7, 3, 3, 1, 2, 2),
    "c20": (5, 20, 5, 5, 17, 3, 1, 1, 1),
}

# Task set-ups: (sample pattern, slot, scores), thresholds 0.1. The patterns interleave the tasks
# (not sorted) and are cycled to the batch size.
TASKS = {
    # T = 4, S = 4: task 0 open (slot 2), task 1 closed with a slot (0), task 2 no slot, task 3
    # open (slot 1) with no samples; slot 3 belongs to no task; base samples.
    "A": ([2, 0, -1, 1, 0, 2, 1, -1, 0], [2, 0, -1, 1], [0.3, 0.05, 0.5, 0.2], 4),
    # T = 3, S = 3: task 0 open at s = τ exactly (>=), task 1 open, task 2 closed (slot 1).
    "B": ([1, -1, 0, 2, 1, 0, 2], [0, 2, 1], [0.1, 0.4, 0.02], 3),
}
TASK_A_CLOSED, TASK_A_NO_SLOT, TASK_A_EMPTY, SLOT_A_UNUSED = 1, 2, 3, 3


def _conv_kw(stride, padding, dilation):
    return dict(stride=(stride, stride), padding=(padding, padding), dilation=(dilation, dilation))


def _make(case, layout, dtype, tasks, score_dtype=None, seed=0):
    B, C, H, W, O, k, stride, padding, dilation = CASES[case]
    pattern, slot, scores, S = TASKS[tasks]
    torch.manual_seed(seed)
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    x = torch.randn(B, C, H, W, device=DEV).to(dtype).contiguous(memory_format=fmt)
    w = (torch.randn(O, C, k, k, device=DEV) / math.sqrt(C * k * k)).to(dtype).contiguous(memory_format=fmt)
    deltas = torch.randn(S, O, C, k, k, device=DEV) / math.sqrt(C * k * k)
    if layout == "channels_last":  # channel-innermost deltas: another stride pattern
        deltas = deltas.permute(0, 1, 3, 4, 2).contiguous().permute(0, 1, 4, 2, 3)
    deltas = deltas.to(dtype)
    b = torch.randn(O, device=DEV).to(dtype)
    sd = score_dtype or dtype
    t = dict(
        sample_task=torch.tensor([pattern[i % len(pattern)] for i in range(B)], device=DEV),
        slot=torch.tensor(slot, dtype=torch.int32, device=DEV),
        scores=torch.tensor(scores, device=DEV).to(sd),
        thresholds=torch.full((len(slot),), 0.1, device=DEV).to(sd),
    )
    return x, w, deltas, b, t, _conv_kw(stride, padding, dilation)


def _open(t):
    return [int(t["slot"][i]) >= 0 and bool(t["scores"][i] >= t["thresholds"][i]) for i in range(t["slot"].numel())]


def _oracle(x, w, deltas, b, t, conv, dy, absolute=False):
    """Float64 (y, dx, ddeltas, dscores); with absolute, the same over absolute values (the error
    scale of each element, see helpers.assert_scaled_close)."""
    f = (lambda v: v.double().abs()) if absolute else (lambda v: v.double())
    xd, wd, dd, dyd = f(x), f(w), f(deltas), f(dy)
    y = F.conv2d(xd, wd, None if b is None else f(b), **conv)
    dx = torch.nn.grad.conv2d_input(x.shape, wd, dyd, **conv)
    ddeltas = torch.zeros_like(dd)
    T = t["slot"].numel()
    dscores = torch.zeros(T, dtype=torch.float64, device=x.device)
    task = t["sample_task"]
    for i, is_open in enumerate(_open(t)):
        m = task == i
        s = int(t["slot"][i])
        if not bool(m.any()) or s < 0:
            continue
        G = torch.nn.grad.conv2d_weight(xd[m], w.shape, dyd[m], **conv)
        dscores[i] = (G * dd[s]).sum()  # straight-through: also when closed
        if is_open:
            y[m] += F.conv2d(xd[m], dd[s], **conv)
            dx[m] += torch.nn.grad.conv2d_input(xd[m].shape, dd[s], dyd[m], **conv)
            ddeltas[s] = G
    return y, dx, ddeltas, dscores


def _run(x, w, deltas, b, t, conv, dy=None, needs=(True, True)):
    cv = (conv["stride"], conv["padding"], conv["dilation"])
    gates = (t["slot"], t["scores"], t["thresholds"])
    y = kmt.mt_conv2d_fwd(x, t["sample_task"], w, deltas, *gates, b, *cv)
    if dy is None:
        torch.manual_seed(123)
        dy = torch.randn(y.shape, device=DEV).to(y.dtype).contiguous(memory_format=kmt.out_format(x))
    dx = kmt.mt_conv2d_dgrad(dy, x, t["sample_task"], w, deltas, *gates, *cv)
    dd, ds = kmt.mt_conv2d_wgrad(dy, x, t["sample_task"], deltas, *gates, *cv, *needs)
    return y, dx, dd, ds, dy


def _check_all(got, want, scale, dtype, tag):
    bd = _bound_dtype(dtype)
    for name, a, e, sc in zip(("y", "dx", "ddeltas", "dscores"), got, want, scale):
        assert_scaled_close(a, e, sc, bd, f"{tag} {name}")


MATRIX = [  # (case, layout, dtype, tasks, score dtype): not the full cross product (interpreter time)
    ("1x1", "nchw", torch.float32, "A", None),
    ("1x1", "channels_last", torch.float16, "B", None),
    ("3x3", "channels_last", torch.float32, "A", None),
    ("3x3", "nchw", torch.float16, "B", None),
    ("3x3_s2", "nchw", torch.float32, "B", None),
    ("3x3_s2", "channels_last", torch.float16, "A", None),
    ("3x3_d2", "channels_last", torch.float32, "B", None),
    ("3x3_d2", "nchw", torch.float16, "A", None),
    ("c20", "nchw", torch.float16, "A", torch.float32),
] + ([("3x3", "channels_last", torch.bfloat16, "B", None), ("3x3_s2", "nchw", torch.bfloat16, "A", None)]
     if torch.bfloat16 in triton_dtypes() else [])


@pytest.mark.parametrize("case, layout, dtype, tasks, score_dtype", MATRIX,
                         ids=[f"{c}-{lay}-{str(d)[6:]}-{tk}" + ("-fp32scores" if sd else "")
                              for c, lay, d, tk, sd in MATRIX])
def test_mt_conv_matches_oracle(case, layout, dtype, tasks, score_dtype):
    x, w, deltas, b, t, conv = _make(case, layout, dtype, tasks, score_dtype)
    y, dx, dd, ds, dy = _run(x, w, deltas, b, t, conv)
    want = _oracle(x, w, deltas, b, t, conv, dy)
    scale = _oracle(x, w, deltas, b, t, conv, dy, absolute=True)
    _check_all((y, dx, dd, ds), want, scale, dtype, f"{case} {layout} {dtype} {tasks}")
    # memory formats and dtypes as promised
    if layout == "channels_last":
        assert y.is_contiguous(memory_format=torch.channels_last)
    assert dx.stride() == x.stride() and dd.stride() == deltas.stride()
    assert dd.dtype == deltas.dtype and ds.dtype == t["scores"].dtype and ds.shape == t["slot"].shape
    # closed / absent / unused slots get exactly zero; a closed task's ds is straight-through
    is_open = _open(t)
    used = {int(t["slot"][i]) for i in range(len(is_open)) if is_open[i] and bool((t["sample_task"] == i).any())}
    for s in range(deltas.shape[0]):
        if s not in used:
            assert torch.count_nonzero(dd[s]) == 0, f"slot {s} must get a zero gradient"
    for i in range(len(is_open)):
        has = bool((t["sample_task"] == i).any())
        if int(t["slot"][i]) >= 0 and has and not is_open[i]:
            assert float(ds[i]) != 0.0, "a closed task's dscore is straight-through, not 0"
        if int(t["slot"][i]) < 0 or not has:
            assert float(ds[i]) == 0.0


@pytest.mark.parametrize("T", [3, 0])
def test_all_samples_base(T):
    """Every sample -1: W only, zero ddeltas and dscores (T = 0: no task at all)."""
    x, w, deltas, b, t, conv = _make("3x3_s2", "nchw", torch.float32, "B")
    t["sample_task"] = torch.full_like(t["sample_task"], -1)
    if T == 0:
        t = dict(sample_task=t["sample_task"], slot=t["slot"][:0], scores=t["scores"][:0],
                 thresholds=t["thresholds"][:0])
    y, dx, dd, ds, dy = _run(x, w, deltas, b, t, conv)
    bd = _bound_dtype(torch.float32)
    xd, wd, dyd = x.double(), w.double(), dy.double()
    assert_scaled_close(y, F.conv2d(xd, wd, b.double(), **conv),
                        F.conv2d(xd.abs(), wd.abs(), b.double().abs(), **conv), bd, "base y")
    assert_scaled_close(dx, torch.nn.grad.conv2d_input(x.shape, wd, dyd, **conv),
                        torch.nn.grad.conv2d_input(x.shape, wd.abs(), dyd.abs(), **conv), bd, "base dx")
    assert torch.count_nonzero(dd) == 0 and ds.shape == (T,) and torch.count_nonzero(ds) == 0


def test_closed_task_reads_weight_only():
    """NaN in the closed task's slot and in the unused slot: forward and dx stay finite and
    correct for every sample (a loaded ΔW times a zero gate would give NaN)."""
    x, w, deltas, b, t, conv = _make("3x3", "nchw", torch.float32, "A")
    deltas[int(t["slot"][TASK_A_CLOSED])] = float("nan")
    deltas[SLOT_A_UNUSED] = float("nan")
    y, dx, dd, ds, dy = _run(x, w, deltas, b, t, conv)
    want = _oracle(x, w, deltas.nan_to_num(), b, t, conv, dy)
    scale = _oracle(x, w, deltas.nan_to_num(), b, t, conv, dy, absolute=True)
    bd = _bound_dtype(torch.float32)
    assert_scaled_close(y, want[0], scale[0], bd, "y")
    assert_scaled_close(dx, want[1], scale[1], bd, "dx")
    # the gradient of the open task's slot is unaffected; closed and unused slots are zero
    assert_scaled_close(dd, want[2], scale[2], bd, "ddeltas")
    # dscores of the closed task reads its (NaN) ΔW by definition (straight-through); the others not
    others = [i for i in range(4) if i != TASK_A_CLOSED]
    assert torch.isfinite(ds[others]).all() and torch.isnan(ds[TASK_A_CLOSED])


def test_nan_score_poisons_only_its_samples():
    x, w, deltas, b, t, conv = _make("3x3_d2", "channels_last", torch.float32, "A")
    t["scores"][0] = float("nan")
    y, dx, dd, ds, dy = _run(x, w, deltas, b, t, conv)
    m = t["sample_task"] == 0
    assert bool(m.any()) and torch.isnan(y[m]).all() and torch.isnan(dx[m]).all()
    want = _oracle(x, w, deltas, b, t, conv, dy)  # the oracle reads NaN >= τ as closed
    scale = _oracle(x, w, deltas, b, t, conv, dy, absolute=True)
    bd = _bound_dtype(torch.float32)
    assert_scaled_close(y[~m], want[0][~m], scale[0][~m], bd, "y of the other samples")
    assert_scaled_close(dx[~m], want[1][~m], scale[1][~m], bd, "dx of the other samples")
    assert torch.isnan(ds[0]) and torch.isfinite(ds[1:]).all()
    assert_scaled_close(dd, want[2], scale[2], bd, "ddeltas")


def test_deterministic():
    x, w, deltas, b, t, conv = _make("1x1", "channels_last", torch.float16, "A")
    runs = [_run(x, w, deltas, b, t, conv)[:4] for _ in range(2)]
    for a, c in zip(*runs):
        assert torch.equal(a, c)


def test_wgrad_flags():
    x, w, deltas, b, t, conv = _make("1x1", "nchw", torch.float32, "B")
    _, _, dd, ds, dy = _run(x, w, deltas, b, t, conv)
    cv = (conv["stride"], conv["padding"], conv["dilation"])
    args = (dy, x, t["sample_task"], deltas, t["slot"], t["scores"], t["thresholds"], *cv)
    dd1, ds1 = kmt.mt_conv2d_wgrad(*args, True, False)
    dd2, ds2 = kmt.mt_conv2d_wgrad(*args, False, True)
    assert ds1 is None and dd2 is None and torch.equal(dd1, dd) and torch.equal(ds2, ds)
    assert kmt.mt_conv2d_wgrad(*args, False, False) == (None, None)


def test_empty_batch():
    """B = 0 launches nothing; the gradients are zeros, not poison."""
    x, w, deltas, b, t, conv = _make("3x3", "nchw", torch.float32, "A")
    x, t["sample_task"] = x[:0], t["sample_task"][:0]
    y, dx, dd, ds, _ = _run(x, w, deltas, b, t, conv)
    assert y.shape == (0, 4, 5, 7) and dx.shape == x.shape
    assert torch.count_nonzero(dd) == 0 and torch.count_nonzero(ds) == 0 and ds.shape == (4,)


def test_autotuners_prune_by_an_existing_argument():
    from triton.runtime.autotuner import Autotuner

    names = ["_taps_mt_conv2d_fwd_kernel", "_taps_mt_conv2d_dgrad_kernel", "_taps_mt_conv2d_wgrad_kernel"]
    for name in names:
        at = getattr(kmt, name)
        assert isinstance(at, Autotuner)
        assert at.early_config_prune.arg in at.fn.arg_names, name
        assert "T" in at.keys


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
def test_no_host_sync_gpu():
    """After autotuning (which syncs), the launchers never synchronise the host."""
    x, w, deltas, b, t, conv = _make("3x3", "channels_last", torch.float16, "A")
    _run(x, w, deltas, b, t, conv)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        _run(x, w, deltas, b, t, conv)
    finally:
        torch.cuda.set_sync_debug_mode("default")
