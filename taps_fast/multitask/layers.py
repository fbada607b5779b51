r"""The gated layers of a MultiTaskModel: a TAPS linear / conv2d layer serving every task at once.

One layer holds the base W (shared), ONE stacked tensor of the deltas of the tasks that opened it
(``deltas[S, *W.shape]``), an index map ``slot[T]`` (task t's index into ``deltas``, -1: no
delta here) and the tasks' scores and thresholds. Per sample i of task t:

    y_i = op(x_i, W + 1[slot[t] ≥ 0 and s_t ≥ τ_t]·ΔW_slot[t]) + b

A mixed batch goes to ``taps_mt_linear`` / ``taps_mt_conv2d``; a task-pure chunk (the CPU path,
``_Context.task`` set) to the single-task op, or, when nothing needs a gradient, straight to
F.linear / F.conv2d with W or W + ΔW.
"""
from __future__ import annotations

from typing import Callable, Optional, Union

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
    """Shared by the multi-task linear and conv layers: the stacked deltas, slot map, scores, and
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

    @property
    def num_tasks(self) -> int:
        return self.slot.numel()

    def task_delta(self, t: int) -> Optional[Tensor]:
        s = int(self.slot[t])
        return None if s < 0 else self.deltas[s]

    # -- adding and removing a task (MultiTaskModel.add_task / remove_task)
    def _append(self, score: Tensor, threshold: float, delta: Optional[Tensor]) -> None:
        w = self.weight
        train = self.deltas.requires_grad
        if delta is not None:
            slot = self.deltas.shape[0]
            self.deltas = nn.Parameter(torch.cat([self.deltas.detach(), delta.to(w).unsqueeze(0)]),
                                       requires_grad=train)
        else:
            slot = -1
        self.scores = nn.Parameter(torch.cat([self.scores.detach(), score.detach().reshape(1).to(self.scores)]),
                                   requires_grad=self.scores.requires_grad)
        self.slot = torch.cat([self.slot, self.slot.new_tensor([slot])])
        thr = torch.tensor([threshold], dtype=self.thresholds.dtype, device=self.thresholds.device)
        self.thresholds = torch.cat([self.thresholds, thr])

    def _remove(self, t: int) -> None:
        s = int(self.slot[t])
        keep_t = [i for i in range(self.num_tasks) if i != t]
        slot = self.slot[keep_t]
        if s >= 0:
            keep_s = [i for i in range(self.deltas.shape[0]) if i != s]
            self.deltas = nn.Parameter(self.deltas.detach()[keep_s], requires_grad=self.deltas.requires_grad)
            slot = torch.where(slot > s, slot - 1, slot)
        self.scores = nn.Parameter(self.scores.detach()[keep_t], requires_grad=self.scores.requires_grad)
        self.slot = slot
        self.thresholds = self.thresholds[keep_t]

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
        return (f"{tuple(self.weight.shape)}, tasks={self.num_tasks}, "
                f"deltas={self.deltas.shape[0]} (tasks with a delta on this layer)")


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
