"""The head of a MultiTaskModel: each task's own head module, any output size, and a task's head
rebuilt from a task file (``head_from_state``).

``tasks`` holds one module per row (the row capacity): a task's head at its row, a placeholder
at a free row (``nn.Linear(in_features, 0)`` for an nn.Linear base head, so that the
concatenated product still serves every head at once; ``nn.Identity`` otherwise, never run)."""
from __future__ import annotations

import copy
import itertools
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from ._context import _Context, attach_context


class MultiTaskHead(nn.Module):
    """Each task's own head (its module, any output size); the base keeps its head.

    All nn.Linear (the usual classifier): one product with the heads' weights concatenated,
    [B, F]·[ΣC, F]ᵀ, then each row gathers its task's columns: no loop and no sync (the extra
    FLOPs, B·F·ΣC, are under 0.3% of a ResNet-50 or ViT-S forward at T = 16). Otherwise a loop
    over the tasks present. Rows are padded with -inf past their task's output size.

    Serving (no gradient needed, not compiling), the concatenated weights, biases, offsets and
    sizes are cached, keyed on every head's weight and bias (identity and version counter: an
    in-place change invalidates it) and the input's dtype and device; adding or removing a task
    clears it.
    """

    def __init__(self, base: nn.Module, ctx: _Context) -> None:
        super().__init__()
        attach_context(self, ctx)
        self.base = base
        self.tasks = nn.ModuleList()  # one per row: the task's head, or a placeholder (free row)
        self._cat_cache = None

    # -- rows (MultiTaskModel.add_prepared / remove_task)
    def _placeholder(self) -> nn.Module:
        """The module of a free row: an empty nn.Linear on the base head's device and dtype for an
        nn.Linear base head (out_features 0: the mixed product stays one product), else Identity."""
        b = self.base
        if type(b) is nn.Linear:
            # Built with one output on meta, then emptied: nn.Linear(in, 0) would warn that its
            # initialisation of a zero-element tensor is a no-op.
            mod = nn.Linear(b.in_features, 1, bias=b.bias is not None, device="meta")
            mod.out_features = 0
            mod.weight = nn.Parameter(b.weight.detach().new_empty((0, b.in_features)))
            if b.bias is not None:
                mod.bias = nn.Parameter(b.weight.detach().new_empty((0,)))
            mod.train(self.training)
            return mod
        return nn.Identity()

    def _grow_rows(self, cap: int) -> None:
        while len(self.tasks) < cap:
            self.tasks.append(self._placeholder())
        self._cat_cache = None

    def _write(self, row: int, module: nn.Module) -> None:
        self.tasks[row] = module
        self._cat_cache = None

    def _clear(self, row: int) -> None:
        self.tasks[row] = self._placeholder()
        self._cat_cache = None

    def _row_nbytes(self, row: int) -> int:
        return module_bytes(self.tasks[row])

    def _allocated_bytes(self) -> int:
        return sum(module_bytes(h) for h in self.tasks)

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
        if torch.compiler.is_compiling() or _needs_grad(heads) or _any_inference(heads):
            # inference tensors (heads made under torch.inference_mode) keep no version counter:
            # an in-place change could not be seen, so they are concatenated every call
            w, b, offs_t, sizes_t, cmax = _concat(heads, f)
        else:
            w, b, offs_t, sizes_t, cmax = self._cached_concat(heads, f)
        allc = F.linear(f, w, b)  # [B, ..., ΣC]
        idx = ids.long() + 1
        off = offs_t[idx]
        size = sizes_t[idx]
        cols = torch.arange(cmax, device=f.device)
        lead = (f.shape[0],) + (1,) * (f.dim() - 2) + (cmax,)
        gidx = (off[:, None] + cols[None, :]).clamp(max=allc.shape[-1] - 1).view(lead)
        gidx = gidx.expand(tuple(allc.shape[:-1]) + (cmax,))
        vals = allc.gather(-1, gidx)
        pad = (cols[None, :] >= size[:, None]).view(lead)
        return vals.masked_fill(pad, float("-inf"))

    def _cached_concat(self, heads: List[nn.Linear], f: Tensor):
        """_concat(heads, f), cached (serving only): the key is every head's weight and bias
        (id and _version; the cache holds them, so an id is never reused while it is cached) and
        f's dtype and device. A thread replaces the cache whole (one attribute store)."""
        params = [p for h in heads for p in (h.weight, h.bias)]
        key = (f.dtype, f.device) + tuple((id(p), p._version) if p is not None else None for p in params)
        hit = self._cat_cache
        if hit is not None and hit[0] == key and all(a is b for a, b in zip(hit[1], params)):
            return hit[2]
        value = _concat(heads, f)
        self._cat_cache = (key, params, value)
        return value

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


def _needs_grad(heads) -> bool:
    return torch.is_grad_enabled() and any(p.requires_grad for h in heads for p in h.parameters())


def _concat(heads: List[nn.Linear], f: Tensor):
    """The heads' weights and biases concatenated (in f's dtype), each head's column offset and
    size on f's device, and the largest size."""
    w = torch.cat([h.weight for h in heads])
    b = torch.cat([h.bias if h.bias is not None else h.weight.new_zeros(h.out_features) for h in heads])
    sizes = [h.out_features for h in heads]
    offs = [0]
    for c in sizes[:-1]:
        offs.append(offs[-1] + c)
    return (w.to(f.dtype), b.to(f.dtype), torch.tensor(offs, device=f.device),
            torch.tensor(sizes, device=f.device), max(sizes))


def module_bytes(mod: nn.Module) -> int:
    """Bytes of a module's parameters and buffers."""
    return sum(t.numel() * t.element_size() for t in itertools.chain(mod.parameters(), mod.buffers()))


def head_from_state(base: nn.Module, state: Dict[str, Tensor]) -> Tuple[Optional[nn.Module], Optional[str]]:
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


def _any_inference(heads) -> bool:
    return any(p is not None and p.is_inference() for h in heads for p in (h.weight, h.bias))
