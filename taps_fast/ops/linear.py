r"""Gated linear: y = x·(W + I(s)·ΔW)ᵀ + b, with I(s) = 1[s ≥ τ].

Math (x: [..., K] flattened to [M, K]; W, ΔW: [N, K]; dy: [M, N]; G = dyᵀ·x, the ordinary weight
gradient of the layer, dW_eff):

    forward   y  = x·W_effᵀ + b,       W_eff = W + I(s)·ΔW
    backward  dx = dy·W_eff
              dΔW = I(s)·G             (zero when closed, and G is then never formed whole)
              ds  = ⟨G, ΔW⟩ = Σ G∘ΔW   (straight-through: flows with the gate closed too)
              db  = Σ_m dy[m]
              dW  = G                  (only if the caller unfroze W; TAPS keeps it frozen)

The file reads top down:
- ``taps_linear_ref``: the oracle, a pure-PyTorch, autograd-differentiable formula (the authors'
  style: materialise W_eff, ordinary op). It is the test oracle and the benchmark baseline.
- ``linear_fwd_torch`` / ``linear_bwd_torch``: the kernels of the "reference" backend, written
  with torch ops. Unlike ``taps_linear_ref`` they branch on the gate: a closed layer reads W only
  and reduces ds block by block without forming G or dW_eff.
- the launcher: the dispatcher picks a backend per call and runs its kernel;
- the ``taps_fast::linear`` / ``taps_fast::linear_backward`` custom ops with fake kernels and
  autograd, so torch.compile(fullgraph=True) traces through them;
- ``_LinearFunction``, the same kernels as an eager autograd.Function (training off the
  reference backward);
- ``taps_linear``, the functional API that ``TAPSLinear`` calls: it picks the eager path
  (ops/_common.eager_path; docs/design.md, "Eager paths"), the reference backward's being
  F.linear's own autograd on ``GatedWeight``.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

from .. import dispatch
from ._common import (
    AUTOGRAD,
    DIRECT,
    DS_BLOCK_ELEMS,
    FORMULA,
    GatedWeight,
    acc_dtype,
    any_autocast,
    autocast_inputs,
    backward_outputs,
    check_bias,
    check_common,
    common_ok,
    contiguous,
    eager_path,
    empty0,
    gate_is_open,
    inner,
    not_a_view,
)

_OP = "taps_linear"


# ----------------------------------------------------------------------------- oracle
def taps_linear_ref(
    x: Tensor, weight: Tensor, delta: Tensor, score: Tensor, bias: Optional[Tensor] = None,
    threshold: float = 0.1,
) -> Tensor:
    """The oracle, autograd-differentiable (authors' style): materialises W_eff every call.

    The straight-through estimator is written as g + s - s.detach(): its value is the gate
    g = 1[s ≥ τ] and its derivative in s is 1, so autograd gives ds = ⟨G, ΔW⟩ and dΔW = g·G.
    """
    g = (score.detach() >= threshold).to(score.dtype)
    gate = g + score - score.detach()
    return F.linear(x, weight + gate.to(weight.dtype) * delta, bias)


# ----------------------------------------------------------------------------- reference backend kernels
def linear_weight_eff(weight: Tensor, delta: Tensor, score: Tensor, threshold: float) -> Tuple[Tensor, bool]:
    """(W_eff, gate): W + ΔW (a transient the size of W) when the gate is open, else W itself."""
    is_open = gate_is_open(score, threshold, _OP)
    return (weight + delta if is_open else weight), is_open


def linear_fwd_torch(
    x: Tensor, weight: Tensor, delta: Tensor, score: Tensor, bias: Optional[Tensor], threshold: float
) -> Tensor:
    return F.linear(x, linear_weight_eff(weight, delta, score, threshold)[0], bias)


def linear_closed_ds(dy2: Tensor, x2: Tensor, delta: Tensor) -> Tensor:
    """ds = ⟨dyᵀx, ΔW⟩ without G whole in memory: as ⟨dy, x·ΔWᵀ⟩ when that [M, N] product is no
    larger than a block (few rows: a GEMV over ΔW instead of writing and reading the N×K outer
    product, 3x fewer bytes), else by blocks of rows of G. Both forms take M·N·K multiply-adds."""
    n, k = delta.shape
    if dy2.shape[0] * n <= DS_BLOCK_ELEMS:
        return inner(dy2, x2 @ delta.t())
    rows = max(1, DS_BLOCK_ELEMS // max(1, k))
    acc = acc_dtype(delta.dtype)
    ds = torch.zeros((), dtype=acc, device=delta.device)
    for n0 in range(0, n, rows):
        g_blk = dy2[:, n0:n0 + rows].t() @ x2
        ds += inner(g_blk, delta[n0:n0 + rows])
    return ds


def linear_bwd_torch(
    dy: Tensor, x: Tensor, weight: Tensor, delta: Tensor, score: Tensor, threshold: float,
    needs_dx: bool, needs_dweight: bool, needs_ddelta: bool, needs_dscore: bool, needs_dbias: bool,
    w_eff: Optional[Tensor] = None, is_open: Optional[bool] = None,
) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """The backward; ``w_eff`` and ``is_open``, when the forward kept them (the eager autograd
    path), spare reading the gate and forming W + ΔW a second time."""
    if is_open is None:
        is_open = gate_is_open(score, threshold, _OP)
    n, k = weight.shape
    flat = x.dim() == 2 and dy.dim() == 2  # (each reshape costs 1 µs: a tenth of a small layer's backward)
    dy2 = dy if flat else dy.reshape(-1, n)
    x2 = x if flat else x.reshape(-1, k)
    dx = dweight = ddelta = dscore = None
    if needs_dx:
        if w_eff is None:
            w_eff = weight + delta if is_open else weight
        dx = dy2 @ w_eff if flat else (dy2 @ w_eff).reshape(x.shape)
    need_g = needs_dweight or (is_open and (needs_ddelta or needs_dscore))
    if need_g:
        g = dy2.t() @ x2
        if needs_dscore:
            dscore = inner(g, delta)
        if needs_ddelta:
            ddelta = g if is_open else torch.zeros_like(delta)
        if needs_dweight:
            dweight = g.clone() if ddelta is g else g
    else:
        if needs_dscore:
            dscore = linear_closed_ds(dy2, x2, delta)
        if needs_ddelta:  # closed: dΔW = 0, not computed
            ddelta = torch.zeros_like(delta)
    return backward_outputs(dy, x, weight, delta, score, contiguous(dx), contiguous(dweight),
                            contiguous(ddelta), dscore, dy2.sum(0) if needs_dbias else None)


# ----------------------------------------------------------------------------- launcher
def _meta(x: Tensor, weight: Tensor) -> dict:
    """What the dispatcher needs to know of a call (metadata only: no sync, compile-safe)."""
    n, k = weight.shape
    numel = x.numel()
    rows = numel // k if k else 0
    return dict(device=x.device, dtype=x.dtype, rows=rows, numel=max(numel, n * k, rows * n))


def _key(x: Tensor, weight: Tensor) -> tuple:
    """The values _meta is made of, as dispatch.select_cached's key."""
    n, k = weight.shape
    numel = x.numel()
    rows = numel // k if k else 0
    cpu = x.is_cpu
    return (cpu, x.dtype, rows, numel, n) if cpu else (cpu, x.device, x.dtype, rows, numel, n)


def _kernel(op: str, x: Tensor, weight: Tensor, key: Optional[tuple] = None):
    """The kernel of the backend that serves ``op`` ("linear_fwd" / "linear_bwd") for this call
    (``key``: _key(x, weight), when the caller has it)."""
    return dispatch.select_cached(op, key or _key(x, weight), lambda: _meta(x, weight)).kernels[op]


def _backward_is_reference(op: str, x: Tensor, weight: Tensor, key: Optional[tuple]) -> bool:
    """Whether the reference backend serves this call's backward (the eager training path then
    composes F.linear's own autograd with GatedWeight). A forced backend without a backward
    answers False: its forward runs, and the backward is chosen when it runs."""
    try:
        return _kernel(op, x, weight, key) is linear_bwd_torch
    except dispatch.NoBackendError:
        return False


def _linear_fwd(x: Tensor, weight: Tensor, delta: Tensor, score: Tensor, bias: Optional[Tensor],
                threshold: float) -> Tensor:
    return not_a_view(_kernel("linear_fwd", x, weight)(x, weight, delta, score, bias, threshold).contiguous())


# ----------------------------------------------------------------------------- custom ops

@torch.library.custom_op("taps_fast::linear", mutates_args=())
def _linear_op(
    x: Tensor, weight: Tensor, delta: Tensor, score: Tensor, bias: Optional[Tensor], threshold: float
) -> Tensor:
    return _linear_fwd(x, weight, delta, score, bias, threshold)


@_linear_op.register_fake
def _linear_fake(x, weight, delta, score, bias, threshold):
    return x.new_empty(tuple(x.shape[:-1]) + (weight.shape[0],))


@torch.library.custom_op("taps_fast::linear_backward", mutates_args=())
def _linear_backward_op(
    dy: Tensor, x: Tensor, weight: Tensor, delta: Tensor, score: Tensor, threshold: float,
    needs_dx: bool, needs_dweight: bool, needs_ddelta: bool, needs_dscore: bool, needs_dbias: bool,
) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    return _kernel("linear_bwd", x, weight)(
        dy, x, weight, delta, score, threshold, needs_dx, needs_dweight, needs_ddelta, needs_dscore,
        needs_dbias,
    )


@_linear_backward_op.register_fake
def _linear_backward_fake(dy, x, weight, delta, score, threshold, needs_dx, needs_dweight,
                          needs_ddelta, needs_dscore, needs_dbias):
    return (
        x.new_empty(x.shape) if needs_dx else empty0(x),
        weight.new_empty(weight.shape) if needs_dweight else empty0(weight),
        delta.new_empty(delta.shape) if needs_ddelta else empty0(delta),
        score.new_empty(()) if needs_dscore else empty0(score),
        dy.new_empty((weight.shape[0],)) if needs_dbias else empty0(dy),
    )


def _linear_setup_context(ctx, inputs, output):
    x, weight, delta, score, bias, threshold = inputs
    ctx.save_for_backward(x, weight, delta, score)  # W_eff is not kept: recomputed in backward
    ctx.threshold = threshold
    ctx.has_bias = bias is not None


def _linear_backward(ctx, dy):
    x, weight, delta, score = ctx.saved_tensors
    nx, nw, nd, ns, nb, _ = ctx.needs_input_grad
    nb = nb and ctx.has_bias
    dx = dw = dd = ds = db = None
    if nx or nw or nd or ns or nb:  # one op: the Triton backend fuses db into the G pass
        dx, dw, dd, ds, db = _linear_backward_op(dy, x, weight, delta, score, ctx.threshold,
                                                 nx, nw, nd, ns, nb)
    return (dx if nx else None, dw if nw else None, dd if nd else None, ds if ns else None,
            db if nb else None, None)


_linear_op.register_autograd(_linear_backward, setup_context=_linear_setup_context)


# ----------------------------------------------------------------------------- eager autograd
class _LinearFunction(torch.autograd.Function):
    """The eager training path: the custom op's forward and backward without the custom op
    (whose autograd wrapper costs more than the whole layer at a few rows; see eager_path).

    On the reference backend the forward keeps W_eff (W itself when the gate is closed, so a
    closed layer holds nothing more) for dx, as the authors' style keeps it for its linear: the
    backward neither re-reads the gate nor forms W + ΔW again. The trade: an open layer holds a
    W-sized tensor from the forward to the backward, like F.linear(x, W + g·ΔW) under autograd.
    """

    @staticmethod
    def forward(ctx, x, weight, delta, score, bias, threshold):
        kernel = _kernel("linear_fwd", x, weight)
        w_eff = is_open = None
        if kernel is linear_fwd_torch:
            w_eff, is_open = linear_weight_eff(weight, delta, score, threshold)
            y = not_a_view(F.linear(x, w_eff, bias))
        else:
            y = not_a_view(kernel(x, weight, delta, score, bias, threshold).contiguous())
        ctx.save_for_backward(x, weight, delta, score, w_eff)
        ctx.threshold, ctx.is_open, ctx.has_bias = threshold, is_open, bias is not None
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, dy):
        x, weight, delta, score, w_eff = ctx.saved_tensors
        nx, nw, nd, ns, nb, _ = ctx.needs_input_grad
        nb = nb and ctx.has_bias
        if not (nx or nw or nd or ns or nb):
            return None, None, None, None, None, None
        kernel = _kernel("linear_bwd", x, weight)
        args = (dy, x, weight, delta, score, ctx.threshold, nx, nw, nd, ns, nb)
        if kernel is linear_bwd_torch and w_eff is not None:
            dx, dw, dd, ds, db = linear_bwd_torch(*args, w_eff=w_eff, is_open=ctx.is_open)
        else:
            dx, dw, dd, ds, db = kernel(*args)
        return (dx if nx else None, dw if nw else None, dd if nd else None, ds if ns else None,
                db if nb else None, None)


