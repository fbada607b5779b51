"""Differential fuzz tests: the TAPS ops and layers against their float64 autograd oracles, on
every CPU backend the dispatcher offers: "reference" (pure PyTorch), "cpp" (the compiled
extension: the linear forwards, few rows) and "triton" (under TRITON_INTERPRET=1, which
tests/conftest.py sets on a machine without a GPU; tiny shapes, the interpreter is slow).

Hypothesis draws each case:
- taps_linear / TAPSLinear and taps_conv2d / TAPSConv2d: shapes with empty batches and size-1
  dimensions, fp64 / fp32 / fp16 / bf16 where the backend serves the dtype, scores in the input's
  dtype or another one, transposed, strided (NaN in the gaps), offset and broadcast views,
  channels_last, every conv option (stride, padding int / pair / 'same' / 'valid', dilation,
  groups, bias; in TAPSConv2d the padding modes zeros / reflect / replicate / circular), unbatched
  conv input, and the gate at its edges: open, closed, a score exactly at τ in the score's dtype
  (open: the gate is s >= τ), one ulp either side of τ, +inf (open) and -inf (closed), with finite
  outputs throughout.
- taps_mt_linear / taps_mt_conv2d: random task tables (tasks without a delta, delta slots no task
  uses, T = 0 with slot, scores and thresholds of shape [0]), batches sorted, unsorted, of one
  task or all base rows (-1), task ids in int32 / int64, and in int8 / int16 / uint8, which must
  give exactly the int64 results.

Each case runs forward and backward (dx, dΔW, ds, db, and dW when the base is unfrozen; a random
subset of the inputs asks for gradients, so every branch of the backward runs) and is compared
with the oracle (taps_linear_ref, taps_conv2d_ref, taps_mt_linear_ref, taps_mt_conv2d_ref; an
nn.Conv2d for the padding modes) in float64 on the same rounded inputs. The bounds are
tests/helpers.py's, measured against the same computation over absolute values
(assert_scaled_close), so cancellation can neither inflate nor hide an error. Kernel outputs are
NaN-filled before each call (the Triton launchers' and the compiled kernels' poison switches) and
every result must be finite, so an element no kernel writes fails.

The oracles' straight-through gate g + s - s.detach() is NaN for an infinite score (inf - inf),
so the oracle gets a finite score on the same side of τ; ds does not depend on the score's value.

Examples: a few per test and backend by default, derandomized (the same cases on every
run; the file takes a few seconds on two cores), plus fixed cases at the gate's edges (a score
exactly at τ, ±inf) that every run includes. TAPS_FUZZ_EXAMPLES=<n> draws n examples in every
test instead, for a long hunt: ``TAPS_FUZZ_EXAMPLES=300 pytest tests/ops/test_fuzz_ops.py``.
"""
import contextlib
import dataclasses
import math
import os
from dataclasses import dataclass
from typing import Optional, Tuple

import pytest
import torch
import torch.nn as nn
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from taps_fast import (
    TAPSConv2d,
    TAPSLinear,
    _ext,
    dispatch,
    taps_conv2d,
    taps_conv2d_ref,
    taps_linear,
    taps_linear_ref,
    taps_mt_conv2d,
    taps_mt_conv2d_ref,
    taps_mt_linear,
    taps_mt_linear_ref,
)
from taps_fast.ops.ext_backend import CPP_MAX_ROWS

from helpers import RTOL, assert_scaled_close, triton_dtypes

CPU = torch.device("cpu")
F64, F32, F16, BF16 = torch.float64, torch.float32, torch.float16, torch.bfloat16

# ----------------------------------------------------------------------------- backends
# What each backend serves on CPU tensors (taps_fast/ops/ext_backend.py, triton_backend.py); the
# strategies draw only calls the forced backend serves. Triton: no fp64 (bf16 under the
# interpreter through tests/interpreter_bf16.py); conv with groups = 1 only; small tiles ("tiny" shapes).
DTYPES = {"reference": (F64, F32, F16, BF16), "cpp": (F64, F32, F16, BF16), "triton": tuple(triton_dtypes())}
TINY = {"reference": False, "cpp": False, "triton": True}
# Examples drawn per test by default, for a few seconds in all on two cores: a case takes
# milliseconds on the CPU backends, the interpreter ~0.05 s per linear and ~0.2 s per conv case.
# The first drawn case is hypothesis' simplest (an empty batch).
DEFAULT_EXAMPLES = {"reference": 20, "cpp": 20, "triton": 3}
DEFAULT_EXAMPLES_TRITON_CONV = 2
EXAMPLES = os.environ.get("TAPS_FUZZ_EXAMPLES")
CPU_CAPABILITY_VAR = "TAPS_FAST_CPU_CAPABILITY"


def _backend(name: str) -> dispatch.Backend:
    return {b.name: b for b in dispatch.backends()}[name]


def _why_not_here(name: str) -> Optional[str]:
    """Why the backend cannot serve CPU tensors here, forced (None: it can)."""
    with dispatch.use_backend(name):
        return dispatch.reasons("linear_fwd", device=CPU, dtype=F32, rows=1, numel=1)[name]


def _backends_with(kernel: str) -> list:
    """(name, skip mark) of each CPU backend with the kernel, skipped where it cannot serve."""
    out = []
    for name in ("reference", "cpp", "triton"):
        if kernel in _backend(name).kernels:
            why = _why_not_here(name)
            out.append((name, pytest.mark.skipif(why is not None, reason=str(why))))
    return out


