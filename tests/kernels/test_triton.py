"""The Triton backend against the float64 oracle.

Without a GPU this runs under TRITON_INTERPRET=1 (tests/conftest.py) on the CPU: small odd shapes,
fp32, fp16 and bf16 (bf16 through tests/interpreter_bf16.py, which makes the interpreter compute
bf16 as the GPU does). With CUDA the same tests run on the GPU, plus the large shapes of the
tests marked ``gpu``.

Every buffer the launchers allocate is NaN-filled first (POISON_OUTPUTS), so an element a kernel
fails to write fails the comparison (rel_err refuses non-finite values).
"""
import itertools
import math
import os

import pytest
import torch
import torch.nn.functional as F

from taps_fast import dispatch, taps_conv2d, taps_conv2d_ref, taps_linear, taps_linear_ref
from helpers import skip_module_without_triton, RTOL, assert_rel_close, assert_scaled_close, check_prune_by_dtype, triton_dtypes

CUDA = torch.cuda.is_available()
DEV = torch.device("cuda" if CUDA else "cpu")
skip_module_without_triton()

from taps_fast.kernels import _common as kcommon  # noqa: E402
from taps_fast.kernels import conv as kconv  # noqa: E402
from taps_fast.kernels import linear as klinear  # noqa: E402

DTYPES = triton_dtypes()
SIZES = [1, 17, 64, 129]


@pytest.fixture(autouse=True)
def _triton(triton_poisoned):  # tests/conftest.py: the backend forced, outputs poisoned
    yield


def _bound_dtype(dtype):
    """The dtype whose error bound applies: on a GPU fp32 runs in TF32 (10-bit mantissa, like
    fp16's)."""
    return torch.float16 if (CUDA and dtype == torch.float32) else dtype


def _bound(dtype):
    return RTOL[_bound_dtype(dtype)]


def assert_ds_close(actual, g, delta, expected, dtype, what="ds"):
    """ds = Σ G∘ΔW may cancel: its error is measured against Σ|G∘ΔW|."""
    scale = (g.double() * delta.double()).abs().sum().reshape(1)
    assert_scaled_close(actual.reshape(1), expected.double().reshape(1), scale, _bound_dtype(dtype), what)


def _grads(out, dy, tensors):
    return torch.autograd.grad(out, tensors, dy, allow_unused=True)


def _linear_case(M, N, K, dtype, is_open, bias=True, seed=0):
    torch.manual_seed(seed)
    x = torch.randn(M, K, device=DEV).to(dtype)
    w = torch.randn(N, K, device=DEV).to(dtype) / math.sqrt(K)
    d = torch.randn(N, K, device=DEV).to(dtype) / math.sqrt(K)
    b = torch.randn(N, device=DEV).to(dtype) if bias else None
    s = torch.tensor(0.15 if is_open else 0.05, device=DEV, dtype=dtype)
    dy = torch.randn(M, N, device=DEV).to(dtype)
    return x, w, d, b, s, dy


def _oracle(fn, inputs, dy, n_leaves):
    """Float64 outputs and gradients of fn, and the same taken over absolute values (the error
    scale for each: see helpers.assert_scaled_close). inputs[:n_leaves] get gradients."""
    out = []
    for absolute in (False, True):
        ts = [None if t is None else (t.double().abs() if absolute else t.double()) for t in inputs]
        leaves = [t.requires_grad_(True) for t in ts[:n_leaves] if t is not None]
        y = fn(*ts)
        g = dy.double().abs() if absolute else dy.double()
        out.append((y.detach(),) + tuple(torch.autograd.grad(y, leaves, g)))
    return out


def _check(tag, got, want, scale, is_open, dtype, names):
    bound_dtype = _bound_dtype(dtype)
    for name, a, e, sc in zip(names, got, want, scale):
        if name == "dΔW" and not is_open:
            assert torch.count_nonzero(a) == 0, f"{tag}: dΔW must be zero with the gate closed"
            continue
        if name == "ds":
            a, e, sc = a.reshape(1), e.reshape(1), sc.reshape(1)
        assert_scaled_close(a, e, sc, bound_dtype, f"{tag} {name}")


