"""Helpers for data-parallel TAPS training (docs/training.md, "Distributed training").

DDP needs none: a closed layer's custom-op backward returns an explicit zero dΔW, so every
trainable parameter gets a gradient on every step (find_unused_parameters=False is right). What
needs care:

- FSDP2 (``torch.distributed.fsdp.fully_shard``) refuses 0-dim parameters ("fully_shard doesn't
  support scalar parameters"), and every TAPS score is 0-dim. Pass the scores as
  ``ignored_params=score_params(model)``: FSDP then neither shards them nor reduces their
  gradients, so call :func:`all_reduce_scores` after each backward.
- ``freeze_gates`` changes which parameters train (closed deltas dropped, scores frozen), which a
  DDP wrapper fixed when it was built and FSDP2 undoes (it re-registers the dropped deltas at
  its next all-gather). :func:`refuse_wrapped` turns both into a clear error.
"""
from __future__ import annotations

import sys
from typing import Set

import torch
import torch.nn as nn

from .convert import taps_layers


def score_params(model: nn.Module) -> Set[nn.Parameter]:
    """The TAPS layers' 0-dim score Parameters: ``fully_shard(..., ignored_params=...)``."""
    return {m.score for _, m in taps_layers(model)}


def all_reduce_scores(model: nn.Module, group=None) -> int:
    """Average the score gradients over the ranks of ``group`` in place, with one all-reduce of
    the L scores stacked (float64): g_i ← (1/R)·Σ_r g_i^(r). For scores that FSDP2 ignores (see
    the module docstring); under DDP the scores are reduced with the other parameters already.

    Every rank must call it after the same backward (it is a collective). A score that requires
    grad but got none on this rank counts as zero. Returns the number of scores reduced (0 after
    ``freeze_gates``, when no score trains: then no collective is issued on any rank).
    """
    import torch.distributed as dist

    scores = [m.score for _, m in taps_layers(model) if m.score.requires_grad]
    if not scores:
        return 0
    flat = torch.stack([(s.grad if s.grad is not None else torch.zeros_like(s)).to(torch.float64)
                        for s in scores])
    dist.all_reduce(flat, group=group)  # SUM then divide: gloo has no ReduceOp.AVG
    flat /= dist.get_world_size(group)
    for s, g in zip(scores, flat.unbind()):
        s.grad = g.to(s.dtype)
    return len(scores)


def refuse_wrapped(model: nn.Module, where: str) -> None:
    """Raise if ``model`` is a DDP wrapper or holds FSDP-managed modules: ``where`` would change
    which parameters train under a wrapper that does not follow (see the module docstring).

    A DDP wrapper left stale after freeze_gates does not fail at once: its next step runs with
    the gradients not all-reduced (the replicas silently diverge), and the step after raises
    "Expected to have finished reduction in the prior iteration", suggesting
    find_unused_parameters=True, which would hide the stale wrapper rather than fix it.
    """
    if isinstance(model, nn.parallel.DistributedDataParallel):
        raise TypeError(
            f"{where}: got a DistributedDataParallel wrapper. DDP fixes the set of trainable "
            f"parameters when it is built, and {where} changes it (closed deltas dropped, scores "
            f"frozen): call {where}(ddp.module), then wrap the model in a new "
            "DistributedDataParallel and rebuild the optimizer")
    if "torch.distributed.fsdp" not in sys.modules:  # FSDP never imported: nothing is sharded
        return
    from torch.distributed.fsdp import FSDPModule, FullyShardedDataParallel

    fsdp = next((n or "<root>" for n, m in model.named_modules()
                 if isinstance(m, (FSDPModule, FullyShardedDataParallel))), None)
    if fsdp is not None:
        raise TypeError(
            f"{where}: module {fsdp!r} is sharded by FSDP, which would re-register the dropped "
            "deltas at its next all-gather (and keep reducing their zero gradients). Gather the "
            "full state dict (DTensor.full_tensor() per entry), load it into an unsharded copy of "
            f"the model, call {where} there, then fully_shard that copy and rebuild the optimizer")

