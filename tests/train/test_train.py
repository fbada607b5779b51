"""taps-fast train / eval end to end on tiny ImageFolder trees: files, resume, joint mode, torchrun."""
import json
import math
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from taps_fast.checkpoint import TaskFile
from taps_fast.train.evaluate import evaluate_task

from train_helpers import LITE0, TINY_BN, TINY_GN, metrics, tiny_data, train

COMMON = ["--img-size", 32, "--batch-size", 8, "--penalty-warmup", 1, "--score-lr", 0.5, "--lam", 1.0, "--seed", 3]


def model_tensors(out, tag="last"):
    return {k: v for k, v in load_file(os.path.join(out, f"{tag}.safetensors")).items() if k.startswith("model/")}


def test_single_task_pretrained_end_to_end(tmp_path):
    data = tiny_data(tmp_path / "data", "digits", per_class=4)
    out = tmp_path / "run"
    assert train("--data", data, "--pretrained-path", LITE0, "--epochs", 2, "--finetune-epochs", 1,
                 "--output", out, *COMMON) == 0
    names = sorted(os.listdir(out))
    for f in ("args.json", "metrics.jsonl", "last.safetensors", "last.json", "best.safetensors", "best.json",
              "task.safetensors", "summary.json", "gate_map.png", "train.log"):
        assert f in names, f
    rows = metrics(out)
    assert [r["epoch"] for r in rows] == [1, 2, 3] and [r["phase"] for r in rows] == ["taps", "taps", "finetune"]
    assert rows[0]["penalty"] == 0.0 and rows[1]["penalty"] > 0  # the penalty waits one epoch
    summ = json.load(open(out / "summary.json"))
    totals = summ["tasks"]["digits"]["totals"]
    assert 0 < totals["task_fraction"] < 1 and totals["layers"] == 44
    assert TaskFile(str(out / "task.safetensors")).labels == [str(i) for i in range(10)]
    args = json.load(open(out / "args.json"))
    assert args["classes"] == [[str(i) for i in range(10)]] and args["model"] == "tf_efficientnet_lite0"
    # taps-fast eval on the task file reproduces the run's last validation
    res = evaluate_task("tf_efficientnet_lite0", str(out / "task.safetensors"), data, pretrained_path=LITE0,
                        img_size=32)
    assert res["val_top1"] == pytest.approx(rows[-1]["val_top1"])
    assert res["val_top5"] == pytest.approx(rows[-1]["val_top5"])
    assert res["task_fraction"] == pytest.approx(totals["task_fraction"])
    assert res["images"] == 10 * 4  # max_per_class caps each split


def test_resume_equals_uninterrupted(tmp_path):
    data = tiny_data(tmp_path / "data", "faces", per_class=8)
    args = ["--data", data, "--model", TINY_BN, "--epochs", 2, "--finetune-epochs", 1, "--accum", 2,
            "--clip-grad", 1.0, "--opt", "adamw", "--lr", 1e-3, "--warmup-epochs", 1, *COMMON]
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    assert train(*args, "--output", whole) == 0
    assert train(*args, "--output", parts, "--stop-after", 1) == 0
    assert len(metrics(parts)) == 1 and not (parts / "task.safetensors").exists()
    assert train(*args, "--resume", parts, "--stop-after", 1) == 0  # ends at the phase boundary
    assert train(*args, "--resume", parts) == 0
    a, b = metrics(whole), metrics(parts)
    drop = ("time_s",)
    assert [{k: v for k, v in r.items() if k not in drop} for r in a] == \
           [{k: v for k, v in r.items() if k not in drop} for r in b]
    ta, tb = model_tensors(whole), model_tensors(parts)
    assert ta.keys() == tb.keys()
    for k in ta:
        assert torch.equal(ta[k], tb[k]), k
    assert load_file(whole / "task.safetensors").keys() == load_file(parts / "task.safetensors").keys()
    summary = (parts / "summary.json").read_bytes()
    assert train(*args, "--resume", parts) == 0  # a finished run: nothing trained, nothing rewritten
    assert len(metrics(parts)) == 3 and (parts / "summary.json").read_bytes() == summary


def test_resume_refuses_another_run(tmp_path, capsys):
    data = tiny_data(tmp_path / "data", "faces", per_class=4)
    out = tmp_path / "run"
    base = ["--data", data, "--model", TINY_BN, "--epochs", 1, *COMMON]
    assert train(*base, "--output", out) == 0
    capsys.readouterr()
    assert train(*base, "--output", out) == 2  # a new run into a used folder
    assert "--resume" in capsys.readouterr().err
    assert train(*base[:-2], "--seed", 4, "--resume", out) == 2
    err = capsys.readouterr().err
    assert "another run" in err and "seed (3 there, 4 here)" in err
    assert train(*base, "--resume", tmp_path / "data") == 2
    assert "no args.json" in capsys.readouterr().err
    # a checkpoint copied in from another run
    other = tmp_path / "other"
    assert train(*base, "--output", other) == 0
    for f in ("last.json", "last.safetensors"):
        (out / f).write_bytes((other / f).read_bytes())
    assert train(*base, "--resume", out) == 2
    assert "belongs to run" in capsys.readouterr().err


