"""An example to serve on a fresh clone, with nothing downloaded: a seeded timm base and a few
task files for it (random task weights, a quarter of the layers open, class names), written to
a folder. ``taps-fast serve --example DIR`` writes it when DIR has none and serves it.

The tasks are synthetic (their answers mean nothing): they exercise the server's whole path, the
mixed batches, the pool and the labels, at the cost of a real model. Real tasks come from
training (docs/training.md) and ``save_task``.
"""
from __future__ import annotations

import os
from typing import Dict, List

import torch

EXAMPLE_MODEL, EXAMPLE_SIZE, EXAMPLE_TASKS = "resnet18", 96, ("flowers", "birds", "cars", "pets")


def write_example(folder: str, model: str = EXAMPLE_MODEL, tasks=EXAMPLE_TASKS, open_frac: float = 0.25,
                  seed: int = 0) -> Dict:
    """Write ``folder``/base.safetensors and ``folder``/tasks/<name>.safetensors; returns the
    paths. Existing files are kept (the same seed writes the same files)."""
    import timm
    from safetensors.torch import save_file

    from ..bench.multitask import synthetic_task
    from ..checkpoint import base_fingerprint, write_task
    from ..convert import convert, taps_layers

    os.makedirs(os.path.join(folder, "tasks"), exist_ok=True)
    base_path = os.path.join(folder, "base.safetensors")
    torch.manual_seed(seed)
    base = timm.create_model(model, pretrained=False).eval()
    if not os.path.exists(base_path):
        save_file({k: v.contiguous() for k, v in base.state_dict().items()}, base_path)
    conv = convert(base)
    fp = base_fingerprint(conv)
    thresholds = {n: 0.1 for n, _ in taps_layers(conv)}
    paths: List[str] = []
    for t, name in enumerate(tasks):
        path = os.path.join(folder, "tasks", f"{name}.safetensors")
        paths.append(path)
        if not os.path.exists(path):
            classes = 5 + 3 * t
            tensors = synthetic_task(conv, torch.Generator().manual_seed(seed + 1 + t), open_frac, classes)
            write_task(tensors, thresholds, fp, path, labels=[f"{name}-{c}" for c in range(classes)])
    return {"base": base_path, "tasks_dir": os.path.join(folder, "tasks"), "tasks": paths, "model": model}
