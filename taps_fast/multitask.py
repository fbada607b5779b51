r"""One base model serving, and jointly training, many TAPS tasks in one mixed batch.

    mt = taps_fast.MultiTaskModel(base)            # base: a model (converted, or plain: converted here)
    mt.add_task("cars", "cars.safetensors")         # a task file (save_task) ...
    mt.add_task("cub", cub_model)                   # ... or a converted model of the same base
    logits = mt(x, task_ids)                        # task_ids: [B] ints (-1 = base) or names

What it holds: the base model once, plus per task only what the task changes. Every gated layer
becomes a multi-task layer holding the base W (shared), ONE stacked tensor of the deltas of the
tasks that opened it (``deltas[S, *W.shape]``), an index map ``slot[T]`` and the tasks' scores
and thresholds; every norm layer holds the tasks' affine parameters and running statistics
stacked ``[T, C]``; each task keeps its own head module. No per-task copy of the model, and no
W + ΔW kept per task.

Forward: each sample is computed with its own task's open deltas, norm layers and head
(``taps_mt_linear`` / ``taps_mt_conv2d`` for the gated layers: the Triton kernels on a GPU, a
loop over the tasks present, never over samples, on the CPU). Rows of the base (-1) use the
base model as it is.

Output: when every head is an nn.Linear (timm classifiers), a tensor [B, C_max] with C_max the
largest output size over the base and all tasks (not just those in the batch, so the shape does
not depend on the batch): row i holds its task's C_t logits in columns [0, C_t) and -inf after
them, so argmax, softmax and F.cross_entropy work on it directly; ``num_outputs`` gives C_t.
Other heads run per task present and are padded the same way to the widest output in the batch.

Training (TAPS' joint variant): in train mode one mixed batch trains every task present at once;
each task's deltas (its slot of each stacked tensor), scores, norm parameters and head get the
gradients its own model would get from its rows (tests/test_multitask.py checks this), and
train-mode BatchNorm computes statistics per task. The base stays frozen: base rows use the base
norms' running statistics in train mode too. ``task_tensors`` / ``save_task`` export a task as
the same file ``taps_fast.save_task`` writes. ``add_task`` / ``remove_task`` replace the stacked
parameters: build the optimizer after adding the tasks.

Threads: several threads may call one model at once (a server's workers): each call's ids and
task live in the calling thread (``_Context`` is a threading.local), and serving reads the
model without writing it, so every call gets exactly its serial result. ``add_task`` and
``remove_task`` replace the stacks: make them while no call is running.
"""
from __future__ import annotations

import copy
import operator
import os
import threading
from typing import Dict, List, Optional, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from .checkpoint import (TaskFileError, TaskSpec, check_header, check_thresholds, check_values, fingerprint_of,
                         header_of, read_task, task_tensors, write_task)
from .convert import convert, is_norm, resolve_head, taps_layers
from .modules import TAPSConv2d, TAPSLinear
from .ops import taps_conv2d, taps_linear
from .ops._common import gate_is_open
from .ops.ext_backend import CPP_MAX_ROWS
from .ops.multitask import check_task_ids, check_task_ids_meta, kernel_ids, taps_mt_conv2d, taps_mt_linear

BASE = "base"
Source = Union[str, "os.PathLike[str]", nn.Module]


class _Context(threading.local):
    """The per-sample task ids of the batch being computed, shared by every wrapped layer and set
    by MultiTaskModel.forward for the duration of the call.

    Per thread (a threading.local): the state of a call lives in the thread making it, so several
    threads may call one model at once and each gets exactly its serial result (a server's worker
    threads do). torch.compile traces the attribute reads like any other (fullgraph holds)."""

    def __init__(self) -> None:
        self.ids: Optional[Tensor] = None
        # The CPU path runs the batch in task-pure chunks: then every sample of the call belongs
        # to this task (-1: the base) and the layers take the single-task path, with no gather
        # and no per-layer host sync.
        self.task: Optional[int] = None

    def __reduce__(self):  # copy.deepcopy / pickle: a fresh, empty context (no call in flight)
        return (_Context, ())

    def get(self, who: str) -> Tensor:
        if self.ids is None:
            raise RuntimeError(f"{who} is part of a MultiTaskModel: call the MultiTaskModel with "
                               "(x, task_ids), not the inner module")
        return self.ids


def _set(module: nn.Module, name: str, value) -> None:
    object.__setattr__(module, name, value)  # a plain attribute, not a registered submodule