# ----------------------------------------------------------------------------- functional API
def _linear_key(x, weight, delta, score, bias, threshold) -> Optional[tuple]:
    """_key(x, weight) when the common case of check_linear holds, else None (every check then
    runs, and names the problem). One frame and the fewest metadata reads, shared by the check
    and the backend choice: each call of a layer pays for them (1.5 µs here against 2.6 µs for
    the full checks and a separate key, on a 2-core x86_64 machine without a GPU, torch 2.14.1).
    It repeats common_ok's tests inline: calling common_ok instead costs 0.27 µs more a call
    (1.61 against 1.33 µs, the same machine), 5% of nn.Linear's call on a 64x64 layer.
    Anything that is not a tensor fails here on a missing attribute."""
    try:
        dt, ws = x.dtype, weight.shape
        if not (weight.dtype is dt and delta.dtype is dt and dt.is_floating_point and len(ws) == 2
                and delta.shape == ws and x.shape[-1] == ws[1] and score.dim() == 0
                and score.dtype.is_floating_point
                and (bias is None or (bias.dtype is dt and bias.dim() == 1 and bias.shape[0] == ws[0]))
                and ((type(threshold) is float and threshold == threshold) or type(threshold) is int)):
            return None
        cpu = x.is_cpu
        if cpu:
            if not (weight.is_cpu and delta.is_cpu and score.is_cpu and (bias is None or bias.is_cpu)):
                return None
        elif not common_ok(x, weight, delta, score, bias, threshold):
            return None
        n, k = ws
        numel = x.numel()
        rows = numel // k if k else 0
        return (cpu, dt, rows, numel, n) if cpu else (cpu, x.device, dt, rows, numel, n)
    except (AttributeError, IndexError):
        return None


