r"""Gated conv2d: y = conv2d(x, W + I(s)·ΔW) + b, with I(s) = 1[s ≥ τ].

Math (x: [B, C, H, W]; W, ΔW: [O, C/groups, kh, kw]; G = ∂L/∂W_eff, the ordinary conv weight
gradient, i.e. the correlation of x with dy):

    forward   y  = conv2d(x, W_eff) + b,   W_eff = W + I(s)·ΔW
    backward  dx = conv_transpose2d(dy, W_eff)   (the input gradient with W_eff)
              dΔW = I(s)·G            (zero when closed, and G is then never formed whole)
              ds  = ⟨G, ΔW⟩           (straight-through: flows with the gate closed too)
              db  = Σ_{b,h,w} dy
              dW  = G                 (only if the caller unfroze W)

The file reads top down, as linear.py: ``taps_conv2d_ref`` (the oracle: the autograd formula,
authors' style, also the benchmark baseline), ``conv2d_fwd_torch`` / ``conv2d_bwd_torch`` (the
kernels of the "reference" backend, written with torch ops), the launcher, the
``taps_fast::conv2d`` / ``conv2d_backward`` custom ops, the eager ``_Conv2dFunction``, and the
functional ``taps_conv2d`` (its eager paths as taps_linear's: F.conv2d's own autograd on
``GatedWeight`` where the reference backward serves). The
ops take symmetric integer padding; 'same' with an even kernel, and non-zero padding modes, are
padded in ``taps_conv2d`` / ``TAPSConv2d`` first, exactly as nn.Conv2d does.
"""
from __future__ import annotations

from typing import List, Optional, Tuple, Union

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
    as_int_list,
    autocast_inputs,
    backward_outputs,
    check_bias,
    check_common,
    common_ok,
    conv_out_size,
    eager_path,
    empty0,
    gate_is_open,
    inner,
    match_layout,
    out_format,
    restride,
)

_OP = "taps_conv2d"
_aten = torch.ops.aten


def conv2d_out_shape(x: Tensor, weight: Tensor, stride, padding, dilation) -> Tuple[int, int, int, int]:
    """[B, O, OH, OW], the output shape of conv2d(x [B, C, H, W], weight [O, C/g, kh, kw]) with
    stride, padding and dilation as int pairs."""
    ho = conv_out_size(x.shape[2], weight.shape[2], stride[0], padding[0], dilation[0])
    wo = conv_out_size(x.shape[3], weight.shape[3], stride[1], padding[1], dilation[1])
    return x.shape[0], weight.shape[0], ho, wo


