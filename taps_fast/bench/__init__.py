"""Benchmarks: ``python -m taps_fast.bench [--suite models|kernels|multitask|small|overhead] ...``.

- :mod:`.harness`: what every suite shares: timing, the measured ceilings, the environment
  record, the JSON writer;
- :mod:`.models`: converted timm models against the plain model (train step, inference);
- :mod:`.kernels`: layer shapes against the floor and the machine's ceilings;
- :mod:`.multitask`: one mixed-task batch, taps_fast.MultiTaskModel against loops over tasks;
- :mod:`.small`: a few rows at a time, the compiled small-batch kernels against the copy floor;
- :mod:`.overhead`: every path against the naive code it replaces, one table of targets.

The suites import only :mod:`.harness`, never each other, except :mod:`.overhead`, which reuses
the models suite's model builders and steps and the multitask suite's tasks and providers;
``__main__`` routes ``--suite`` to them.
The names below are those the models suite and the timing helpers had at ``taps_fast.bench``.
"""
from __future__ import annotations

from typing import Optional, Sequence

from .harness import (
    Stats,
    device_name,
    environment,
    resolve_device,
    resolve_dtype,
    selected_backends,
    sync_for,
    time_fn,
    time_interleaved,
)
from .models import Row, add_ratios, create_model, format_table, infer_step, make_row, prepare_taps, train_step


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``python -m taps_fast.bench``: see :mod:`taps_fast.bench.__main__`."""
    from .__main__ import main as run

    return run(argv)


__all__ = [
    "main", "Stats", "time_fn", "time_interleaved", "sync_for", "environment", "device_name",
    "resolve_device", "resolve_dtype", "selected_backends", "Row", "make_row", "add_ratios",
    "format_table", "create_model", "prepare_taps", "train_step", "infer_step",
]