def check_linear(x: Tensor, weight: Tensor, delta: Tensor, score: Tensor, bias: Optional[Tensor],
                 threshold: float) -> None:
    if _linear_key(x, weight, delta, score, bias, threshold) is not None:
        return
    check_common(_OP, x, weight, delta, score, bias, threshold)
    if weight.dim() != 2:
        raise ValueError(f"{_OP}: weight must be 2-D [out_features, in_features], got shape {tuple(weight.shape)}")
    if x.dim() < 1 or x.shape[-1] != weight.shape[1]:
        raise ValueError(
            f"{_OP}: input of shape {tuple(x.shape)} does not fit the layer: its last dimension "
            f"must be in_features={weight.shape[1]}"
        )
    check_bias(_OP, bias, weight)


def taps_linear(
    x: Tensor, weight: Tensor, delta: Optional[Tensor], score: Tensor, bias: Optional[Tensor] = None,
    threshold: float = 0.1,
) -> Tensor:
    """y = x·(W + 1[s ≥ τ]·ΔW)ᵀ + b with the TAPS gradients (see the module docstring).

    ``delta=None`` (a closed layer whose delta was dropped by ``freeze_gates``) is the plain
    F.linear on W. Under torch.autocast the inputs are cast as autocast casts F.linear's.
    """
    if delta is None:
        return F.linear(x, weight, bias)
    if any_autocast():
        x, weight, delta, bias = autocast_inputs(x, weight, delta, bias)
    key = _linear_key(x, weight, delta, score, bias, threshold)
    if key is None:
        check_linear(x, weight, delta, score, bias, threshold)
    path = eager_path(x, weight, delta, score, bias)
    if path == DIRECT:
        y = _kernel("linear_fwd", x, weight, key)(x, weight, delta, score, bias, float(threshold))
        return y if y.is_contiguous() and not y._is_view() else not_a_view(y.contiguous())
    if path == AUTOGRAD:
        threshold = float(threshold)
        if _backward_is_reference("linear_bwd", x, weight, key):
            # the reference backward: F.linear's own autograd on W_eff (GatedWeight), but for
            # a closed layer too large for one block of its blocked ds (G would be whole)
            is_open = gate_is_open(score, threshold, _OP)
            if is_open or weight.numel() <= DS_BLOCK_ELEMS:
                # not_a_view: F.linear returns a view for a 3-D x; FSDP2 warns about in-place ops
                # on views (the custom op's outputs follow the same rule)
                return not_a_view(F.linear(x, GatedWeight.apply(weight, delta, score, is_open), bias))
        return _LinearFunction.apply(x, weight, delta, score, bias, threshold)
    if path == FORMULA:
        return taps_linear_ref(x, weight, delta, score, bias, float(threshold))
    return _linear_op(x, weight, delta, score, bias, float(threshold))
