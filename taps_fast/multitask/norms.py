r"""The norm layers of a MultiTaskModel: each task's own affine parameters and running statistics.

A norm layer keeps the base layer as it is (for the base rows) and every task's copy of its
parameters and persistent buffers in tables ``[R_cap, ...]`` indexed by the task's row (stable
while the task lives; free rows are zero; the tables grow by the model's ``pool_chunk`` rows).
``norm_class_for`` picks the version: BatchNorm and LayerNorm as one pass over a mixed batch, any
other norm by the layer's own forward once per task present.
"""
from __future__ import annotations

from typing import Dict

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from ._context import _Context, attach_context


class _MTNorm(nn.Module):
    """Per-task copies of a norm layer's parameters (``keys``) and persistent buffers
    (``buffer_keys``), each a table [R_cap, ...] by row, with the base layer kept as it is for the
    base rows."""

    def __init__(self, base: nn.Module, ctx: _Context) -> None:
        super().__init__()
        attach_context(self, ctx)
        self.base = base
        self.keys = [k for k, p in base._parameters.items() if p is not None]
        self.buffer_keys = [k for k, b in base._buffers.items()
                            if b is not None and k not in base._non_persistent_buffers_set]
        for k in self.keys:
            p = getattr(base, k)
            self.register_parameter(k, nn.Parameter(p.new_zeros((0,) + tuple(p.shape)), requires_grad=True))
        for k in self.buffer_keys:
            b = getattr(base, k)
            self.register_buffer(k, b.new_zeros((0,) + tuple(b.shape)))

    @property
    def num_rows(self) -> int:
        """The row capacity of the tables, free rows included."""
        return getattr(self, (self.keys + self.buffer_keys)[0]).shape[0]

    def task_state(self, row: int) -> Dict[str, Tensor]:
        return {k: getattr(self, k)[row] for k in self.keys + self.buffer_keys}

    # -- adding and removing a task (MultiTaskModel.add_prepared / remove_task)
    @torch.no_grad()
    def _grow_rows(self, cap: int) -> None:
        """Grow every table to ``cap`` rows (new rows zero)."""
        for k in self.keys + self.buffer_keys:
            t = getattr(self, k)
            if cap <= t.shape[0]:
                continue
            new = torch.cat([t.detach(), t.detach().new_zeros((cap - t.shape[0],) + tuple(t.shape[1:]))])
            setattr(self, k, nn.Parameter(new, requires_grad=t.requires_grad) if k in self.keys else new)

    @torch.no_grad()
    def _write(self, row: int, state: Dict[str, Tensor]) -> None:
        """Write a task's state into free row ``row`` (in place; tensors on any device)."""
        for k in self.keys + self.buffer_keys:
            getattr(self, k)[row].copy_(state[k])

    @torch.no_grad()
    def _clear(self, row: int) -> None:
        """Free row ``row``: zero it in every table."""
        for k in self.keys + self.buffer_keys:
            getattr(self, k)[row].zero_()

    def _row_nbytes(self, row: int = 0) -> int:
        """Bytes one task row holds in this layer (the same for every row)."""
        total = 0
        for k in self.keys + self.buffer_keys:
            t = getattr(self, k)
            total += (t[0].numel() if t.shape[0] else getattr(self.base, k).numel()) * t.element_size()
        return total

    def _allocated_bytes(self) -> int:
        return sum(getattr(self, k).numel() * getattr(self, k).element_size() for k in self.keys + self.buffer_keys)

    def _table(self, k: str) -> Tensor:
        """[R_cap + 1, ...]: the base's tensor at row 0, then the rows' (index with rows + 1)."""
        mine = getattr(self, k)
        return torch.cat([getattr(self.base, k).to(mine).unsqueeze(0), mine])

    def extra_repr(self) -> str:
        return f"{type(self.base).__name__}, rows={self.num_rows}"