# ----------------------------------------------------------------------------- gated layers
class _MTGated(nn.Module):
    """Shared by the multi-task linear and conv layers: the stacked deltas, slot map, scores."""

    def _init_stack(self, layer: Union[TAPSLinear, TAPSConv2d], ctx: _Context) -> None:
        _set(self, "_ctx", ctx)
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

    def _single(self, t: int, x: Tensor):
        """Task t on this layer: (delta, score, threshold) for the single-task op, or the weight
        to use directly: W (no delta here), or, when nothing needs a gradient (serving), W or
        W + ΔW by the gate, skipping the custom op's dispatch (on the CPU about 0.1 ms a call,
        8% of vit_tiny's forward at batch 16)."""
        s = int(self.slot[t]) if t >= 0 else -1
        if s < 0:
            return self.weight
        d, score, thr = self.deltas[s], self.scores[t], float(self.thresholds[t])
        if not torch.is_grad_enabled() or not (d.requires_grad or score.requires_grad or x.requires_grad):
            if not gate_is_open(score, thr, type(self).__name__):
                return self.weight
            return self._open_weight(x, d)
        return d, score, thr

    def _open_weight(self, x: Tensor, d: Tensor) -> Tensor:
        """Serving, gate open: the weight to run the plain op with (MultiTaskLinear overrides
        this for few rows, where a fused kernel reads W and ΔW without forming W + ΔW)."""
        return self.weight + d

    def _taps_args(self):
        return (self._ctx.get(type(self).__name__), self.weight, self.deltas, self.slot, self.scores,
                self.thresholds)

    def extra_repr(self) -> str:
        return (f"{tuple(self.weight.shape)}, tasks={self.num_tasks}, "
                f"deltas={self.deltas.shape[0]} (tasks with a delta on this layer)")


class MultiTaskLinear(_MTGated):
    """A TAPS linear layer serving a mixed batch (taps_fast.ops.multitask.taps_mt_linear)."""

    def __init__(self, layer: TAPSLinear, ctx: _Context) -> None:
        super().__init__()
        self.in_features, self.out_features = layer.in_features, layer.out_features
        self._init_stack(layer, ctx)

    def _open_weight(self, x: Tensor, d: Tensor):
        # Few rows on the CPU with the compiled extension: the cpp GEMV kernel streams W and ΔW
        # once (W + ΔW is never written), with no custom-op dispatch; None tells forward that the
        # kernel is to be called (see forward). Otherwise W + ΔW for F.linear.
        if x.device.type == "cpu" and x.numel() <= CPP_MAX_ROWS * self.in_features and _cpp_kernel_ready(x.dtype):
            return None
        return self.weight + d

    def forward(self, x: Tensor) -> Tensor:
        if self._ctx.task is not None:  # a task-pure chunk: the single-task op (or W alone)
            t = self._ctx.task
            one = self._single(t, x)
            if one is None:  # serving few rows, gate open: the fused cpp kernel
                s = int(self.slot[t])
                y = torch.ops.taps_fast.small_linear(x.reshape(-1, self.in_features).contiguous(), self.weight,
                                                     self.deltas[s], self.scores[t], self.bias,
                                                     float(self.thresholds[t]))
                return y.reshape(tuple(x.shape[:-1]) + (self.out_features,))
            if isinstance(one, Tensor):
                return F.linear(x, one, self.bias)
            d, s, thr = one
            return taps_linear(x, self.weight, d, s, self.bias, thr)
        ids, w, d, slot, s, thr = self._taps_args()
        return taps_mt_linear(x, ids, w, d, slot, s, thr, self.bias, check_ids=False)


class MultiTaskConv2d(_MTGated):
    """A TAPS conv2d layer serving a mixed batch (taps_fast.ops.multitask.taps_mt_conv2d)."""

    def __init__(self, layer: TAPSConv2d, ctx: _Context) -> None:
        super().__init__()
        for a in TAPSConv2d._ATTRS:
            setattr(self, a, getattr(layer, a))
        self._init_stack(layer, ctx)

    def forward(self, x: Tensor) -> Tensor:
        padding = self.padding
        if self.padding_mode != "zeros":  # as nn.Conv2d: pad, then a 'valid' conv
            x = F.pad(x, self._reversed_padding_repeated_twice, mode=self.padding_mode)
            padding = 0
        if self._ctx.task is not None:  # a task-pure chunk: the single-task op (or W alone)
            one = self._single(self._ctx.task, x)
            if isinstance(one, Tensor):
                return F.conv2d(x, one, self.bias, self.stride, padding, self.dilation, self.groups)
            d, s, thr = one
            return taps_conv2d(x, self.weight, d, s, self.bias, self.stride, padding, self.dilation,
                               self.groups, thr)
        ids, w, d, slot, s, thr = self._taps_args()
        return taps_mt_conv2d(x, ids, w, d, slot, s, thr, self.bias, self.stride, padding,
                              self.dilation, self.groups, check_ids=False)


