"""The compiled extension taps_fast._C in the package: build, loading and fallback, the "cuda" and
"cpp" backends in the dispatcher, the ops through the public API (autograd, torch.compile,
opcheck), and on a GPU the CUDA kernels through the same API (CUDA-graph capture, no host sync).

The kernels themselves, against a float64 oracle on odd shapes, are in test_ext_kernels.py.
"""
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import taps_fast
from taps_fast import _ext, dispatch
from taps_fast.ops.ext_backend import CPP_MAX_ROWS, CUDA_MAX_ROWS

from helpers import assert_rel_close, assert_scaled_close

HAS_EXT = _ext.load()[0] is not None
needs_ext = pytest.mark.skipif(not HAS_EXT, reason=f"taps_fast._C not loaded: {_ext.load()[1]}")
gpu = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
CPU = torch.device("cpu")


def _build_expected():
    """What `make test` (pip install -e . with CUDA_HOME set) must have built on this machine."""
    if os.environ.get("TAPS_FAST_NO_EXT") == "1":
        return None
    from torch.utils import cpp_extension

    cuda = (os.environ.get("TAPS_FAST_NO_CUDA") != "1" and cpp_extension.CUDA_HOME is not None
            and torch.version.cuda is not None)
    return {"cuda": cuda}


# ----------------------------------------------------------------------------- build and loading
def test_extension_built_with_every_part_the_machine_allows():
    """`make test` builds the extension: the C++ part always, the CUDA part wherever nvcc and a CUDA torch
    are present (e.g. nvcc 13.0 with torch+cu130), so a .cu that fails to compile fails the suite rather
    than being skipped in silence."""
    want = _build_expected()
    if want is None:
        pytest.skip("TAPS_FAST_NO_EXT=1: the extension was not built on purpose")
    mod, why = _ext.load()
    assert mod is not None, f"the extension did not load: {why}"
    info = _ext.build_info()
    assert info["torch"].split("+")[0] == torch.__version__.split("+")[0]
    if want["cuda"]:
        assert info["cuda"], "nvcc and a CUDA-enabled torch are present but the CUDA part was not built"
        assert (8, 0, False) in _ext.cuda_archs() and (9, 0, True) in _ext.cuda_archs(), info


def test_info_reports_the_extension():
    from taps_fast import info

    text = info.report(CPU)
    if HAS_EXT:
        assert "compiled extension" in text and "loaded" in text
        assert "CUDA kernels" in text
    for name in ("cuda", "cpp"):
        assert f"{name}" in text


def _run_py(code: str, env=None) -> subprocess.CompletedProcess:
    e = dict(os.environ)
    e.update(env or {})
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          env=e, timeout=300)


def test_without_the_extension_the_package_imports_and_falls_back_with_one_line():
    """As torchao/xformers do: a missing _C is one line of notice, never a crash; the ops run on
    the reference path and the dispatcher says why the compiled backends stepped aside."""
    r = _run_py("""
        import sys, warnings
        sys.modules["taps_fast._C"] = None          # as if it had never been built
        import torch, taps_fast
        from taps_fast import dispatch
        x, w, d = torch.randn(2, 5), torch.randn(3, 5), torch.randn(3, 5)
        y = taps_fast.taps_linear(x, w, d, torch.tensor(0.5))
        assert torch.allclose(y, x @ (w + d).t(), atol=1e-5)
        y2 = taps_fast.taps_linear(x, w, d, torch.tensor(0.5))  # a second call: no second notice
        r = dispatch.reasons("linear_fwd", device=torch.device("cpu"), dtype=torch.float32, rows=2)
        assert "taps_fast._C is not available" in r["cpp"], r
        assert dispatch.select("linear_fwd", device=torch.device("cpu"), dtype=torch.float32, rows=2).name == "reference"
        print("OK")
    """)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "OK"
    notice = [ln for ln in r.stderr.splitlines() if "taps_fast._C" in ln]
    assert len(notice) == 1, r.stderr
    assert "ExtensionNotLoadedWarning" in notice[0] and "falling back" in notice[0]


def test_import_does_not_load_the_extension():
    r = _run_py("""
        import sys, taps_fast
        assert "taps_fast._C" not in sys.modules
        print("OK")
    """)
    assert r.returncode == 0 and r.stdout.strip() == "OK", r.stderr


