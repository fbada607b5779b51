r"""The gated layers of a MultiTaskModel: a TAPS linear / conv2d layer serving every task at once.

One layer holds the base W (shared), a slot pool of the deltas of the tasks that opened it
(``deltas[S_cap, *W.shape]``: S_cap slots, grown by a quarter (at least one slot) when full,
never shrunk; a free slot is zero), and per *row* (a task's internal index, stable while the task
lives; MultiTaskModel maps public ids to rows) an index map ``slot[R_cap]`` (the row's slot in
``deltas``, -1: no delta here, or a free row) and the rows' scores and thresholds (0 on free
rows). Adding a task writes its row and its slots in place (``_write``); removing it zeroes them
and frees them (``_clear``): no other task's tensors are copied. Per sample i of row r:

    y_i = op(x_i, W + 1[slot[r] ≥ 0 and s_r ≥ τ_r]·ΔW_slot[r]) + b

A mixed batch goes to ``taps_mt_linear`` / ``taps_mt_conv2d``; a task-pure chunk (the CPU path,
``_Context.task`` set) to the single-task op, or, when nothing needs a gradient, straight to
F.linear / F.conv2d with W or W + ΔW.
"""
from __future__ import annotations

import heapq
from typing import Callable, Dict, List, Optional, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from .. import dispatch
from ..modules import TAPSConv2d, TAPSLinear
from ..ops import taps_conv2d, taps_linear, taps_mt_conv2d, taps_mt_linear
from ..ops._common import gate_is_open
from ..ops.ext_backend import CPP_MAX_ROWS
from ._context import _Context, attach_context