def backends_for(kernel: str):
    """Parametrize ``backend`` over the CPU backends with the kernel."""
    return pytest.mark.parametrize("backend", [pytest.param(n, marks=m) for n, m in _backends_with(kernel)])


MT_FORWARD = {"linear": "mt_linear_fwd", "conv": "mt_conv2d_fwd"}


def mt_ops_and_backends():
    """Parametrize ``op`` ("linear", "conv") and ``backend`` over the backends with its
    multi-task kernels."""
    return pytest.mark.parametrize("op,backend", [
        pytest.param(op, n, marks=m, id=f"{op}-{n}") for op, kernel in MT_FORWARD.items()
        for n, m in _backends_with(kernel)])


def fits(backend: str, rows: int) -> bool:
    """Whether a call of this many rows goes to the forced backend: the compiled kernels serve
    few rows only (ext_backend.CPP_MAX_ROWS)."""
    return backend != "cpp" or rows <= CPP_MAX_ROWS


def backward_backend(backend: str, op: str) -> Optional[str]:
    """The backend forced for the backward: the same one where it has the kernel ("cpp" has
    forward kernels only: its backward is the automatic choice)."""
    return backend if op in _backend(backend).kernels else None


@pytest.fixture(autouse=True, scope="module")
def _poisoned_outputs():
    """Every buffer the Triton launchers and the compiled kernels allocate is NaN-filled."""
    kcommon = None
    if _why_not_here("triton") is None:
        from taps_fast.kernels import _common as kcommon  # imports triton
        kcommon_poison, kcommon.POISON_OUTPUTS = kcommon.POISON_OUTPUTS, True
    ext = _ext.load()[0]
    if ext is not None:
        ext._set_poison_outputs(True)
    yield
    if kcommon is not None:
        kcommon.POISON_OUTPUTS = kcommon_poison
    if ext is not None:
        ext._set_poison_outputs(False)


def fuzz(check, cases, backend: str, op: str, explicit=()) -> None:
    """Run ``check(backend, case)`` on the ``explicit`` cases, then on cases of ``op`` drawn from
    the strategy ``cases``: the default count for the backend, or TAPS_FUZZ_EXAMPLES;
    derandomized, so every run sees the same cases. A failing Triton case is reported as drawn:
    the interpreter is too slow to shrink it (hundreds of reruns). The explicit cases run as
    plain calls: as hypothesis' @example they run the interpreter ~2.5x slower."""
    if EXAMPLES:
        examples = int(EXAMPLES)
    elif backend == "triton" and "conv" in op:
        examples = DEFAULT_EXAMPLES_TRITON_CONV
    else:
        examples = DEFAULT_EXAMPLES[backend]
    phases = (Phase.explicit, Phase.reuse, Phase.generate) if backend == "triton" else tuple(Phase)

    @settings(max_examples=examples, deadline=None, derandomize=True, database=None, phases=phases,
              suppress_health_check=[HealthCheck.too_slow])
    @given(case=cases)
    def run(case):
        check(backend, case)

    # One thread: the cases are tiny, and with two, on a busy two-core machine (`make test` runs two test
    # workers), each small CPU op can wait ~16 ms for the pool's other thread.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for case in explicit:
            try:
                check(backend, case)
            except Exception as e:
                e.add_note(f"Failing explicit case: {case!r}")
                raise
        run()
    finally:
        torch.set_num_threads(threads)


@contextlib.contextmanager
def cpu_kernel_copy(name: str):
    """Which copy of the compiled CPU kernels runs: "native" (AVX2 where the CPU has it) or
    "portable" (the DEFAULT copy, forced with TAPS_FAST_CPU_CAPABILITY=default)."""
    old = os.environ.pop(CPU_CAPABILITY_VAR, None)
    if name == "portable":
        os.environ[CPU_CAPABILITY_VAR] = "default"
    try:
        yield
    finally:
        os.environ.pop(CPU_CAPABILITY_VAR, None)
        if old is not None:
            os.environ[CPU_CAPABILITY_VAR] = old


def cpu_kernel_copies(backend: str):
    return st.sampled_from(("native", "portable")) if backend == "cpp" else st.just("native")


# ----------------------------------------------------------------------------- gates
GATES = ("open", "closed", "at_threshold", "ulp_below", "ulp_above", "inf", "-inf")
OPEN_GATES = ("open", "at_threshold", "ulp_above", "inf")
THRESHOLDS = (0.1, 0.0, -0.3, 1 / 3)


def gate_score(kind: str, threshold: float, dtype: torch.dtype) -> torch.Tensor:
    """A 0-dim score in ``dtype`` placed relative to τ rounded to that dtype (torch compares
    s >= τ in the score's dtype): at it, one ulp either side, well inside, or infinite."""
    tau = torch.tensor(threshold, dtype=dtype)
    inf = torch.tensor(math.inf, dtype=dtype)
    return {
        "open": tau + 0.25,
        "closed": tau - 0.25,
        "at_threshold": tau,
        "ulp_below": torch.nextafter(tau, -inf),
        "ulp_above": torch.nextafter(tau, inf),
        "inf": inf,
        "-inf": -inf,
    }[kind]


def finite_scores(scores: torch.Tensor, thresholds: torch.Tensor) -> torch.Tensor:
    """float64 scores for the oracle: the same gates, an infinite score replaced by a finite one
    on the same side of τ (τ itself for +inf, τ - 1 for -inf)."""
    s, t = scores.detach().double(), thresholds.double()
    return torch.where(s == math.inf, t, torch.where(s == -math.inf, t - 1, s))