def _cpp_kernel_ready(dtype: torch.dtype) -> bool:
    """Whether the dispatcher would give a few-row CPU linear to the "cpp" backend (the compiled
    extension is loaded, serves this dtype, and no other backend is forced)."""
    from . import dispatch

    return dispatch.select("linear_fwd", device=torch.device("cpu"), dtype=dtype, rows=1).name == "cpp"


# ----------------------------------------------------------------------------- norm layers
def _rows(ids: Tensor, x: Tensor) -> Tuple[int, ...]:
    return (ids.shape[0],) + (1,) * (x.dim() - 1)


class _MTNorm(nn.Module):
    """Per-task copies of a norm layer's parameters and buffers, stacked [T, ...] (``KEYS``), with
    the base layer kept as it is for the base rows."""

    def __init__(self, base: nn.Module, ctx: _Context) -> None:
        super().__init__()
        _set(self, "_ctx", ctx)
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

    def task_state(self, t: int) -> Dict[str, Tensor]:
        return {k: getattr(self, k)[t] for k in self.keys + self.buffer_keys}

    def _append(self, state: Dict[str, Tensor]) -> None:
        for k in self.keys:
            p = getattr(self, k)
            setattr(self, k, nn.Parameter(torch.cat([p.detach(), state[k].to(p).unsqueeze(0)]),
                                          requires_grad=p.requires_grad))
        for k in self.buffer_keys:
            b = getattr(self, k)
            setattr(self, k, torch.cat([b, state[k].to(b).unsqueeze(0)]))

    def _remove(self, t: int) -> None:
        n = getattr(self, (self.keys + self.buffer_keys)[0]).shape[0]
        keep = [i for i in range(n) if i != t]
        for k in self.keys:
            p = getattr(self, k)
            setattr(self, k, nn.Parameter(p.detach()[keep], requires_grad=p.requires_grad))
        for k in self.buffer_keys:
            setattr(self, k, getattr(self, k)[keep])

    def _table(self, k: str) -> Tensor:
        """[T + 1, ...]: the base's tensor at row 0, then the tasks' (index with ids + 1)."""
        mine = getattr(self, k)
        return torch.cat([getattr(self.base, k).to(mine).unsqueeze(0), mine])

    def extra_repr(self) -> str:
        return f"{type(self.base).__name__}, tasks={getattr(self, (self.keys + self.buffer_keys)[0]).shape[0]}"


class MultiTaskBatchNorm(_MTNorm):
    """BatchNorm with per-task affine parameters and running statistics.

    Eval: a per-sample affine, y = x·a[t] + c[t] with a = γ/√(var + ε), c = β - mean·a gathered
    by task: one pass, no loop. Train: statistics per task (sums scattered by task with
    index_add: each task's rows are normalised by their own mean and variance, exactly as the
    task's model alone would), and each present task's running statistics updated.
    """

    def forward(self, x: Tensor) -> Tensor:
        if self._ctx.task is not None:
            return self._single(x, self._ctx.task)
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

    def _single(self, x: Tensor, t: int) -> Tensor:
        """All samples of task t: F.batch_norm on the task's rows of the stacks (views, so the
        running statistics update in place); the base with its running statistics."""
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


def _norm_kind(m: nn.Module):
    bn = nn.modules.batchnorm._BatchNorm
    if (isinstance(m, bn) and type(m).forward is bn.forward and m.track_running_stats
            and not isinstance(m, nn.SyncBatchNorm)):
        return MultiTaskBatchNorm
    if isinstance(m, nn.LayerNorm) and (type(m).forward is nn.LayerNorm.forward or (
            type(m).__module__.startswith("timm.layers.norm") and type(m).__name__ == "LayerNorm")):
        return MultiTaskLayerNorm
    return MultiTaskNormFallback


