r"""Multi-task gated linear and conv2d: one mixed batch, each sample with its own task's delta.

Layout of one layer's tasks (built by :class:`taps_fast.MultiTaskModel`):

    weight W, bias b        the frozen base layer, shared by every task
    deltas [S, *W.shape]    the deltas of the S tasks that opened this layer, stacked
    slot   [T] int          task t's index into ``deltas`` (-1: the task has no delta here)
    scores [T]              every task's gate score on this layer
    thresholds [T]          every task's τ (in the scores' dtype)
    task_ids [B] int        per sample: its task, or -1 for the base model

Math, per sample i with task t = task_ids[i] and g_t = 1[slot[t] ≥ 0 and s_t ≥ τ_t] (0 for -1):

    forward   y_i  = op(x_i, W + g_t·ΔW_slot[t]) + b
    backward  dx_i = the layer's input gradient with the same W_eff
              G_t  = the ordinary weight gradient over the rows of task t only
                     (linear: dy_tᵀ·x_t; conv: conv2d_weight(x_t, dy_t))
              dΔW_slot[t] = g_t·G_t          (zero for a closed task, and for absent tasks)
              ds_t = ⟨G_t, ΔW_slot[t]⟩      (straight-through: also when closed; 0 without a slot)
              db = Σ dy, dW = Σ_t G_t = G    (only if the caller unfroze the base)

So a mixed batch trains every task present at once (TAPS' joint variant): each task's slot of
``deltas`` and entry of ``scores`` get exactly the gradients the task's own model would get from
its rows.

This file holds, Liger-Kernel style:
- ``taps_mt_linear_ref`` / ``taps_mt_conv2d_ref``: autograd-differentiable formulas (a masked
  loop over the T tasks, each an ordinary op on the whole batch): the test oracle, in float64.
- the "reference" backend's kernels, the CPU path: a loop over the tasks present, never over
  samples. Conv: y = conv(x, W) + b for the whole batch, then y_t += conv(x_t, ΔW_t) for each
  open task t (linearity: W + ΔW is never formed). Linear on a batch in which the rows of each
  weight (W for the base and the closed tasks, W + ΔW_t for each open task t) form one run of
  consecutive samples: one product per run, written
  in place into y, with W + ΔW_t formed for the call (a transient the size of W; the model
  holds only W and the stacked deltas). Groups of consecutive samples are views, never copies.
  The groups are found on the host (a sync per layer: fine on a CPU; the Triton kernels build
  them on the device).
- the ``taps_fast::mt_linear`` / ``mt_conv2d`` custom ops (+ backward ops), fake kernels and
  autograd, so torch.compile traces through them; the functional API ``taps_mt_linear`` /
  ``taps_mt_conv2d`` that the multi-task modules call.
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import dispatch
from ._common import acc_dtype, autocast_inputs, eager_no_grad, empty0, inner, match_layout, not_a_view
from .conv import _closed_ds as _conv_closed_ds
from .conv import _conv2d_fake, _out_format, _restride, _y_numel, conv_geometry
from .linear import _closed_ds as _linear_closed_ds

_aten = torch.ops.aten
_LIN, _CONV = "taps_mt_linear", "taps_mt_conv2d"


# ----------------------------------------------------------------------------- reference formulas
def _ste_gates(slot: Tensor, scores: Tensor, thresholds: Tensor) -> Tensor:
    """[T] gates g_t with the straight-through estimator: value 1[slot ≥ 0 and s ≥ τ],
    derivative 1 in s_t (g + s - s.detach())."""
    g = ((slot >= 0) & (scores.detach() >= thresholds)).to(scores.dtype)
    return g + scores - scores.detach()


def _masks(task_ids: Tensor, T: int, dtype) -> Tensor:
    """[T, B] one-hot sample masks per task (the base rows, -1, belong to none)."""
    return (task_ids[None, :] == torch.arange(T, device=task_ids.device)[:, None]).to(dtype)


def taps_mt_linear_ref(x: Tensor, task_ids: Tensor, weight: Tensor, deltas: Tensor, slot: Tensor,
                       scores: Tensor, thresholds: Tensor, bias: Optional[Tensor] = None) -> Tensor:
    """Autograd-differentiable oracle: y = x·Wᵀ + b + Σ_t mask_t·(x·(gate_t·ΔW_slot[t])ᵀ).
    T ordinary products over the whole batch: a test oracle, not a fast path."""
    y = F.linear(x, weight, bias)
    gates = _ste_gates(slot, scores, thresholds)
    masks = _masks(task_ids, slot.numel(), x.dtype)
    view = (-1,) + (1,) * (x.dim() - 1)
    for t in range(slot.numel()):
        s = int(slot[t])
        if s >= 0:
            y = y + masks[t].view(view) * F.linear(x, gates[t].to(x.dtype) * deltas[s])
    return y


def taps_mt_conv2d_ref(x: Tensor, task_ids: Tensor, weight: Tensor, deltas: Tensor, slot: Tensor,
                       scores: Tensor, thresholds: Tensor, bias: Optional[Tensor] = None,
                       stride=1, padding=0, dilation=1, groups: int = 1) -> Tensor:
    """Autograd-differentiable oracle: conv(x, W) + b + Σ_t mask_t·conv(x, gate_t·ΔW_slot[t])."""
    y = F.conv2d(x, weight, bias, stride, padding, dilation, groups)
    gates = _ste_gates(slot, scores, thresholds)
    masks = _masks(task_ids, slot.numel(), x.dtype)
    for t in range(slot.numel()):
        s = int(slot[t])
        if s >= 0:
            d = gates[t].to(x.dtype) * deltas[s]
            y = y + masks[t].view(-1, 1, 1, 1) * F.conv2d(x, d, None, stride, padding, dilation, groups)
    return y


# ----------------------------------------------------------------------------- reference backend
def _open_tasks(task_ids: Tensor, slot: Tensor, scores: Tensor, thresholds: Tensor, where: str) -> Tensor:
    """[T] bool: which tasks' gates are open; refuses a NaN score of a task present in the batch."""
    is_open = (slot >= 0) & (scores.detach() >= thresholds)
    nan = torch.isnan(scores.detach())
    if bool(nan.any()):
        present = torch.zeros_like(nan)
        present[task_ids[task_ids >= 0].long()] = True
        bad = (nan & present).nonzero().flatten().tolist()
        if bad:
            raise ValueError(f"{where}: the gate score of task(s) {bad} is NaN, so their gate is "
                             "undefined; the training diverged or the score was overwritten")
    return is_open