def _check_linear(M, N, K, dtype, is_open, bias=True):
    x, w, d, b, s, dy = _linear_case(M, N, K, dtype, is_open, bias)
    leaves = [t.clone().requires_grad_(True) for t in (x, d, s)] + ([b.clone().requires_grad_(True)] if bias else [])
    y = taps_linear(leaves[0], w, leaves[1], leaves[2], leaves[3] if bias else None, 0.1)
    got = (y,) + _grads(y, dy, leaves)
    fn = lambda x, d, s, b, w: taps_linear_ref(x, w, d, s, b, 0.1)  # noqa: E731
    want, scale = _oracle(fn, [x, d, s, b, w], dy, 4)
    # the score's abs run would flip nothing (|0.15| = 0.15, |0.05| = 0.05): same gate
    tag = f"linear M={M} N={N} K={K} {dtype} {'open' if is_open else 'closed'}"
    _check(tag, got, want, scale, is_open, dtype, ["y", "dx", "dΔW", "ds", "db"][:4 + bias])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("is_open", [True, False], ids=["open", "closed"])
@pytest.mark.parametrize("M", SIZES)
def test_linear_odd_shapes(M, is_open, dtype):
    """Forward and every gradient, every (N, K) in SIZES² for this M."""
    for N, K in itertools.product(SIZES, SIZES):
        _check_linear(M, N, K, dtype, is_open, bias=(N + K) % 2 == 0)


@pytest.mark.parametrize("split", [2, 3, 7])
@pytest.mark.parametrize("is_open", [True, False], ids=["open", "closed"])
def test_linear_split_reductions(split, is_open):
    """The split-K forward and split-M weight-gradient paths (chosen on a GPU when tiles are few)."""
    M, N, K = 129, 17, 129
    x, w, d, b, s, dy = _linear_case(M, N, K, torch.float32, is_open)
    g = 1.0 if is_open else 0.0
    weff = w.double() + g * d.double()
    y = klinear.linear_fwd(x, w, d, s, b, 0.1, split_k=split)
    assert_rel_close(y, x.double() @ weff.t() + b.double(), torch.float32, "split-K y")
    dx = klinear.linear_fwd(dy, w, d, s, None, 0.1, split_k=split, transpose_weight=True)
    assert_rel_close(dx, dy.double() @ weff, torch.float32, "split-K dx")
    dW, dD, ds, db = klinear.linear_wgrad(dy, x, w, d, s, 0.1, True, True, True, True, split=split)
    G = dy.double().t() @ x.double()
    assert_rel_close(dW, G, torch.float32, "split dW")
    if is_open:
        assert_rel_close(dD, G, torch.float32, "split dΔW")
    else:
        assert torch.count_nonzero(dD) == 0
    assert_ds_close(ds, G, d, (G * d.double()).sum(), torch.float32)
    assert_rel_close(db, dy.double().sum(0), torch.float32, "split db")


def test_linear_ds_deterministic():
    x, w, d, b, s, dy = _linear_case(129, 64, 129, torch.float32, True)
    runs = [klinear.linear_wgrad(dy, x, w, d, s, 0.1, False, True, True, False, split=3)[2] for _ in range(3)]
    assert all(torch.equal(runs[0], r) for r in runs)


def test_closed_gate_reads_weight_only():
    """A closed gate must not read ΔW: with NaN in ΔW, y and dx stay finite (0·NaN would be NaN
    if ΔW were loaded and multiplied by the gate)."""
    x, w, d, b, s, dy = _linear_case(17, 17, 17, torch.float32, is_open=False)
    d = torch.full_like(d, float("nan"))
    y = klinear.linear_fwd(x, w, d, s, b, 0.1)
    dx = klinear.linear_fwd(dy, w, d, s, None, 0.1, transpose_weight=True)
    assert torch.isfinite(y).all() and torch.isfinite(dx).all()
    assert_rel_close(y, x.double() @ w.double().t() + b.double(), torch.float32, "closed y")
    xc = torch.randn(1, 3, 6, 6, device=DEV)
    wc = torch.randn(4, 3, 3, 3, device=DEV)
    yc = kconv.conv2d_fwd(xc, wc, torch.full_like(wc, float("nan")), s, None, [1, 1], [1, 1], [1, 1], 0.1)
    assert torch.isfinite(yc).all()


def test_nan_score_poisons_instead_of_closing():
    """The kernels do not sync the host, so a NaN score cannot raise; it must not read as closed."""
    x, w, d, b, s, dy = _linear_case(5, 6, 7, torch.float32, True)
    s = torch.tensor(float("nan"), device=DEV)
    assert torch.isnan(klinear.linear_fwd(x, w, d, s, b, 0.1)).all()
    assert torch.isnan(klinear.linear_wgrad(dy, x, w, d, s, 0.1, False, True, True, False)[2])