# ----------------------------------------------------------------------------- dispatch
@needs_ext
@pytest.mark.parametrize("op", ["linear_fwd", "mt_linear_fwd"])
def test_cpp_backend_serves_few_rows_on_the_cpu(op):
    sel = lambda **m: dispatch.select(op, device=CPU, **m).name  # noqa: E731
    assert sel(dtype=torch.float32, rows=1) == "cpp"
    assert sel(dtype=torch.float32, rows=CPP_MAX_ROWS) == "cpp"
    assert sel(dtype=torch.float64, rows=4) == "cpp"
    assert sel(dtype=torch.float32, rows=CPP_MAX_ROWS + 1) == "reference"
    r = dispatch.reasons(op, device=CPU, dtype=torch.float32, rows=CPP_MAX_ROWS + 1)
    assert f"M={CPP_MAX_ROWS + 1} rows > {CPP_MAX_ROWS}" in r["cpp"]
    assert "CUDA tensors only" in r["cuda"]


@needs_ext
def test_compiled_backends_have_no_backward_or_conv_and_say_so():
    for op in ("linear_bwd", "conv2d_fwd", "mt_linear_bwd", "mt_conv2d_fwd"):
        r = dispatch.reasons(op, device=CPU, dtype=torch.float32, rows=1)
        assert r["cpp"] == f"has no {op} kernel" and r["cuda"] == f"has no {op} kernel"
        assert dispatch.select(op, device=CPU, dtype=torch.float32, rows=1).name == "reference"


@needs_ext
def test_forced_cpp_backend_refusing_a_big_batch_lists_every_reason():
    with dispatch.use_backend("cpp"):
        x, w, d = torch.randn(CPP_MAX_ROWS + 1, 8), torch.randn(3, 8), torch.randn(3, 8)
        with pytest.raises(dispatch.NoBackendError) as e:
            taps_fast.taps_linear(x, w, d, torch.tensor(0.5))
    msg = str(e.value)
    assert "backend 'cpp' (forced)" in msg and f"rows > {CPP_MAX_ROWS}" in msg and "reference: ok" in msg


# ----------------------------------------------------------------------------- through the public API
def _linear_case(M, N, K, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    mk = lambda *s: torch.randn(*s, generator=g).to(device=device, dtype=dtype)  # noqa: E731
    return mk(M, K), mk(N, K), mk(N, K) * 0.1, mk(N)


@needs_ext
@pytest.mark.parametrize("score", [0.5, 0.05], ids=["open", "closed"])
@pytest.mark.parametrize("lead", [(3,), (2, 3)], ids=["2d", "3d"])
def test_taps_linear_on_cpp_matches_the_oracle_and_trains(score, lead):
    """Forward on the cpp kernel (M ≤ 32 rows after flattening), backward on the reference path:
    the values and every gradient equal the float64 oracle's."""
    dtype = torch.float32
    M = int(torch.tensor(lead).prod())
    x, w, d, b = _linear_case(M, 33, 19, dtype, CPU)
    x = x.reshape(*lead, 19)
    s = torch.tensor(score)
    leaves = [t.clone().requires_grad_(True) for t in (x, d, s, b)]
    y = taps_fast.taps_linear(leaves[0], w, leaves[1], leaves[2], leaves[3], 0.1)
    assert dispatch.select("linear_fwd", device=CPU, dtype=dtype, rows=M).name == "cpp"
    ref_leaves = [t.detach().double().requires_grad_(True) for t in (x, d, s, b)]
    y_ref = taps_fast.taps_linear_ref(ref_leaves[0], w.double(), ref_leaves[1], ref_leaves[2], ref_leaves[3], 0.1)
    assert_rel_close(y, y_ref, dtype, "y")
    dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(1))
    y.backward(dy)
    y_ref.backward(dy.double())
    for name, a, e in zip(("dx", "dΔW", "db"), (leaves[0], leaves[1], leaves[3]),
                          (ref_leaves[0], ref_leaves[1], ref_leaves[3])):
        assert_rel_close(a.grad, e.grad, dtype, name)
    # ds = Σ G∘ΔW cancels: its error is measured against Σ |G|∘|ΔW|, the size of what was added
    g_abs = dy.double().reshape(-1, 33).abs().t() @ x.double().reshape(-1, 19).abs()
    assert_scaled_close(leaves[2].grad, ref_leaves[2].grad, (g_abs * d.double().abs()).sum(), dtype, "ds")


@needs_ext
def test_taps_mt_linear_on_cpp_matches_the_oracle():
    dtype = torch.float32
    B, N, K, T = 7, 21, 13, 4
    x, w, _, b = _linear_case(B, N, K, dtype, CPU)
    x = x.reshape(B, 1, K).expand(B, 2, K).contiguous()  # 2 rows per sample: 14 rows
    deltas = torch.randn(3, N, K) * 0.1
    slot = torch.tensor([0, -1, 1, 2])
    scores = torch.tensor([0.5, 0.5, 0.05, 0.3])  # task 2 closed, task 1 has no delta here
    th = torch.full((T,), 0.1)
    ids = torch.tensor([2, -1, 0, 3, 0, 1, 3])
    assert dispatch.select("mt_linear_fwd", device=CPU, dtype=dtype, rows=2 * B).name == "cpp"
    y = taps_fast.taps_mt_linear(x, ids, w, deltas, slot, scores, th, b)
    y_ref = taps_fast.taps_mt_linear_ref(x.double(), ids, w.double(), deltas.double(), slot, scores.double(),
                                         th.double(), b.double())
    assert_rel_close(y, y_ref, dtype, "y")