# ----------------------------------------------------------------------------- heads
class MultiTaskHead(nn.Module):
    """Each task's own head (its module, any output size); the base keeps its head.

    All nn.Linear (the usual classifier): one product with the heads' weights concatenated,
    [B, F]·[ΣC, F]ᵀ, then each row gathers its task's columns: no loop and no sync (the extra
    FLOPs, B·F·ΣC, are under 0.3% of a ResNet-50 or ViT-S forward at T = 16). Otherwise a loop
    over the tasks present. Rows are padded with -inf past their task's output size.
    """

    def __init__(self, base: nn.Module, ctx: _Context) -> None:
        super().__init__()
        _set(self, "_ctx", ctx)
        self.base = base
        self.tasks = nn.ModuleList()

    def _all_linear(self) -> bool:
        heads = [self.base] + list(self.tasks)
        return all(type(h) is nn.Linear for h in heads) and len({h.in_features for h in heads}) == 1

    def num_outputs(self, t: int) -> Optional[int]:
        h = self.base if t < 0 else self.tasks[t]
        return h.out_features if isinstance(h, nn.Linear) else None

    def forward(self, f: Tensor) -> Tensor:
        t = self._ctx.task
        if t is not None:  # a task-pure chunk: its head, padded to the width of the mixed path
            y = (self.base if t < 0 else self.tasks[t])(f)
            if self._all_linear():
                width = max([self.base.out_features] + [h.out_features for h in self.tasks])
                y = F.pad(y, (0, width - y.shape[-1]), value=float("-inf"))
            return y
        ids = self._ctx.get("MultiTaskHead")
        if self._all_linear():
            return self._linear(f, ids)
        return self._loop(f, ids)

    def _linear(self, f: Tensor, ids: Tensor) -> Tensor:
        heads = [self.base] + list(self.tasks)
        w = torch.cat([h.weight for h in heads])
        b = torch.cat([h.bias if h.bias is not None else h.weight.new_zeros(h.out_features) for h in heads])
        sizes = [h.out_features for h in heads]
        offs = [0]
        for c in sizes[:-1]:
            offs.append(offs[-1] + c)
        cmax = max(sizes)
        allc = F.linear(f, w.to(f.dtype), b.to(f.dtype))  # [B, ..., ΣC]
        idx = ids.long() + 1
        off = torch.tensor(offs, device=f.device)[idx]
        size = torch.tensor(sizes, device=f.device)[idx]
        cols = torch.arange(cmax, device=f.device)
        lead = (f.shape[0],) + (1,) * (f.dim() - 2) + (cmax,)
        gidx = (off[:, None] + cols[None, :]).clamp(max=allc.shape[-1] - 1).view(lead)
        gidx = gidx.expand(tuple(allc.shape[:-1]) + (cmax,))
        vals = allc.gather(-1, gidx)
        pad = (cols[None, :] >= size[:, None]).view(lead)
        return vals.masked_fill(pad, float("-inf"))

    def _loop(self, f: Tensor, ids: Tensor) -> Tensor:
        parts = []
        for t in [-1] + torch.unique(ids[ids >= 0]).tolist():
            idx = (ids == t).nonzero().flatten()
            if idx.numel():
                h = self.base if t < 0 else self.tasks[t]
                parts.append((idx, h(f.index_select(0, idx))))
        if not parts:
            return self.base(f)
        width = max(y.shape[-1] for _, y in parts)
        out = parts[0][1].new_full((f.shape[0],) + tuple(parts[0][1].shape[1:-1]) + (width,), float("-inf"))
        for idx, y in parts:
            out[idx, ..., : y.shape[-1]] = y
        return out


