"""End-to-end demo: TAPS against full fine-tuning and head-only training on handwritten digits.

Run ``python -m taps_fast.demo`` (or ``taps-fast demo``, ``make demo``); ``--help`` lists the
options. Everything runs on the CPU (about 70 s on 2 cores) and nothing is downloaded: the data is
scikit-learn's copy of the UCI handwritten digits (1797 grey 8×8 images, values 0..16, shipped
inside the sklearn package; ``pip install scikit-learn``).

1. One stratified train/test split (70/30, seeded) of all 1797 images. Every stage trains on the
   train split only and reports accuracy on the test split, so no test image is seen in training,
   in any form (the tasks below transform the same images, the split stays the same).
2. Pretraining: a small CNN (:func:`build_model`, 4 convs, 28k parameters) classifies digits
   0-4 (Adam).
3. Adaptation tasks (:data:`TASKS`): "digits 5-9" (5-way, new classes), "mirrored" (images
   flipped left-right, 10-way), "inverted" (1 - x, 10-way), "parity" (even/odd, 2-way). Each
   starts from a copy of the pretrained model with a fresh head and is trained three ways: full
   fine-tuning, head-only (frozen features) and TAPS (convert, warm-up, penalty, frozen gates).
4. The table: per task, each method's test accuracy and task-specific parameters as % of the
   base model (what a task must store beyond the shared base), and the layers TAPS opened.
5. Serving: the pretrained base in a :class:`taps_fast.MultiTaskModel`, every TAPS task added
   from its task file, one mixed batch of all tasks' test images; every row must predict what
   its task model predicts alone (the command exits 1 otherwise).
6. Plots (matplotlib, ``taps_fast.plot``): the gate map of all tasks and a λ sweep.

Outputs in ``--out`` (default ``./demo_out``): results.json (every number, and the data behind
the plots), results.md (the table), tasks/*.safetensors (the task files), base.safetensors,
gate_map.png, lambda_sweep.png. The building blocks (:func:`load_split`, :func:`task_data`,
:func:`build_model`, :func:`pretrain`, :func:`finetune_full`, :func:`finetune_head`,
:func:`train_taps`, :func:`evaluate`, :func:`serve_check`) are public for ``examples/``.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
import time
from dataclasses import asdict, replace
from typing import Dict, List, Optional, Sequence

import torch


from .digits import (  # the building blocks, public here too
    ALL, DemoConfig, HEAD, POOL_AFTER, PRETRAIN, Progress, Split, TASKS, TASKS_BY_NAME, Task, TaskData,
    WIDTHS, build_model, count_params, evaluate, finetune_full, finetune_head, load_split, predict, pretrain,
    quick_config, save_base, serve_check, task_data, train_epochs, train_taps, with_new_head,
)

log = logging.getLogger("taps_fast.demo")


# ----------------------------------------------------------------------------- the run
METHODS = ("full FT", "head only", "TAPS")


def run_demo(cfg: DemoConfig, out_dir: str, *, quiet: bool = False) -> dict:
    """Every stage of the demo (see the module docstring); returns the results dict that main
    writes to results.json."""
    t_start = time.perf_counter()
    split = load_split(cfg.seed, cfg.test_size)
    sweep_extra = [(t, lam) for t in cfg.sweep_tasks for lam in cfg.sweep_lams if lam != cfg.lam]
    total = (cfg.pretrain_epochs + len(TASKS) * (cfg.ft_epochs + 1 + cfg.taps_epochs())
             + len(sweep_extra) * cfg.taps_epochs())
    progress = Progress(total, disable=quiet)
    timing: Dict[str, float] = {}
    try:
        t0 = time.perf_counter()
        base, base_acc = pretrain(split, cfg, progress)
        timing["pretrain"] = time.perf_counter() - t0
        log.info("pretrained on digits 0-4: test accuracy %.4f (%d parameters)", base_acc, count_params(base))

        tasks, taps_models, datas = {}, {}, {}
        for task in TASKS:
            t0 = time.perf_counter()
            data = datas[task.name] = task_data(split, task)
            _, ft = finetune_full(base, task, data, cfg, progress)
            _, ho = finetune_head(base, task, data, cfg, progress)
            taps_models[task.name], tp = train_taps(base, task, data, cfg, progress=progress)
            tasks[task.name] = {"classes": task.num_classes, "description": task.description,
                                "train": len(data.y_train), "test": len(data.y_test),
                                "methods": {"full FT": ft, "head only": ho, "TAPS": tp}}
            timing[task.name] = time.perf_counter() - t0
            log.info("%s: full FT %.4f, head only %.4f, TAPS %.4f (%.1f%% of the base, open: %s)", task.name,
                     ft["accuracy"], ho["accuracy"], tp["accuracy"], 100 * tp["task_fraction"],
                     ", ".join(tp["open_layers"]) or "none")

        t0 = time.perf_counter()
        points, baselines = [], {}
        for tname in cfg.sweep_tasks:
            task, m = TASKS_BY_NAME[tname], tasks[tname]["methods"]
            for lam in cfg.sweep_lams:
                r = m["TAPS"] if lam == cfg.lam else train_taps(base, task, datas[tname], cfg, lam, progress)[1]
                points.append({"task": tname, "lam": lam, "accuracy": r["accuracy"],
                               "task_fraction": r["task_fraction"], "open_layers": r["open_layers"]})
            for meth in ("full FT", "head only"):
                label = meth if len(cfg.sweep_tasks) == 1 else f"{meth} ({tname})"
                baselines[label] = {"task": tname, "accuracy": m[meth]["accuracy"],
                                    "task_fraction": m[meth]["task_fraction"]}
        timing["lambda_sweep"] = time.perf_counter() - t0
    finally:
        progress.close()

    t0 = time.perf_counter()
    pre = task_data(split, PRETRAIN)
    serving = serve_check(base, taps_models, {n: d.x_test for n, d in datas.items()}, out_dir,
                          base_inputs=pre.x_test)
    timing["serving"] = time.perf_counter() - t0
    timing["total"] = time.perf_counter() - t_start
    return {
        "config": asdict(cfg),
        "torch_threads": torch.get_num_threads(),
        "split": {"train": len(split.y_train), "test": len(split.y_test), "seed": cfg.seed,
                  "test_size": cfg.test_size, "stratified": True},
        "model": {"widths": list(WIDTHS), "params": count_params(base), "head": HEAD},
        "pretrain": {"task": PRETRAIN.name, "accuracy": base_acc, "train": len(pre.y_train), "test": len(pre.y_test)},
        "tasks": tasks,
        "gate_map": {n: t["methods"]["TAPS"]["summary"] for n, t in tasks.items()},
        "lambda_sweep": {"points": points, "baselines": baselines},
        "serving": serving,
        "timing_s": timing,
    }


# ----------------------------------------------------------------------------- report
def format_table(results: dict) -> str:
    """The paper-style table (markdown): per task, accuracy and task-specific parameters as % of
    the base for each method, and the layers TAPS left open."""
    head = ["task", "classes"] + [f"{m} {k}" for m in METHODS for k in ("acc", "params")] + ["TAPS open layers"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, t in results["tasks"].items():
        m = t["methods"]
        cells = [name, str(t["classes"])]
        for meth in METHODS:
            cells += [f"{100 * m[meth]['accuracy']:.1f}%", f"{100 * m[meth]['task_fraction']:.1f}%"]
        n, opened = len(m["TAPS"]["summary"]["rows"]), m["TAPS"]["open_layers"]
        cells.append(f"{len(opened)}/{n}: " + (", ".join(opened) or "none"))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def format_report(results: dict) -> str:
    cfg, s, sv = results["config"], results["split"], results["serving"]
    out = [f"# taps_fast demo: handwritten digits (sklearn), {s['train']} train / {s['test']} test images",
           "",
           f"Base: a {results['model']['params']:,}-parameter CNN pretrained on digits 0-4: "
           f"{100 * results['pretrain']['accuracy']:.1f}% test accuracy. TAPS λ = {cfg['lam']:g}; params = "
           "task-specific parameters as % of the base model.",
           "", format_table(results), "",
           "λ sweep (" + ", ".join(cfg["sweep_tasks"]) + "):", ""]
    out += ["| task | λ | accuracy | params | open layers |", "|---|---|---|---|---|"]
    for p in results["lambda_sweep"]["points"]:
        out.append(f"| {p['task']} | {p['lam']:g} | {100 * p['accuracy']:.1f}% | {100 * p['task_fraction']:.1f}% | "
                   f"{', '.join(p['open_layers']) or 'none'} |")
    sizes = ", ".join(f"{n} {b:,}" for n, b in sv["task_file_bytes"].items())
    out += ["", f"Serving: one mixed batch of {sv['batch_rows']} test rows (all tasks and the base, interleaved): "
            f"predictions {'EQUAL to' if sv['predictions_equal'] else 'DIFFERENT from'} each task model alone; "
            f"max |logit difference| {sv['max_abs_logit_diff']:.2e} (CPU default: task-pure chunks), "
            f"{sv['one_call']['max_abs_logit_diff']:.2e} (one call through the mixed-batch ops).",
            f"Task files (bytes): {sizes}; the base model: {sv['base_file_bytes']:,}. The MultiTaskModel "
            f"holds {sv['multitask_weight_bytes']:,} bytes for the base and all {len(sv['task_file_bytes'])} tasks.",
            f"Time: {results['timing_s']['total']:.0f} s on {results['torch_threads']} thread(s)."]
    return "\n".join(out)


def make_plots(results: dict, out_dir: str) -> List[str]:
    """gate_map.png and lambda_sweep.png from the results (skipped, with one warning, when
    taps_fast.plot or matplotlib is missing)."""
    paths = [os.path.join(out_dir, "gate_map.png"), os.path.join(out_dir, "lambda_sweep.png")]
    sweep = results["lambda_sweep"]
    try:
        import matplotlib.pyplot as plt

        from taps_fast import plot_gate_map, plot_lambda_sweep

        figs = [plot_gate_map(results["gate_map"], paths[0], title="TAPS gates per task (filled = open)"),
                plot_lambda_sweep(sweep["points"], paths[1], baselines=sweep["baselines"],
                                  title="TAPS λ sweep: accuracy vs task-specific parameters")]
    except ImportError as e:
        log.warning("no plots: %s (they need taps_fast.plot and matplotlib: pip install matplotlib)", e)
        return []
    for fig in figs:
        plt.close(fig)
    return paths


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="taps-fast demo", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="demo_out", help="output directory (default: ./demo_out)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--epochs", type=float, default=1.0, metavar="SCALE",
                   help="multiply every stage's epoch count (default 1.0)")
    g.add_argument("--quick", action="store_true",
                   help="a reduced run (a third of the epochs, a 3-point λ sweep on one task; ~20 s)")
    p.add_argument("--lam", type=float, default=None, help=f"TAPS sparsity weight λ (default {DemoConfig.lam})")
    p.add_argument("--seed", type=int, default=0, help="seed of the split, the inits and the batches")
    # 1 thread: on a 2-core x86_64 machine without a GPU (torch 2.14.1), 2 threads ran a batch-64 training step 10-20% faster when the
    # machine was idle (11.6 vs 14.5 ms) and 5-10x slower while other processes were busy.
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (default 1: the convs on 8×8 images are too small to gain much)")
    p.add_argument("--no-plots", action="store_true", help="skip gate_map.png and lambda_sweep.png")
    p.add_argument("--quiet", action="store_true", help="no progress bar and no log lines")
    p.add_argument("-v", "--verbose", action="store_true", help="also the taps_fast library's INFO logging")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    from tqdm.contrib.logging import logging_redirect_tqdm

    p = build_parser()
    args = p.parse_args(argv)
    if not args.epochs > 0 or not math.isfinite(args.epochs):
        p.error(f"--epochs must be a positive number, got {args.epochs}")
    if args.threads < 1:
        p.error("--threads must be >= 1")
    if args.lam is not None and not args.lam >= 0:
        p.error("--lam must be >= 0")
    if not logging.getLogger().handlers:
        logging.basicConfig(format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    log.setLevel(logging.WARNING if args.quiet else logging.INFO)
    if args.verbose:
        logging.getLogger("taps_fast").setLevel(logging.INFO)
    cfg = quick_config(args.seed) if args.quick else DemoConfig(seed=args.seed).scaled(args.epochs)
    if args.lam is not None:
        cfg = replace(cfg, lam=args.lam)
    os.makedirs(args.out, exist_ok=True)
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        with logging_redirect_tqdm():
            results = run_demo(cfg, args.out, quiet=args.quiet)
            plots = [] if args.no_plots else make_plots(results, args.out)
    finally:
        torch.set_num_threads(threads)
    results["plots"] = plots
    report = format_report(results)
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump(results, f, indent=2)
        f.write("\n")
    with open(os.path.join(args.out, "results.md"), "w") as f:
        f.write(report + "\n")
    print(report)
    print(f"\nwrote {os.path.join(args.out, 'results.json')}, results.md"
          + "".join(f", {os.path.basename(x)}" for x in plots) + f" and tasks/ in {args.out}")
    if not results["serving"]["predictions_equal"]:
        sv = results["serving"]
        bad = sorted({n for d in (sv["tasks"], sv["one_call"]["tasks"])
                      for n, t in d.items() if not t["predictions_equal"]})
        print(f"taps-fast demo: the mixed batch predicts differently from the task models alone for {bad}",
              file=sys.stderr)
        return 1
    return 0


__all__ = [
    "ALL", "DemoConfig", "HEAD", "POOL_AFTER", "PRETRAIN", "Progress", "Split", "TASKS", "TASKS_BY_NAME",
    "Task", "TaskData", "WIDTHS", "build_model", "count_params", "evaluate", "finetune_full", "finetune_head",
    "load_split", "predict", "pretrain", "quick_config", "save_base", "serve_check", "task_data",
    "train_epochs", "train_taps", "with_new_head", "METHODS", "run_demo", "format_table", "format_report",
    "make_plots", "build_parser", "main",
]


if __name__ == "__main__":
    sys.exit(main())
