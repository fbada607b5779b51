"""Helpers shared by the op files and the backends: input checks, the gate, autocast, layouts,
conv geometry, and the backward ops' outputs.

Every check here runs on tensor metadata only (shapes, dtypes, devices), so it is free at run
time and torch.compile traces it without a graph break. Nothing here imports triton or the
compiled extension: the Triton launchers (taps_fast.kernels) import the layout helpers from here.
"""
from __future__ import annotations

import functools
from typing import Optional, Tuple

import torch
from torch import Tensor

# The largest element count the Triton and CUDA kernels address: they index with int32.
INT32_MAX = 2**31 - 1

# The reference backward reduces ds = <G, ΔW> for a closed gate block by block, so that no more
# than this many elements of G exist at once (4 MiB in fp32); an open gate needs all of G anyway,
# since it is dΔW. Blocks of at least this size keep each matmul large enough to run at full rate.
DS_BLOCK_ELEMS = 1 << 20


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype for reductions (ds): float64 stays float64, everything else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def inner(a: Tensor, b: Tensor) -> Tensor:
    """⟨a, b⟩ = Σ a∘b accumulated in acc_dtype, as one BLAS dot (no elementwise temporary in
    fp32/fp64; half inputs are upcast first, as fp16 dot would accumulate in fp16)."""
    acc = acc_dtype(a.dtype)
    a, b = a.reshape(-1), b.reshape(-1)
    if a.dtype is not acc or b.dtype is not acc:
        a, b = a.to(acc), b.to(acc)
    return torch.dot(a, b)


# τ rounded to each score dtype: torch compares a score tensor with a Python float in the score's
# dtype (τ = 0.1 against a float16 score compares with 0.0999755859375), and so does
# gate_is_open, on the host.
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


@functools.lru_cache(maxsize=256)
def threshold_in(dtype: torch.dtype, threshold: float) -> float:
    """τ as a score of ``dtype`` holds it (what ``score >= τ`` compares with). Cached: a tensor
    round trip per call would cost more host time than the rest of a small layer's call; the
    Triton launchers use it too."""
    return float(torch.tensor(threshold, dtype=dtype))


def gate_is_open(score: Tensor, threshold: float, where: str) -> bool:
    """I(s) = 1[s >= τ] as a Python bool, compared in the score's dtype as ``score >= τ`` does.

    One read of the score (``item()``: one host sync on accelerators; on the CPU 0.3 µs, against
    6 µs for the two tensor comparisons it replaces, on a 2-core x86_64 machine without a GPU,
    torch 2.14.1). A NaN score would silently read as closed (NaN >= τ is False); it is refused.
    """
    s = score.item()
    if s != s:
        raise ValueError(
            f"{where}: the gate score is NaN, so the gate I(s)=1[s>={threshold}] is undefined; "
            "the training diverged (check the learning rate and the loss) or the score was "
            "overwritten"
        )
    dtype = score.dtype
    if dtype in _FLOAT_DTYPES:
        return s >= threshold_in(dtype, threshold)
    return bool(score.detach() >= threshold)


def check_threshold(threshold: float, where: str, finite: bool = False) -> None:
    """A real number (an int or a float, not a bool), not NaN; ``finite``: not ±inf either (a
    layer's τ: an infinite one would fix its gate for ever, and a task file refuses it)."""
    if (not isinstance(threshold, (int, float)) or isinstance(threshold, bool) or threshold != threshold
            or (finite and threshold in (float("inf"), float("-inf")))):
        kind = "finite real" if finite else "real"
        raise ValueError(f"{where}: threshold must be a {kind} number, got {threshold!r}")