class MultiTaskBatchNorm(_MTNorm):
    """BatchNorm with per-task affine parameters and running statistics.

    Eval: a per-sample affine, y = x·a[t] + c[t] with a = γ/√(var + ε), c = β - mean·a gathered
    by task: one pass, no loop. Train: statistics per task (sums scattered by task with
    index_add: each task's rows are normalised by their own mean and variance, exactly as the
    task's model alone would), and each present task's running statistics updated.
    """

    def forward(self, x: Tensor) -> Tensor:
        if self._ctx.task is not None:
            return self._forward_task(x, self._ctx.task)
        ids = self._ctx.get("MultiTaskBatchNorm")
        m = self.base
        idx = ids.long() + 1  # row 0 of the tables: the base
        shape = (x.shape[0], x.shape[1]) + (1,) * (x.dim() - 2)
        affine = bool(self.keys)
        rm, rv = self._table("running_mean"), self._table("running_var")
        if not self.training:
            mean, var = rm[idx], rv[idx]
        else:
            mean, var = self._batch_stats(x, idx, rm, rv)
        # y = x·a + c with a = γ/√(var + ε), c = β - mean·a per (sample, channel): one pass
        # over x (addcmul), as F.batch_norm's own eval kernel makes.
        a = torch.rsqrt(var + m.eps)
        if affine:
            a = a * self._table("weight")[idx]
        c = -mean * a
        if affine:
            c = c + self._table("bias")[idx]
        return torch.addcmul(c.view(shape).to(x.dtype), x, a.view(shape).to(x.dtype))

    def _forward_task(self, x: Tensor, t: int) -> Tensor:
        """All samples of row t: F.batch_norm on the row's entries of the tables (views, so the
        running statistics update in place); the base (-1) with its running statistics."""
        m = self.base
        if t < 0:
            return F.batch_norm(x, m.running_mean, m.running_var, m.weight, m.bias, False, 0.0, m.eps)
        w = self.weight[t] if "weight" in self.keys else None
        b = self.bias[t] if "bias" in self.keys else None
        momentum = 0.0
        if self.training:
            with torch.no_grad():
                self.num_batches_tracked[t] += 1
            momentum = m.momentum if m.momentum is not None else 1.0 / float(self.num_batches_tracked[t])
        return F.batch_norm(x, self.running_mean[t], self.running_var[t], w, b, self.training, momentum, m.eps)

    def _batch_stats(self, x: Tensor, idx: Tensor, rm: Tensor, rv: Tensor):
        T1 = rm.shape[0]
        dims = tuple(range(2, x.dim()))
        per = 1
        for d in dims:
            per *= x.shape[d]
        xf = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
        cnt = torch.zeros(T1, dtype=xf.dtype, device=x.device).index_add_(
            0, idx, torch.full((x.shape[0],), float(per), dtype=xf.dtype, device=x.device))
        s1 = xf.sum(dims) if dims else xf
        mean_t = torch.zeros(T1, x.shape[1], dtype=xf.dtype, device=x.device).index_add(0, idx, s1)
        mean_t = mean_t / cnt.clamp(min=1)[:, None]
        centred = xf - mean_t[idx].view((x.shape[0], x.shape[1]) + (1,) * len(dims))
        s2 = (centred * centred).sum(dims) if dims else centred * centred
        var_t = torch.zeros_like(mean_t).index_add(0, idx, s2) / cnt.clamp(min=1)[:, None]
        base_row = (idx == 0)[:, None]  # the frozen base uses its running statistics
        mean = torch.where(base_row, rm[idx].to(mean_t), mean_t[idx])
        var = torch.where(base_row, rv[idx].to(var_t), var_t[idx])
        self._update_running(mean_t[1:].detach(), var_t[1:].detach(), cnt[1:])
        return mean, var

    @torch.no_grad()
    def _update_running(self, mean: Tensor, var: Tensor, cnt: Tensor) -> None:
        m = self.base
        present = cnt > 0
        self.num_batches_tracked.add_(present.to(self.num_batches_tracked.dtype))
        if m.momentum is None:  # cumulative moving average, per task
            f = (1.0 / self.num_batches_tracked.clamp(min=1).to(mean.dtype))[:, None]
        else:
            f = torch.full_like(mean[:, :1], m.momentum)
        unbiased = var * (cnt / (cnt - 1).clamp(min=1))[:, None]
        p = present[:, None]
        self.running_mean.copy_(torch.where(p, (1 - f) * self.running_mean + f * mean.to(self.running_mean), self.running_mean))
        self.running_var.copy_(torch.where(p, (1 - f) * self.running_var + f * unbiased.to(self.running_var), self.running_var))