Sel = Union[slice, Tensor]


def _groups(task_ids: Tensor, keep: Tensor) -> List[Tuple[int, Sel]]:
    """[(task, its samples)] for each task t present with keep[t], in task order; the samples
    as a slice when they are consecutive (MultiTaskModel sorts the batch by task on the CPU, so
    they are: a view, no copy) or else an index tensor. Host sync: the CPU path's way."""
    out: List[Tuple[int, Sel]] = []
    if keep.numel() == 0:  # no tasks on this layer (T = 0): every row is the base's
        return out
    ids = task_ids.long()
    sel = (ids >= 0) & keep[ids.clamp(min=0)]
    if not bool(sel.any()):
        return out
    for t in torch.unique(ids[sel]).tolist():
        idx = (ids == t).nonzero().flatten()
        a, b = int(idx[0]), int(idx[-1]) + 1
        out.append((t, slice(a, b) if b - a == idx.numel() else idx))
    return out


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


def _take(t: Tensor, sel: Sel) -> Tensor:
    return t[sel]  # a view for a slice; aten::index (4x faster than index_select here) for a tensor


def _add_rows(y: Tensor, sel: Sel, v: Tensor) -> None:
    if isinstance(sel, slice):
        y[sel] += v
    else:
        y.index_add_(0, sel, v)


def _rows_mm(a2: Tensor, w: Tensor, out2: Tensor, lo: int, hi: int, bias: Optional[Tensor]) -> None:
    """out2[lo:hi] = a2[lo:hi]·w (+ bias), written in place (no temporary, no copy)."""
    if bias is not None:
        torch.addmm(bias, a2[lo:hi], w, out=out2[lo:hi])
    else:
        torch.mm(a2[lo:hi], w, out=out2[lo:hi])


