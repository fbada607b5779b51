"""Training helpers: the sparsity penalty, the frozen-gate phase, and the per-layer summary."""
from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field
from typing import Dict, List

import torch
import torch.nn as nn
from torch import Tensor

from .convert import taps_layers, task_state_keys
from .distributed import refuse_wrapped
from .ops._common import gate_is_open

log = logging.getLogger("taps_fast")


def _layers_or_raise(model: nn.Module, where: str):
    layers = list(taps_layers(model))
    if not layers:
        raise ValueError(f"{where}: {type(model).__name__} has no TAPS layers; call taps_fast.convert(model) first")
    return layers


def sparsity_penalty(model: nn.Module, lam: float, normalize: str = "layers") -> Tensor:
    """λ·(1/L)·Σ_i |s_i| over the L gated layers of ``model`` (TAPS' penalty, with the real L where
    the authors' code divides by 52 whatever the model).

    ``normalize="params"`` weighs each |s_i| by its layer's share of the gated parameters,
    λ·Σ_i (n_i/Σ_j n_j)·|s_i|, so closing a big layer counts for more. Leave it out (or pass
    lam=0) for the first epochs of training: the deltas start at zero, so the scores get no task
    signal until the deltas have grown (TAPS uses 2 warm-up epochs).
    """
    if not isinstance(lam, (int, float)) or not lam >= 0:
        raise ValueError(f"sparsity_penalty: lam must be a number >= 0, got {lam!r}")
    layers = _layers_or_raise(model, "sparsity_penalty")
    return penalty_of_scores(torch.stack([m.score for _, m in layers]), [m.weight.numel() for _, m in layers],
                             lam, normalize)


def penalty_of_scores(scores: Tensor, sizes, lam: float, normalize: str = "layers") -> Tensor:
    """``sparsity_penalty``'s formula on stacked scores [L, ...] (one row per gated layer, e.g.
    [L, T] for T tasks of a MultiTaskModel) and the layers' weight sizes [L]: the penalty per
    trailing index (a scalar for [L])."""
    scores = scores.float().abs()
    if normalize == "layers":
        return lam * scores.mean(0)
    if normalize == "params":
        n = torch.tensor([float(k) for k in sizes], device=scores.device)
        w = (n / n.sum()).reshape((-1,) + (1,) * (scores.dim() - 1))
        return lam * (scores * w).sum(0)
    raise ValueError(f"sparsity_penalty: normalize must be 'layers' or 'params', got {normalize!r}")


def freeze_gates(model: nn.Module) -> Dict[str, int]:
    """The frozen-gate fine-tune phase: every score stops training (the gates are now fixed),
    closed layers drop their deltas (freeing their memory; they compute with W alone), open
    layers keep training their deltas. Rebuild the optimizer afterwards: the dropped deltas are
    gone. Returns {"open": n_open, "closed": n_closed}.

    Distributed: pass the unwrapped model, then wrap it again (DDP) or re-shard it (FSDP2): a
    DDP wrapper or FSDP-sharded module is refused (taps_fast.distributed.refuse_wrapped)."""
    refuse_wrapped(model, "freeze_gates")
    layers = _layers_or_raise(model, "freeze_gates")
    states = {name: gate_is_open(m.score, m.threshold, f"freeze_gates: layer {name!r}") for name, m in layers}
    for name, m in layers:
        m.score.requires_grad_(False)
        if not states[name]:
            m.delta = None
    n_open = sum(states.values())
    log.info("taps_fast.freeze_gates: %d open layers keep training, %d closed layers dropped their deltas",
             n_open, len(layers) - n_open)
    return {"open": n_open, "closed": len(layers) - n_open}


@dataclass
class LayerRow:
    name: str
    kind: str
    shape: List[int]
    params: int
    score: float
    threshold: float
    open: bool
    delta_kept: bool


@dataclass
class Summary:
    """Per-layer rows and totals of a TAPS model; ``str(summary)`` is a printable table.

    Totals: ``layers``/``open_layers``; ``gated_params`` (weights of the gated layers);
    ``open_delta_params``, ``norm_params``, ``head_params``, ``score_params``; ``task_params``
    (their sum: what a task adds to the base); ``base_params`` (the model's parameters without
    deltas and scores, i.e. the unconverted model); ``task_fraction`` = task / base.
    """

    rows: List[LayerRow]
    totals: Dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"rows": [asdict(r) for r in self.rows], "totals": dict(self.totals)}

    def table(self) -> str:
        w = max([len(r.name) for r in self.rows] + [5])
        lines = [f"{'layer':<{w}}  {'type':<6}  {'shape':<18}  {'params':>10}  {'score':>8}  gate"]
        for r in self.rows:
            gate = ("open" if r.open else "closed") + ("" if r.delta_kept else " (delta dropped)")
            lines.append(f"{r.name:<{w}}  {r.kind:<6}  {'x'.join(map(str, r.shape)):<18}  {r.params:>10,}  "
                         f"{r.score:>8.4f}  {gate}")
        t = self.totals
        lines.append("")
        lines.append(f"open layers: {t['open_layers']}/{t['layers']}   gated params: {t['gated_params']:,}")
        lines.append(f"task-specific params: {t['task_params']:,} = open deltas {t['open_delta_params']:,} + "
                     f"norms {t['norm_params']:,} + head {t['head_params']:,} + scores {t['score_params']:,}")
        lines.append(f"base model params: {t['base_params']:,}   task / base: {100 * t['task_fraction']:.2f}%")
        return "\n".join(lines)

    __str__ = table


def summary(model: nn.Module) -> Summary:
    """Per-layer gate states and the task's parameter count against the base model's."""
    layers = _layers_or_raise(model, "summary")
    rows = []
    for name, m in layers:
        s = float(m.score.detach())
        rows.append(LayerRow(name=name, kind="Linear" if isinstance(m, nn.Linear) else "Conv2d",
                             shape=list(m.weight.shape), params=m.weight.numel(), score=s,
                             threshold=m.threshold, open=bool(s >= m.threshold),
                             delta_kept=m.delta is not None))
    norm_keys, head_keys = task_state_keys(model)
    params = dict(model.named_parameters())
    norm_params = sum(params[k].numel() for k in norm_keys if k in params)
    head_params = sum(params[k].numel() for k in head_keys if k in params)
    open_delta = sum(r.params for r in rows if r.open and r.delta_kept)
    own = {id(p) for _, m in layers for p in (m.delta, m.score) if p is not None}
    base = sum(p.numel() for p in model.parameters() if id(p) not in own)
    task = open_delta + norm_params + head_params + len(rows)
    totals = {"layers": len(rows), "open_layers": sum(r.open for r in rows),
              "gated_params": sum(r.params for r in rows), "open_delta_params": open_delta,
              "norm_params": norm_params, "head_params": head_params, "score_params": len(rows),
              "task_params": task, "base_params": base, "task_fraction": task / max(1, base)}
    return Summary(rows=rows, totals=totals)