class MultiTaskLayerNorm(_MTNorm):
    """LayerNorm with per-task γ, β: normalise once, then a per-sample affine gathered by task."""

    def forward(self, x: Tensor) -> Tensor:
        m = self.base
        t = self._ctx.task
        if t is not None:
            if t < 0:
                return m(x)
            w = self.weight[t] if "weight" in self.keys else None
            b = self.bias[t] if "bias" in self.keys else None
            return F.layer_norm(x, m.normalized_shape, w, b, m.eps)
        ids = self._ctx.get("MultiTaskLayerNorm")
        y = F.layer_norm(x, m.normalized_shape, None, None, m.eps)
        idx = ids.long() + 1
        ns = len(m.normalized_shape)
        shape = (x.shape[0],) + (1,) * (x.dim() - 1 - ns) + tuple(m.normalized_shape)
        if "weight" in self.keys:
            y = y * self._table("weight")[idx].view(shape).to(y.dtype)
        if "bias" in self.keys:
            y = y + self._table("bias")[idx].view(shape).to(y.dtype)
        return y


class MultiTaskNormFallback(_MTNorm):
    """Any other norm layer (GroupNorm, RMSNorm, timm's LayerNorm2d, BatchNormAct2d, ...): the
    layer's own forward with each task's tensors, run once per task present on its rows
    (torch.func.functional_call; a BatchNorm-like layer thus gets per-task statistics)."""

    def forward(self, x: Tensor) -> Tensor:
        if self._ctx.task is not None:
            return self._run(self._ctx.task, x)
        ids = self._ctx.get("MultiTaskNormFallback")
        out = None
        for t in [-1] + torch.unique(ids[ids >= 0]).tolist():
            idx = (ids == t).nonzero().flatten()
            if idx.numel() == 0:
                continue
            xt = x if idx.numel() == x.shape[0] else x[idx]
            yt = self._run(t, xt)
            if idx.numel() == x.shape[0]:
                return yt
            if out is None:
                out = yt.new_empty((x.shape[0],) + tuple(yt.shape[1:]))
            out.index_copy_(0, idx, yt)
        return out if out is not None else self.base(x)

    def _run(self, t: int, x: Tensor) -> Tensor:
        if t >= 0:
            return torch.func.functional_call(self.base, self.task_state(t), (x,))
        was = self.base.training
        self.base.train(False)  # the frozen base: its running statistics
        try:
            return self.base(x)
        finally:
            self.base.train(was)


def norm_class_for(m: nn.Module) -> type:
    """The multi-task version of norm layer ``m``: MultiTaskBatchNorm for a BatchNorm with its
    own forward and running statistics (not SyncBatchNorm), MultiTaskLayerNorm for torch's or
    timm's plain LayerNorm, MultiTaskNormFallback for any other."""
    bn = nn.modules.batchnorm._BatchNorm
    if (isinstance(m, bn) and type(m).forward is bn.forward and m.track_running_stats
            and not isinstance(m, nn.SyncBatchNorm)):
        return MultiTaskBatchNorm
    if isinstance(m, nn.LayerNorm) and (type(m).forward is nn.LayerNorm.forward or (
            type(m).__module__.startswith("timm.layers.norm") and type(m).__name__ == "LayerNorm")):
        return MultiTaskLayerNorm
    return MultiTaskNormFallback