def ste_gate(score: torch.Tensor, threshold) -> torch.Tensor:
    """The straight-through gate of the oracles: value 1[s >= τ], derivative 1 in s."""
    g = (score.detach() >= threshold).to(score.dtype)
    return g + score - score.detach()


def coarser(a: torch.dtype, b: torch.dtype) -> torch.dtype:
    """The dtype with the looser bound (ds is rounded to the score's dtype)."""
    return a if RTOL[a] >= RTOL[b] else b


# ----------------------------------------------------------------------------- layouts
X_LAYOUTS = ("contiguous", "transposed", "strided", "offset", "broadcast")
CONV_X_LAYOUTS = ("contiguous", "channels_last", "transposed", "strided", "offset")


def arrange(t: torch.Tensor, layout: str) -> torch.Tensor:
    """A tensor holding t's values in the given memory layout. Layouts with gaps are views into
    a NaN-filled buffer, so a kernel that reads a wrong stride or offset reads NaN."""
    nan = math.nan
    if layout == "channels_last" and t.dim() == 4:
        return t.contiguous(memory_format=torch.channels_last)
    if layout == "channels_last" and t.dim() == 5:  # stacked conv deltas, channel innermost
        return t.permute(0, 1, 3, 4, 2).contiguous().permute(0, 1, 4, 2, 3)
    if layout == "transposed" and t.dim() >= 2:  # the last two dimensions swapped in memory
        return t.transpose(-1, -2).contiguous().transpose(-1, -2)
    if layout == "strided" and t.dim() >= 1:  # every other element of the last dimension
        buf = torch.full(tuple(t.shape[:-1]) + (2 * t.shape[-1],), nan, dtype=t.dtype)
        buf[..., ::2] = t
        return buf[..., ::2]
    if layout == "offset":  # a storage offset
        buf = torch.full((t.numel() + 3,), nan, dtype=t.dtype)
        buf[3:] = t.reshape(-1)
        return buf[3:].view(t.shape)
    if layout == "broadcast" and t.dim() >= 1 and t.shape[0] > 0:  # stride 0 along dim 0
        return t[:1].expand(t.shape)
    return t.contiguous()


def values(gen: torch.Generator, shape, dtype: torch.dtype, scale: float = 1.0) -> torch.Tensor:
    """Random values of either sign with magnitudes in [0.5, 1.5)·scale, rounded to dtype. Away
    from zero, so that no product of two of them falls in fp16's subnormal range, where the
    rounding of a one-term sum would exceed the fp16 bound relative to its own size."""
    shape = tuple(shape)
    magnitude = 0.5 + torch.rand(shape, generator=gen, dtype=F64)
    sign = torch.randint(0, 2, shape, generator=gen, dtype=F64) * 2 - 1
    return (sign * magnitude * scale).to(dtype)


# ----------------------------------------------------------------------------- oracle, checks
SCORE_NAMES = ("score", "scores")
GATE_INPUTS = SCORE_NAMES + ("thresholds",)  # their values are the gates: never made absolute


def _oracle_leaf(t, absolute: bool, grad: bool):
    if t is None or not t.is_floating_point():
        return t
    t = t.detach().double()
    return (t.abs() if absolute else t).requires_grad_(grad)


def grads_of(y: torch.Tensor, wrt, dy: torch.Tensor):
    """Gradients of y (grad_output dy) w.r.t. wrt; zeros for an input y does not depend on."""
    if not wrt:
        return ()
    return torch.autograd.grad(y, wrt, dy, allow_unused=True, materialize_grads=True)


def oracle(fn, inputs: dict, wrt, dy: torch.Tensor):
    """[(y, {name: gradient}), (the same over absolute values)] of ``fn(**inputs)`` in float64.
    The second run is the error scale of each result (helpers.assert_scaled_close): every
    floating input but the scores and thresholds (whose values are the gates), and dy, replaced
    by its absolute value."""
    runs = []
    for absolute in (False, True):
        ts = {k: _oracle_leaf(v, absolute and k not in GATE_INPUTS, k in wrt) for k, v in inputs.items()}
        y = fn(**ts)
        if y.requires_grad:
            g = grads_of(y, [ts[k] for k in wrt], dy.double().abs() if absolute else dy.double())
        else:  # no input asked for is used (e.g. the deltas of an all-base batch)
            g = [torch.zeros_like(ts[k]) for k in wrt]
        runs.append((y.detach(), dict(zip(wrt, g))))
    return runs


def assert_matches(what: str, got: torch.Tensor, want: torch.Tensor, scale: torch.Tensor,
                   dtype: torch.dtype, bound_dtype: torch.dtype) -> None:
    assert got.dtype == dtype, f"{what}: dtype {got.dtype}, expected {dtype}"
    assert tuple(got.shape) == tuple(want.shape), f"{what}: shape {tuple(got.shape)}, expected {tuple(want.shape)}"
    if want.numel():
        assert_scaled_close(got, want, scale, bound_dtype, what)


def compare(y, got_grads: dict, inputs: dict, runs, dtype, score_dtype) -> None:
    """y and every gradient against the oracle's runs, each in its input's dtype and bound."""
    (y64, g64), (y_abs, g_abs) = runs
    assert_matches("y", y, y64, y_abs, dtype, dtype)
    for name, g in got_grads.items():
        sdt = name in SCORE_NAMES
        want_dtype = score_dtype if sdt else inputs[name].dtype
        bound = coarser(dtype, score_dtype) if sdt else dtype
        assert_matches(f"d{name}", g, g64[name], g_abs[name], want_dtype, bound)