def check_common(
    op: str,
    x: Tensor,
    weight: Tensor,
    delta: Tensor,
    score: Tensor,
    bias: Optional[Tensor],
    threshold: float,
) -> None:
    """Checks shared by every TAPS op; each error names the argument and the problem."""
    for name, t in (("x", x), ("weight", weight), ("delta", delta), ("score", score)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if bias is not None and not isinstance(bias, Tensor):
        raise TypeError(f"{op}: bias must be a torch.Tensor or None, got {type(bias).__name__}")
    check_threshold(threshold, op)
    if delta.shape != weight.shape:
        raise ValueError(
            f"{op}: delta has shape {tuple(delta.shape)} but weight has shape "
            f"{tuple(weight.shape)}; the task delta must have the weight's shape"
        )
    if score.dim() != 0:
        raise ValueError(f"{op}: score must be a 0-dim tensor, got shape {tuple(score.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"{op}: x must be a floating-point tensor, got dtype {x.dtype}")
    if not score.is_floating_point():
        raise TypeError(f"{op}: score must be a floating-point tensor, got dtype {score.dtype}")
    named = [("x", x), ("weight", weight), ("delta", delta)] + ([("bias", bias)] if bias is not None else [])
    for name, t in named[1:]:
        if t.dtype != x.dtype:
            raise TypeError(
                f"{op}: dtype mismatch: x is {x.dtype} but {name} is {t.dtype}; cast the input "
                f"(or the layer, with .to({x.dtype})) or run under torch.autocast"
            )
    for name, t in named[1:] + [("score", score)]:
        if t.device != x.device:
            raise ValueError(
                f"{op}: device mismatch: x is on {x.device} but {name} is on {t.device}; "
                f"move the input or the layer with .to(device)"
            )


def _same_device(x: Tensor, tensors) -> bool:
    """Whether every tensor is on x's device, reading cheap flags first (``t.device`` builds a
    torch.device, 0.3 µs a read; ``is_cpu`` / ``is_cuda`` / ``get_device`` 0.07 µs)."""
    if x.is_cpu:
        return all(t.is_cpu for t in tensors)
    if x.is_cuda:
        index = x.get_device()
        return all(t.is_cuda and t.get_device() == index for t in tensors)
    device = x.device
    return all(t.device == device for t in tensors)


def common_ok(x, weight, delta, score, bias, threshold) -> bool:
    """The common case of check_common, accepted with the fewest metadata reads (each call of a
    layer pays for them: 0.6 µs here against 3 µs for every check, on a 2-core x86_64 machine
    without a GPU, torch 2.14.1); False sends the call through every check, which names the
    problem. An argument that is not a tensor fails here on a missing attribute or on a dtype
    that is not a torch.dtype."""
    try:
        dt = x.dtype
        if not (weight.dtype is dt and delta.dtype is dt and (bias is None or bias.dtype is dt)
                and dt.is_floating_point and score.dtype.is_floating_point and score.dim() == 0
                and delta.shape == weight.shape
                and ((type(threshold) is float and threshold == threshold) or type(threshold) is int)):
            return False
        if x.is_cpu:
            return weight.is_cpu and delta.is_cpu and score.is_cpu and (bias is None or bias.is_cpu)
        return _same_device(x, (weight, delta, score) if bias is None else (weight, delta, score, bias))
    except AttributeError:
        return False


def check_bias(op: str, bias: Optional[Tensor], weight: Tensor) -> None:
    """bias, when given, is [out] for a weight [out, ...]."""
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        raise ValueError(f"{op}: bias has shape {tuple(bias.shape)}, expected ({weight.shape[0]},)")


# How a functional call runs (eager_path): the forward kernel straight away, the eager
# autograd.Function, the custom op, or the pure-PyTorch formula (*_ref) under torch.func.
DIRECT, AUTOGRAD, CUSTOM_OP, FORMULA = 0, 1, 2, 3
_has_torch_function = torch.overrides.has_torch_function
_functorch_active = getattr(torch._C, "_are_functorch_transforms_active", lambda: False)


def eager_path(x: Tensor, *tensors: Optional[Tensor]) -> int:
    """Which path a call takes. The custom op (CUSTOM_OP) where something must see the op:
    torch.compile / export tracing and tensor subclasses (fake tensors, DTensor). Under torch.func
    transforms (grad, vmap, jacrev: neither a custom op with register_autograd nor an
    autograd.Function without setup_context composes with them) the pure-PyTorch formula
    (FORMULA: taps_linear_ref / taps_conv2d_ref, whose NaN score gives NaN outputs). Otherwise the
    call is plain eager PyTorch, and the custom op would add nothing but its cost (taps_linear on a
    64x64 layer, M = 1, 2-core x86_64, no GPU, torch 2.14.1: 44 µs through the custom op against
    6 µs for nn.Linear): DIRECT runs the forward kernel when nothing needs a gradient, AUTOGRAD the
    op's torch.autograd.Function, which calls the same kernels. ``tensors`` may hold None (a
    missing bias)."""
    if torch.compiler.is_compiling() or type(x) is not Tensor or _has_torch_function(tensors):
        return CUSTOM_OP
    if _functorch_active():
        return FORMULA
    if torch.is_grad_enabled() and (x.requires_grad or any(t is not None and t.requires_grad for t in tensors)):
        return AUTOGRAD
    return DIRECT


class GatedWeight(torch.autograd.Function):
    """W_eff = W + g·ΔW, g = 1[s ≥ τ] given as ``is_open``, as an autograd node of its own: the
    eager training path on the reference backend. The layer's op then runs as the plain model's
    does, F.linear / F.conv2d on W_eff with torch's own autograd (one fused backward for dx, G =
    dW_eff and the bias, in C++), and this node's backward turns G into the TAPS gradients:

        dΔW = g·G (G itself when open: no copy),  ds = ⟨G, ΔW⟩,  dW = G (only if W needs it).

    Measured against one autograd.Function around the whole layer (the custom op's kernels, a
    Python backward): a TAPSConv2d 16→16 3×3 on 1×16×8×8, forward + backward, 161 µs against
    198 µs, nn.Conv2d taking 102 µs (2-core x86_64, no GPU, torch 2.14.1).

    Memory: an open layer holds W_eff from the forward to the backward (saved by the op's own
    autograd, as the authors' style holds it); a closed one a view of W. The op's backward forms
    G whole, so callers keep the blocked reduction of ds for closed layers larger than
    DS_BLOCK_ELEMS (a transient G of at most one block, as the reference backward allows)."""

    @staticmethod
    def forward(ctx, weight: Tensor, delta: Tensor, score: Tensor, is_open: bool) -> Tensor:
        ctx.save_for_backward(delta)
        ctx.is_open, ctx.score_dtype = is_open, score.dtype
        return weight + delta if is_open else weight.view_as(weight)

    @staticmethod
    def backward(ctx, g: Tensor):
        # Plain torch ops, differentiable (ds = ⟨G, ΔW⟩ is itself a product), so this also
        # serves create_graph=True; each op counts: a small layer's whole backward is ~50 µs.
        (delta,) = ctx.saved_tensors
        needs_dweight, needs_ddelta, needs_dscore = ctx.needs_input_grad[:3]
        dscore = ddelta = dweight = None
        if needs_dscore:
            dscore = inner(g, delta)
            if dscore.dtype is not ctx.score_dtype:
                dscore = dscore.to(ctx.score_dtype)
        if needs_ddelta:
            ddelta = g if ctx.is_open else torch.zeros_like(delta)
        if needs_dweight:
            dweight = g.clone() if ddelta is g else g
        return dweight, ddelta, dscore, None


# One flag read (0.05 µs) for every autocast device; where torch lacks it, autocast_inputs asks.
any_autocast = getattr(torch._C, "_is_any_autocast_enabled", None) or (lambda: True)


def autocast_inputs(x: Tensor, weight: Tensor, delta: Tensor, bias: Optional[Tensor]):
    """Apply torch.autocast's policy for linear/conv (cast to the autocast dtype), since a
    custom op is not covered by autocast's own lists. Outside autocast, returns the inputs."""
    if not any_autocast():
        return x, weight, delta, bias
    dev = x.device.type
    if dev in ("cpu", "cuda", "xpu") and torch.is_autocast_enabled(dev):
        dt = torch.get_autocast_dtype(dev)
        cast = lambda t: t if t is None or not t.is_floating_point() else t.to(dt)  # noqa: E731
        return cast(x), cast(weight), cast(delta), cast(bias)
    return x, weight, delta, bias


def dense_strides(shape, fmt: torch.memory_format) -> Tuple[int, ...]:
    """The strides torch.empty(shape, memory_format=fmt) gives, for the contiguous format and, on
    4-D shapes, channels_last (0.5 µs; the meta tensor this replaces costs 3 µs)."""
    if fmt is torch.channels_last:
        n, c, h, w = shape
        return (h * w * c, 1, w * c, c)
    if len(shape) == 4:  # a conv's tensors, without the loop (0.3 µs against 0.9 µs)
        c, h, w = max(shape[1], 1), max(shape[2], 1), max(shape[3], 1)
        return (c * h * w, h * w, w, 1)
    out, step = [], 1
    for n in reversed(shape):
        out.append(step)
        step *= max(n, 1)
    return tuple(reversed(out))


def _empty_like_strides(ref: Tensor) -> Tuple[int, ...]:
    """The strides torch.empty_like(ref) has: ref's own if ref is contiguous or channels_last
    (non-overlapping and dense), else what torch decides (read off a meta tensor)."""
    if ref.is_contiguous() or (ref.dim() == 4 and ref.is_contiguous(memory_format=torch.channels_last)):
        return ref.stride()  # dense: empty_like keeps the strides as they are (size-1 dims too)
    return torch.empty_like(ref, device="meta").stride()


def match_layout(t: Tensor, ref: Tensor) -> Tensor:
    """Return t with the strides torch.empty_like(ref) would have, so a real kernel's output
    agrees with what the fake (meta) kernel promises, e.g. channels_last in, channels_last out."""
    if t.stride() == _empty_like_strides(ref):
        return t
    return torch.empty_like(ref).copy_(t)


def out_format(x: Tensor) -> torch.memory_format:
    """The memory format of a conv's output for input x: channels_last in gives channels_last
    out; anything else gives contiguous out."""
    if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
        return torch.channels_last
    return torch.contiguous_format


def restride(t: Tensor, fmt: torch.memory_format) -> Tensor:
    """t in memory format fmt: t itself when its strides already are, else a copy."""
    if t.stride() == dense_strides(t.shape, fmt):
        return t
    return torch.empty(t.shape, dtype=t.dtype, device=t.device, memory_format=fmt).copy_(t)


def conv_out_size(n: int, k: int, s: int, p: int, d: int) -> int:
    """Output length of a conv along one dimension: input n, kernel k, stride s, padding p (each
    side), dilation d."""
    return (n + 2 * p - d * (k - 1) - 1) // s + 1


def as_int_list(v, n: int, name: str) -> list:
    if type(v) is tuple and len(v) == 2 == n and type(v[0]) is int and type(v[1]) is int:
        return [v[0], v[1]]  # nn.Conv2d's form, without a generator (0.15 µs against 0.7 µs)
    if type(v) is tuple and len(v) == n and all(type(i) is int for i in v):
        return list(v)
    if isinstance(v, int):
        return [v] * n
    v = list(v)
    if len(v) != n or not all(isinstance(i, int) for i in v):
        raise ValueError(f"{name} must be an int or {n} ints, got {v!r}")
    return v


def contiguous(t: Optional[Tensor]) -> Optional[Tensor]:
    """t in the contiguous format (itself when it already is), None for None."""
    return t if t is None or t.is_contiguous() else t.contiguous()


def empty0(t: Tensor) -> Tensor:
    """Placeholder for a gradient that was not asked for (custom ops cannot return None)."""
    return t.new_empty((0,))


def backward_outputs(dy: Tensor, x: Tensor, weight: Tensor, delta: Tensor, score: Tensor,
                     dx: Optional[Tensor], dweight: Optional[Tensor], ddelta: Optional[Tensor],
                     dscore: Optional[Tensor], dbias: Optional[Tensor]) -> Tuple[Tensor, ...]:
    """The five outputs of a single-task backward op, (dx, dW, dΔW, ds, db): each gradient, or
    an empty placeholder where it was not asked for (None); ds in the score's dtype."""
    return (
        dx if dx is not None else empty0(x),
        dweight if dweight is not None else empty0(weight),
        ddelta if ddelta is not None else empty0(delta),
        empty0(score) if dscore is None else dscore if dscore.dtype is score.dtype else dscore.to(score.dtype),
        dbias if dbias is not None else empty0(dy),
    )


def mt_backward_outputs(x: Tensor, deltas: Tensor, scores: Tensor, dx: Optional[Tensor],
                        ddeltas: Optional[Tensor], dscores: Optional[Tensor]) -> Tuple[Tensor, ...]:
    """The three outputs of a multi-task backward op, (dx, ddeltas, dscores), as
    backward_outputs gives them."""
    return (dx if dx is not None else empty0(x),
            ddeltas if ddeltas is not None else empty0(deltas),
            dscores.to(scores.dtype) if dscores is not None else empty0(scores))


def not_a_view(y: Tensor) -> Tensor:
    """The forward result of a custom op as a tensor autograd does not treat as a view.

    Backends that reshape a 2-D [M, N] result back to x's leading dims ("cpp", "cuda", "triton")
    return a view of a tensor made inside the op. Autograd then refuses any in-place op on the
    layer's output ("Output 0 of ...Backward is a view and is being modified inplace": e.g.
    nn.ReLU(inplace=True) right after a TAPSLinear), and FSDP2 warns that such an op would skip
    its pre-backward all-gather. aten._unsafe_view shares the storage without the view mark, as
    torch.matmul's own reshape does: no copy.
    """
    return torch.ops.aten._unsafe_view(y, y.shape) if y._is_view() else y