def test_joint_end_to_end_and_served(tmp_path):
    from taps_fast.multitask import MultiTaskModel
    from taps_fast.train.model import create_base

    d1 = tiny_data(tmp_path / "data", "digits", per_class=3)
    d2 = tiny_data(tmp_path / "data", "faces", per_class=6)
    out = tmp_path / "joint"
    # 64 px: at 32 px the last BatchNorm sees 1×1 maps, and a task with one row in a batch has no
    # batch statistics there
    assert train("--joint", d1, d2, "--model", TINY_BN, "--epochs", 2, "--finetune-epochs", 1,
                 "--output", out, *COMMON, "--img-size", 64) == 0
    rows = metrics(out)
    assert set(rows[-1]["tasks"]) == {"digits", "faces"}
    assert rows[-1]["val_top1"] == pytest.approx((rows[-1]["tasks"]["digits"]["val_top1"]
                                                  + rows[-1]["tasks"]["faces"]["val_top1"]) / 2)
    summ = json.load(open(out / "summary.json"))
    assert set(summ["tasks"]) == {"digits", "faces"} and (out / "gate_map.png").exists()
    torch.manual_seed(3)
    mt = MultiTaskModel(create_base(TINY_BN, 10))
    for name in ("digits", "faces"):
        mt.add_task(name, str(out / "tasks" / f"{name}.safetensors"))
    assert mt.task_labels("faces") == ["face", "non_face"]
    mt.eval()
    y = mt(torch.randn(3, 3, 64, 64), ["digits", "faces", "digits"])
    assert y.shape == (3, 10) and torch.isinf(y[1, 2:]).all() and torch.isfinite(y[1, :2]).all()


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["single", "joint"])
def test_torchrun_two_processes_equal_one(tmp_path, mode):
    d1 = tiny_data(tmp_path / "data", "faces", per_class=8)
    if mode == "single":
        data = ["--data", str(d1)]
    else:  # the absent tasks' heads get no gradient: DDP with find_unused_parameters
        data = ["--joint", str(d1), str(tiny_data(tmp_path / "data", "textures", per_class=4)),
                "--finetune-epochs", "1"]
    args = ["-m", "taps_fast.train", *data, "--model", TINY_GN, "--epochs", "2", "--workers", "0",
            "--no-progress", "--device", "cpu", *map(str, COMMON)]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    one, two = tmp_path / "one", tmp_path / "two"
    subprocess.run([sys.executable, *args, "--output", str(one)], check=True, env=env, timeout=120)
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                    *args, "--output", str(two)], check=True, env=env, timeout=120)
    a, b = metrics(one), metrics(two)
    for ra, rb in zip(a, b):
        for k in ("train_top1", "val_top1", "val_top5", "open_layers"):
            assert ra.get(k) == rb.get(k), (k, ra, rb)
        for k in ("train_loss", "val_loss", "task_fraction", "penalty"):
            if k in ra or k in rb:  # joint runs record no single task fraction
                assert ra[k] == pytest.approx(rb[k], rel=1e-4, abs=1e-5), k
        assert ra.get("tasks", {}).keys() == rb.get("tasks", {}).keys()
    ta, tb = model_tensors(one), model_tensors(two)
    # joint: the per-task chunks sum gradients in another order on two processes, and the scores'
    # lr of 0.5 carries that rounding on (measured: 1.3e-4 at most, on scores of size 0.2-4)
    tol = dict(rtol=1e-4, atol=1e-5) if mode == "single" else dict(rtol=1e-3, atol=5e-4)
    for k in ta:
        torch.testing.assert_close(ta[k], tb[k], **tol, msg=k)
    assert json.load(open(two / "args.json"))["world_size"] == 2


@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_amp_and_channels_last_run(tmp_path, amp):
    data = tiny_data(tmp_path / "data", "faces", per_class=4)
    out = tmp_path / amp
    assert train("--data", data, "--model", TINY_BN, "--epochs", 2, "--amp", amp, "--channels-last",
                 "--output", out, *COMMON) == 0
    rows = metrics(out)
    assert len(rows) == 2 and all(math.isfinite(r["train_loss"]) for r in rows)
    meta = json.load(open(out / "last.json"))
    assert (meta["scaler"] is not None) == (amp == "fp16")  # fp16 trains through a GradScaler


def test_cli_lists_train_and_eval(capsys):
    from taps_fast.cli import main

    assert main([]) == 0
    text = capsys.readouterr().out
    assert "train" in text and "eval" in text
    with pytest.raises(SystemExit):
        main(["train", "--data", "x", "--joint", "y", "z"])
    assert "exactly one of --data" in capsys.readouterr().err


def test_eval_refuses_other_classes(tmp_path):
    from taps_fast.train.data import DataError

    data = tiny_data(tmp_path / "data", "faces", per_class=4)
    other = tiny_data(tmp_path / "data", "textures", per_class=2)
    out = tmp_path / "run"
    assert train("--data", data, "--model", TINY_BN, "--epochs", 1, "--output", out, *COMMON) == 0
    with pytest.raises(DataError, match=r"classes \['brick', 'grass', 'gravel', 'moon'\], the task file"):
        evaluate_task(TINY_BN, str(out / "task.safetensors"), other, img_size=32)
