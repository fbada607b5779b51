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
- ``taps_linear``, the functional API that ``TAPSLinear`` calls.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import dispatch
from ._common import (
    DS_BLOCK_ELEMS,
    acc_dtype,
    autocast_inputs,
    backward_outputs,
    check_bias,
    check_common,
    eager_no_grad,
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
def linear_fwd_torch(
    x: Tensor, weight: Tensor, delta: Tensor, score: Tensor, bias: Optional[Tensor], threshold: float
) -> Tensor:
    if gate_is_open(score, threshold, _OP):
        weight = weight + delta  # W_eff, a transient the size of W
    return F.linear(x, weight, bias)


def linear_closed_ds(dy2: Tensor, x2: Tensor, delta: Tensor) -> Tensor:
    """ds = ⟨dyᵀx, ΔW⟩ by blocks of rows of G, so G is never whole in memory."""
    n, k = delta.shape
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
) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    is_open = gate_is_open(score, threshold, _OP)
    n, k = weight.shape
    dy2 = dy.reshape(-1, n)
    x2 = x.reshape(-1, k)
    dx = dweight = ddelta = dscore = None
    if needs_dx:
        w_eff = weight + delta if is_open else weight
        dx = (dy2 @ w_eff).reshape(x.shape)
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
    dx, dweight, ddelta = (None if t is None else t.contiguous() for t in (dx, dweight, ddelta))
    return backward_outputs(dy, x, weight, delta, score, dx, dweight, ddelta, dscore,
                            dy2.sum(0) if needs_dbias else None)


# ----------------------------------------------------------------------------- launcher
def _meta(x: Tensor, weight: Tensor) -> dict:
    """What the dispatcher needs to know of a call (metadata only: no sync, compile-safe)."""
    rows = x.numel() // max(1, weight.shape[1])
    return dict(device=x.device, dtype=x.dtype, rows=rows,
                numel=max(x.numel(), weight.numel(), rows * weight.shape[0]))


def _linear_fwd(x: Tensor, weight: Tensor, delta: Tensor, score: Tensor, bias: Optional[Tensor],
                threshold: float) -> Tensor:
    be = dispatch.select("linear_fwd", **_meta(x, weight))
    return not_a_view(be.kernels["linear_fwd"](x, weight, delta, score, bias, threshold).contiguous())


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
    be = dispatch.select("linear_bwd", **_meta(x, weight))
    return be.kernels["linear_bwd"](
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


# ----------------------------------------------------------------------------- functional API
def check_linear(x: Tensor, weight: Tensor, delta: Tensor, score: Tensor, bias: Optional[Tensor],
                 threshold: float) -> None:
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
    x, weight, delta, bias = autocast_inputs(x, weight, delta, bias)
    check_linear(x, weight, delta, score, bias, threshold)
    op = _linear_fwd if eager_no_grad(x, weight, delta, score, bias) else _linear_op
    return op(x, weight, delta, score, bias, float(threshold))