class _MTGated(nn.Module):
    """Shared by the multi-task linear and conv layers: the delta slot pool, slot map, scores, and
    the single-task path of a task-pure chunk. A subclass gives the plain op (``_plain``: x with
    a given weight) and the gated one (``_taps``: the single-task custom op)."""

    def _init_stack(self, layer: Union[TAPSLinear, TAPSConv2d], ctx: _Context) -> None:
        attach_context(self, ctx)
        self.weight = layer.weight
        self.bias = layer.bias
        w = layer.weight
        self.deltas = nn.Parameter(w.new_zeros((0,) + tuple(w.shape)))
        self.scores = nn.Parameter(w.new_zeros((0,)))
        self.register_buffer("slot", torch.zeros(0, dtype=torch.int32, device=w.device))
        self.register_buffer("thresholds", w.new_zeros((0,)))
        # Host-side bookkeeping (no device sync to add, remove or count): row -> its slot, and
        # the free slots (a heap: the lowest is reused first).
        self._slot_of: Dict[int, int] = {}
        self._free_slots: List[int] = []

    @property
    def num_rows(self) -> int:
        """The row capacity (rows of ``slot``, ``scores``, ``thresholds``), free rows included."""
        return self.slot.numel()

    @property
    def slots_used(self) -> int:
        """Slots of ``deltas`` holding a task's delta (the others are free and zero)."""
        return len(self._slot_of)

    def task_delta(self, row: int) -> Optional[Tensor]:
        s = self._slot_of.get(row, -1)
        return None if s < 0 else self.deltas[s]

    # -- adding and removing a task (MultiTaskModel.add_prepared / remove_task)
    @torch.no_grad()
    def _grow_rows(self, cap: int) -> None:
        """Grow the row tables to ``cap`` rows (new rows free: slot -1, score 0, threshold 0)."""
        n = self.slot.numel()
        if cap <= n:
            return
        extra = cap - n
        self.scores = nn.Parameter(torch.cat([self.scores.detach(), self.scores.new_zeros(extra)]),
                                   requires_grad=self.scores.requires_grad)
        self.slot = torch.cat([self.slot, self.slot.new_full((extra,), -1)])
        self.thresholds = torch.cat([self.thresholds, self.thresholds.new_zeros(extra)])

    @torch.no_grad()
    def _take_slot(self) -> int:
        """A free slot of ``deltas`` (the lowest); when none is free the pool grows by a quarter
        of its slots (at least one): one allocation and one copy of the pool (requires_grad
        kept). Geometric growth keeps at most a quarter of the slots spare (a fixed chunk of 8
        held 8 full copies of every opened layer for the first task: 8x the task's bytes) while
        each slot is copied at most 4 times on average, so an add costs amortised time in
        proportion to the task's bytes."""
        if not self._free_slots:
            old = self.deltas
            n = old.shape[0]
            grow = max(1, n // 4)
            new = old.detach().new_zeros((n + grow,) + tuple(old.shape[1:]))
            if n:
                new[:n].copy_(old.detach())
            self.deltas = nn.Parameter(new, requires_grad=old.requires_grad)
            self._free_slots.extend(range(n, n + grow))  # ascending: a valid heap
        return heapq.heappop(self._free_slots)

    @torch.no_grad()
    def _write(self, row: int, score: Tensor, threshold: float, delta: Optional[Tensor]) -> None:
        """Write a task into free row ``row``: its score, τ and (an open layer) its delta, copied
        into a free slot (tensors on any device: copied across)."""
        if delta is not None:
            s = self._take_slot()
            self.deltas[s].copy_(delta)
            self._slot_of[row] = s
            self.slot[row] = s
        self.scores[row].copy_(score.detach().reshape(()))
        self.thresholds[row] = threshold

    @torch.no_grad()
    def _clear(self, row: int) -> None:
        """Free row ``row``: its slot zeroed and freed, slot -1, score and τ 0 (no copy of other rows)."""
        s = self._slot_of.pop(row, -1)
        if s >= 0:
            self.deltas[s].zero_()
            heapq.heappush(self._free_slots, s)
        self.slot[row] = -1
        self.scores[row] = 0
        self.thresholds[row] = 0

    def _row_fixed_bytes(self) -> int:
        """Bytes every row holds here: its score, threshold and slot entry."""
        return self.scores.element_size() + self.thresholds.element_size() + self.slot.element_size()

    def _slot_bytes(self) -> int:
        return self.weight.numel() * self.deltas.element_size()

    def _row_nbytes(self, row: int) -> int:
        """Bytes task row ``row`` holds in this layer (its delta if any, score, τ, slot entry)."""
        return self._row_fixed_bytes() + (self._slot_bytes() if row in self._slot_of else 0)

    def _allocated_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.deltas, self.scores, self.thresholds, self.slot))

    # -- forward
    def _forward_task(self, x: Tensor, t: int) -> Tensor:
        """Every row of x belongs to task t (-1: the base): W alone where the task has no delta;
        the single-task op where a gradient is needed; otherwise (serving) W or W + ΔW by the
        gate with the plain op, skipping the custom op's dispatch (on the CPU about 0.1 ms a
        call, 8% of vit_tiny's forward at batch 16)."""
        s = int(self.slot[t]) if t >= 0 else -1
        if s < 0:
            return self._plain(x, self.weight)
        d, score, thr = self.deltas[s], self.scores[t], float(self.thresholds[t])
        if torch.is_grad_enabled() and (d.requires_grad or score.requires_grad or x.requires_grad):
            return self._taps(x, d, score, thr)
        if not gate_is_open(score, thr, type(self).__name__):
            return self._plain(x, self.weight)
        return self._serve_open(x, d, score, thr)

    def _serve_open(self, x: Tensor, d: Tensor, score: Tensor, thr: float) -> Tensor:
        """Serving, gate open: the plain op with W + ΔW, formed in the thread's scratch buffer
        (_Context.weight_sum; MultiTaskLinear overrides this for few rows, where a fused kernel
        reads W and ΔW without forming W + ΔW)."""
        return self._plain(x, self._ctx.weight_sum(self.weight, d))

    def _plain(self, x: Tensor, weight: Tensor) -> Tensor:
        raise NotImplementedError

    def _taps(self, x: Tensor, d: Tensor, score: Tensor, thr: float) -> Tensor:
        raise NotImplementedError

    def _mixed_args(self):
        """The arguments of the mixed-batch op after x: (ids, W, deltas, slot, scores, thresholds)."""
        return (self._ctx.get(type(self).__name__), self.weight, self.deltas, self.slot, self.scores,
                self.thresholds)

    def extra_repr(self) -> str:
        return (f"{tuple(self.weight.shape)}, rows={self.num_rows}, "
                f"delta slots={self.slots_used} used of {self.deltas.shape[0]}")