# ----------------------------------------------------------------------------- linear
@dataclass(frozen=True)
class LinearCase:
    dtype: torch.dtype
    score_dtype: torch.dtype
    lead: Tuple[int, ...]  # x's leading dimensions (none, or sizes including 0 and 1)
    in_features: int
    out_features: int
    bias: bool
    gate: str
    threshold: float
    module: bool  # through TAPSLinear (score in the layer's dtype) instead of taps_linear
    x_layout: str
    weight_layout: str
    delta_layout: str
    dy_layout: str
    grads: Tuple[str, ...]  # the inputs that require a gradient
    cpu_kernel: str  # the compiled CPU kernels' copy ("cpp" backend): native or portable
    seed: int


@st.composite
def linear_cases(draw, backend: str):
    tiny = TINY[backend]
    dtype = draw(st.sampled_from(DTYPES[backend]))
    module = draw(st.booleans())
    score_dtype = dtype if module else draw(st.sampled_from((dtype, F32, F64, F16)))
    lead = tuple(draw(st.lists(st.integers(0, 3 if tiny else 5), max_size=2).filter(
        lambda dims: fits(backend, math.prod(dims)))))
    feat = st.integers(1, 16 if tiny else 40)
    bias = draw(st.booleans())
    names = ("x", "weight", "delta", "score") + (("bias",) if bias else ())
    weight_layouts = ("contiguous",) if module else ("contiguous", "transposed", "strided", "offset")
    return LinearCase(
        dtype=dtype, score_dtype=score_dtype, lead=lead, in_features=draw(feat),
        out_features=draw(feat), bias=bias, gate=draw(st.sampled_from(GATES)),
        threshold=draw(st.sampled_from(THRESHOLDS)), module=module,
        x_layout=draw(st.sampled_from(X_LAYOUTS)),
        weight_layout=draw(st.sampled_from(weight_layouts)),
        delta_layout=draw(st.sampled_from(weight_layouts)),
        dy_layout=draw(st.sampled_from(X_LAYOUTS)),
        grads=tuple(sorted(draw(st.sets(st.sampled_from(names))))), cpu_kernel=draw(cpu_kernel_copies(backend)),
        seed=draw(st.integers(0, 2**16)),
    )


def check_linear(backend: str, case: LinearCase) -> None:
    gen = torch.Generator().manual_seed(case.seed)
    k, n, dt = case.in_features, case.out_features, case.dtype
    inputs = dict(
        x=arrange(values(gen, case.lead + (k,), dt), case.x_layout),
        weight=arrange(values(gen, (n, k), dt, k ** -0.5), case.weight_layout),
        delta=arrange(values(gen, (n, k), dt, k ** -0.5), case.delta_layout),
        score=gate_score(case.gate, case.threshold, case.score_dtype),
        bias=values(gen, (n,), dt) if case.bias else None,
    )
    dy = arrange(values(gen, case.lead + (n,), dt), case.dy_layout)
    if case.module:
        layer = TAPSLinear(k, n, bias=case.bias, dtype=dt, threshold=case.threshold)
        with torch.no_grad():
            for name in ("weight", "delta", "score", "bias"):
                if inputs[name] is not None:
                    getattr(layer, name).copy_(inputs[name])
        params = {name: getattr(layer, name) for name in ("weight", "delta", "score", "bias")}
        leaves = dict(params, x=inputs["x"])
        forward = layer
    else:
        leaves = inputs
        forward = lambda x: taps_linear(x, inputs["weight"], inputs["delta"], inputs["score"],  # noqa: E731
                                        inputs["bias"], case.threshold)
    for name, t in leaves.items():
        if t is not None:
            t.requires_grad_(name in case.grads)
    wrt = [name for name in case.grads if leaves[name] is not None]

    with dispatch.use_backend(backend), cpu_kernel_copy(case.cpu_kernel):
        y = forward(leaves["x"])
    with dispatch.use_backend(backward_backend(backend, "linear_bwd")):
        got = dict(zip(wrt, grads_of(y, [leaves[name] for name in wrt], dy)))

    tau = float(torch.tensor(case.threshold, dtype=case.score_dtype))  # τ in the score's dtype
    ref = dict(inputs, score=finite_scores(inputs["score"], torch.tensor(tau, dtype=F64)))
    assert bool(ref["score"] >= tau) == (case.gate in OPEN_GATES)
    runs = oracle(lambda **a: taps_linear_ref(a["x"], a["weight"], a["delta"], a["score"], a["bias"], tau),
                  ref, wrt, dy)
    compare(y, got, inputs, runs, dt, case.score_dtype)


def linear_edges() -> list:
    """The cases every run includes: a score exactly at τ (open) in fp16 with fp32 inputs, τ =
    0.1 rounded to fp16 (below 0.1), so a gate read as s > τ, or compared with τ unrounded,
    fails; an fp64 score one ulp below τ (closed: an fp64 score compares in double, and in fp32
    it would round up to τ); and TAPSLinear with an infinite score (open, finite outputs)."""
    at_threshold = LinearCase(
        dtype=F32, score_dtype=F16, lead=(3,), in_features=5, out_features=4, bias=True,
        gate="at_threshold", threshold=0.1, module=False, x_layout="contiguous",
        weight_layout="contiguous", delta_layout="contiguous", dy_layout="contiguous",
        grads=("bias", "delta", "score", "x"), cpu_kernel="native", seed=0)
    return [at_threshold, dataclasses.replace(at_threshold, score_dtype=F64, gate="ulp_below"),
            dataclasses.replace(at_threshold, score_dtype=F32, gate="inf", module=True)]