def mt_linear_fwd_reference(x, task_ids, weight, deltas, slot, scores, thresholds, bias):
    """A batch whose rows of each weight form one consecutive run (the base's and the closed
    tasks' rows count as one weight, W): one product per run, written in place into y (W + ΔW_t
    formed for the call: on a CPU that add costs less than a second product over the task's
    rows). Any other batch: y = x·Wᵀ + b for all, then y_t += x_t·ΔW_tᵀ per open task."""
    is_open = _open_tasks(task_ids, slot, scores, thresholds, _LIN)
    opened = _groups(task_ids, is_open)
    if not opened:
        return F.linear(x, weight, bias)
    runs = _runs(task_ids, is_open)
    if runs is None:
        y = F.linear(x, weight, bias)
        for t, sel in opened:
            _add_rows(y, sel, F.linear(_take(x, sel), deltas[int(slot[t])]))
        return y
    n, k = weight.shape
    per = x[0].numel() // k if x.shape[0] else 0  # rows per sample
    x2 = x.reshape(-1, k)
    y = x.new_empty(tuple(x.shape[:-1]) + (n,))
    y2 = y.view(-1, n)
    for a, b, t in runs:
        w = weight if t < 0 else weight + deltas[int(slot[t])]
        _rows_mm(x2, w.t(), y2, a * per, b * per, bias)
    return y


def mt_conv2d_fwd_reference(x, task_ids, weight, deltas, slot, scores, thresholds, bias,
                            stride, padding, dilation, groups):
    """y = conv(x, W) + b over the whole batch, then y_t += conv(x_t, ΔW_t) per open task
    (linearity). No conv has an out= form, so splitting the batch into runs would copy every
    output once; the extra product over the open tasks' rows costs less (measured with
    ``taps-fast bench --suite multitask``), and W + ΔW is never formed."""
    is_open = _open_tasks(task_ids, slot, scores, thresholds, _CONV)
    y = F.conv2d(x, weight, bias, stride, padding, dilation, groups)
    for t, sel in _groups(task_ids, is_open):
        _add_rows(y, sel, F.conv2d(_take(x, sel), deltas[int(slot[t])], None, stride, padding, dilation, groups))
    return y


def _task_grads(dy, x, task_ids, deltas, slot, is_open, needs_ddeltas, needs_dscores, g_of, closed_ds):
    """Per task present with a delta here: G_t once (open: dΔW = G_t, ds = ⟨G_t, ΔW⟩), or ds
    block by block without forming G_t (closed: dΔW = 0; ds flows, straight-through)."""
    ddeltas = torch.zeros_like(deltas) if needs_ddeltas else None
    dscores = torch.zeros(slot.numel(), dtype=acc_dtype(deltas.dtype), device=deltas.device) if needs_dscores else None
    if needs_ddeltas or needs_dscores:
        for t, sel in _groups(task_ids, slot >= 0):
            s = int(slot[t])
            dyt, xt = _take(dy, sel), _take(x, sel)
            if bool(is_open[t]):
                g = g_of(dyt, xt)
                if needs_ddeltas:
                    ddeltas[s].copy_(g)
                if needs_dscores:
                    dscores[t] = inner(g, deltas[s])
            elif needs_dscores:
                dscores[t] = closed_ds(dyt, xt, deltas[s])
    return ddeltas, dscores


def _pack(x, deltas, scores, dx, ddeltas, dscores):
    return (dx if dx is not None else empty0(x),
            ddeltas if ddeltas is not None else empty0(deltas),
            dscores.to(scores.dtype) if dscores is not None else empty0(scores))