def test_threshold_compared_in_score_dtype():
    """s = τ exactly opens the gate (>=), in the score's dtype, as the reference does."""
    for dtype in (torch.float32, torch.float16):
        x, w, d, b, _, _ = _linear_case(3, 4, 5, dtype, True)
        s = torch.tensor(0.1, dtype=dtype, device=DEV)
        with dispatch.use_backend("reference"):
            want = taps_linear(x, w, d, s, b, 0.1)
        assert torch.allclose(taps_linear(x, w, d, s, b, 0.1).double(), want.double(),
                              rtol=0, atol=_bound(dtype) * float(want.abs().max()))


# ----------------------------------------------------------------------------- conv
CONV_CASES = {
    # name: (B, C, H, W, O, kernel, stride, padding, dilation)
    "1x1": (2, 5, 7, 9, 6, 1, 1, 0, 1),
    "3x3": (2, 3, 9, 7, 5, 3, 1, 1, 1),
    "7x7_s2": (1, 3, 13, 12, 4, 7, 2, 3, 1),
    "3x3_s2": (2, 4, 11, 10, 6, 3, 2, 1, 1),
    "3x3_d2": (2, 4, 9, 9, 5, 3, 1, 2, 2),
    "same_4x4": (1, 3, 8, 7, 4, 4, 1, "same", 1),
    "same_3x3_d2": (1, 4, 7, 8, 3, 3, 1, "same", 2),
    "1x1_s2": (2, 6, 9, 8, 7, 1, 2, 0, 1),
    "rect_pad": (1, 3, 10, 9, 5, (3, 5), (1, 2), (2, 1), (1, 2)),
}


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("is_open", [True, False], ids=["open", "closed"])
@pytest.mark.parametrize("case", list(CONV_CASES))
def test_conv_odd_shapes(case, is_open, dtype, layout):
    B, C, H, W, O, k, stride, padding, dilation = CONV_CASES[case]
    k = (k, k) if isinstance(k, int) else k
    torch.manual_seed(1)
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    x = torch.randn(B, C, H, W, device=DEV).to(dtype).contiguous(memory_format=fmt)
    w = (torch.randn(O, C, *k, device=DEV) / math.sqrt(C * k[0] * k[1])).to(dtype).contiguous(memory_format=fmt)
    d = (torch.randn(O, C, *k, device=DEV) / math.sqrt(C * k[0] * k[1])).to(dtype)
    b = torch.randn(O, device=DEV).to(dtype)
    s = torch.tensor(0.15 if is_open else 0.05, device=DEV, dtype=dtype)
    args = dict(stride=stride, padding=padding, dilation=dilation, threshold=0.1)
    leaves = [t.clone().requires_grad_(True) for t in (x, d, s, b)]
    y = taps_conv2d(leaves[0], w, leaves[1], leaves[2], leaves[3], **args)
    if layout == "channels_last" and padding != "same":
        assert y.is_contiguous(memory_format=torch.channels_last)
    dy = torch.randn_like(y)
    got = (y,) + _grads(y, dy, leaves)
    fn = lambda x, d, s, b, w: taps_conv2d_ref(x, w, d, s, b, **args)  # noqa: E731
    want, scale = _oracle(fn, [x, d, s, b, w], dy, 4)
    tag = f"conv {case} {layout} {dtype} {'open' if is_open else 'closed'}"
    _check(tag, got, want, scale, is_open, dtype, ["y", "dx", "dΔW", "ds", "db"])