@needs_ext
def test_small_ops_pass_opcheck():
    x, w, d, b = _linear_case(5, 9, 11, torch.float32, CPU)
    torch.library.opcheck(torch.ops.taps_fast.small_linear.default, (x, w, d, torch.tensor(0.5), b, 0.1))
    torch.library.opcheck(torch.ops.taps_fast.small_linear.default, (x, w, d, torch.tensor(0.05), None, 0.1))
    deltas = torch.randn(2, 9, 11)
    args = (x, torch.tensor([0, 1, -1, 1, 0]), w, deltas, torch.tensor([1, 0]), torch.tensor([0.5, 0.5]),
            torch.tensor([0.1, 0.1]), b)
    torch.library.opcheck(torch.ops.taps_fast.small_mt_linear.default, args)


@needs_ext
def test_unboxed_entry_point_is_the_op():
    """taps_fast._C.small_linear (the eager path's call, csrc/fast_call.cpp) gives the op's result
    bit for bit, gate open and closed, with and without bias; its own argument errors are
    TypeErrors naming the argument, and the op's contract checks reach Python as the op's."""
    import threading

    mod = _ext.load()[0]
    x, w, d, b = _linear_case(5, 9, 11, torch.float32, CPU)
    for score in (torch.tensor(0.5), torch.tensor(0.05), torch.tensor(0.5, dtype=torch.float64)):
        for bias in (b, None):
            want = torch.ops.taps_fast.small_linear(x, w, d, score, bias, 0.1)
            got = mod.small_linear(x, w, d, score, bias, 0.1)
            assert got.dtype == want.dtype and got.shape == want.shape and torch.equal(got, want)
    with pytest.raises(TypeError, match="expected 6 arguments"):
        mod.small_linear(x, w, d, torch.tensor(0.5), b)
    with pytest.raises(TypeError, match="delta must be a Tensor, got list"):
        mod.small_linear(x, w, [1.0], torch.tensor(0.5), b, 0.1)
    with pytest.raises(TypeError, match="bias must be a Tensor"):
        mod.small_linear(x, w, d, torch.tensor(0.5), 3, 0.1)
    with pytest.raises(TypeError):
        mod.small_linear(x, w, d, torch.tensor(0.5), b, "0.1")
    with pytest.raises(RuntimeError, match="x has K=11 columns but weight has in_features=10"):
        mod.small_linear(x, w[:, :10].contiguous(), d[:, :10].contiguous(), torch.tensor(0.5), b, 0.1)
    with pytest.raises(RuntimeError, match="must be contiguous"):
        mod.small_linear(x, w.t().contiguous().t(), d, torch.tensor(0.5), b, 0.1)
    # several threads at once (the call releases the GIL while the kernel runs)
    results = [None] * 4
    threads = [threading.Thread(target=lambda i=i: results.__setitem__(
        i, mod.small_linear(x, w, d, torch.tensor(0.5), b, 0.1))) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    want = torch.ops.taps_fast.small_linear(x, w, d, torch.tensor(0.5), b, 0.1)
    assert all(torch.equal(r, want) for r in results)


@needs_ext
def test_compiled_taps_linear_module_uses_the_kernel_without_graph_breaks():
    torch._dynamo.reset()
    lin = taps_fast.TAPSLinear(19, 7)
    with torch.no_grad():
        lin.delta.normal_(0, 0.1)
    x = torch.randn(4, 19)
    want = lin(x)
    got = torch.compile(lin, fullgraph=True)(x)
    assert_rel_close(got, want.double(), torch.float32, "compiled")


@needs_ext
@pytest.mark.parametrize("cpu_chunk", [3, 0], ids=["chunks", "mixed"])
def test_small_batch_multitask_serving_on_cpp_matches_each_task_alone(cpu_chunk, monkeypatch):
    """A MultiTaskModel (test_vit, float64) serving 3 images of 5 tokens: 15 rows per layer call,
    so its linear layers run on the cpp kernels (the single-task one on task-pure chunks, the
    mixed-batch one in one call); every row equals its task's own model."""
    from taps_fast.ops import ext_backend
    from multitask.test_multitask import SIZES, build, check_rows, oracle_rows

    calls = {"linear_fwd": 0, "mt_linear_fwd": 0}
    for op in calls:
        def counted(*a, _f=ext_backend.KERNELS[op], _op=op):
            calls[_op] += 1
            return _f(*a)
        monkeypatch.setitem(ext_backend.KERNELS, op, counted)
    monkeypatch.setattr(taps_fast.MultiTaskModel, "CPU_CHUNK_MIN_ROWS", 0)  # chunks, however few rows per task
    mt, tasks, base_oracle = build("test_vit", T=3, cpu_chunk=cpu_chunk)
    for m in [mt, base_oracle] + tasks:
        m.eval()
    x = torch.randn(3, 3, SIZES["test_vit"], SIZES["test_vit"], dtype=torch.float64)
    ids = torch.tensor([2, -1, 0])
    with torch.no_grad():
        out = mt(x, ids)
    rows = oracle_rows(x, ids, tasks, base_oracle)
    check_rows(out, rows, ids, tasks, base_oracle)
    assert calls["mt_linear_fwd" if cpu_chunk == 0 else "linear_fwd"] > 0, calls


# ----------------------------------------------------------------------------- on a GPU
@gpu
@needs_cuda
@needs_ext
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_cuda_backend_serves_few_rows_and_matches_the_oracle(dtype):
    dev = torch.device("cuda")
    assert dispatch.select("linear_fwd", device=dev, dtype=dtype, rows=4).name == "cuda"
    assert dispatch.select("mt_linear_fwd", device=dev, dtype=dtype, rows=CUDA_MAX_ROWS + 1).name != "cuda"
    x, w, d, b = _linear_case(4, 100, 72, dtype, dev)
    for score in (0.5, 0.05):
        y = taps_fast.taps_linear(x, w, d, torch.tensor(score, device=dev), b)
        y_ref = taps_fast.taps_linear_ref(x.double(), w.double(), d.double(), torch.tensor(score, device=dev).double(),
                                          b.double())
        assert_rel_close(y, y_ref, dtype, f"score {score}")


@gpu
@needs_cuda
@needs_ext
def test_cuda_kernels_never_sync_and_capture_in_a_cuda_graph():
    dev = torch.device("cuda")
    x, w, d, b = _linear_case(4, 256, 136, torch.bfloat16, dev)
    deltas = torch.stack([d, -d])
    ids = torch.tensor([1, 0, -1, 1], device=dev, dtype=torch.int32)
    slot = torch.tensor([0, 1], device=dev)
    sc = torch.tensor([0.5, 0.5], device=dev)
    th = torch.tensor([0.1, 0.1], device=dev)
    s = torch.tensor(0.5, device=dev)
    run = lambda: (torch.ops.taps_fast.small_linear(x, w, d, s, b, 0.1),  # noqa: E731
                   torch.ops.taps_fast.small_mt_linear(x, ids, w, deltas, slot, sc, th, b))
    want = [t.clone() for t in run()]
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        run()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    g = torch.cuda.CUDAGraph()
    st = torch.cuda.Stream()
    st.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(st), torch.cuda.graph(g, stream=st):
        outs = run()
    torch.cuda.current_stream().wait_stream(st)
    for o in outs:
        o.fill_(float("nan"))
    g.replay()
    torch.cuda.synchronize()
    for o, e in zip(outs, want):
        torch.testing.assert_close(o, e, rtol=0, atol=0)


def test_cuda_backend_checks_the_compute_capability(monkeypatch):
    """The cuda backend serves only GPUs its build runs on: a cubin on its own major version at
    the same or a higher minor, PTX on anything newer; else the reason names the build and the
    GPU (instead of "no kernel image" at the first launch)."""
    monkeypatch.setattr(_ext, "cuda_archs", lambda: ((8, 0, False), (9, 0, True)))
    for cap in ((8, 0), (8, 6), (8, 9), (9, 0), (10, 0), (12, 0)):
        assert _ext.cuda_arch_reason(cap) is None, cap
    for cap in ((7, 5), (7, 0)):
        why = _ext.cuda_arch_reason(cap)
        assert f"sm_{cap[0]}{cap[1]}" in why and "sm_80, sm_90+PTX" in why
    monkeypatch.setattr(_ext, "cuda_archs", lambda: ((8, 0, False), (9, 0, False)))
    assert "rebuild with TORCH_CUDA_ARCH_LIST including 10.0" in _ext.cuda_arch_reason((10, 0))
    assert _ext.cuda_arch_reason((9, 0)) is None
    monkeypatch.setattr(_ext, "cuda_archs", lambda: ())
    assert "no GPU architecture" in _ext.cuda_arch_reason((9, 0))
    # through the backend: a GPU the build cannot run is refused with that reason
    from taps_fast.ops import ext_backend

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 5))
    monkeypatch.setattr(_ext, "cuda_archs", lambda: ((8, 0, False), (9, 0, True)))
    why = ext_backend.why_not_cuda("linear_fwd", torch.device("cuda", 0), torch.float16, rows=1)
    assert why is not None and "sm_75" in why