def mt_linear_bwd_reference(dy, x, task_ids, weight, deltas, slot, scores, thresholds,
                            needs_dx, needs_ddeltas, needs_dscores):
    n, k = weight.shape
    is_open = _open_tasks(task_ids, slot, scores, thresholds, _LIN)
    dx = None
    if needs_dx:  # the forward's scheme with the transposed weights
        runs = _runs(task_ids, is_open)
        if runs is None:
            dx = dy @ weight
            for t, sel in _groups(task_ids, is_open):
                _add_rows(dx, sel, _take(dy, sel) @ deltas[int(slot[t])])
        else:
            per = x[0].numel() // k if x.shape[0] else 0
            dx = x.new_empty(x.shape)
            dx2, dy2 = dx.view(-1, k), dy.reshape(-1, n)
            for a, b, t in runs:
                w = weight if t < 0 else weight + deltas[int(slot[t])]
                _rows_mm(dy2, w, dx2, a * per, b * per, None)

    def g_of(dyt, xt):
        return dyt.reshape(-1, n).t() @ xt.reshape(-1, k)

    def closed_ds(dyt, xt, d):
        return _linear_closed_ds(dyt.reshape(-1, n), xt.reshape(-1, k), d)

    dd, ds = _task_grads(dy, x, task_ids, deltas, slot, is_open, needs_ddeltas, needs_dscores, g_of, closed_ds)
    return _pack(x, deltas, scores, dx, dd, ds)


def mt_conv2d_bwd_reference(dy, x, task_ids, weight, deltas, slot, scores, thresholds,
                            stride, padding, dilation, groups, needs_dx, needs_ddeltas, needs_dscores):
    is_open = _open_tasks(task_ids, slot, scores, thresholds, _CONV)

    def conv_bwd(dyt, xt, w, mask):
        return _aten.convolution_backward(dyt, xt, w, None, stride, padding, dilation, False,
                                          [0, 0], groups, mask)

    dx = None
    if needs_dx:  # linearity, as the forward
        dx = conv_bwd(dy, x, weight, [True, False, False])[0]
        for t, sel in _groups(task_ids, is_open):
            _add_rows(dx, sel, conv_bwd(_take(dy, sel), _take(x, sel), deltas[int(slot[t])], [True, False, False])[0])
        dx = match_layout(dx, x)

    def g_of(dyt, xt):
        return conv_bwd(dyt, xt, weight, [False, True, False])[1]

    def closed_ds(dyt, xt, d):
        return _conv_closed_ds(dyt, xt, d, stride, padding, dilation, groups)

    dd, ds = _task_grads(dy, x, task_ids, deltas, slot, is_open, needs_ddeltas, needs_dscores, g_of, closed_ds)
    return _pack(x, deltas, scores, dx, dd, ds)


# ----------------------------------------------------------------------------- custom ops
def _meta(x: Tensor, weight: Tensor, deltas: Tensor, y_numel: int, groups: int = 1) -> dict:
    # rows: the GEMM's M (linear: the flattened rows; conv: unused by the conv backends)
    return dict(device=x.device, dtype=x.dtype, groups=groups, rows=x.numel() // max(1, weight.shape[-1]),
                numel=max(x.numel(), deltas.numel(), y_numel))


def _lin_y_numel(x: Tensor, weight: Tensor) -> int:
    return x.numel() // max(1, weight.shape[1]) * weight.shape[0]


def _mt_linear_fwd(x: Tensor, task_ids: Tensor, weight: Tensor, deltas: Tensor, slot: Tensor,
                   scores: Tensor, thresholds: Tensor, bias: Optional[Tensor]) -> Tensor:
    be = dispatch.select("mt_linear_fwd", **_meta(x, weight, deltas, _lin_y_numel(x, weight)))
    y = be.kernels["mt_linear_fwd"](x, task_ids, weight, deltas, slot, scores, thresholds, bias)
    return not_a_view(y.contiguous())


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
    be = dispatch.select("mt_linear_bwd", **_meta(x, weight, deltas, dy.numel()))
    return be.kernels["mt_linear_bwd"](dy, x, task_ids, weight, deltas, slot, scores, thresholds,
                                       needs_dx, needs_ddeltas, needs_dscores)


@_mt_linear_backward_op.register_fake
def _mt_linear_backward_fake(dy, x, task_ids, weight, deltas, slot, scores, thresholds, needs_dx,
                             needs_ddeltas, needs_dscores):
    return _bwd_fake(x, deltas, scores, needs_dx, needs_ddeltas, needs_dscores)


def _bwd_fake(x, deltas, scores, needs_dx, needs_ddeltas, needs_dscores):
    return (torch.empty_like(x) if needs_dx else empty0(x),
            torch.empty_like(deltas) if needs_ddeltas else empty0(deltas),
            scores.new_empty(scores.shape) if needs_dscores else empty0(scores))


