"""MultiTaskModel: a base model and its TAPS tasks, served and trained in one mixed batch.

The model replaces the base's gated layers, norm layers and head by their multi-task versions
(layers.py, norms.py, heads.py), which share one per-thread ``_Context``: the rows of the call in
flight.

Rows and slot pools. Every per-task tensor (scores, thresholds, slot maps, norm tables, heads) is
indexed by the task's internal *row*, which never moves while the task lives; public task ids are
positions in ``tasks`` (removing a task shifts the later ids, not their rows). ``_row_of`` maps a
public id to its row, and the buffer ``_row_table`` ([T + 1], entry 0 = -1, the base) does the
same on the device: rows = _row_table[ids + 1], no host sync, traceable. Row capacity grows by
``pool_chunk`` rows when no row is free, and never shrinks; a removed task's row is zeroed and
goes on the free list (the lowest free row is reused first). Each gated layer's deltas are a slot
pool ``[S_cap, *W.shape]`` managed the same way but grown by a quarter of its slots (at least
one) when full: one allocation and one copy of the pool, at most a quarter of it spare. So adding or removing a task costs time and memory in
proportion to that task's bytes, not to the number of tasks held.

Adding a task: ``prepare_task`` checks it (checkpoint.check_header / check_values) and builds what
each part writes (``_plan``, tensors already on the model's device and dtype), writing nothing
(a loader thread may call it while forwards run); ``add_prepared`` then writes it in place into
a free row and free slots, so a refused task changes nothing. ``add_task`` does both.
"""
from __future__ import annotations

import copy
import heapq
import itertools
import operator
import os
from typing import Dict, List, NamedTuple, Optional, Tuple, Union

import torch
import torch.nn as nn
from torch import Tensor

from ..checkpoint import (TaskFileError, TaskSpec, check_header, check_label_count, check_label_list,
                          check_thresholds, check_values, fingerprint_of, header_of,
                          read_task_with_labels, task_tensors, write_task)
from ..convert import convert, is_norm, resolve_head, taps_layers
from ..modules import TAPSLinear
from ..ops._mt_common import check_task_ids, check_task_ids_meta, kernel_ids
from ._context import _Context, attach_context
from .heads import MultiTaskHead, head_from_state, module_bytes
from .layers import MultiTaskConv2d, MultiTaskLinear, _MTGated
from .norms import _MTNorm, norm_class_for

BASE = "base"
Source = Union[str, "os.PathLike[str]", nn.Module]


class TaskPlan(NamedTuple):
    """A checked task as each part of the model will write it (MultiTaskModel.add_prepared)."""

    layers: Dict[str, Tuple[Tensor, float, Optional[Tensor]]]  # gated layer: (score, τ, ΔW or None: closed)
    norms: Dict[str, Dict[str, Tensor]]  # norm layer: its parameters' and buffers' values
    heads: Dict[str, nn.Module]  # head: the task's own module


class PreparedTask(NamedTuple):
    """A task read and checked by ``MultiTaskModel.prepare_task``, not yet added: ``add_prepared``
    writes it. ``plan``: what each part writes (tensors on the model's device and dtype when
    prepared; ``add_prepared`` also takes them on the CPU); ``nbytes``: the bytes the task adds
    on the device (its deltas, scores, thresholds and slot entries, norm state, head);
    ``labels``: the class names its file carries, or None; ``fingerprint``: the base it was
    checked against. ``add_prepared`` copies the plan (a PreparedTask may be added again after a
    remove_task, e.g. from a server's host cache)."""

    name: str
    plan: TaskPlan
    nbytes: int
    labels: Optional[List[str]]
    fingerprint: str


