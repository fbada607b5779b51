r"""What the multi-task ops (mt_linear.py, mt_conv.py) share: the layout of one layer's tasks,
the checks of the task ids and of the stacked tensors, the oracle's gates and masks, the
reference backend's grouping of a batch by task, and the autograd plumbing.

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
              dΔW_slot[t] = g_t·G_t          (zero for a closed task, and for absent tasks)
              ds_t = ⟨G_t, ΔW_slot[t]⟩      (straight-through: also when closed; 0 without a slot)
              db = Σ dy, dW = Σ_t G_t = G    (only if the caller unfroze the base)

So a mixed batch trains every task present at once (TAPS' joint variant): each task's slot of
``deltas`` and entry of ``scores`` get exactly the gradients the task's own model would get from
its rows.

The reference backend's kernels loop over the tasks present, never over samples. The tasks'
samples are found on the host (a sync per layer: fine on a CPU; the Triton kernels group them on
the device), and the samples of one task are a view when they are consecutive.
"""
from __future__ import annotations

from typing import Callable, List, Optional, Tuple, Union

import torch
from torch import Tensor

from ._common import acc_dtype, empty0, inner

# ----------------------------------------------------------------------------- task ids
# Every integer dtype is accepted as ids; the kernels read int32 or int64 (kernel_ids widens).
ID_DTYPES = (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8)


def kernel_ids(task_ids: Tensor) -> Tensor:
    """The ids as the kernels read them: int32/int64 as given, narrower integers widened to int32
    (a copy of B bytes; uint8 ids cannot say -1, the base)."""
    return task_ids if task_ids.dtype in (torch.int32, torch.int64) else task_ids.to(torch.int32)


def check_task_ids_meta(where: str, task_ids: Tensor, batch: int, device) -> None:
    """Metadata checks of a per-sample task id tensor: an integer tensor [batch] on device."""
    if not isinstance(task_ids, Tensor):
        raise TypeError(f"{where}: task_ids must be an integer torch.Tensor, got {type(task_ids).__name__}")
    if task_ids.dtype not in ID_DTYPES:
        raise TypeError(f"{where}: task_ids must be an integer tensor, got dtype {task_ids.dtype}")
    if task_ids.dim() != 1 or task_ids.shape[0] != batch:
        raise ValueError(f"{where}: task_ids has shape {tuple(task_ids.shape)}, expected ({batch},): "
                         "one task id per sample of the batch")
    if task_ids.device != device:
        raise ValueError(f"{where}: task_ids is on {task_ids.device} but the input is on {device}")


def check_task_ids(where: str, task_ids: Tensor, batch: int, num_tasks: int, device) -> None:
    """Metadata checks of a per-sample task id tensor, plus (a host sync) the id range."""
    check_task_ids_meta(where, task_ids, batch, device)
    if task_ids.numel():
        lo, hi = int(task_ids.min()), int(task_ids.max())
        if lo < -1 or hi >= num_tasks:
            bad = lo if lo < -1 else hi
            raise ValueError(f"{where}: task id {bad} is out of range: this layer serves {num_tasks} "
                             f"task(s), ids 0..{num_tasks - 1}, and -1 for the base model")


def check_batch_ids(where: str, task_ids, x: Tensor, slot: Tensor, check_range: bool) -> None:
    """The ids of a batch x: check_task_ids (with the range, a host sync) or only their metadata."""
    if check_range:
        check_task_ids(where, task_ids, x.shape[0], slot.numel(), x.device)
    else:
        check_task_ids_meta(where, task_ids, x.shape[0], x.device)


def check_stack(where: str, x: Tensor, weight: Tensor, deltas: Tensor, slot: Tensor, scores: Tensor,
                thresholds: Tensor, bias: Optional[Tensor]) -> None:
    """Checks of a layer's stacked tensors (the layout above) against each other and x."""
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


def rows_per_sample(x: Tensor, k: int) -> int:
    """Rows of the flattened [M, k] input per sample of x [B, ..., k] (1 for an empty batch)."""
    return x.numel() // k // x.shape[0] if x.shape[0] else 1


def row_task_ids(task_ids: Tensor, x: Tensor, k: int) -> Tensor:
    """Per-row task ids for a linear input x [B, ..., k] flattened to [M, k]: the rows of a
    sample share its task."""
    per = rows_per_sample(x, k)
    return task_ids if per == 1 else task_ids.repeat_interleave(per)


# ----------------------------------------------------------------------------- oracle pieces
def ste_gates(slot: Tensor, scores: Tensor, thresholds: Tensor) -> Tensor:
    """[T] gates g_t with the straight-through estimator: value 1[slot ≥ 0 and s ≥ τ],
    derivative 1 in s_t (g + s - s.detach())."""
    g = ((slot >= 0) & (scores.detach() >= thresholds)).to(scores.dtype)
    return g + scores - scores.detach()


def task_masks(task_ids: Tensor, T: int, dtype) -> Tensor:
    """[T, B] one-hot sample masks per task (the base rows, -1, belong to none)."""
    return (task_ids[None, :] == torch.arange(T, device=task_ids.device)[:, None]).to(dtype)