def _base_grads(ctx, dy, x, weight, wgrad):
    """dW and db of the (normally frozen) base: the ordinary gradients over the whole batch."""
    nw, nb = ctx.needs_input_grad[2], ctx.needs_input_grad[7] and ctx.has_bias
    dw = wgrad(dy, x, weight) if nw else None
    db = None
    if nb:  # sum over every dimension but the output channel's
        db = dy.sum(tuple(range(dy.dim() - 1)) if ctx.is_linear else (0, 2, 3))
    return dw, db


def _setup(ctx, inputs, is_linear):
    x, task_ids, weight, deltas, slot, scores, thresholds, bias = inputs[:8]
    ctx.save_for_backward(x, task_ids, weight, deltas, slot, scores, thresholds)
    ctx.has_bias = bias is not None
    ctx.is_linear = is_linear
    ctx.args = tuple(inputs[8:])


def _mt_linear_backward(ctx, dy):
    x, task_ids, weight, deltas, slot, scores, thresholds = ctx.saved_tensors
    nx, _, _, nd, _, ns = ctx.needs_input_grad[:6]
    dx = dd = ds = None
    if nx or nd or ns:
        dx, dd, ds = _mt_linear_backward_op(dy, x, task_ids, weight, deltas, slot, scores,
                                            thresholds, nx, nd, ns)
    dw, db = _base_grads(ctx, dy, x, weight,
                         lambda dy, x, w: dy.reshape(-1, w.shape[0]).t() @ x.reshape(-1, w.shape[1]))
    return (dx if nx else None, None, dw, dd if nd else None, None, ds if ns else None, None, db)


def _mt_linear_setup(ctx, inputs, output):
    _setup(ctx, inputs, True)


_mt_linear_op.register_autograd(_mt_linear_backward, setup_context=_mt_linear_setup)


def _mt_conv2d_fwd(x: Tensor, task_ids: Tensor, weight: Tensor, deltas: Tensor, slot: Tensor,
                   scores: Tensor, thresholds: Tensor, bias: Optional[Tensor], stride: List[int],
                   padding: List[int], dilation: List[int], groups: int) -> Tensor:
    be = dispatch.select("mt_conv2d_fwd", **_meta(x, weight, deltas, _y_numel(x, weight, stride, padding, dilation), groups))
    y = be.kernels["mt_conv2d_fwd"](x, task_ids, weight, deltas, slot, scores, thresholds, bias,
                                    stride, padding, dilation, groups)
    return _restride(y, _out_format(x))


@torch.library.custom_op("taps_fast::mt_conv2d", mutates_args=())
def _mt_conv2d_op(x: Tensor, task_ids: Tensor, weight: Tensor, deltas: Tensor, slot: Tensor,
                  scores: Tensor, thresholds: Tensor, bias: Optional[Tensor], stride: List[int],
                  padding: List[int], dilation: List[int], groups: int) -> Tensor:
    return _mt_conv2d_fwd(x, task_ids, weight, deltas, slot, scores, thresholds, bias, stride, padding,
                          dilation, groups)


@_mt_conv2d_op.register_fake
def _mt_conv2d_fake(x, task_ids, weight, deltas, slot, scores, thresholds, bias, stride, padding,
                    dilation, groups):
    return _conv2d_fake(x, weight, deltas, scores, bias, stride, padding, dilation, groups, 0.0)


@torch.library.custom_op("taps_fast::mt_conv2d_backward", mutates_args=())
def _mt_conv2d_backward_op(dy: Tensor, x: Tensor, task_ids: Tensor, weight: Tensor, deltas: Tensor,
                           slot: Tensor, scores: Tensor, thresholds: Tensor, stride: List[int],
                           padding: List[int], dilation: List[int], groups: int, needs_dx: bool,
                           needs_ddeltas: bool, needs_dscores: bool) -> Tuple[Tensor, Tensor, Tensor]:
    be = dispatch.select("mt_conv2d_bwd", **_meta(x, weight, deltas, dy.numel(), groups))
    return be.kernels["mt_conv2d_bwd"](dy, x, task_ids, weight, deltas, slot, scores, thresholds,
                                       stride, padding, dilation, groups, needs_dx, needs_ddeltas,
                                       needs_dscores)