@backends_for("linear_fwd")
def test_linear_matches_float64_oracle(backend):
    """taps_linear and TAPSLinear, forward on the forced backend, backward on it where it has
    the kernel: every gradient against taps_linear_ref in float64."""
    fuzz(check_linear, linear_cases(backend), backend, "linear", linear_edges())


# ----------------------------------------------------------------------------- conv geometry
@dataclass(frozen=True)
class ConvGeometry:
    batch: int
    in_channels: int
    out_channels: int
    groups: int
    kernel_size: Tuple[int, int]
    stride: object  # an int or a pair
    padding: object  # an int, a pair, 'same' or 'valid'
    dilation: object  # an int or a pair
    size: Tuple[int, int]  # H, W

    def kwargs(self) -> dict:
        return dict(stride=self.stride, padding=self.padding, dilation=self.dilation, groups=self.groups)


def _int_or_pair(draw, pair):
    return pair[0] if pair[0] == pair[1] and draw(st.booleans()) else pair


@st.composite
def conv_geometries(draw, tiny: bool, max_batch: int):
    groups = 1 if tiny else draw(st.integers(1, 3))
    per_group = st.integers(1, 2 if tiny else 3)
    kernel = (draw(st.integers(1, 3)), draw(st.integers(1, 3 if tiny else 4)))
    dilation = (draw(st.integers(1, 2)), draw(st.integers(1, 2)))
    kind = draw(st.sampled_from(("int", "pair", "same", "valid")))
    stride = (1, 1) if kind == "same" else (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
    if kind == "int":
        pad = (draw(st.integers(0, 2)),) * 2
        padding = pad[0]
    elif kind == "pair":
        pad = (draw(st.integers(0, 2)), draw(st.integers(0, 2)))
        padding = pad
    else:
        pad, padding = (0, 0), kind
    size = []
    for k, d, p in zip(kernel, dilation, pad):
        span = d * (k - 1) + 1
        side = span // 2 if kind == "same" else p  # the widest side pad (reflect needs < size)
        low = max(1, side + 1) if kind == "same" else max(1, span - 2 * p, p + 1)
        size.append(low + draw(st.integers(0, 1 if tiny else 3)))
    return ConvGeometry(
        batch=draw(st.integers(0, max_batch)), in_channels=groups * draw(per_group),
        out_channels=groups * draw(per_group), groups=groups, kernel_size=kernel,
        stride=_int_or_pair(draw, stride), padding=padding, dilation=_int_or_pair(draw, dilation),
        size=tuple(size),
    )


def conv_weight_shape(geo: ConvGeometry) -> Tuple[int, ...]:
    return (geo.out_channels, geo.in_channels // geo.groups) + geo.kernel_size


def strictly_channels_last(t: torch.Tensor) -> bool:
    return t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last) and not t.is_contiguous()


# ----------------------------------------------------------------------------- conv
@dataclass(frozen=True)
class ConvCase:
    dtype: torch.dtype
    score_dtype: torch.dtype
    geometry: ConvGeometry
    unbatched: bool  # a 3-D input (one sample)
    padding_mode: str  # TAPSConv2d's; the functional op pads with zeros
    bias: bool
    gate: str
    threshold: float
    module: bool  # through TAPSConv2d instead of taps_conv2d
    x_layout: str
    weight_layout: str
    dy_layout: str
    grads: Tuple[str, ...]
    seed: int


@st.composite
def conv_cases(draw, backend: str, module: bool):
    tiny = TINY[backend]
    dtype = draw(st.sampled_from(DTYPES[backend]))
    geo = draw(conv_geometries(tiny, max_batch=2 if tiny else 3))
    bias = draw(st.booleans())
    names = ("x", "weight", "delta", "score") + (("bias",) if bias else ())
    return ConvCase(
        dtype=dtype,
        score_dtype=dtype if module else draw(st.sampled_from((dtype, F32, F64, F16))),
        geometry=geo, unbatched=geo.batch == 1 and draw(st.booleans()),
        padding_mode=draw(st.sampled_from(("zeros", "reflect", "replicate", "circular"))) if module else "zeros",
        bias=bias, gate=draw(st.sampled_from(GATES)), threshold=draw(st.sampled_from(THRESHOLDS)),
        module=module, x_layout=draw(st.sampled_from(CONV_X_LAYOUTS)),
        weight_layout="contiguous" if module else draw(st.sampled_from(("contiguous", "channels_last", "offset"))),
        dy_layout=draw(st.sampled_from(("contiguous", "channels_last", "strided"))),
        grads=tuple(sorted(draw(st.sets(st.sampled_from(names))))), seed=draw(st.integers(0, 2**16)),
    )


def check_conv(backend: str, case: ConvCase) -> None:
    gen = torch.Generator().manual_seed(case.seed)
    geo, dt = case.geometry, case.dtype
    wshape = conv_weight_shape(geo)
    fan_in = wshape[1] * wshape[2] * wshape[3]
    x = arrange(values(gen, (geo.batch, geo.in_channels) + geo.size, dt), case.x_layout)
    inputs = dict(
        x=x[0] if case.unbatched else x,
        weight=arrange(values(gen, wshape, dt, fan_in ** -0.5), case.weight_layout),
        delta=arrange(values(gen, wshape, dt, fan_in ** -0.5), case.weight_layout),
        score=gate_score(case.gate, case.threshold, case.score_dtype),
        bias=values(gen, (geo.out_channels,), dt) if case.bias else None,
    )
    conv_kw = dict(in_channels=geo.in_channels, out_channels=geo.out_channels,
                   kernel_size=geo.kernel_size, bias=case.bias, padding_mode=case.padding_mode,
                   **geo.kwargs())
    tau = float(torch.tensor(case.threshold, dtype=case.score_dtype))  # τ in the score's dtype
    if case.module:
        layer = TAPSConv2d(**conv_kw, dtype=dt, threshold=case.threshold)
        with torch.no_grad():
            for name in ("weight", "delta", "score", "bias"):
                if inputs[name] is not None:
                    getattr(layer, name).copy_(inputs[name])
        leaves = dict({name: getattr(layer, name) for name in ("weight", "delta", "score", "bias")},
                      x=inputs["x"])
        forward = layer
        plain = nn.Conv2d(**conv_kw, dtype=F64)  # the oracle: nn.Conv2d's own padding modes

        def ref_fn(x, weight, delta, score, bias):
            params = {"weight": weight + ste_gate(score, tau) * delta}
            if bias is not None:
                params["bias"] = bias
            return torch.func.functional_call(plain, params, (x,))
    else:
        leaves = inputs
        forward = lambda x: taps_conv2d(x, inputs["weight"], inputs["delta"], inputs["score"],  # noqa: E731
                                        inputs["bias"], threshold=case.threshold, **geo.kwargs())

        def ref_fn(x, weight, delta, score, bias):
            return taps_conv2d_ref(x, weight, delta, score, bias, threshold=tau, **geo.kwargs())
    for name, t in leaves.items():
        if t is not None:
            t.requires_grad_(name in case.grads)
    wrt = [name for name in case.grads if leaves[name] is not None]

    with dispatch.use_backend(backend):
        y = forward(leaves["x"])
    dy = values(gen, y.shape, dt)
    dy = arrange(dy, case.dy_layout) if dy.dim() == 4 else dy
    with dispatch.use_backend(backward_backend(backend, "conv2d_bwd")):
        got = dict(zip(wrt, grads_of(y, [leaves[name] for name in wrt], dy)))

    ref = dict(inputs, score=finite_scores(inputs["score"], torch.tensor(tau, dtype=F64)))
    assert bool(ref["score"] >= tau) == (case.gate in OPEN_GATES)
    compare(y, got, inputs, oracle(ref_fn, ref, wrt, dy), dt, case.score_dtype)
    if strictly_channels_last(inputs["x"]) and case.padding_mode == "zeros":
        assert y.is_contiguous(memory_format=torch.channels_last), "channels_last in, channels_last out"
        if "x" in got:
            assert got["x"].is_contiguous(memory_format=torch.channels_last), "dx keeps x's layout"


def conv_edge(module: bool) -> ConvCase:
    """The case every run includes. taps_conv2d: a score exactly at τ (open) in fp16 with fp32
    inputs (τ = 0.1 rounded to fp16), channels_last, stride, dilation and padding unequal along
    H and W. TAPSConv2d: a score of -inf (closed, finite outputs), 'same' padding of an even
    kernel in reflect mode, a strided input."""
    if module:
        geometry = ConvGeometry(batch=2, in_channels=2, out_channels=3, groups=1, kernel_size=(2, 3),
                                stride=1, padding="same", dilation=1, size=(3, 4))
    else:
        geometry = ConvGeometry(batch=2, in_channels=2, out_channels=3, groups=1, kernel_size=(3, 2),
                                stride=(2, 1), padding=(1, 0), dilation=(1, 2), size=(5, 4))
    return ConvCase(dtype=F32, score_dtype=F32 if module else F16, geometry=geometry, unbatched=False,
                    padding_mode="reflect" if module else "zeros", bias=True,
                    gate="-inf" if module else "at_threshold", threshold=0.1, module=module,
                    x_layout="strided" if module else "channels_last", weight_layout="contiguous",
                    dy_layout="contiguous", grads=("bias", "delta", "score", "x"), seed=0)


@backends_for("conv2d_fwd")
def test_conv2d_matches_float64_oracle(backend):
    """taps_conv2d with every option of F.conv2d, against taps_conv2d_ref in float64."""
    fuzz(check_conv, conv_cases(backend, module=False), backend, "conv", [conv_edge(module=False)])


@backends_for("conv2d_fwd")
def test_conv2d_module_matches_float64_oracle(backend):
    """TAPSConv2d with every padding mode, against an nn.Conv2d in float64 whose weight is the
    oracle's W + g·ΔW (straight-through gate)."""
    fuzz(check_conv, conv_cases(backend, module=True), backend, "conv", [conv_edge(module=True)])


# ----------------------------------------------------------------------------- multi-task
ID_PATTERNS = ("random", "sorted", "one_task", "all_base")
NARROW_ID_DTYPES = (torch.int8, torch.int16, torch.uint8)


@dataclass(frozen=True)
class MTCase:
    op: str  # "linear" or "conv"
    dtype: torch.dtype
    score_dtype: torch.dtype
    ids: Tuple[int, ...]  # each sample's task, -1 for the base model
    id_dtype: torch.dtype
    slot: Tuple[int, ...]  # per task: its delta's index, or -1
    slot_dtype: torch.dtype
    n_slots: int  # S, the stacked deltas (some may belong to no task)
    gates: Tuple[str, ...]  # per task
    thresholds: Tuple[float, ...]  # per task
    inner: Tuple[int, ...]  # linear: x's dimensions between the batch and the features
    in_features: int
    out_features: int
    geometry: Optional[ConvGeometry]
    bias: bool
    x_layout: str
    weight_layout: str
    deltas_layout: str
    grads: Tuple[str, ...]
    cpu_kernel: str
    seed: int


@st.composite
def mt_cases(draw, op: str, backend: str, tasks, id_dtypes=(torch.int64, torch.int32)):
    """Multi-task cases with T drawn from ``tasks`` and ids of a dtype from ``id_dtypes``
    (uint8 cannot hold -1: its batches have no base rows)."""
    tiny = TINY[backend]
    dtype = draw(st.sampled_from(DTYPES[backend]))
    T = draw(tasks)
    has_delta = [draw(st.booleans()) for _ in range(T)]
    S = sum(has_delta) + draw(st.integers(0, 1))
    order = draw(st.permutations(range(S)))
    owned = iter(order)
    slot = tuple(next(owned) if h else -1 for h in has_delta)
    id_dtype = draw(st.sampled_from(id_dtypes))
    lowest = 0 if id_dtype == torch.uint8 else -1
    if op == "linear":
        batch = draw(st.integers(0, 4 if tiny else 6))
        inner = tuple(draw(st.lists(st.integers(0, 2 if tiny else 3), max_size=1 if tiny else 2).filter(
            lambda dims: fits(backend, batch * math.prod(dims)))))
        feat = st.integers(1, 16 if tiny else 32)
        k, n, geo = draw(feat), draw(feat), None
    else:
        geo = draw(conv_geometries(tiny, max_batch=3 if tiny else 5))
        batch, inner, k, n = geo.batch, (), 0, 0
    patterns = ID_PATTERNS if lowest < 0 else ID_PATTERNS[:3]
    pattern = draw(st.sampled_from(patterns)) if T else "all_base"
    if pattern == "all_base":
        ids = [-1] * batch
    elif pattern == "one_task":
        ids = [draw(st.integers(0, T - 1))] * batch
    else:
        ids = draw(st.lists(st.integers(lowest, T - 1), min_size=batch, max_size=batch))
        ids = sorted(ids) if pattern == "sorted" else ids
    bias = draw(st.booleans())
    names = ("x", "weight", "deltas", "scores") + (("bias",) if bias else ())
    layouts = X_LAYOUTS if op == "linear" else CONV_X_LAYOUTS
    if op == "linear":
        weight_layouts = deltas_layouts = ("contiguous", "transposed", "strided", "offset")
    else:
        weight_layouts = deltas_layouts = ("contiguous", "channels_last", "offset")
    return MTCase(
        op=op, dtype=dtype, score_dtype=draw(st.sampled_from((dtype, F32, F64, F16))),
        ids=tuple(ids), id_dtype=id_dtype, slot=slot,
        slot_dtype=draw(st.sampled_from((torch.int64, torch.int32))), n_slots=S,
        gates=tuple(draw(st.sampled_from(GATES)) for _ in range(T)),
        thresholds=tuple(draw(st.sampled_from(THRESHOLDS)) for _ in range(T)),
        inner=inner, in_features=k, out_features=n, geometry=geo, bias=bias,
        x_layout=draw(st.sampled_from(layouts)), weight_layout=draw(st.sampled_from(weight_layouts)),
        deltas_layout=draw(st.sampled_from(deltas_layouts)),
        grads=tuple(sorted(draw(st.sets(st.sampled_from(names))))), cpu_kernel=draw(cpu_kernel_copies(backend)),
        seed=draw(st.integers(0, 2**16)),
    )


def check_mt(backend: str, case: MTCase):
    """One multi-task case against the oracle; returns the output and the gradients."""
    gen = torch.Generator().manual_seed(case.seed)
    dt, sdt, T = case.dtype, case.score_dtype, len(case.slot)
    batch = len(case.ids)
    if case.op == "linear":
        k, n = case.in_features, case.out_features
        wshape, xshape, fan_in = (n, k), (batch,) + case.inner + (k,), k
        op_name, op, ref_op, kw = "mt_linear", taps_mt_linear, taps_mt_linear_ref, {}
    else:
        geo = case.geometry
        wshape = conv_weight_shape(geo)
        xshape, fan_in = (batch, geo.in_channels) + geo.size, wshape[1] * wshape[2] * wshape[3]
        op_name, op, ref_op, kw = "mt_conv2d", taps_mt_conv2d, taps_mt_conv2d_ref, geo.kwargs()
        n = geo.out_channels
    thresholds = torch.tensor(case.thresholds, dtype=F64).to(sdt)  # τ_t in the scores' dtype
    scores = torch.stack([gate_score(g, t, sdt) for g, t in zip(case.gates, case.thresholds)]) if T \
        else torch.zeros(0, dtype=sdt)
    ids = torch.tensor(case.ids, dtype=case.id_dtype)
    slot = torch.tensor(case.slot, dtype=case.slot_dtype)
    inputs = dict(
        x=arrange(values(gen, xshape, dt), case.x_layout),
        weight=arrange(values(gen, wshape, dt, fan_in ** -0.5), case.weight_layout),
        deltas=arrange(values(gen, (case.n_slots,) + wshape, dt, fan_in ** -0.5), case.deltas_layout),
        scores=scores,
        bias=values(gen, (n,), dt) if case.bias else None,
    )
    for name, t in inputs.items():
        if t is not None:
            t.requires_grad_(name in case.grads)
    wrt = [name for name in case.grads if inputs[name] is not None]

    def call(f, ids, slot, a):
        return f(a["x"], ids, a["weight"], a["deltas"], slot, a["scores"], a["thresholds"], a["bias"], **kw)

    with dispatch.use_backend(backend), cpu_kernel_copy(case.cpu_kernel):
        y = call(op, ids, slot, dict(inputs, thresholds=thresholds))
    dy = values(gen, y.shape, dt)
    with dispatch.use_backend(backward_backend(backend, op_name + "_bwd")):
        got = dict(zip(wrt, grads_of(y, [inputs[name] for name in wrt], dy)))

    thr64 = thresholds.double()
    ref = dict(inputs, scores=finite_scores(scores, thr64), thresholds=thr64)
    is_open = [s >= 0 and case.gates[t] in OPEN_GATES for t, s in enumerate(case.slot)]
    assert ((slot >= 0) & (ref["scores"] >= thr64)).tolist() == is_open
    runs = oracle(lambda **a: call(ref_op, ids.long(), slot.long(), a), ref, wrt, dy)
    compare(y, got, inputs, runs, dt, sdt)
    return y, got


MT_EDGE_GEOMETRY = ConvGeometry(batch=0, in_channels=2, out_channels=3, groups=1, kernel_size=(1, 2),
                                stride=1, padding=(0, 1), dilation=1, size=(2, 2))


def mt_edge(op: str, ids, slot, n_slots: int, gates, thresholds, id_dtype=torch.int64) -> MTCase:
    """A fixed multi-task case (scores and thresholds in fp16, inputs in fp32, every gradient)."""
    return MTCase(
        op=op, dtype=F32, score_dtype=F16, ids=ids, id_dtype=id_dtype, slot=slot, slot_dtype=torch.int64,
        n_slots=n_slots, gates=gates, thresholds=thresholds, inner=(), in_features=6, out_features=5,
        geometry=dataclasses.replace(MT_EDGE_GEOMETRY, batch=len(ids)) if op == "conv" else None,
        bias=True, x_layout="contiguous", weight_layout="contiguous", deltas_layout="contiguous",
        grads=("bias", "deltas", "scores", "x"), cpu_kernel="native", seed=0,
    )


def mixed_batch_edge(op: str) -> MTCase:
    """The case every run includes: tasks with scores exactly at τ (open), one ulp below it, +inf
    and -inf, one delta slot no task uses, every task present in an unsorted batch with base
    rows."""
    return mt_edge(op, ids=(3, -1, 0, 1, 2, -1, 0), slot=(2, 0, 3, 1), n_slots=5,
                   gates=("at_threshold", "ulp_below", "inf", "-inf"), thresholds=(0.1, 0.0, -0.3, 1 / 3))


@backends_for("mt_linear_fwd")
def test_mt_linear_matches_float64_oracle(backend):
    """taps_mt_linear on mixed batches (T >= 1), against taps_mt_linear_ref in float64."""
    cases = mt_cases("linear", backend, tasks=st.integers(1, 4))
    fuzz(check_mt, cases, backend, "linear", [mixed_batch_edge("linear")])


@backends_for("mt_conv2d_fwd")
def test_mt_conv2d_matches_float64_oracle(backend):
    """taps_mt_conv2d on mixed batches (T >= 1), against taps_mt_conv2d_ref in float64."""
    cases = mt_cases("conv", backend, tasks=st.integers(1, 4))
    fuzz(check_mt, cases, backend, "conv", [mixed_batch_edge("conv")])


@mt_ops_and_backends()
def test_mt_zero_tasks(op, backend):
    """A layer no task uses (T = 0: slot, scores and thresholds of shape [0]; S stacked deltas,
    possibly none): every sample is a base row, the output is the base layer's, the deltas get
    zero gradients and dscores has shape [0]."""
    zero_tasks = mt_edge(op, ids=(-1, -1, -1), slot=(), n_slots=1, gates=(), thresholds=())
    fuzz(check_mt, mt_cases(op, backend, tasks=st.just(0)), backend, op, [zero_tasks])


def check_narrow_ids(backend: str, case: MTCase) -> None:
    y, got = check_mt(backend, case)
    y64, got64 = check_mt(backend, dataclasses.replace(case, id_dtype=torch.int64))
    assert torch.equal(y, y64), f"y with {case.id_dtype} task ids differs from int64's"
    for name in got:
        assert torch.equal(got[name], got64[name]), f"d{name} with {case.id_dtype} task ids differs from int64's"


@mt_ops_and_backends()
def test_mt_narrow_id_dtypes_match_int64(op, backend):
    """Task ids in int8, int16 or uint8 (accepted by the API) give exactly the int64 results."""
    cases = mt_cases(op, backend, tasks=st.integers(1, 4), id_dtypes=NARROW_ID_DTYPES)
    int8_ids = mt_edge(op, ids=(1, -1, 0, 1), slot=(1, 0), n_slots=2, gates=("at_threshold", "closed"),
                       thresholds=(0.1, 0.0), id_dtype=torch.int8)
    fuzz(check_narrow_ids, cases, backend, op, [int8_ids])