# ----------------------------------------------------------------------------- the model
class MultiTaskModel(nn.Module):
    """A base model and any number of TAPS tasks served (and trained) in one mixed batch.

    ``base_model`` is modified in place: its gated layers, norm layers and head are replaced by
    their multi-task versions (a plain model is first converted with ``convert(model,
    **convert_kwargs)``; a converted model's own deltas and scores are not used: the base is W).
    ``cpu_chunk``: on the CPU the batch runs in task-pure chunks of at most this many samples in
    eval (see ``_forward_chunks``; 8 was fastest for ResNet-50 on the 2-core VM); 0 runs the
    mixed batch in one call through the mixed-batch ops, as on a GPU.
    """

    def __init__(self, base_model: nn.Module, cpu_chunk: int = 8, **convert_kwargs) -> None:
        super().__init__()
        if not isinstance(cpu_chunk, int) or cpu_chunk < 0:
            raise ValueError(f"MultiTaskModel: cpu_chunk must be an int >= 0, got {cpu_chunk!r}")
        self.cpu_chunk = cpu_chunk  # 0: the CPU runs the mixed batch in one call, like a GPU
        if not isinstance(base_model, nn.Module):
            raise TypeError(f"MultiTaskModel: base_model must be an nn.Module, got {type(base_model).__name__}")
        if any(isinstance(m, _MTGated) for m in base_model.modules()):
            raise ValueError("MultiTaskModel: this model is already part of a MultiTaskModel")
        if not any(True for _ in taps_layers(base_model)):
            base_model = convert(base_model, **convert_kwargs)
        elif convert_kwargs:
            raise ValueError("MultiTaskModel: convert_kwargs given, but the model is already converted")
        ctx = _Context()
        _set(self, "_ctx", ctx)
        layers = list(taps_layers(base_model))
        self.fingerprint = fingerprint_of((n, m.weight) for n, m in layers)
        heads = resolve_head(base_model)
        mapping: Dict[int, nn.Module] = {}
        self._layer_names: List[str] = []
        self._norm_names: List[str] = []
        for name, m in layers:
            mapping[id(m)] = (MultiTaskLinear if isinstance(m, TAPSLinear) else MultiTaskConv2d)(m, ctx)
            self._layer_names.append(name)
        for name, m in base_model.named_modules():
            if is_norm(m) and not any(name == h or name.startswith(h + ".") for h in heads) and (
                    any(p is not None for p in m._parameters.values())
                    or any(b is not None for b in m._buffers.values())):
                if any(isinstance(c, nn.Module) and c is not m and (c._parameters or c._buffers)
                       for c in m.modules()):
                    raise ValueError(f"MultiTaskModel: norm layer {name!r} ({type(m).__name__}) has "
                                     "submodules with parameters; it cannot be served per task")
                mapping[id(m)] = _norm_kind(m)(m, ctx)
                self._norm_names.append(name)
        self._head_names = list(heads)
        for h in heads:
            mapping[id(base_model.get_submodule(h))] = MultiTaskHead(base_model.get_submodule(h), ctx)
        for mod in list(base_model.modules()):
            for k, child in list(mod._modules.items()):
                if child is not None and id(child) in mapping:
                    mod._modules[k] = mapping[id(child)]
        for p in base_model.parameters():  # the shared base is frozen; tasks' tensors are not
            p.requires_grad_(False)
        for m in mapping.values():  # the tasks' stacks train (joint training); W, b do not
            if isinstance(m, _MTGated):
                m.deltas.requires_grad_(True)
                m.scores.requires_grad_(True)
            elif isinstance(m, _MTNorm):
                for p in m.parameters(recurse=False):  # the stacks; the base norm is a submodule
                    p.requires_grad_(True)
        self.base = base_model
        self.tasks: List[str] = []

    # -- structure
    def _layers(self) -> Dict[str, _MTGated]:
        return {n: self.base.get_submodule(n) for n in self._layer_names}

    def _norms(self) -> Dict[str, _MTNorm]:
        return {n: self.base.get_submodule(n) for n in self._norm_names}

    def _heads(self) -> Dict[str, MultiTaskHead]:
        return {n: self.base.get_submodule(n) for n in self._head_names}

    def task_index(self, name: str) -> int:
        if name == BASE:
            return -1
        try:
            return self.tasks.index(name)
        except ValueError:
            raise KeyError(f"unknown task {name!r}; this MultiTaskModel has tasks {self.tasks} "
                           f"(and {BASE!r} for the base model)") from None

    def num_outputs(self, task: Union[str, int]) -> Optional[int]:
        """The output size of a task's head (nn.Linear heads), or None."""
        t = self.task_index(task) if isinstance(task, str) else int(task)
        heads = list(self._heads().values())
        return heads[0].num_outputs(t) if heads else None

    # -- tasks
    def add_task(self, name: str, source: Source) -> None:
        """Add a task from a task file (``taps_fast.save_task``) or a converted model of the same
        base. Everything is checked first: a refused task leaves the model unchanged."""
        if not isinstance(name, str) or not name:
            raise ValueError(f"add_task: the task name must be a non-empty string, got {name!r}")
        if name == BASE:
            raise ValueError(f"add_task: {BASE!r} is reserved for the base model")
        if name in self.tasks:
            raise ValueError(f"add_task: a task named {name!r} exists already (remove_task it first)")
        if isinstance(source, nn.Module):
            tensors, thresholds, opened, heads = self._from_model(source, name)
            where = f"task {name!r} (a {type(source).__name__})"
        elif isinstance(source, (str, bytes, os.PathLike)):
            tensors, thresholds, opened = read_task(source, self.task_spec())
            heads = None
            where = repr(os.fsdecode(source))
        else:
            raise TypeError(f"add_task: source must be a task file path or a converted nn.Module, "
                            f"got {type(source).__name__}")
        plan = self._plan(tensors, thresholds, opened, heads, where)
        self._commit(plan)
        self.tasks.append(name)

    def remove_task(self, name: str) -> None:
        """Remove a task: its deltas, scores, norms and head. Later tasks' ids shift down by one."""
        t = self.task_index(name)
        if t < 0:
            raise ValueError("remove_task: the base model cannot be removed")
        for m in self._layers().values():
            m._remove(t)
        for m in self._norms().values():
            m._remove(t)
        for h in self._heads().values():
            del h.tasks[t]
        self.tasks.pop(t)

    def task_spec(self, heads: bool = True) -> TaskSpec:
        """What a task must hold to be added (taps_fast.checkpoint.TaskSpec): a score for every
        gated layer, deltas of the weights' shapes and dtypes, every norm layer's state, and the
        head (an nn.Linear head may have any number of classes). ``heads=False``: without the
        head keys (a task given as a model brings its head as a module)."""
        layers = {n: (tuple(m.weight.shape), m.weight.dtype, m.scores.dtype) for n, m in self._layers().items()}
        states: Dict[str, Tuple[Tuple[Optional[int], ...], torch.dtype]] = {}
        for n, m in self._norms().items():
            for k in m.keys + m.buffer_keys:
                ref = getattr(m.base, k)
                states[f"{n}.{k}" if n else k] = (tuple(ref.shape), ref.dtype)
        for h, mh in self._heads().items() if heads else ():
            for k, v in mh.base.state_dict(prefix=h + ".").items():
                shape = tuple(v.shape)
                if type(mh.base) is nn.Linear:  # a task's own number of classes
                    shape = (None,) + shape[1:]
                states[k] = (shape, v.dtype)
        return TaskSpec("MultiTaskModel", self.fingerprint, layers, states,
                        extra_hint="a MultiTaskModel serves per task only the gated layers, norm layers "
                                   "and head: the task unfroze other parameters of the base")

    def _from_model(self, model: nn.Module, name: str):
        layers = list(taps_layers(model))
        where = f"task {name!r} (a {type(model).__name__})"
        if not layers:
            raise ValueError(f"add_task: the {type(model).__name__} has no TAPS layers; pass a "
                             "converted model (taps_fast.convert) or a task file")
        if [n for n, _ in layers] != self._layer_names:
            raise TaskFileError(f"add_task: the {type(model).__name__}'s gated layers differ from the "
                                "base's (another architecture, or converted with other include/exclude)")
        fp = fingerprint_of((n, m.weight) for n, m in layers)
        if fp != self.fingerprint:
            raise TaskFileError(f"add_task: the {type(model).__name__} was converted from a different base "
                                f"model (base fingerprint {fp[:16]}…, this MultiTaskModel's "
                                f"{self.fingerprint[:16]}…): its frozen weights differ")
        head_keys = tuple(h + "." for h in self._head_names)
        tensors = {k: t for k, t in task_tensors(model).items()
                   if not (k.startswith("state/") and k[6:].startswith(head_keys))}
        thresholds = check_thresholds({n: m.threshold for n, m in layers}, self._layer_names, where)
        spec = self.task_spec(heads=False)
        check_header(header_of(tensors), fp, spec, where)
        opened = check_values(tensors, thresholds, spec, where)
        heads = {h: model.get_submodule(h) for h in self._head_names if _has_module(model, h)}
        return tensors, thresholds, opened, heads

    def _plan(self, tensors: Dict[str, Tensor], thresholds: Dict[str, float], opened: Dict[str, bool],
              head_modules: Optional[Dict[str, nn.Module]], where: str):
        """A checked task (check_header, check_values) as what _commit writes (nothing is
        written here); the heads are rebuilt from their state or copied from the task's model."""
        problems: List[str] = []
        plan_layers = {n: (tensors[f"score/{n}"], thresholds[n], tensors[f"delta/{n}"] if opened[n] else None)
                       for n in self._layer_names}
        plan_norms = {}
        for n, m in self._norms().items():
            plan_norms[n] = {k: tensors[f"state/{n}.{k}" if n else f"state/{k}"] for k in m.keys + m.buffer_keys}
        plan_heads = {}
        for h, mh in self._heads().items():
            if head_modules is not None and h in head_modules:
                plan_heads[h] = copy.deepcopy(head_modules[h])
                continue
            state = {k[len(h) + 7:]: t for k, t in tensors.items() if k.startswith(f"state/{h}.")}
            mod, why = _head_from_state(mh.base, state)
            if why:
                problems.append(f"head {h!r}: {why}")
            plan_heads[h] = mod
        if problems:
            raise TaskFileError(f"{where} does not fit this MultiTaskModel: " + "; ".join(problems))
        return plan_layers, plan_norms, plan_heads

    def _commit(self, plan) -> None:
        plan_layers, plan_norms, plan_heads = plan
        for n, m in self._layers().items():
            m._append(*plan_layers[n])
        for n, m in self._norms().items():
            m._append(plan_norms[n])
        for h, mh in self._heads().items():
            ref = mh.base.weight if hasattr(mh.base, "weight") else None
            mod = plan_heads[h]
            if ref is not None:
                mod = mod.to(device=ref.device, dtype=ref.dtype)
            mod.train(self.training)
            for p in mod.parameters():
                p.requires_grad_(True)
            mh.tasks.append(mod)

    def task_tensors(self, name: str) -> Dict[str, Tensor]:
        """The task as ``taps_fast.save_task`` stores it (score/, delta/ of open layers, state/)."""
        t = self.task_index(name)
        if t < 0:
            raise ValueError("task_tensors: the base model is not a task")
        out: Dict[str, Tensor] = {}
        for n, m in self._layers().items():
            out[f"score/{n}"] = m.scores.detach()[t]
            d = m.task_delta(t)
            if d is not None and bool(m.scores.detach()[t] >= m.thresholds[t]):
                out[f"delta/{n}"] = d.detach()
        for n, m in self._norms().items():
            for k, v in m.task_state(t).items():
                out[f"state/{n}.{k}" if n else f"state/{k}"] = v.detach()
        for h, mh in self._heads().items():
            for k, v in mh.tasks[t].state_dict(prefix=h + ".").items():
                out[f"state/{k}"] = v.detach()
        return out

    def save_task(self, name: str, path) -> int:
        """Write one task to a task file (loadable by ``taps_fast.load_task`` into a converted
        base, or by ``add_task``); returns its size in bytes."""
        t = self.task_index(name)
        thresholds = {n: float(m.thresholds[t]) for n, m in self._layers().items()}
        return write_task(self.task_tensors(name), thresholds, self.fingerprint, path)

    # -- forward
    def _ids(self, task_ids, x) -> Tensor:
        batch = x.shape[0] if isinstance(x, Tensor) else None
        dev = x.device if isinstance(x, Tensor) else None
        if isinstance(task_ids, (list, tuple)):
            if batch is not None and len(task_ids) != batch:
                raise ValueError(f"MultiTaskModel: {len(task_ids)} task ids for a batch of {batch} samples")
            task_ids = torch.tensor([self._id_of(t) for t in task_ids], dtype=torch.int64, device=dev)
        if batch is None:
            raise TypeError("MultiTaskModel: x must be a tensor whose first dimension is the batch")
        if torch.compiler.is_compiling():  # the id range check syncs the host: eager only
            check_task_ids_meta("MultiTaskModel", task_ids, batch, dev)
        else:
            check_task_ids("MultiTaskModel", task_ids, batch, len(self.tasks), dev)
        return kernel_ids(task_ids)

    def _id_of(self, t) -> int:
        """One entry of a list of ids: a task name, or an integer (a Python or numpy int; a float
        or a bool is refused rather than truncated)."""
        if isinstance(t, str):
            return self.task_index(t)
        if not isinstance(t, bool):
            try:
                return operator.index(t)
            except TypeError:
                pass
        raise TypeError(f"MultiTaskModel: task ids must be task names or integers, got {t!r} "
                        f"({type(t).__name__})")

    def forward(self, x: Tensor, task_ids) -> Tensor:
        """Each sample through its own task (task_ids: [B] ints, -1 = base, or a list of task
        names / ints); returns the base model's output form (see the module docstring)."""
        ids = self._ids(task_ids, x)
        if x.device.type == "cpu" and self.cpu_chunk and ids.numel() and not torch.compiler.is_compiling():
            return self._forward_chunks(x, ids)
        self._ctx.ids = ids
        try:
            return self.base(x)
        finally:
            self._ctx.ids = None

    def _forward_chunks(self, x: Tensor, ids: Tensor):
        """The CPU path: the batch sorted by task (stable), then run in task-pure chunks (a loop
        over the tasks present, never over samples; in eval a large task is cut into chunks of
        ``cpu_chunk`` samples, in training each task is one chunk so that its BatchNorm
        statistics are over all its rows). Every layer then takes the single-task path: no gather,
        no per-layer sync. Why chunks: on the 2-core VM timm's resnet50 at 160 px runs a batch
        of 32 in 2097 ms as one call and in 1417-1476 ms as chunks of 8 or 4 (vit_small at 224:
        2772 ms, 2129 ms as chunks of 16); activations that stay in cache, and allocations that
        are reused instead of page-faulted fresh, beat one large batch here."""
        perm = None
        if ids.numel() > 1 and not bool((ids[1:] >= ids[:-1]).all()):
            perm = torch.argsort(ids, stable=True)
            x, ids = x[perm], ids[perm]
        tasks, counts = torch.unique_consecutive(ids, return_counts=True)
        outs, start = [], 0
        try:
            for t, n in zip(tasks.tolist(), counts.tolist()):
                step = n if self.training else self.cpu_chunk
                for a in range(start, start + n, step):
                    b = min(a + step, start + n)
                    self._ctx.ids, self._ctx.task = ids[a:b], t
                    outs.append(self.base(x[a:b]))
                start += n
        finally:
            self._ctx.ids, self._ctx.task = None, None
        out = _cat_chunks(outs)
        return out if perm is None else _unpermute(out, perm)

    # -- accounting
    def weight_bytes(self) -> int:
        """Bytes of every parameter and buffer held (each storage once)."""
        return storage_bytes(list(self.parameters()) + list(self.buffers()))

    def extra_repr(self) -> str:
        return f"tasks={self.tasks}"


