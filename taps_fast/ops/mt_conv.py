r"""Multi-task gated conv2d: one mixed batch, each sample with its own task's delta.

Math (the layer's layout and the general rule are in _mt_common.py). x: [B, C, H, W], sample i
with task t = task_ids[i]; W: [O, C/groups, kh, kw]; deltas: [S, *W.shape];
g_t = 1[slot[t] ≥ 0 and s_t ≥ τ_t] (0 for the base, t = -1):

    forward   y_i  = conv2d(x_i, W + g_t·ΔW_slot[t]) + b
    backward  dx_i = conv_transpose2d(dy_i, W + g_t·ΔW_slot[t])
              G_t  = conv2d_weight(x_t, dy_t), the weight gradient over task t's samples only
              dΔW_slot[t] = g_t·G_t,   ds_t = ⟨G_t, ΔW_slot[t]⟩   (straight-through)
              db = Σ_{i,h,w} dy,  dW = Σ_t G_t = G   (only if the caller unfroze the base)

The file reads top down:
- ``taps_mt_conv2d_ref``: the oracle, an autograd-differentiable formula (a masked loop over the
  T tasks, each an ordinary conv over the whole batch), used in float64 by the tests.
- ``mt_conv2d_fwd_torch`` / ``mt_conv2d_bwd_torch``: the kernels of the "reference" backend,
  written with torch ops (the CPU path): y = conv(x, W) + b for the whole batch, then
  y_t += conv(x_t, ΔW_t) for each open task t (linearity: W + ΔW is never formed).
- the launcher (the dispatcher picks a backend per call);
- the ``taps_fast::mt_conv2d`` / ``mt_conv2d_backward`` custom ops, fake kernels and autograd,
  so torch.compile traces through them;
- ``taps_mt_conv2d``, the functional API that the multi-task modules call.
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import dispatch
from ._common import DIRECT, autocast_inputs, eager_path, match_layout, mt_backward_outputs, out_format, restride
from ._mt_common import (
    add_rows,
    base_grads,
    check_batch_ids,
    check_stack,
    dispatch_meta,
    kernel_ids,
    mt_backward_fake,
    open_tasks,
    setup_context,
    ste_gates,
    take,
    task_grads,
    task_groups,
    task_masks,
)
from .conv import conv2d_closed_ds, conv2d_out_numel, conv_geometry, new_conv2d_output

_OP = "taps_mt_conv2d"
_aten = torch.ops.aten


# ----------------------------------------------------------------------------- oracle
def taps_mt_conv2d_ref(x: Tensor, task_ids: Tensor, weight: Tensor, deltas: Tensor, slot: Tensor,
                       scores: Tensor, thresholds: Tensor, bias: Optional[Tensor] = None,
                       stride=1, padding=0, dilation=1, groups: int = 1) -> Tensor:
    """Autograd-differentiable oracle: conv(x, W) + b + Σ_t mask_t·conv(x, gate_t·ΔW_slot[t])."""
    y = F.conv2d(x, weight, bias, stride, padding, dilation, groups)
    gates = ste_gates(slot, scores, thresholds)
    masks = task_masks(task_ids, slot.numel(), x.dtype)
    for t in range(slot.numel()):
        s = int(slot[t])
        if s >= 0:
            d = gates[t].to(x.dtype) * deltas[s]
            y = y + masks[t].view(-1, 1, 1, 1) * F.conv2d(x, d, None, stride, padding, dilation, groups)
    return y


# ----------------------------------------------------------------------------- reference backend kernels
def mt_conv2d_fwd_torch(x, task_ids, weight, deltas, slot, scores, thresholds, bias,
                        stride, padding, dilation, groups):
    """y = conv(x, W) + b over the whole batch, then y_t += conv(x_t, ΔW_t) per open task
    (linearity). No conv has an out= form, so splitting the batch into runs would copy every
    output once; the extra product over the open tasks' rows costs less (measured with
    ``taps-fast bench --suite multitask``), and W + ΔW is never formed."""
    is_open = open_tasks(task_ids, slot, scores, thresholds, _OP)
    y = F.conv2d(x, weight, bias, stride, padding, dilation, groups)
    for t, sel in task_groups(task_ids, is_open):
        add_rows(y, sel, F.conv2d(take(x, sel), deltas[int(slot[t])], None, stride, padding, dilation, groups))
    return y


def mt_conv2d_bwd_torch(dy, x, task_ids, weight, deltas, slot, scores, thresholds,
                        stride, padding, dilation, groups, needs_dx, needs_ddeltas, needs_dscores):
    is_open = open_tasks(task_ids, slot, scores, thresholds, _OP)

    def conv_bwd(dyt, xt, w, mask):
        return _aten.convolution_backward(dyt, xt, w, None, stride, padding, dilation, False,
                                          [0, 0], groups, mask)

    dx = None
    if needs_dx:  # linearity, as the forward
        dx = conv_bwd(dy, x, weight, [True, False, False])[0]
        for t, sel in task_groups(task_ids, is_open):
            add_rows(dx, sel, conv_bwd(take(dy, sel), take(x, sel), deltas[int(slot[t])], [True, False, False])[0])
        dx = match_layout(dx, x)

    def g_of(dyt, xt):
        return conv_bwd(dyt, xt, weight, [False, True, False])[1]

    def closed_ds(dyt, xt, d):
        return conv2d_closed_ds(dyt, xt, d, stride, padding, dilation, groups)

    dd, ds = task_grads(dy, x, task_ids, deltas, slot, is_open, needs_ddeltas, needs_dscores, g_of, closed_ds)
    return mt_backward_outputs(x, deltas, scores, dx, dd, ds)


# ----------------------------------------------------------------------------- launcher
def _mt_conv2d_fwd(x: Tensor, task_ids: Tensor, weight: Tensor, deltas: Tensor, slot: Tensor,
                   scores: Tensor, thresholds: Tensor, bias: Optional[Tensor], stride: List[int],
                   padding: List[int], dilation: List[int], groups: int) -> Tensor:
    y_numel = conv2d_out_numel(x, weight, stride, padding, dilation)
    be = dispatch.select("mt_conv2d_fwd", **dispatch_meta(x, weight, deltas, y_numel, groups))
    y = be.kernels["mt_conv2d_fwd"](x, task_ids, weight, deltas, slot, scores, thresholds, bias,
                                    stride, padding, dilation, groups)
    return restride(y, out_format(x))


# ----------------------------------------------------------------------------- custom ops
@torch.library.custom_op("taps_fast::mt_conv2d", mutates_args=())
def _mt_conv2d_op(x: Tensor, task_ids: Tensor, weight: Tensor, deltas: Tensor, slot: Tensor,
                  scores: Tensor, thresholds: Tensor, bias: Optional[Tensor], stride: List[int],
                  padding: List[int], dilation: List[int], groups: int) -> Tensor:
    return _mt_conv2d_fwd(x, task_ids, weight, deltas, slot, scores, thresholds, bias, stride, padding,
                          dilation, groups)


@_mt_conv2d_op.register_fake
def _mt_conv2d_fake(x, task_ids, weight, deltas, slot, scores, thresholds, bias, stride, padding,
                    dilation, groups):
    return new_conv2d_output(x, weight, stride, padding, dilation)


@torch.library.custom_op("taps_fast::mt_conv2d_backward", mutates_args=())
def _mt_conv2d_backward_op(dy: Tensor, x: Tensor, task_ids: Tensor, weight: Tensor, deltas: Tensor,
                           slot: Tensor, scores: Tensor, thresholds: Tensor, stride: List[int],
                           padding: List[int], dilation: List[int], groups: int, needs_dx: bool,
                           needs_ddeltas: bool, needs_dscores: bool) -> Tuple[Tensor, Tensor, Tensor]:
    be = dispatch.select("mt_conv2d_bwd", **dispatch_meta(x, weight, deltas, dy.numel(), groups))
    return be.kernels["mt_conv2d_bwd"](dy, x, task_ids, weight, deltas, slot, scores, thresholds,
                                       stride, padding, dilation, groups, needs_dx, needs_ddeltas,
                                       needs_dscores)


@_mt_conv2d_backward_op.register_fake
def _mt_conv2d_backward_fake(dy, x, task_ids, weight, deltas, slot, scores, thresholds, stride,
                             padding, dilation, groups, needs_dx, needs_ddeltas, needs_dscores):
    return mt_backward_fake(x, deltas, scores, needs_dx, needs_ddeltas, needs_dscores)


def _mt_conv2d_setup(ctx, inputs, output):
    setup_context(ctx, inputs, False)


def _mt_conv2d_backward(ctx, dy):
    x, task_ids, weight, deltas, slot, scores, thresholds = ctx.saved_tensors
    stride, padding, dilation, groups = ctx.args
    nx, _, _, nd, _, ns = ctx.needs_input_grad[:6]
    dx = dd = ds = None
    if nx or nd or ns:
        dx, dd, ds = _mt_conv2d_backward_op(dy, x, task_ids, weight, deltas, slot, scores,
                                            thresholds, stride, padding, dilation, groups, nx, nd, ns)

    def wgrad(dy, x, w):
        return _aten.convolution_backward(dy, x, w, None, stride, padding, dilation, False, [0, 0],
                                          groups, [False, True, False])[1]

    dw, db = base_grads(ctx, dy, x, weight, wgrad)
    return (dx if nx else None, None, dw, dd if nd else None, None, ds if ns else None, None, db,
            None, None, None, None)


_mt_conv2d_op.register_autograd(_mt_conv2d_backward, setup_context=_mt_conv2d_setup)


# ----------------------------------------------------------------------------- functional API
def taps_mt_conv2d(x: Tensor, task_ids: Tensor, weight: Tensor, deltas: Tensor, slot: Tensor,
                   scores: Tensor, thresholds: Tensor, bias: Optional[Tensor] = None,
                   stride: Union[int, Sequence[int]] = 1, padding: Union[int, Sequence[int], str] = 0,
                   dilation: Union[int, Sequence[int]] = 1, groups: int = 1,
                   check_ids: bool = True) -> Tensor:
    """Mixed-batch gated conv2d (module docstring): x [B, C, H, W], task_ids [B] (-1 = base);
    conv arguments as F.conv2d's (zero padding: an int, a pair, 'same' or 'valid')."""
    x, weight, deltas, bias = autocast_inputs(x, weight, deltas, bias)
    check_stack(_OP, x, weight, deltas, slot, scores, thresholds, bias)
    if x.dim() != 4 or weight.dim() != 4 or x.shape[1] != weight.shape[1] * groups:
        raise ValueError(f"{_OP}: input of shape {tuple(x.shape)} does not fit weight {tuple(weight.shape)} "
                         f"with groups={groups}: expected [B, {weight.shape[1] * groups}, H, W]")
    check_batch_ids(_OP, task_ids, x, slot, check_ids)
    task_ids = kernel_ids(task_ids)
    x, stride, padding, dilation = conv_geometry(_OP, x, weight, stride, padding, dilation)
    op = _mt_conv2d_fwd if eager_path(x, weight, deltas, scores, bias) == DIRECT else _mt_conv2d_op
    return op(x, task_ids, weight, deltas, slot, scores, thresholds, bias, stride, padding, dilation, groups)
