r"""Multi-task gated linear: one mixed batch, each sample with its own task's delta.

Math (the layer's layout and the general rule are in _mt_common.py). x: [B, ..., K], flattened to
[M, K], each row with its sample's task t = task_ids[i]; W: [N, K]; deltas: [S, N, K];
g_t = 1[slot[t] ≥ 0 and s_t ≥ τ_t] (0 for the base, t = -1); R_t = the rows of task t:

    forward   y[m]  = x[m]·(W + g_t·ΔW_slot[t])ᵀ + b
    backward  dx[m] = dy[m]·(W + g_t·ΔW_slot[t])
              G_t   = dy[R_t]ᵀ·x[R_t]
              dΔW_slot[t] = g_t·G_t,   ds_t = ⟨G_t, ΔW_slot[t]⟩   (straight-through)
              db = Σ_m dy[m],  dW = Σ_t G_t = dyᵀ·x   (only if the caller unfroze the base)

The file reads top down:
- ``taps_mt_linear_ref``: the oracle, an autograd-differentiable formula (a masked loop over the
  T tasks, each an ordinary product over the whole batch), used in float64 by the tests.
- ``mt_linear_fwd_torch`` / ``mt_linear_bwd_torch``: the kernels of the "reference" backend,
  written with torch ops (the CPU path). On a batch in which the rows of each weight (W for the
  base and the closed tasks, W + ΔW_t for each open task t) form one run of consecutive samples:
  one product per run, written in place into y, with W + ΔW_t formed for the call (a transient
  the size of W; the model holds only W and the stacked deltas). Any other batch: y = x·Wᵀ + b
  for all, then y_t += x_t·ΔW_tᵀ per open task.
- the launcher (the dispatcher picks a backend per call);
- the ``taps_fast::mt_linear`` / ``mt_linear_backward`` custom ops, fake kernels and autograd,
  so torch.compile traces through them;
- ``taps_mt_linear``, the functional API that the multi-task modules call.
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import dispatch
from ._common import DIRECT, autocast_inputs, eager_path, mt_backward_outputs, not_a_view
from ._mt_common import (
    add_rows,
    base_grads,
    check_batch_ids,
    check_stack,
    dispatch_meta,
    kernel_ids,
    mt_backward_fake,
    open_tasks,
    rows_per_sample,
    setup_context,
    ste_gates,
    take,
    task_grads,
    task_groups,
    task_masks,
)
from .linear import linear_closed_ds

_OP = "taps_mt_linear"


# ----------------------------------------------------------------------------- oracle
def taps_mt_linear_ref(x: Tensor, task_ids: Tensor, weight: Tensor, deltas: Tensor, slot: Tensor,
                       scores: Tensor, thresholds: Tensor, bias: Optional[Tensor] = None) -> Tensor:
    """Autograd-differentiable oracle: y = x·Wᵀ + b + Σ_t mask_t·(x·(gate_t·ΔW_slot[t])ᵀ).
    T ordinary products over the whole batch: a test oracle, not a fast path."""
    y = F.linear(x, weight, bias)
    gates = ste_gates(slot, scores, thresholds)
    masks = task_masks(task_ids, slot.numel(), x.dtype)
    view = (-1,) + (1,) * (x.dim() - 1)
    for t in range(slot.numel()):
        s = int(slot[t])
        if s >= 0:
            y = y + masks[t].view(view) * F.linear(x, gates[t].to(x.dtype) * deltas[s])
    return y


# ----------------------------------------------------------------------------- reference backend kernels
def _runs(task_ids: Tensor, is_open: Tensor) -> Optional[List[Tuple[int, int, int]]]:
    """Maximal runs (start, stop, task or -1 for W) of consecutive samples computed with the
    same weight, or None when that would take more runs than there are weights (an unsorted
    batch: then the groups are gathered instead)."""
    ids = task_ids.long()
    if is_open.numel() == 0:  # no tasks (T = 0): one run of the base weight
        key = torch.full_like(ids, -1)
    else:
        key = torch.where((ids >= 0) & is_open[ids.clamp(min=0)], ids, -1)
    if key.numel() == 0:
        return []
    change = (key[1:] != key[:-1]).nonzero().flatten() + 1
    starts = [0] + change.tolist()
    stops = starts[1:] + [key.numel()]
    keys = key[starts].tolist()
    if len(set(keys)) != len(keys):
        return None
    return list(zip(starts, stops, keys))


def _rows_mm(a2: Tensor, w: Tensor, out2: Tensor, lo: int, hi: int, bias: Optional[Tensor]) -> None:
    """out2[lo:hi] = a2[lo:hi]·w (+ bias), written in place (no temporary, no copy)."""
    if bias is not None:
        torch.addmm(bias, a2[lo:hi], w, out=out2[lo:hi])
    else:
        torch.mm(a2[lo:hi], w, out=out2[lo:hi])


def mt_linear_fwd_torch(x, task_ids, weight, deltas, slot, scores, thresholds, bias):
    """A batch whose rows of each weight form one consecutive run (the base's and the closed
    tasks' rows count as one weight, W): one product per run, written in place into y (W + ΔW_t
    formed for the call: on a CPU that add costs less than a second product over the task's
    rows). Any other batch: y = x·Wᵀ + b for all, then y_t += x_t·ΔW_tᵀ per open task."""
    is_open = open_tasks(task_ids, slot, scores, thresholds, _OP)
    opened = task_groups(task_ids, is_open)
    if not opened:
        return F.linear(x, weight, bias)
    runs = _runs(task_ids, is_open)
    if runs is None:
        y = F.linear(x, weight, bias)
        for t, sel in opened:
            add_rows(y, sel, F.linear(take(x, sel), deltas[int(slot[t])]))
        return y
    n, k = weight.shape
    per = rows_per_sample(x, k)
    x2 = x.reshape(-1, k)
    y = x.new_empty(tuple(x.shape[:-1]) + (n,))
    y2 = y.view(-1, n)
    for a, b, t in runs:
        w = weight if t < 0 else weight + deltas[int(slot[t])]
        _rows_mm(x2, w.t(), y2, a * per, b * per, bias)
    return y


def mt_linear_bwd_torch(dy, x, task_ids, weight, deltas, slot, scores, thresholds,
                        needs_dx, needs_ddeltas, needs_dscores):
    n, k = weight.shape
    is_open = open_tasks(task_ids, slot, scores, thresholds, _OP)
    dx = None
    if needs_dx:  # the forward's scheme with the transposed weights
        runs = _runs(task_ids, is_open)
        if runs is None:
            dx = dy @ weight
            for t, sel in task_groups(task_ids, is_open):
                add_rows(dx, sel, take(dy, sel) @ deltas[int(slot[t])])
        else:
            per = rows_per_sample(x, k)
            dx = x.new_empty(x.shape)
            dx2, dy2 = dx.view(-1, k), dy.reshape(-1, n)
            for a, b, t in runs:
                w = weight if t < 0 else weight + deltas[int(slot[t])]
                _rows_mm(dy2, w, dx2, a * per, b * per, None)

    def g_of(dyt, xt):
        return dyt.reshape(-1, n).t() @ xt.reshape(-1, k)

    def closed_ds(dyt, xt, d):
        return linear_closed_ds(dyt.reshape(-1, n), xt.reshape(-1, k), d)

    dd, ds = task_grads(dy, x, task_ids, deltas, slot, is_open, needs_ddeltas, needs_dscores, g_of, closed_ds)
    return mt_backward_outputs(x, deltas, scores, dx, dd, ds)


# ----------------------------------------------------------------------------- launcher
def _y_numel(x: Tensor, weight: Tensor) -> int:
    return x.numel() // max(1, weight.shape[1]) * weight.shape[0]


def _mt_linear_fwd(x: Tensor, task_ids: Tensor, weight: Tensor, deltas: Tensor, slot: Tensor,
                   scores: Tensor, thresholds: Tensor, bias: Optional[Tensor]) -> Tensor:
    be = dispatch.select("mt_linear_fwd", **dispatch_meta(x, weight, deltas, _y_numel(x, weight)))
    y = be.kernels["mt_linear_fwd"](x, task_ids, weight, deltas, slot, scores, thresholds, bias)
    return not_a_view(y.contiguous())


# ----------------------------------------------------------------------------- custom ops
@torch.library.custom_op("taps_fast::mt_linear", mutates_args=())
def _mt_linear_op(x: Tensor, task_ids: Tensor, weight: Tensor, deltas: Tensor, slot: Tensor,
                  scores: Tensor, thresholds: Tensor, bias: Optional[Tensor]) -> Tensor:
    return _mt_linear_fwd(x, task_ids, weight, deltas, slot, scores, thresholds, bias)


@_mt_linear_op.register_fake
def _mt_linear_fake(x, task_ids, weight, deltas, slot, scores, thresholds, bias):
    return x.new_empty(tuple(x.shape[:-1]) + (weight.shape[0],))


@torch.library.custom_op("taps_fast::mt_linear_backward", mutates_args=())
def _mt_linear_backward_op(dy: Tensor, x: Tensor, task_ids: Tensor, weight: Tensor, deltas: Tensor,
                           slot: Tensor, scores: Tensor, thresholds: Tensor, needs_dx: bool,
                           needs_ddeltas: bool, needs_dscores: bool) -> Tuple[Tensor, Tensor, Tensor]:
    be = dispatch.select("mt_linear_bwd", **dispatch_meta(x, weight, deltas, dy.numel()))
    return be.kernels["mt_linear_bwd"](dy, x, task_ids, weight, deltas, slot, scores, thresholds,
                                       needs_dx, needs_ddeltas, needs_dscores)


@_mt_linear_backward_op.register_fake
def _mt_linear_backward_fake(dy, x, task_ids, weight, deltas, slot, scores, thresholds, needs_dx,
                             needs_ddeltas, needs_dscores):
    return mt_backward_fake(x, deltas, scores, needs_dx, needs_ddeltas, needs_dscores)


def _mt_linear_setup(ctx, inputs, output):
    setup_context(ctx, inputs, True)


def _mt_linear_backward(ctx, dy):
    x, task_ids, weight, deltas, slot, scores, thresholds = ctx.saved_tensors
    nx, _, _, nd, _, ns = ctx.needs_input_grad[:6]
    dx = dd = ds = None
    if nx or nd or ns:
        dx, dd, ds = _mt_linear_backward_op(dy, x, task_ids, weight, deltas, slot, scores,
                                            thresholds, nx, nd, ns)
    dw, db = base_grads(ctx, dy, x, weight,
                        lambda dy, x, w: dy.reshape(-1, w.shape[0]).t() @ x.reshape(-1, w.shape[1]))
    return (dx if nx else None, None, dw, dd if nd else None, None, ds if ns else None, None, db)


_mt_linear_op.register_autograd(_mt_linear_backward, setup_context=_mt_linear_setup)


# ----------------------------------------------------------------------------- functional API
def taps_mt_linear(x: Tensor, task_ids: Tensor, weight: Tensor, deltas: Tensor, slot: Tensor,
                   scores: Tensor, thresholds: Tensor, bias: Optional[Tensor] = None,
                   check_ids: bool = True) -> Tensor:
    """Mixed-batch gated linear (module docstring): x [B, ..., K], task_ids [B] (-1 = base).
    ``check_ids`` validates the id range (a host sync; MultiTaskModel checks once per batch and
    passes False)."""
    x, weight, deltas, bias = autocast_inputs(x, weight, deltas, bias)
    check_stack(_OP, x, weight, deltas, slot, scores, thresholds, bias)
    if weight.dim() != 2 or x.dim() < 2 or x.shape[-1] != weight.shape[1]:
        raise ValueError(f"{_OP}: input of shape {tuple(x.shape)} does not fit weight {tuple(weight.shape)}: "
                         f"expected [batch, ..., {weight.shape[-1]}]")
    check_batch_ids(_OP, task_ids, x, slot, check_ids)
    task_ids = kernel_ids(task_ids)
    op = _mt_linear_fwd if eager_path(x, weight, deltas, scores, bias) == DIRECT else _mt_linear_op
    return op(x, task_ids, weight, deltas, slot, scores, thresholds, bias)
