"""Helpers shared by the op files and the backends: input checks, the gate, autocast, layouts,
conv geometry, and the backward ops' outputs.

Every check here runs on tensor metadata only (shapes, dtypes, devices), so it is free at run
time and torch.compile traces it without a graph break. Nothing here imports triton or the
compiled extension: the Triton launchers (taps_fast.kernels) import the layout helpers from here.
"""
from __future__ import annotations

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
    return torch.dot(a.reshape(-1).to(acc), b.reshape(-1).to(acc))


def gate_is_open(score: Tensor, threshold: float, where: str) -> bool:
    """I(s) = 1[s >= τ] as a Python bool (a host sync on accelerators).

    A NaN score would silently read as closed (NaN >= τ is False); it is refused instead.
    """
    s = score.detach()
    if bool(torch.isnan(s)):
        raise ValueError(
            f"{where}: the gate score is NaN, so the gate I(s)=1[s>={threshold}] is undefined; "
            "the training diverged (check the learning rate and the loss) or the score was "
            "overwritten"
        )
    return bool(s >= threshold)


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


def check_bias(op: str, bias: Optional[Tensor], weight: Tensor) -> None:
    """bias, when given, is [out] for a weight [out, ...]."""
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        raise ValueError(f"{op}: bias has shape {tuple(bias.shape)}, expected ({weight.shape[0]},)")


def eager_no_grad(x: Tensor, *tensors: Optional[Tensor]) -> bool:
    """Whether a call may run its forward kernel directly instead of through its custom op:
    eager (not traced by torch.compile / export), a plain tensor input (not a fake or functorch
    tensor), and nothing that needs a gradient. The custom op adds nothing there but its cost:
    about 0.25 ms a call on a 2-core x86_64 machine without a GPU, torch 2.14.1 (taps_linear 370 µs vs 41 µs for the kernel op
    alone, measured on a 1x8x8 layer), more than the kernel itself for a few rows."""
    if torch.compiler.is_compiling() or type(x) is not Tensor:
        return False
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x,) + tensors):
        return False
    return True


def autocast_inputs(x: Tensor, weight: Tensor, delta: Tensor, bias: Optional[Tensor]):
    """Apply torch.autocast's policy for linear/conv (cast to the autocast dtype), since a
    custom op is not covered by autocast's own lists. Outside autocast, returns the inputs."""
    dev = x.device.type
    if dev in ("cpu", "cuda", "xpu") and torch.is_autocast_enabled(dev):
        dt = torch.get_autocast_dtype(dev)
        cast = lambda t: t if t is None or not t.is_floating_point() else t.to(dt)  # noqa: E731
        return cast(x), cast(weight), cast(delta), cast(bias)
    return x, weight, delta, bias


def match_layout(t: Tensor, ref: Tensor) -> Tensor:
    """Return t with the strides torch.empty_like(ref) would have, so a real kernel's output
    agrees with what the fake (meta) kernel promises, e.g. channels_last in, channels_last out."""
    want = torch.empty_like(ref, device="meta").stride()
    if t.stride() == want:
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
    want = torch.empty(t.shape, device="meta", memory_format=fmt).stride()
    if t.stride() == want:
        return t
    return torch.empty(t.shape, dtype=t.dtype, device=t.device, memory_format=fmt).copy_(t)


def conv_out_size(n: int, k: int, s: int, p: int, d: int) -> int:
    """Output length of a conv along one dimension: input n, kernel k, stride s, padding p (each
    side), dilation d."""
    return (n + 2 * p - d * (k - 1) - 1) // s + 1


def as_int_list(v, n: int, name: str) -> list:
    if isinstance(v, int):
        return [v] * n
    v = list(v)
    if len(v) != n or not all(isinstance(i, int) for i in v):
        raise ValueError(f"{name} must be an int or {n} ints, got {v!r}")
    return v


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
        dscore.to(score.dtype) if dscore is not None else empty0(score),
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