@_mt_conv2d_backward_op.register_fake
def _mt_conv2d_backward_fake(dy, x, task_ids, weight, deltas, slot, scores, thresholds, stride,
                             padding, dilation, groups, needs_dx, needs_ddeltas, needs_dscores):
    return _bwd_fake(x, deltas, scores, needs_dx, needs_ddeltas, needs_dscores)


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

    dw, db = _base_grads(ctx, dy, x, weight, wgrad)
    return (dx if nx else None, None, dw, dd if nd else None, None, ds if ns else None, None, db,
            None, None, None, None)


def _mt_conv2d_setup(ctx, inputs, output):
    _setup(ctx, inputs, False)


_mt_conv2d_op.register_autograd(_mt_conv2d_backward, setup_context=_mt_conv2d_setup)


# ----------------------------------------------------------------------------- functional API
def check_task_ids(where: str, task_ids: Tensor, batch: int, num_tasks: int, device) -> None:
    """Metadata checks of a per-sample task id tensor, plus (a host sync) the id range."""
    check_task_ids_meta(where, task_ids, batch, device)
    if task_ids.numel():
        lo, hi = int(task_ids.min()), int(task_ids.max())
        if lo < -1 or hi >= num_tasks:
            bad = lo if lo < -1 else hi
            raise ValueError(f"{where}: task id {bad} is out of range: this layer serves {num_tasks} "
                             f"task(s), ids 0..{num_tasks - 1}, and -1 for the base model")


# Every integer dtype is accepted as ids; the kernels read int32 or int64 (kernel_ids widens).
ID_DTYPES = (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8)


def kernel_ids(task_ids: Tensor) -> Tensor:
    """The ids as the kernels read them: int32/int64 as given, narrower integers widened to int32
    (a copy of B bytes; uint8 ids cannot say -1, the base)."""
    return task_ids if task_ids.dtype in (torch.int32, torch.int64) else task_ids.to(torch.int32)


def check_task_ids_meta(where: str, task_ids: Tensor, batch: int, device) -> None:
    if not isinstance(task_ids, Tensor):
        raise TypeError(f"{where}: task_ids must be an integer torch.Tensor, got {type(task_ids).__name__}")
    if task_ids.dtype not in ID_DTYPES:
        raise TypeError(f"{where}: task_ids must be an integer tensor, got dtype {task_ids.dtype}")
    if task_ids.dim() != 1 or task_ids.shape[0] != batch:
        raise ValueError(f"{where}: task_ids has shape {tuple(task_ids.shape)}, expected ({batch},): "
                         "one task id per sample of the batch")
    if task_ids.device != device:
        raise ValueError(f"{where}: task_ids is on {task_ids.device} but the input is on {device}")


def _check_ids(where: str, task_ids, x: Tensor, slot: Tensor, check_range: bool) -> None:
    if check_range:
        check_task_ids(where, task_ids, x.shape[0], slot.numel(), x.device)
    else:
        check_task_ids_meta(where, task_ids, x.shape[0], x.device)


