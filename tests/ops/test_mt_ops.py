"""The multi-task ops (taps_mt_linear / taps_mt_conv2d) through the dispatcher: the reference
(CPU) backend in float64 and the Triton backend under the interpreter, each against the
autograd oracle (taps_mt_*_ref), on sorted and interleaved batches."""
import contextlib

import pytest
import torch

from taps_fast import NoBackendError, taps_mt_conv2d, taps_mt_conv2d_ref, taps_mt_linear, taps_mt_linear_ref, use_backend
from taps_fast.ops import triton_backend

from helpers import assert_rel_close, tf32_allowed, triton_device

# Task layout: 0 open, 1 no delta, 2 open, 3 closed with a delta, 4 open but absent from batches.
SLOT = torch.tensor([0, -1, 2, 1, 3])
SCORES = [0.2, 0.3, 0.15, 0.05, 0.4]
IDS = {
    "interleaved": torch.tensor([2, -1, 0, 3, 2, 1, 0, -1, 3]),
    "sorted": torch.tensor([-1, -1, 0, 0, 1, 2, 2, 3, 3]),
    "one_task": torch.full((9,), 2),
    "all_base": torch.full((9,), -1),
}


def stack(shape, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=g, dtype=torch.float64)
    d = torch.randn((4,) + tuple(shape), generator=g, dtype=torch.float64) * 0.5
    s = torch.tensor(SCORES, dtype=torch.float64)
    return w.to(dtype), d.to(dtype), s.to(dtype), torch.full((5,), 0.1, dtype=dtype)


def grads(fn, x, w, d, s, b, ids, device=None):
    """y and the gradients of (x, W, ΔW, s, b) for a fixed dy, computed on ``device`` (default:
    where x is), returned on the CPU."""
    device = device or x.device
    x, d, s, w, b = (t.detach().to(device).clone().requires_grad_() for t in (x, d, s, w, b))
    y = fn(x, ids.to(device), w, d, SLOT.to(device), s, torch.full_like(s, 0.1), b)
    gy = torch.randn(y.shape, generator=torch.Generator().manual_seed(4), dtype=torch.float64).to(device, y.dtype)
    out = torch.autograd.grad(y, (x, w, d, s, b), gy)
    return tuple(t.cpu() for t in (y,) + out)


@pytest.mark.parametrize("layout", list(IDS))
@pytest.mark.parametrize("op", ["linear", "conv"])
def test_reference_backend_matches_oracle_fp64(layout, op):
    ids = IDS[layout]
    if op == "linear":
        w, d, s, _ = stack((6, 5), torch.float64)
        x = torch.randn(9, 3, 5, dtype=torch.float64)
        b = torch.randn(6, dtype=torch.float64)
        fn, ref = taps_mt_linear, taps_mt_linear_ref
    else:
        w, d, s, _ = stack((4, 3, 3, 3), torch.float64)
        x = torch.randn(9, 3, 6, 5, dtype=torch.float64)
        b = torch.randn(4, dtype=torch.float64)
        fn = lambda *a: taps_mt_conv2d(*a, stride=2, padding=1)  # noqa: E731
        ref = lambda *a: taps_mt_conv2d_ref(*a, stride=2, padding=1)  # noqa: E731
    with use_backend("reference"):
        got = grads(fn, x, w, d, s, b, ids)
    want = grads(ref, x, w, d, s, b, ids)
    for name, a, e in zip(("y", "dx", "dW", "dΔW", "ds", "db"), got, want):
        assert_rel_close(a, e, torch.float64, f"{op} {layout} {name}")
    dd = got[3]
    assert torch.count_nonzero(dd[1]) == 0 and torch.count_nonzero(dd[3]) == 0, "closed / absent slots get 0"
    if layout == "interleaved":
        assert float(got[4][3]) != 0.0, "a closed task's score still gets ⟨G, ΔW⟩ (straight-through)"


def test_reference_refuses_nan_score_of_a_present_task():
    w, d, s, thr = stack((6, 5), torch.float64)
    s[2] = float("nan")
    x = torch.randn(3, 5, dtype=torch.float64)
    with use_backend("reference"), pytest.raises(ValueError, match=r"task\(s\) \[2\] is NaN"):
        taps_mt_linear(x, torch.tensor([0, 2, -1]), w, d, SLOT, s, thr)
    with use_backend("reference"):  # absent from the batch: served
        taps_mt_linear(x, torch.tensor([0, 1, -1]), w, d, SLOT, s, thr)


