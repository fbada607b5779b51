"""Shared test helpers. The relative error bounds per dtype live here and only here."""
import contextlib

import torch

# Max |actual - expected| / max(|expected|_max, tiny), compared with a float64 oracle.
# fp32: a few ulps times sqrt(K) growth on the small shapes the tests use; fp16: 2^-10 ulp with
# fp32 accumulation on the same shapes; bf16: 2^-7 ulp.
RTOL = {
    torch.float64: 1e-12,
    torch.float32: 2e-5,
    torch.float16: 4e-3,
    torch.bfloat16: 3e-2,
}



def triton_dtypes() -> list:
    """The dtypes the Triton kernel tests run: fp32, fp16, and bf16 on a GPU or under an
    interpreter that computes bf16 as a GPU does (tests/interpreter_bf16.py, applied by
    conftest.py; stock interpreters compute bf16 tl.dot on the bit patterns)."""
    import interpreter_bf16

    bf16 = torch.cuda.is_available() or interpreter_bf16.applied()
    return [torch.float32, torch.float16] + ([torch.bfloat16] if bf16 else [])


# Whole-model comparisons (a network's forward or gradients against the same network computed
# another way, e.g. a mixed batch against each task's own model): the rounding of dozens of
# layers, BatchNorm statistics summed in another order, and the backward through all of them.
RTOL_MODEL = {
    torch.float64: 1e-9,
    torch.float32: 1e-4,
}


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    a = actual.detach().double()
    e = expected.detach().double()
    assert a.shape == e.shape, (a.shape, e.shape)
    assert torch.isfinite(a).all(), "non-finite values in the result (unwritten elements?)"
    scale = e.abs().max().clamp_min(1e-30)
    return float((a - e).abs().max() / scale)


def assert_rel_close(actual, expected, dtype, what="", bounds=RTOL):
    err = rel_err(actual, expected)
    bound = bounds[dtype]
    assert err <= bound, f"{what}: relative error {err:.3g} > bound {bound:.3g} for {dtype}"


def assert_scaled_close(actual, expected, scale, dtype, what=""):
    """For sums of products (matmul, conv, their gradients, ds): each element's error is measured
    against the same sum taken over absolute values (scale), the size of what was added, so that
    cancellation in a single output element cannot inflate the relative error."""
    a = actual.detach().double()
    assert a.shape == expected.shape, (what, a.shape, expected.shape)
    assert torch.isfinite(a).all(), f"{what}: non-finite values in the result (unwritten elements?)"
    s = scale.detach().double()
    err = float(((a - expected.double()).abs() / s.clamp_min(1e-6 * float(s.max()) + 1e-30)).max())
    bound = RTOL[dtype]
    assert err <= bound, f"{what}: relative error {err:.3g} > bound {bound:.3g} for {dtype}"


@contextlib.contextmanager
def tf32_allowed(on: bool = True):
    """torch's TF32 switches for matmul and cuDNN set to ``on`` inside the block, restored after.
    (pytest's monkeypatch cannot restore them: torch.backends.cuda.matmul is a module proxy whose
    attributes live behind __getattr__, and pytest 9 then deletes the attribute on undo.)"""
    flags = (torch.backends.cuda.matmul, torch.backends.cudnn)
    before = [f.allow_tf32 for f in flags]
    try:
        for f in flags:
            f.allow_tf32 = on
        yield
    finally:
        for f, b in zip(flags, before):
            f.allow_tf32 = b


def check_prune_by_dtype(prune) -> None:
    """An autotuner's early_config_prune keeps exactly the tiles its family lists for the input's
    element size: on the configs mm_configs makes for a GPU (each tile once) and on those configs
    rebuilt as Triton's autotune disk cache rebuilds them, Config(**config.__dict__)."""
    import triton

    from taps_fast.kernels import _common as kcommon

    interpret = kcommon.INTERPRET
    kcommon.INTERPRET = False  # the GPU's configs, not the interpreter's single one
    try:
        configs = kcommon.mm_configs(prune.family, *prune.names)
    finally:
        kcommon.INTERPRET = interpret
    assert len({kcommon.config_signature(c) for c in configs}) == len(configs)  # each tile once
    reloaded = [triton.Config(**c.__dict__) for c in configs]
    names = prune.names
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        size = torch.empty(0, dtype=dtype).element_size()
        want = sorted(set(prune.family[size]))
        for cfgs in (configs, reloaded):
            kept = prune(cfgs, {prune.arg: torch.empty(1, dtype=dtype)})
            got = sorted(tuple(c.kwargs[k] for k in names) + (c.num_warps, c.num_stages) for c in kept)
            assert got == want, (dtype, got, want)


def triton_device():
    """Where the forced Triton backend can run a test's tensors: the GPU when there is one, the
    CPU under Triton's interpreter (TRITON_INTERPRET=1, set by conftest.py without a GPU), else
    None. A test that forces "triton" on CPU tensors fails on a GPU machine, where the
    interpreter is off and the backend refuses CPU tensors."""
    from taps_fast.ops import triton_backend

    if triton_backend.available() is not None:
        return None
    if torch.cuda.is_available():
        return torch.device("cuda")
    return torch.device("cpu") if triton_backend._interpret() else None


def skip_module_without_triton() -> None:
    """Skip the calling test module when the Triton backend cannot run here (no triton, or no
    GPU and no TRITON_INTERPRET)."""
    import pytest

    from taps_fast.ops import triton_backend

    if triton_backend.available() is not None or (not torch.cuda.is_available() and not triton_backend._interpret()):
        pytest.skip(f"triton backend unavailable: {triton_backend.available()}", allow_module_level=True)