def _check_stack(where: str, x: Tensor, weight: Tensor, deltas: Tensor, slot: Tensor, scores: Tensor,
                 thresholds: Tensor, bias: Optional[Tensor]) -> None:
    for name, t in (("x", x), ("weight", weight), ("deltas", deltas), ("slot", slot),
                    ("scores", scores), ("thresholds", thresholds)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{where}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if tuple(deltas.shape[1:]) != tuple(weight.shape) or deltas.dim() != weight.dim() + 1:
        raise ValueError(f"{where}: deltas has shape {tuple(deltas.shape)}, expected "
                         f"[S, {', '.join(map(str, weight.shape))}] (the stacked deltas of S tasks)")
    if slot.dim() != 1 or slot.is_floating_point() or slot.dtype == torch.bool:
        raise ValueError(f"{where}: slot must be a 1-D integer tensor [T], got {slot.dtype} {tuple(slot.shape)}")
    if scores.shape != slot.shape or thresholds.shape != slot.shape:
        raise ValueError(f"{where}: scores {tuple(scores.shape)}, thresholds {tuple(thresholds.shape)} "
                         f"and slot {tuple(slot.shape)} must all be [T]")
    if not scores.is_floating_point() or thresholds.dtype != scores.dtype:
        raise TypeError(f"{where}: scores must be floating point and thresholds of the same dtype, got "
                        f"{scores.dtype} and {thresholds.dtype}")
    if not x.is_floating_point():
        raise TypeError(f"{where}: x must be a floating-point tensor, got dtype {x.dtype}")
    named = [("weight", weight), ("deltas", deltas)] + ([("bias", bias)] if bias is not None else [])
    for name, t in named:
        if t.dtype != x.dtype:
            raise TypeError(f"{where}: dtype mismatch: x is {x.dtype} but {name} is {t.dtype}; cast the "
                            f"input or the model (.to({x.dtype})) or run under torch.autocast")
    for name, t in named + [("slot", slot), ("scores", scores), ("thresholds", thresholds)]:
        if t.device != x.device:
            raise ValueError(f"{where}: device mismatch: x is on {x.device} but {name} is on {t.device}")


def taps_mt_linear(x: Tensor, task_ids: Tensor, weight: Tensor, deltas: Tensor, slot: Tensor,
                   scores: Tensor, thresholds: Tensor, bias: Optional[Tensor] = None,
                   check_ids: bool = True) -> Tensor:
    """Mixed-batch gated linear (module docstring): x [B, ..., K], task_ids [B] (-1 = base).
    ``check_ids`` validates the id range (a host sync; MultiTaskModel checks once per batch and
    passes False)."""
    x, weight, deltas, bias = autocast_inputs(x, weight, deltas, bias)
    _check_stack(_LIN, x, weight, deltas, slot, scores, thresholds, bias)
    if weight.dim() != 2 or x.dim() < 2 or x.shape[-1] != weight.shape[1]:
        raise ValueError(f"{_LIN}: input of shape {tuple(x.shape)} does not fit weight {tuple(weight.shape)}: "
                         f"expected [batch, ..., {weight.shape[-1]}]")
    _check_ids(_LIN, task_ids, x, slot, check_ids)
    task_ids = kernel_ids(task_ids)
    op = _mt_linear_fwd if eager_no_grad(x, weight, deltas, scores, bias) else _mt_linear_op
    return op(x, task_ids, weight, deltas, slot, scores, thresholds, bias)


def taps_mt_conv2d(x: Tensor, task_ids: Tensor, weight: Tensor, deltas: Tensor, slot: Tensor,
                   scores: Tensor, thresholds: Tensor, bias: Optional[Tensor] = None,
                   stride: Union[int, Sequence[int]] = 1, padding: Union[int, Sequence[int], str] = 0,
                   dilation: Union[int, Sequence[int]] = 1, groups: int = 1,
                   check_ids: bool = True) -> Tensor:
    """Mixed-batch gated conv2d (module docstring): x [B, C, H, W], task_ids [B] (-1 = base);
    conv arguments as F.conv2d's (zero padding: an int, a pair, 'same' or 'valid')."""
    x, weight, deltas, bias = autocast_inputs(x, weight, deltas, bias)
    _check_stack(_CONV, x, weight, deltas, slot, scores, thresholds, bias)
    if x.dim() != 4 or weight.dim() != 4 or x.shape[1] != weight.shape[1] * groups:
        raise ValueError(f"{_CONV}: input of shape {tuple(x.shape)} does not fit weight {tuple(weight.shape)} "
                         f"with groups={groups}: expected [B, {weight.shape[1] * groups}, H, W]")
    _check_ids(_CONV, task_ids, x, slot, check_ids)
    task_ids = kernel_ids(task_ids)
    x, stride, padding, dilation = conv_geometry(_CONV, x, weight, stride, padding, dilation)
    op = _mt_conv2d_fwd if eager_no_grad(x, weight, deltas, scores, bias) else _mt_conv2d_op
    return op(x, task_ids, weight, deltas, slot, scores, thresholds, bias, stride, padding, dilation, groups)


__all__ = ["taps_mt_linear", "taps_mt_conv2d", "taps_mt_linear_ref", "taps_mt_conv2d_ref"]