def test_functional_checks():
    w, d, s, thr = stack((6, 5), torch.float32)
    x = torch.randn(3, 5)
    with pytest.raises(ValueError, match="deltas has shape"):
        taps_mt_linear(x, torch.tensor([0, 1, 2]), w, d[:, :, :4], SLOT, s, thr)
    with pytest.raises(ValueError, match="task id 5 is out of range"):
        taps_mt_linear(x, torch.tensor([0, 5, 2]), w, d, SLOT, s, thr)
    with pytest.raises(TypeError, match="dtype mismatch"):
        taps_mt_linear(x.double(), torch.tensor([0, 1, 2]), w, d, SLOT, s, thr)
    with pytest.raises(ValueError, match="must all be"):
        taps_mt_linear(x, torch.tensor([0, 1, 2]), w, d, SLOT, s[:3], thr)


def test_opcheck_reference():
    from torch.library import opcheck

    w, d, s, thr = stack((6, 5), torch.float32)
    x = torch.randn(9, 2, 5, requires_grad=True)
    ids = IDS["interleaved"]
    opcheck(torch.ops.taps_fast.mt_linear.default,
            (x, ids, w, d.requires_grad_(), SLOT, s.requires_grad_(), thr, torch.randn(6)))
    wc, dc, sc, thc = stack((4, 3, 3, 3), torch.float32)
    opcheck(torch.ops.taps_fast.mt_conv2d.default,
            (torch.randn(9, 3, 6, 5, requires_grad=True), ids, wc, dc.requires_grad_(), SLOT,
             sc.requires_grad_(), thc, None, [1, 1], [1, 1], [1, 1], 1))


triton_ok = pytest.mark.skipif(triton_backend.available() is not None, reason="triton kernels unavailable")


@triton_ok
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("op", ["linear", "conv"])
def test_triton_backend_matches_oracle(op, dtype):
    """The Triton kernels through the op and its autograd, forced: on the GPU where there is one,
    else on the CPU under the interpreter."""
    device = triton_device()
    if device is None:
        pytest.skip("the triton backend cannot run here (no GPU, no TRITON_INTERPRET=1)")
    ids = IDS["interleaved"]
    if op == "linear":
        w, d, s, _ = stack((17, 20), dtype)
        x = torch.randn(9, 3, 20, dtype=torch.float64)
        b = torch.randn(17, dtype=torch.float64)
        fn, ref = taps_mt_linear, taps_mt_linear_ref
    else:
        w, d, s, _ = stack((5, 3, 3, 3), dtype)
        x = torch.randn(9, 3, 6, 5, dtype=torch.float64)
        b = torch.randn(5, dtype=torch.float64)
        fn = lambda *a: taps_mt_conv2d(*a, padding=1)  # noqa: E731
        ref = lambda *a: taps_mt_conv2d_ref(*a, padding=1)  # noqa: E731
    x, b = x.to(dtype), b.to(dtype)  # the oracle gets the same rounded inputs
    # on a GPU fp32 runs as TF32 only where torch allows it; RTOL's fp32 bound covers TF32 there
    tf32 = tf32_allowed(True) if device.type == "cuda" else contextlib.nullcontext()
    with tf32, use_backend("triton"):
        got = grads(fn, x, w, d, s, b, ids, device)
    want = grads(ref, x.double(), w.double(), d.double(), s.double(), b.double(), ids)
    for name, a, e in zip(("y", "dx", "dW", "dΔW", "ds", "db"), got, want):
        assert_rel_close(a, e, dtype, f"{op} {name}")


@pytest.mark.parametrize("backend", ["reference", "cpp", "triton"])
def test_inplace_op_on_output(backend):
    """An in-place op on the output (nn.ReLU(inplace=True)): the op must not return a view
    made inside it (autograd refuses to modify those in place); gradients as out of place."""
    w, d, s, th = stack((5, 6), torch.float32)
    x = torch.randn(2, 3, 6)
    ids = torch.tensor([0, 2])
    dd, ss = d.clone().requires_grad_(), s.clone().requires_grad_()
    with use_backend(backend):
        try:
            y = taps_mt_linear(x, ids, w, dd, SLOT, ss, th)
        except NoBackendError as e:
            pytest.skip(f"backend {backend!r} cannot serve here: {e}")
        assert not y._is_view()
        y.relu_()
    y.sum().backward()  # by the default backends: "cpp" has forward kernels only
    dr, sr = d.clone().requires_grad_(), s.clone().requires_grad_()
    taps_mt_linear_ref(x, ids, w, dr, SLOT, sr, th).relu().sum().backward()
    assert_rel_close(dd.grad, dr.grad, torch.float32, "dΔW")
    assert_rel_close(ss.grad, sr.grad, torch.float32, "ds")