class MultiTaskModel(nn.Module):
    """A base model and any number of TAPS tasks served (and trained) in one mixed batch.

    ``base_model`` is modified in place: its gated layers, norm layers and head are replaced by
    their multi-task versions (a plain model is first converted with ``convert(model,
    **convert_kwargs)``; a converted model's own deltas and scores are not used: the base is W).
    ``cpu_chunk``: on the CPU the batch runs in task-pure chunks of at most this many samples in
    eval when one task is present or the tasks present average ``CPU_CHUNK_MIN_ROWS`` rows or
    more (see ``forward`` and
    ``_forward_chunks``; 8 was fastest for ResNet-50 on a 2-core x86_64 CPU); 0 runs the
    mixed batch in one call through the mixed-batch ops, as on a GPU. ``pool_chunk``: the rows
    are allocated this many at a time (the delta slot pools grow by a quarter; see the module
    docstring): larger means fewer reallocations of the row tables, and more rows held idle.
    """

    # In eval on the CPU, the chunk path runs one forward per task present, so its cost grows with
    # the tasks in the batch (each forward reads every weight); the mixed-batch ops read W once
    # and add each open task's ΔW·x. Batch of 32, timm resnet18 / vit_tiny at 128 px, 1 thread,
    # 2-core x86_64 (no GPU, torch 2.14.1), time vs the base model alone: 6 tasks present,
    # chunks 0.84 / 0.79, mixed 0.75 / 0.70; 19 tasks present, chunks 0.72 / 0.59, mixed 0.74 /
    # 0.67. So chunks when one task is present or the tasks present average at least this many
    # rows, else mixed.
    CPU_CHUNK_MIN_ROWS = 4

    def __init__(self, base_model: nn.Module, cpu_chunk: int = 8, pool_chunk: int = 8, **convert_kwargs) -> None:
        super().__init__()
        if not isinstance(cpu_chunk, int) or cpu_chunk < 0:
            raise ValueError(f"MultiTaskModel: cpu_chunk must be an int >= 0, got {cpu_chunk!r}")
        if not isinstance(pool_chunk, int) or isinstance(pool_chunk, bool) or pool_chunk < 1:
            raise ValueError(f"MultiTaskModel: pool_chunk must be an int >= 1, got {pool_chunk!r}")
        self.cpu_chunk = cpu_chunk  # 0: the CPU runs the mixed batch in one call, like a GPU
        self.pool_chunk = pool_chunk
        if not isinstance(base_model, nn.Module):
            raise TypeError(f"MultiTaskModel: base_model must be an nn.Module, got {type(base_model).__name__}")
        if any(isinstance(m, _MTGated) for m in base_model.modules()):
            raise ValueError("MultiTaskModel: this model is already part of a MultiTaskModel")
        if not any(True for _ in taps_layers(base_model)):
            base_model = convert(base_model, **convert_kwargs)
        elif convert_kwargs:
            raise ValueError("MultiTaskModel: convert_kwargs given, but the model is already converted")
        ctx = _Context()
        attach_context(self, ctx)
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
                mapping[id(m)] = norm_class_for(m)(m, ctx)
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
        self.tasks: List[str] = []  # public id -> name
        self._row_of: List[int] = []  # public id -> row
        self._free_rows: List[int] = []  # a heap: the lowest free row is reused first
        self._rows_cap = 0
        self._labels: Dict[str, Optional[List[str]]] = {}
        dev = layers[0][1].weight.device
        self.register_buffer("_row_table", torch.full((1,), -1, dtype=torch.int64, device=dev), persistent=False)

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

    def _parts(self) -> List[nn.Module]:
        """Every part holding per-row tensors: gated layers, norm layers, heads."""
        return list(self._layers().values()) + list(self._norms().values()) + list(self._heads().values())

    def _row(self, t: int) -> int:
        """The row of public id t (-1: the base)."""
        return -1 if t < 0 else self._row_of[t]

    def num_outputs(self, task: Union[str, int]) -> Optional[int]:
        """The output size of a task's head (nn.Linear heads), or None."""
        t = self.task_index(task) if isinstance(task, str) else int(task)
        heads = list(self._heads().values())
        return heads[0].num_outputs(self._row(t)) if heads else None

    # -- tasks
    def add_task(self, name: str, source: Source) -> None:
        """Add a task from a task file (``taps_fast.save_task``) or a converted model of the same
        base. Everything is checked first: a refused task leaves the model unchanged.
        ``add_prepared(prepare_task(name, source))``."""
        self._add(self.prepare_task(name, source), owned=True)

    def _check_name(self, name, where: str) -> None:
        if not isinstance(name, str) or not name:
            raise ValueError(f"{where}: the task name must be a non-empty string, got {name!r}")
        if name == BASE:
            raise ValueError(f"{where}: {BASE!r} is reserved for the base model")
        if name in self.tasks:
            raise ValueError(f"{where}: a task named {name!r} exists already (remove_task it first)")

    def prepare_task(self, name: str, source: Source, device: Optional[Union[str, torch.device]] = None) -> PreparedTask:
        """Read and check a task as ``add_task`` does (the same checks, errors and messages), and
        build what ``add_prepared`` writes, its tensors on the model's device (or ``device``,
        e.g. "cpu" for a host cache) and dtype; writes nothing to the model. Safe to call from
        another thread while forwards run (a server's loader thread); ``add_prepared`` must then
        run while no call is in flight."""
        self._check_name(name, "add_task")
        labels = None
        if isinstance(source, nn.Module):
            tensors, thresholds, opened, heads = self._from_model(source, name)
            where = f"task {name!r} (a {type(source).__name__})"
        elif isinstance(source, (str, bytes, os.PathLike)):
            tensors, thresholds, opened, labels = read_task_with_labels(source, self.task_spec())
            heads = None
            where = repr(os.fsdecode(source))
        else:
            raise TypeError(f"add_task: source must be a task file path or a converted nn.Module, "
                            f"got {type(source).__name__}")
        # A model's tensors are its live parameters: copied, so that the prepared task is a snapshot.
        plan = self._plan(tensors, thresholds, opened, heads, where, copy_tensors=isinstance(source, nn.Module),
                          device=None if device is None else torch.device(device))
        return PreparedTask(name, plan, self._plan_nbytes(plan), labels, self.fingerprint)

    def add_prepared(self, prepared: PreparedTask) -> None:
        """Add a task prepared by ``prepare_task`` (of this model, or of one of the same base and
        structure): written in place into a free row and free delta slots (growing the row tables by
        ``pool_chunk`` and a delta pool by a quarter when none is free). Re-checks that the name is still free (ValueError).
        The plan's tensors may be on the CPU for a model on another device; the plan is copied,
        never kept, so one PreparedTask may be added again after a remove_task."""
        self._add(prepared, owned=False)

    def _add(self, prepared: PreparedTask, owned: bool) -> None:
        if not isinstance(prepared, PreparedTask):
            raise TypeError(f"add_prepared: expected a PreparedTask (MultiTaskModel.prepare_task's result), "
                            f"got {type(prepared).__name__}")
        name, plan = prepared.name, prepared.plan
        self._check_name(name, "add_prepared")
        if prepared.fingerprint != self.fingerprint:
            raise TaskFileError(f"add_prepared: task {name!r} was prepared for a different base model (base "
                                f"fingerprint {str(prepared.fingerprint)[:16]}…, this MultiTaskModel's "
                                f"{self.fingerprint[:16]}…)")
        if (set(plan.layers) != set(self._layer_names) or set(plan.norms) != set(self._norm_names)
                or set(plan.heads) != set(self._head_names)):
            raise ValueError(f"add_prepared: task {name!r} was prepared for a MultiTaskModel with other gated "
                             "layers, norm layers or heads")
        heads = {}
        for h, mh in self._heads().items():  # the task's own module, on the base head's device and dtype
            mod = self._head_to(mh, plan.heads[h] if owned else copy.deepcopy(plan.heads[h]))
            mod.train(self.training)
            for p in mod.parameters():
                p.requires_grad_(True)
            heads[h] = mod
        row = self._take_row()
        try:
            for n, m in self._layers().items():
                m._write(row, *plan.layers[n])
            for n, m in self._norms().items():
                m._write(row, plan.norms[n])
            for h, mh in self._heads().items():
                mh._write(row, heads[h])
        except BaseException:
            self._clear_row(row)
            heapq.heappush(self._free_rows, row)
            raise
        self.tasks.append(name)
        self._row_of.append(row)
        self._labels[name] = list(prepared.labels) if prepared.labels is not None else None
        self._update_row_table()

    def remove_task(self, name: str) -> None:
        """Remove a task: its row and delta slots are zeroed and freed (no other task's tensors
        are copied). Later tasks' ids shift down by one (their rows do not move)."""
        t = self.task_index(name)
        if t < 0:
            raise ValueError("remove_task: the base model cannot be removed")
        row = self._row_of[t]
        self._clear_row(row)
        self.tasks.pop(t)
        self._row_of.pop(t)
        self._labels.pop(name, None)
        heapq.heappush(self._free_rows, row)
        self._update_row_table()

    def _head_to(self, mh: MultiTaskHead, mod: nn.Module, device: Optional[torch.device] = None) -> nn.Module:
        """A task's head module moved (in place) to the base head's device (or ``device``) and
        dtype: those of its weight, else of its first floating-point tensor, else the model's
        device."""
        ref = getattr(mh.base, "weight", None)
        if not isinstance(ref, Tensor):
            ref = next((t for t in itertools.chain(mh.base.parameters(), mh.base.buffers()) if t.is_floating_point()),
                       None)
        if ref is None:
            return mod.to(device=device or self._row_table.device)
        return mod.to(device=device or ref.device, dtype=ref.dtype)

    # -- rows
    def _take_row(self) -> int:
        """The lowest free row; when none is free every part grows by ``pool_chunk`` rows."""
        if not self._free_rows:
            cap = self._rows_cap + self.pool_chunk
            for m in self._parts():
                m._grow_rows(cap)
            self._free_rows.extend(range(self._rows_cap, cap))  # ascending: a valid heap
            self._rows_cap = cap
        return heapq.heappop(self._free_rows)

    def _clear_row(self, row: int) -> None:
        for m in self._parts():
            m._clear(row)

    def _update_row_table(self) -> None:
        self._row_table = torch.tensor([-1] + self._row_of, dtype=torch.int64, device=self._row_table.device)

    def _rows(self, ids: Tensor) -> Tensor:
        """Public ids (-1: the base) as rows: a gather in ``_row_table``, no host sync."""
        table = self._row_table
        if table.device != ids.device:
            table = table.to(ids.device)
        return table[ids.long() + 1]

    # -- accounting
    def task_bytes(self, name: str) -> int:
        """Bytes task ``name`` holds on the device: its deltas, scores, thresholds and slot
        entries, norm state and head (what ``prepare_task`` reported as ``nbytes``)."""
        t = self.task_index(name)
        if t < 0:
            raise ValueError("task_bytes: the base model is not a task")
        row = self._row_of[t]
        return sum(m._row_nbytes(row) for m in self._parts())

    def pool_stats(self) -> Dict[str, int]:
        """The pools: ``tasks``, ``rows`` (row capacity), ``free_rows``, ``delta_slots`` (slots
        over every gated layer), ``delta_slots_used``, ``bytes_allocated`` (every per-row
        tensor and delta pool, free rows and slots included) and ``bytes_used`` (the tasks'
        ``task_bytes``, summed)."""
        layers = list(self._layers().values())
        return {
            "tasks": len(self.tasks),
            "rows": self._rows_cap,
            "free_rows": len(self._free_rows),
            "delta_slots": sum(m.deltas.shape[0] for m in layers),
            "delta_slots_used": sum(m.slots_used for m in layers),
            "bytes_allocated": sum(m._allocated_bytes() for m in self._parts()),
            "bytes_used": sum(self.task_bytes(n) for n in self.tasks),
        }

    def task_labels(self, name: str) -> Optional[List[str]]:
        """The labels task ``name`` was added with (its file's 'labels' metadata), or None."""
        t = self.task_index(name)
        if t < 0:
            return None
        labels = self._labels.get(name)
        return list(labels) if labels is not None else None

    def _plan_nbytes(self, plan: TaskPlan) -> int:
        """The bytes ``plan`` will hold on the device once added (as ``task_bytes`` counts them)."""
        total = 0
        for n, m in self._layers().items():
            total += m._row_fixed_bytes() + (m._slot_bytes() if plan.layers[n][2] is not None else 0)
        total += sum(m._row_nbytes() for m in self._norms().values())
        total += sum(module_bytes(plan.heads[h]) for h in self._head_names)
        return total

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
        linear_heads = [h for h, mh in self._heads().items() if type(mh.base) is nn.Linear]
        return TaskSpec("MultiTaskModel", self.fingerprint, layers, states,
                        extra_hint="a MultiTaskModel serves per task only the gated layers, norm layers "
                                   "and head: the task unfroze other parameters of the base",
                        label_keys=tuple(f"{h}.weight" for h in linear_heads) if heads else ())

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
              head_modules: Optional[Dict[str, nn.Module]], where: str, copy_tensors: bool = False,
              device: Optional[torch.device] = None) -> TaskPlan:
        """A checked task (check_header, check_values) as what add_prepared writes (nothing is
        written here), its tensors on the device and dtype of what they will be written into
        (``copy_tensors``: always copies, never views of ``tensors``; ``device``: on that device
        instead); the heads are rebuilt from their state or copied from the task's model, on the
        base head's device (or ``device``) and dtype."""
        problems: List[str] = []

        def like(t: Tensor, ref: Tensor) -> Tensor:
            return t.detach().to(device=device or ref.device, dtype=ref.dtype, copy=copy_tensors)

        plan_layers = {}
        for n, m in self._layers().items():
            delta = like(tensors[f"delta/{n}"], m.deltas) if opened[n] else None
            plan_layers[n] = (like(tensors[f"score/{n}"], m.scores), thresholds[n], delta)
        plan_norms = {}
        for n, m in self._norms().items():
            plan_norms[n] = {k: like(tensors[f"state/{n}.{k}" if n else f"state/{k}"], getattr(m, k))
                             for k in m.keys + m.buffer_keys}
        plan_heads = {}
        for h, mh in self._heads().items():
            if head_modules is not None and h in head_modules:
                mod = copy.deepcopy(head_modules[h])
            else:
                state = {k[len(h) + 7:]: t for k, t in tensors.items() if k.startswith(f"state/{h}.")}
                mod, why = head_from_state(mh.base, state)
                if why:
                    problems.append(f"head {h!r}: {why}")
                    continue
            plan_heads[h] = self._head_to(mh, mod, device)
        if problems:
            raise TaskFileError(f"{where} does not fit this MultiTaskModel: " + "; ".join(problems))
        return TaskPlan(plan_layers, plan_norms, plan_heads)

    def task_tensors(self, name: str) -> Dict[str, Tensor]:
        """The task as ``taps_fast.save_task`` stores it (score/, delta/ of open layers, state/)."""
        t = self.task_index(name)
        if t < 0:
            raise ValueError("task_tensors: the base model is not a task")
        row = self._row_of[t]
        out: Dict[str, Tensor] = {}
        for n, m in self._layers().items():
            out[f"score/{n}"] = m.scores.detach()[row]
            d = m.task_delta(row)
            if d is not None and bool(m.scores.detach()[row] >= m.thresholds[row]):
                out[f"delta/{n}"] = d.detach()
        for n, m in self._norms().items():
            for k, v in m.task_state(row).items():
                out[f"state/{n}.{k}" if n else f"state/{k}"] = v.detach()
        for h, mh in self._heads().items():
            for k, v in mh.tasks[row].state_dict(prefix=h + ".").items():
                out[f"state/{k}"] = v.detach()
        return out

    def save_task(self, name: str, path, labels: Optional[List[str]] = None) -> int:
        """Write one task to a task file (loadable by ``taps_fast.load_task`` into a converted
        base, or by ``add_task``); returns its size in bytes. ``labels``: the class names to
        store (one per output of an nn.Linear head); None: those the task was added with, if any."""
        t = self.task_index(name)
        if t < 0:
            raise ValueError("save_task: the base model is not a task")
        row = self._row_of[t]
        if labels is None:
            labels = self._labels.get(name)
        else:
            labels = check_label_list(labels, "save_task")
            for h, mh in self._heads().items():
                head = mh.tasks[row]
                if type(head) is nn.Linear:
                    check_label_count(labels, head.out_features, h, "save_task", ValueError)
        thresholds = {n: float(m.thresholds[row]) for n, m in self._layers().items()}
        return write_task(self.task_tensors(name), thresholds, self.fingerprint, path, labels=labels)

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
        # The id range check syncs the host: eager only (not while compiling, nor while the
        # current CUDA stream is being captured into a graph, where a sync is an error).
        if torch.compiler.is_compiling() or (torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()):
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
        names / ints); returns the base model's output form (see the module docstring). The
        layers see rows, not public ids (``_rows``)."""
        ids = self._rows(self._ids(task_ids, x))
        if x.device.type == "cpu" and self.cpu_chunk and ids.numel() and not torch.compiler.is_compiling():
            present = torch.unique(ids).numel()
            if self.training or present == 1 or present * self.CPU_CHUNK_MIN_ROWS <= ids.numel():
                return self._forward_chunks(x, ids)
            # many tasks, few rows each: one pass of the mixed-batch ops beats a forward per task
        self._ctx.ids = ids
        try:
            return self.base(x)
        finally:
            self._ctx.ids = None

    def _forward_chunks(self, x: Tensor, ids: Tensor):
        """The CPU path (ids: rows): the batch sorted by row (stable), then run in task-pure chunks (a loop
        over the tasks present, never over samples; in eval a large task is cut into chunks of
        ``cpu_chunk`` samples, in training each task is one chunk so that its BatchNorm
        statistics are over all its rows). Every layer then takes the single-task path: no gather,
        no per-layer sync. Why chunks: on a 2-core x86_64 CPU (no GPU, torch 2.14.1) timm's
        resnet50 at 160 px runs a batch of 32 in 2097 ms as one call and in 1417-1476 ms as
        chunks of 8 or 4 (vit_small at 224: 2772 ms, 2129 ms as chunks of 16); activations that
        stay in cache, and allocations that are reused instead of page-faulted fresh, beat one
        large batch here."""
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

    def weight_bytes(self) -> int:
        """Bytes of every parameter and buffer held (each storage once)."""
        return storage_bytes(list(self.parameters()) + list(self.buffers()))

    def extra_repr(self) -> str:
        return f"tasks={self.tasks}, rows={self._rows_cap}, pool_chunk={self.pool_chunk}"


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
