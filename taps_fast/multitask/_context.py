"""The per-call state shared by every multi-task layer of one MultiTaskModel."""
from __future__ import annotations

import threading
from typing import Dict, Optional, Tuple

import torch

import torch.nn as nn
from torch import Tensor


class _Context(threading.local):
    """The per-sample task rows of the batch being computed (a task's internal row, -1 the base;
    MultiTaskModel.forward maps the public ids to rows), shared by every wrapped layer and set by
    MultiTaskModel.forward for the duration of the call.

    Per thread (a threading.local): the state of a call lives in the thread making it, so several
    threads may call one model at once and each gets exactly its serial result (a server's worker
    threads do). torch.compile traces the attribute reads like any other (fullgraph holds)."""

    def __init__(self) -> None:
        self.ids: Optional[Tensor] = None
        # The CPU path runs the batch in task-pure chunks: then every sample of the call belongs
        # to this row (-1: the base) and the layers take the single-task path, with no gather
        # and no per-layer host sync.
        self.task: Optional[int] = None
        # Serving a task-pure chunk with a gate open computes with W + ΔW: written into this
        # thread's scratch buffer (one per dtype and device, as large as the largest layer's W)
        # rather than into a fresh tensor per layer and chunk. The layers run one after the
        # other, and the plain op keeps no reference to its weight, so one buffer serves them
        # all. Why: a fresh W-sized tensor per open layer and chunk is allocated, page-faulted
        # and written back to memory each time; resnet50 at 160 px with 16 tasks of 2 samples
        # (a quarter of the layers open per task) spent 11% over the merged copies doing so on
        # a 2-core x86_64 machine without a GPU, torch 2.14.1.
        self.scratch: Dict[Tuple[torch.dtype, torch.device], Tensor] = {}

    def __reduce__(self):  # copy.deepcopy / pickle: a fresh, empty context (no call in flight)
        return (_Context, ())

    def weight_sum(self, weight: Tensor, delta: Tensor) -> Tensor:
        """W + ΔW in this thread's scratch buffer: valid until the next call of weight_sum in
        this thread (for an op that keeps no reference to its weight: inference only)."""
        key = (weight.dtype, weight.device)
        buf = self.scratch.get(key)
        if buf is None or buf.numel() < weight.numel():
            buf = self.scratch[key] = torch.empty(weight.numel(), dtype=weight.dtype, device=weight.device)
        return torch.add(weight, delta, out=buf[:weight.numel()].view(weight.shape))

    def get(self, who: str) -> Tensor:
        if self.ids is None:
            raise RuntimeError(f"{who} is part of a MultiTaskModel: call the MultiTaskModel with "
                               "(x, task_ids), not the inner module")
        return self.ids


def attach_context(module: nn.Module, ctx: _Context) -> None:
    """Give ``module`` the model's context as ``module._ctx``: a plain attribute, not a registered
    submodule (the context holds no parameters, and every layer shares the one object)."""
    object.__setattr__(module, "_ctx", ctx)