class MultiTaskLinear(_MTGated):
    """A TAPS linear layer serving a mixed batch (taps_fast.ops.taps_mt_linear)."""

    def __init__(self, layer: TAPSLinear, ctx: _Context) -> None:
        super().__init__()
        self.in_features, self.out_features = layer.in_features, layer.out_features
        self._init_stack(layer, ctx)

    def forward(self, x: Tensor) -> Tensor:
        if self._ctx.task is not None:  # a task-pure chunk: the single-task op (or W alone)
            return self._forward_task(x, self._ctx.task)
        return taps_mt_linear(x, *self._mixed_args(), self.bias, check_ids=False)

    def _plain(self, x: Tensor, weight: Tensor) -> Tensor:
        return F.linear(x, weight, self.bias)

    def _taps(self, x: Tensor, d: Tensor, score: Tensor, thr: float) -> Tensor:
        return taps_linear(x, self.weight, d, score, self.bias, thr)

    def _serve_open(self, x: Tensor, d: Tensor, score: Tensor, thr: float) -> Tensor:
        # Few rows on the CPU with the compiled extension: the cpp GEMV kernel streams W and ΔW
        # once (W + ΔW is never written), called directly, with no custom-op dispatch. Otherwise
        # W + ΔW for F.linear.
        kernel = _few_row_kernel(x, self.in_features)
        if kernel is None:
            return super()._serve_open(x, d, score, thr)
        return kernel(x, self.weight, d, score, self.bias, thr)


def _few_row_kernel(x: Tensor, in_features: int) -> Optional[Callable[..., Tensor]]:
    """The "linear_fwd" kernel the dispatcher picks for a serving call of x when that is the
    "cpp" backend's (the compiled extension is loaded, serves this dtype and row count, and no
    other backend is forced); None otherwise, and then W + ΔW goes to F.linear. Past
    CPP_MAX_ROWS rows the dispatcher is not asked: no few-row kernel serves them, and a large
    serving chunk then pays no backend selection."""
    if x.device.type != "cpu":
        return None
    rows = x.numel() // in_features
    if rows > CPP_MAX_ROWS:
        return None
    backend = dispatch.select("linear_fwd", device=x.device, dtype=x.dtype, rows=rows)
    return backend.kernels["linear_fwd"] if backend.name == "cpp" else None


class MultiTaskConv2d(_MTGated):
    """A TAPS conv2d layer serving a mixed batch (taps_fast.ops.taps_mt_conv2d)."""

    def __init__(self, layer: TAPSConv2d, ctx: _Context) -> None:
        super().__init__()
        for a in TAPSConv2d._ATTRS:
            setattr(self, a, getattr(layer, a))
        self._init_stack(layer, ctx)

    @property
    def _op_padding(self):
        """The padding the op is called with: the layer's, or 0 once forward has padded x itself
        (a padding_mode other than 'zeros', as nn.Conv2d does)."""
        return self.padding if self.padding_mode == "zeros" else 0

    def forward(self, x: Tensor) -> Tensor:
        if self.padding_mode != "zeros":  # as nn.Conv2d: pad, then a 'valid' conv
            x = F.pad(x, self._reversed_padding_repeated_twice, mode=self.padding_mode)
        if self._ctx.task is not None:  # a task-pure chunk: the single-task op (or W alone)
            return self._forward_task(x, self._ctx.task)
        return taps_mt_conv2d(x, *self._mixed_args(), self.bias, self.stride, self._op_padding,
                              self.dilation, self.groups, check_ids=False)

    def _plain(self, x: Tensor, weight: Tensor) -> Tensor:
        return F.conv2d(x, weight, self.bias, self.stride, self._op_padding, self.dilation, self.groups)

    def _taps(self, x: Tensor, d: Tensor, score: Tensor, thr: float) -> Tensor:
        return taps_conv2d(x, self.weight, d, score, self.bias, self.stride, self._op_padding, self.dilation,
                           self.groups, thr)