def storage_bytes(tensors) -> int:
    """Bytes of the storages behind ``tensors``, each storage counted once (views share)."""
    seen, total = set(), 0
    for t in tensors:
        key = (t.untyped_storage().data_ptr(), t.device)
        if key not in seen:
            seen.add(key)
            total += t.untyped_storage().nbytes()
    return total


def _cat_chunks(outs: list):
    """Concatenate the chunks' outputs along the batch (tensors, or tuples / lists / dicts)."""
    first = outs[0]
    if isinstance(first, Tensor):
        return outs[0] if len(outs) == 1 else torch.cat(outs)
    if isinstance(first, (tuple, list)):
        return type(first)(_cat_chunks([o[i] for o in outs]) for i in range(len(first)))
    if isinstance(first, dict):
        return {k: _cat_chunks([o[k] for o in outs]) for k in first}
    raise TypeError(f"MultiTaskModel: cannot join the base model's outputs of type {type(first).__name__}")


def _unpermute(out, perm: Tensor):
    """Undo the batch sort on the output (a tensor, or tuples / lists / dicts of them)."""
    if isinstance(out, Tensor):
        if out.dim() == 0 or out.shape[0] != perm.numel():
            return out
        inv = torch.empty_like(perm)
        inv[perm] = torch.arange(perm.numel(), device=perm.device)
        return out[inv]
    if isinstance(out, (tuple, list)):
        return type(out)(_unpermute(o, perm) for o in out)
    if isinstance(out, dict):
        return {k: _unpermute(v, perm) for k, v in out.items()}
    return out