# ----------------------------------------------------------------------------- reference backend pieces
def open_tasks(task_ids: Tensor, slot: Tensor, scores: Tensor, thresholds: Tensor, where: str) -> Tensor:
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


Samples = Union[slice, Tensor]  # one task's samples: a slice when consecutive, else an index tensor


def task_groups(task_ids: Tensor, keep: Tensor) -> List[Tuple[int, Samples]]:
    """[(task, its samples)] for each task t present with keep[t], in task order; the samples
    as a slice when they are consecutive (MultiTaskModel sorts the batch by task on the CPU, so
    they are: a view, no copy) or else an index tensor. Host sync: the CPU path's way."""
    out: List[Tuple[int, Samples]] = []
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


def take(t: Tensor, sel: Samples) -> Tensor:
    return t[sel]  # a view for a slice; aten::index (4x faster than index_select here) for a tensor


def add_rows(y: Tensor, sel: Samples, v: Tensor) -> None:
    """y[sel] += v, in place."""
    if isinstance(sel, slice):
        y[sel] += v
    else:
        y.index_add_(0, sel, v)


def task_grads(dy: Tensor, x: Tensor, task_ids: Tensor, deltas: Tensor, slot: Tensor, is_open: Tensor,
               needs_ddeltas: bool, needs_dscores: bool, g_of: Callable[[Tensor, Tensor], Tensor],
               closed_ds: Callable[[Tensor, Tensor, Tensor], Tensor]
               ) -> Tuple[Optional[Tensor], Optional[Tensor]]:
    """(ddeltas, dscores in the accumulation dtype), None where not asked for. Per task present
    with a delta here: G_t = g_of(dy_t, x_t) once (open: dΔW = G_t, ds = ⟨G_t, ΔW⟩), or
    closed_ds(dy_t, x_t, ΔW) block by block without forming G_t (closed: dΔW = 0; ds flows,
    straight-through)."""
    ddeltas = torch.zeros_like(deltas) if needs_ddeltas else None
    dscores = torch.zeros(slot.numel(), dtype=acc_dtype(deltas.dtype), device=deltas.device) if needs_dscores else None
    if needs_ddeltas or needs_dscores:
        for t, sel in task_groups(task_ids, slot >= 0):
            s = int(slot[t])
            dyt, xt = take(dy, sel), take(x, sel)
            if bool(is_open[t]):
                g = g_of(dyt, xt)
                if needs_ddeltas:
                    ddeltas[s].copy_(g)
                if needs_dscores:
                    dscores[t] = inner(g, deltas[s])
            elif needs_dscores:
                dscores[t] = closed_ds(dyt, xt, deltas[s])
    return ddeltas, dscores


# ----------------------------------------------------------------------------- launcher and autograd pieces
def dispatch_meta(x: Tensor, weight: Tensor, deltas: Tensor, y_numel: int, groups: int = 1) -> dict:
    """What the dispatcher needs to know of a call (metadata only: no sync, compile-safe).
    rows: the GEMM's M (linear: the flattened rows; conv: unused by the conv backends)."""
    return dict(device=x.device, dtype=x.dtype, groups=groups, rows=x.numel() // max(1, weight.shape[-1]),
                numel=max(x.numel(), deltas.numel(), y_numel))


def mt_backward_fake(x: Tensor, deltas: Tensor, scores: Tensor, needs_dx: bool, needs_ddeltas: bool,
                     needs_dscores: bool) -> Tuple[Tensor, Tensor, Tensor]:
    """The fake kernel of a multi-task backward op: (dx, ddeltas, dscores) or placeholders."""
    return (torch.empty_like(x) if needs_dx else empty0(x),
            torch.empty_like(deltas) if needs_ddeltas else empty0(deltas),
            scores.new_empty(scores.shape) if needs_dscores else empty0(scores))


def setup_context(ctx, inputs, is_linear: bool) -> None:
    """Save what a multi-task op's backward needs: the first eight inputs are (x, task_ids,
    weight, deltas, slot, scores, thresholds, bias); the rest (conv geometry) go to ctx.args."""
    x, task_ids, weight, deltas, slot, scores, thresholds, bias = inputs[:8]
    ctx.save_for_backward(x, task_ids, weight, deltas, slot, scores, thresholds)
    ctx.has_bias = bias is not None
    ctx.is_linear = is_linear
    ctx.args = tuple(inputs[8:])


def base_grads(ctx, dy: Tensor, x: Tensor, weight: Tensor, wgrad) -> Tuple[Optional[Tensor], Optional[Tensor]]:
    """dW and db of the (normally frozen) base: the ordinary gradients over the whole batch;
    wgrad(dy, x, weight) is the op's weight gradient."""
    nw, nb = ctx.needs_input_grad[2], ctx.needs_input_grad[7] and ctx.has_bias
    dw = wgrad(dy, x, weight) if nw else None
    db = None
    if nb:  # sum over every dimension but the output channel's
        db = dy.sum(tuple(range(dy.dim() - 1)) if ctx.is_linear else (0, 2, 3))
    return dw, db