def conv2d_out_numel(x: Tensor, weight: Tensor, stride, padding, dilation) -> int:
    """B·O·OH·OW of conv2d_out_shape, in two shape reads (each read costs 0.1 µs and every call
    of a layer pays for them)."""
    b, _, h, w = x.shape
    o, _, kh, kw = weight.shape
    return (b * o * ((h + 2 * padding[0] - dilation[0] * (kh - 1) - 1) // stride[0] + 1)
            * ((w + 2 * padding[1] - dilation[1] * (kw - 1) - 1) // stride[1] + 1))


def new_conv2d_output(x: Tensor, weight: Tensor, stride, padding, dilation) -> Tensor:
    """An uninitialised conv2d output of x's dtype and device, in out_format(x) (the fake
    kernels' result)."""
    return torch.empty(conv2d_out_shape(x, weight, stride, padding, dilation), dtype=x.dtype,
                       device=x.device, memory_format=out_format(x))


# ----------------------------------------------------------------------------- oracle
def taps_conv2d_ref(
    x: Tensor, weight: Tensor, delta: Tensor, score: Tensor, bias: Optional[Tensor] = None,
    stride=1, padding=0, dilation=1, groups: int = 1, threshold: float = 0.1,
) -> Tensor:
    """The oracle, autograd-differentiable (authors' style): materialises W_eff every call; the
    gate's straight-through estimator is g + s - s.detach() (see linear.py)."""
    g = (score.detach() >= threshold).to(score.dtype)
    gate = g + score - score.detach()
    return F.conv2d(x, weight + gate.to(weight.dtype) * delta, bias, stride, padding, dilation, groups)


# ----------------------------------------------------------------------------- reference backend kernels
def conv2d_weight_eff(weight: Tensor, delta: Tensor, score: Tensor, threshold: float) -> Tuple[Tensor, bool]:
    """(W_eff, gate): W + ΔW (a transient the size of W) when the gate is open, else W itself."""
    is_open = gate_is_open(score, threshold, _OP)
    return (weight + delta if is_open else weight), is_open


def conv2d_fwd_torch(x, weight, delta, score, bias, stride, padding, dilation, groups, threshold):
    w_eff = conv2d_weight_eff(weight, delta, score, threshold)[0]
    return F.conv2d(x, w_eff, bias, stride, padding, dilation, groups)


def conv2d_closed_ds(dy, x, delta, stride, padding, dilation, groups) -> Tensor:
    """ds = ⟨G, ΔW⟩ by blocks of output channels (or of whole groups), so that G is never whole
    in memory: each block's G comes from aten.convolution_backward on a slice of dy (and of x
    for grouped convs)."""
    cout, cin_g = delta.shape[0], delta.shape[1]
    khw = delta.shape[2] * delta.shape[3]
    unit_out = 1 if groups == 1 else cout // groups  # output channels per unit
    n_units = cout // unit_out
    step = max(1, DS_BLOCK_ELEMS // (unit_out * cin_g * khw))
    acc = acc_dtype(delta.dtype)
    ds = torch.zeros((), dtype=acc, device=delta.device)
    for u0 in range(0, n_units, step):
        u1 = min(n_units, u0 + step)
        o0, o1 = u0 * unit_out, u1 * unit_out
        if groups == 1:
            xb, gb = x, 1
        else:
            xb, gb = x[:, u0 * cin_g:u1 * cin_g], u1 - u0
        d_blk = delta[o0:o1]
        g_blk = _aten.convolution_backward(
            dy[:, o0:o1], xb, d_blk, None, stride, padding, dilation, False, [0, 0], gb,
            [False, True, False],
        )[1]
        ds += inner(g_blk, d_blk)
    return ds


def conv2d_bwd_torch(dy, x, weight, delta, score, stride, padding, dilation, groups, threshold,
                     needs_dx, needs_dweight, needs_ddelta, needs_dscore, needs_dbias,
                     w_eff: Optional[Tensor] = None, is_open: Optional[bool] = None):
    """The backward; ``w_eff`` and ``is_open``, when the forward kept them (the eager autograd
    path), spare reading the gate and forming W + ΔW a second time."""
    if is_open is None:
        is_open = gate_is_open(score, threshold, _OP)
    if w_eff is None:
        w_eff = weight + delta if (is_open and needs_dx) else weight
    # A closed gate needs G only for ds = ⟨G, ΔW⟩. Where G fits in one block of the blocked
    # reduction (conv2d_closed_ds), it comes from the same convolution_backward call as dx: one
    # call instead of two, and a transient G no larger than a block, as the blocked form holds.
    # resnet50's train step at 160 px, batch 8, half the gates closed: 1.06x plain fine-tuning
    # with two calls (2-core x86_64, no GPU, torch 2.14.1).
    g_for_ds = not is_open and needs_dscore and weight.numel() <= DS_BLOCK_ELEMS
    need_g = needs_dweight or (is_open and (needs_ddelta or needs_dscore)) or g_for_ds
    dx = dweight = ddelta = dscore = None
    if needs_dx or need_g:
        dx, g, _ = _aten.convolution_backward(
            dy, x, w_eff, None, stride, padding, dilation, False, [0, 0], groups,
            [needs_dx, need_g, False],
        )
        if need_g:
            if needs_dscore:
                dscore = inner(g, delta)
            if needs_ddelta:
                ddelta = g if is_open else torch.zeros_like(delta)
            if needs_dweight:
                dweight = g.clone() if ddelta is g else g
    if not need_g:
        if needs_dscore:
            dscore = conv2d_closed_ds(dy, x, delta, stride, padding, dilation, groups)
        if needs_ddelta:  # closed: dΔW = 0, not computed
            ddelta = torch.zeros_like(delta)
    dx, dweight, ddelta = (None if t is None else match_layout(t, like)
                           for t, like in ((dx, x), (dweight, weight), (ddelta, delta)))
    return backward_outputs(dy, x, weight, delta, score, dx, dweight, ddelta, dscore,
                            dy.sum((0, 2, 3)) if needs_dbias else None)


# ----------------------------------------------------------------------------- launcher
def _meta(x: Tensor, weight: Tensor, groups: int, y_numel: int) -> dict:
    """What the dispatcher needs to know of a call (metadata only: no sync, compile-safe)."""
    return dict(device=x.device, dtype=x.dtype, groups=groups,
                numel=max(x.numel(), weight.numel(), y_numel))


def _kernel(op: str, x: Tensor, weight: Tensor, groups: int, y_numel: int):
    """The kernel of the backend that serves ``op`` ("conv2d_fwd" / "conv2d_bwd") for this call:
    dispatch.select_cached over the values _meta is made of."""
    numel = max(x.numel(), weight.numel(), y_numel)
    cpu = x.is_cpu
    key = (cpu, x.dtype, groups, numel) if cpu else (cpu, x.device, x.dtype, groups, numel)
    return dispatch.select_cached(op, key, lambda: _meta(x, weight, groups, y_numel)).kernels[op]


def _conv2d_fwd(x: Tensor, weight: Tensor, delta: Tensor, score: Tensor, bias: Optional[Tensor],
                stride: List[int], padding: List[int], dilation: List[int], groups: int,
                threshold: float) -> Tensor:
    kernel = _kernel("conv2d_fwd", x, weight, groups, conv2d_out_numel(x, weight, stride, padding, dilation))
    y = kernel(x, weight, delta, score, bias, stride, padding, dilation, groups, threshold)
    return restride(y, out_format(x))


# ----------------------------------------------------------------------------- custom ops

@torch.library.custom_op("taps_fast::conv2d", mutates_args=())
def _conv2d_op(
    x: Tensor, weight: Tensor, delta: Tensor, score: Tensor, bias: Optional[Tensor],
    stride: List[int], padding: List[int], dilation: List[int], groups: int, threshold: float,
) -> Tensor:
    return _conv2d_fwd(x, weight, delta, score, bias, stride, padding, dilation, groups, threshold)


@_conv2d_op.register_fake
def _conv2d_fake(x, weight, delta, score, bias, stride, padding, dilation, groups, threshold):
    return new_conv2d_output(x, weight, stride, padding, dilation)


@torch.library.custom_op("taps_fast::conv2d_backward", mutates_args=())
def _conv2d_backward_op(
    dy: Tensor, x: Tensor, weight: Tensor, delta: Tensor, score: Tensor,
    stride: List[int], padding: List[int], dilation: List[int], groups: int, threshold: float,
    needs_dx: bool, needs_dweight: bool, needs_ddelta: bool, needs_dscore: bool, needs_dbias: bool,
) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    kernel = _kernel("conv2d_bwd", x, weight, groups, dy.numel())
    return kernel(dy, x, weight, delta, score, stride, padding, dilation, groups, threshold, needs_dx,
                  needs_dweight, needs_ddelta, needs_dscore, needs_dbias)


@_conv2d_backward_op.register_fake
def _conv2d_backward_fake(dy, x, weight, delta, score, stride, padding, dilation, groups, threshold,
                          needs_dx, needs_dweight, needs_ddelta, needs_dscore, needs_dbias):
    return (
        torch.empty_like(x) if needs_dx else empty0(x),
        torch.empty_like(weight) if needs_dweight else empty0(weight),
        torch.empty_like(delta) if needs_ddelta else empty0(delta),
        score.new_empty(()) if needs_dscore else empty0(score),
        dy.new_empty((weight.shape[0],)) if needs_dbias else empty0(dy),
    )


def _conv2d_setup_context(ctx, inputs, output):
    x, weight, delta, score, bias, stride, padding, dilation, groups, threshold = inputs
    ctx.save_for_backward(x, weight, delta, score)
    ctx.args = (stride, padding, dilation, groups, threshold)
    ctx.has_bias = bias is not None


def _conv2d_backward(ctx, dy):
    x, weight, delta, score = ctx.saved_tensors
    nx, nw, nd, ns, nb = ctx.needs_input_grad[:5]
    nb = nb and ctx.has_bias
    dx = dw = dd = ds = db = None
    if nx or nw or nd or ns or nb:  # one op: the Triton backend fuses db into the G pass
        dx, dw, dd, ds, db = _conv2d_backward_op(dy, x, weight, delta, score, *ctx.args,
                                                 nx, nw, nd, ns, nb)
    return (dx if nx else None, dw if nw else None, dd if nd else None, ds if ns else None,
            db if nb else None, None, None, None, None, None)


_conv2d_op.register_autograd(_conv2d_backward, setup_context=_conv2d_setup_context)


# ----------------------------------------------------------------------------- eager autograd
class _Conv2dFunction(torch.autograd.Function):
    """The eager training path, as linear.py's _LinearFunction: the custom op's kernels without
    the custom op, and on the reference backend W_eff kept from the forward for dx (an open layer
    holds a W-sized tensor until the backward, as the authors' style does; a closed one nothing)."""

    @staticmethod
    def forward(ctx, x, weight, delta, score, bias, stride, padding, dilation, groups, threshold):
        kernel = _kernel("conv2d_fwd", x, weight, groups, conv2d_out_numel(x, weight, stride, padding, dilation))
        w_eff = is_open = None
        if kernel is conv2d_fwd_torch:
            w_eff, is_open = conv2d_weight_eff(weight, delta, score, threshold)
            y = F.conv2d(x, w_eff, bias, stride, padding, dilation, groups)
        else:
            y = kernel(x, weight, delta, score, bias, stride, padding, dilation, groups, threshold)
        ctx.save_for_backward(x, weight, delta, score, w_eff)
        ctx.args = (stride, padding, dilation, groups, threshold)
        ctx.is_open, ctx.has_bias = is_open, bias is not None
        return restride(y, out_format(x))

    @staticmethod
    @once_differentiable
    def backward(ctx, dy):
        x, weight, delta, score, w_eff = ctx.saved_tensors
        nx, nw, nd, ns, nb = ctx.needs_input_grad[:5]
        nb = nb and ctx.has_bias
        none = (None,) * 5
        if not (nx or nw or nd or ns or nb):
            return (None,) * 5 + none
        groups = ctx.args[3]
        kernel = _kernel("conv2d_bwd", x, weight, groups, dy.numel())
        args = (dy, x, weight, delta, score, *ctx.args, nx, nw, nd, ns, nb)
        if kernel is conv2d_bwd_torch and w_eff is not None:
            dx, dw, dd, ds, db = conv2d_bwd_torch(*args, w_eff=w_eff, is_open=ctx.is_open)
        else:
            dx, dw, dd, ds, db = kernel(*args)
        return (dx if nx else None, dw if nw else None, dd if nd else None, ds if ns else None,
                db if nb else None) + none


# ----------------------------------------------------------------------------- functional API
def same_padding(kernel_size, dilation) -> Tuple[List[int], List[int]]:
    """'same' padding as nn.Conv2d computes it: total d·(k-1) per dim, the odd pixel on the
    right/bottom. Returns (symmetric part [ph, pw], extra right/bottom [eh, ew])."""
    sym, extra = [], []
    for k, d in zip(kernel_size, dilation):
        total = d * (k - 1)
        left = total // 2
        sym.append(left)
        extra.append(total - 2 * left)
    return sym, extra


def conv_geometry(op: str, x: Tensor, weight: Tensor, stride, padding, dilation):
    """F.conv2d's stride / padding (an int, a pair, 'same' or 'valid') / dilation as int pairs;
    'same' with an even kernel pads x's bottom and right by one more (as PyTorch does)."""
    stride = as_int_list(stride, 2, f"{op}: stride")
    dilation = as_int_list(dilation, 2, f"{op}: dilation")
    if isinstance(padding, str):
        if padding == "valid":
            padding = [0, 0]
        elif padding == "same":
            if stride != [1, 1]:
                raise ValueError(f"{op}: padding='same' is not supported for strided convolutions (stride={stride})")
            padding, extra = same_padding(weight.shape[2:], dilation)
            if any(extra):
                x = F.pad(x, [0, extra[1], 0, extra[0]])
        else:
            raise ValueError(f"{op}: padding must be an int, a pair, 'same' or 'valid', got {padding!r}")
    else:
        padding = as_int_list(padding, 2, f"{op}: padding")
    return x, stride, padding, dilation


def _conv2d_ok(x, weight, delta, score, bias, groups, threshold) -> bool:
    """The common case of check_conv2d, accepted in one frame and the fewest metadata reads (each
    call of a layer pays for them); False sends the call through every check, which names the
    problem. common_ok's tests are repeated inline: calling it costs 0.15 µs more a call (1.52
    against 1.38 µs, 2-core x86_64, no GPU, torch 2.14.1). Anything that is not a tensor fails
    here on a missing attribute."""
    try:
        dt, ws, xs = x.dtype, weight.shape, x.shape
        if not (weight.dtype is dt and delta.dtype is dt and dt.is_floating_point and len(ws) == 4
                and len(xs) == 4 and delta.shape == ws and score.dim() == 0
                and score.dtype.is_floating_point and type(groups) is int and groups >= 1
                and ws[0] % groups == 0 and xs[1] == ws[1] * groups
                and (bias is None or (bias.dtype is dt and bias.dim() == 1 and bias.shape[0] == ws[0]))
                and ((type(threshold) is float and threshold == threshold) or type(threshold) is int)):
            return False
        if x.is_cpu:
            return weight.is_cpu and delta.is_cpu and score.is_cpu and (bias is None or bias.is_cpu)
        return common_ok(x, weight, delta, score, bias, threshold)
    except (AttributeError, IndexError):
        return False


def check_conv2d(x, weight, delta, score, bias, groups, threshold) -> None:
    if _conv2d_ok(x, weight, delta, score, bias, groups, threshold):
        return
    check_common(_OP, x, weight, delta, score, bias, threshold)
    if weight.dim() != 4:
        raise ValueError(f"{_OP}: weight must be 4-D [out, in/groups, kh, kw], got shape {tuple(weight.shape)}")
    if x.dim() != 4:
        raise ValueError(f"{_OP}: input must be 4-D [batch, channels, height, width] (or 3-D unbatched), "
                         f"got shape {tuple(x.shape)}")
    if not isinstance(groups, int) or groups < 1 or weight.shape[0] % groups:
        raise ValueError(f"{_OP}: groups={groups!r} must be a positive int dividing out_channels={weight.shape[0]}")
    if x.shape[1] != weight.shape[1] * groups:
        raise ValueError(
            f"{_OP}: input of shape {tuple(x.shape)} has {x.shape[1]} channels, but the layer expects "
            f"in_channels={weight.shape[1] * groups} (weight {tuple(weight.shape)}, groups={groups})"
        )
    check_bias(_OP, bias, weight)


def taps_conv2d(
    x: Tensor, weight: Tensor, delta: Optional[Tensor], score: Tensor, bias: Optional[Tensor] = None,
    stride: Union[int, Tuple[int, int]] = 1, padding: Union[int, Tuple[int, int], str] = 0,
    dilation: Union[int, Tuple[int, int]] = 1, groups: int = 1, threshold: float = 0.1,
) -> Tensor:
    """conv2d(x, W + 1[s ≥ τ]·ΔW) + b with the TAPS gradients (module docstring); arguments as
    F.conv2d's (padding an int, a pair, 'same' or 'valid'; zero padding). A 3-D input is an
    unbatched sample. ``delta=None`` is the plain F.conv2d on W."""
    if delta is None:
        return F.conv2d(x, weight, bias, stride, padding, dilation, groups)
    if any_autocast():
        x, weight, delta, bias = autocast_inputs(x, weight, delta, bias)
    unbatched = isinstance(x, Tensor) and x.dim() == 3
    if unbatched:
        x = x.unsqueeze(0)
    check_conv2d(x, weight, delta, score, bias, groups, threshold)
    x, stride, padding, dilation = conv_geometry(_OP, x, weight, stride, padding, dilation)
    path = eager_path(x, weight, delta, score, bias)
    if path == AUTOGRAD:
        try:  # a forced backend without a backward: its forward runs (_Conv2dFunction)
            composed = _kernel("conv2d_bwd", x, weight, groups,
                               conv2d_out_numel(x, weight, stride, padding, dilation)) is conv2d_bwd_torch
        except dispatch.NoBackendError:
            composed = False
        if composed:
            # the reference backward: F.conv2d's own autograd on W_eff (GatedWeight), but for
            # a closed layer too large for one block of its blocked ds (G would be whole)
            is_open = gate_is_open(score, threshold, _OP)
            if is_open or weight.numel() <= DS_BLOCK_ELEMS:
                y = F.conv2d(x, GatedWeight.apply(weight, delta, score, is_open), bias, stride, padding,
                             dilation, groups)
                return y.squeeze(0) if unbatched else y
    if path == FORMULA:
        y = taps_conv2d_ref(x, weight, delta, score, bias, stride, padding, dilation, groups, float(threshold))
    else:
        op = _conv2d_fwd if path == DIRECT else _Conv2dFunction.apply if path == AUTOGRAD else _conv2d_op
        y = op(x, weight, delta, score, bias, stride, padding, dilation, groups, float(threshold))
    return y.squeeze(0) if unbatched else y