def _has_module(model: nn.Module, name: str) -> bool:
    try:
        model.get_submodule(name)
        return True
    except AttributeError:
        return False


def _head_from_state(base: nn.Module, state: Dict[str, Tensor]) -> Tuple[Optional[nn.Module], Optional[str]]:
    """A task's head module rebuilt from its saved state: an nn.Linear of the saved size, or a
    copy of the base head when the shapes agree."""
    want = base.state_dict()
    if set(state) != set(want):
        return None, f"keys {sorted(state)} differ from the base head's {sorted(want)}"
    if type(base) is nn.Linear:
        w = state["weight"]
        if w.dim() != 2 or w.shape[1] != base.in_features:
            return None, f"weight of shape {tuple(w.shape)} does not take the base head's {base.in_features} features"
        mod = nn.Linear(base.in_features, w.shape[0], bias="bias" in state, device=base.weight.device,
                        dtype=base.weight.dtype)
        mod.load_state_dict(state)
        return mod, None
    bad = [k for k in want if tuple(state[k].shape) != tuple(want[k].shape)]
    if bad:
        return None, (f"{bad} have other shapes than the base head's and a {type(base).__name__} head "
                      "cannot be rebuilt from a file; pass the converted model to add_task instead")
    mod = copy.deepcopy(base)
    mod.load_state_dict(state)
    return mod, None


__all__ = ["MultiTaskModel", "MultiTaskLinear", "MultiTaskConv2d", "MultiTaskBatchNorm",
           "MultiTaskLayerNorm", "MultiTaskNormFallback", "MultiTaskHead"]