@pytest.mark.parametrize("split", [2, 5])
def test_conv_split_reduction(split):
    torch.manual_seed(2)
    x = torch.randn(2, 4, 9, 9, device=DEV).contiguous(memory_format=torch.channels_last)
    w = torch.randn(5, 4, 3, 3, device=DEV)
    d = torch.randn(5, 4, 3, 3, device=DEV).contiguous(memory_format=torch.channels_last)
    s = torch.tensor(0.15, device=DEV)
    dy = torch.randn(2, 5, 5, 5, device=DEV)
    dW, dD, ds, db = kconv.conv2d_wgrad(dy, x, w, d, s, [2, 2], [1, 1], [1, 1], 0.1,
                                        True, True, True, True, split=split)
    _, G, _ = torch.ops.aten.convolution_backward(dy.double(), x.double(), w.double(), None, [2, 2], [1, 1],
                                                  [1, 1], False, [0, 0], 1, [False, True, False])
    assert_rel_close(dW, G, torch.float32, "split dW")
    assert_rel_close(dD, G, torch.float32, "split dΔW")
    assert dD.stride() == d.stride()
    assert_ds_close(ds, G, d, (G * d.double()).sum(), torch.float32)
    assert_rel_close(db, dy.double().sum((0, 2, 3)), torch.float32, "split db")


# ----------------------------------------------------------------------------- GPU only
@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("shape", [(12608, 768, 768), (4096, 2304, 768), (16, 3072, 768), (1, 8192, 8192)])
def test_linear_large_gpu(shape, dtype):
    M, N, K = shape
    for is_open in (True, False):
        _check_linear(M, N, K, dtype, is_open)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_conv_large_gpu(dtype):
    for (B, C, H, O, k, st, p) in [(32, 64, 56, 64, 3, 1, 1), (32, 256, 56, 128, 1, 1, 0), (32, 128, 56, 128, 3, 2, 1)]:
        torch.manual_seed(0)
        x = torch.randn(B, C, H, H, device=DEV, dtype=dtype).contiguous(memory_format=torch.channels_last)
        w = torch.randn(O, C, k, k, device=DEV, dtype=dtype) / math.sqrt(C * k * k)
        d = torch.randn_like(w) / 4
        s = torch.tensor(0.15, device=DEV, dtype=dtype)
        y = taps_conv2d(x, w, d, s, None, st, p)
        ref = F.conv2d(x.double(), w.double() + d.double(), None, st, p)
        assert_rel_close(y, ref, dtype, f"conv {B}x{C}x{H} k{k} s{st}")


def test_autotuners_prune_by_an_existing_argument():
    """The configs are pruned by the element size of a named tensor argument. The interpreter's
    single config never calls the prune function, so check every autotuner statically: the
    argument exists, and pruning keeps exactly the configs of that element size."""
    from triton.runtime.autotuner import Autotuner

    tuners = [(n, getattr(mod, n)) for mod in (klinear, kconv) for n in dir(mod)
              if isinstance(getattr(mod, n), Autotuner)]
    assert len(tuners) == 5
    for name, at in tuners:
        prune = at.early_config_prune
        assert prune.arg in at.fn.arg_names, f"{name}: prunes by {prune.arg!r}, not an argument"
        check_prune_by_dtype(prune)


def test_autotuned_kernels_reset_their_ds_partials():
    """On a key's first GPU call the autotuner runs every config on the real buffers; a kernel
    writing per-tile ds partials must have them zeroed before the chosen config runs, or a
    config with fewer tiles sums the others' leftovers into ds (PARTIALS_RESET in _common.py)."""
    import importlib

    from triton.runtime.autotuner import Autotuner

    checked = 0
    for mod in ("linear", "conv", "mt_linear", "mt_conv"):
        m = importlib.import_module(f"taps_fast.kernels.{mod}")
        for name, obj in vars(m).items():
            if isinstance(obj, Autotuner) and "part_ptr" in obj.fn.arg_names:
                assert "part_ptr" in obj.reset_to_zero, f"{mod}.{name} does not reset part_ptr"
                checked += 1
    assert checked >= 4


def test_autotune_first_keeps_one_tile_per_element_size():
    """TAPS_FAST_AUTOTUNE=first (the GPU smoke run): a fresh interpreter without TRITON_INTERPRET
    gives each autotuner the first tile of each element size, and the full tables otherwise."""
    import subprocess
    import sys

    code = ("from taps_fast.kernels import _common as c, linear as l;"
            "print(len(l._taps_linear_fwd_kernel.configs), c.AUTOTUNE_FIRST)")
    counts = {}
    for mode in ("first", "all"):
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        env["TAPS_FAST_AUTOTUNE"] = mode
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
        counts[mode] = out.stdout.split()
    # FWD_TILES lists the same first tile for fp16/bf16 and fp32: one config, kept once
    assert counts["first"] == ["1", "True"]
    assert counts["all"] == [str(len({t for ts in kcommon.FWD_TILES.values() for t in ts})), "False"]
