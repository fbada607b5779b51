"""The per-call state shared by every multi-task layer of one MultiTaskModel."""
from __future__ import annotations

import threading
from typing import Optional

import torch.nn as nn
from torch import Tensor


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


def attach_context(module: nn.Module, ctx: _Context) -> None:
    """Give ``module`` the model's context as ``module._ctx``: a plain attribute, not a registered
    submodule (the context holds no parameters, and every layer shares the one object)."""
    object.__setattr__(module, "_ctx", ctx)
