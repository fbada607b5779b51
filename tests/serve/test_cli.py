"""The command line: options reach ServeConfig; bad invocations fail with a message."""
import subprocess
import sys

import pytest

from taps_fast import cli
from taps_fast.serve.__main__ import config_from_args, parser


def test_options_fill_the_config():
    args = parser().parse_args(["--model", "resnet18", "--tasks", "a", "--tasks", "b", "--pin", "x",
                                "--task-budget-mb", "64", "--max-batch", "16", "--no-pad-buckets", "--preload"])
    cfg = config_from_args(args)
    assert (cfg.model, cfg.tasks, cfg.pin, cfg.task_budget_mb, cfg.max_batch, cfg.pad_buckets, cfg.preload) == \
        ("resnet18", ["a", "b"], ["x"], 64.0, 16, False, True)


def test_serve_is_a_taps_fast_command(capsys):
    assert "serve" in cli.COMMANDS
    with pytest.raises(SystemExit) as e:
        cli.main(["serve", "--help"])
    assert e.value.code == 0 and "--task-budget-mb" in capsys.readouterr().out


def test_missing_model_and_bad_weights_fail_clearly(tmp_path):
    r = subprocess.run([sys.executable, "-m", "taps_fast.serve"], capture_output=True, text=True)
    assert r.returncode == 2 and "--model is required" in r.stderr
    r = subprocess.run([sys.executable, "-m", "taps_fast.serve", "--model", "test_resnet", "--base-weights",
                        str(tmp_path / "none.safetensors")], capture_output=True, text=True)
    assert r.returncode == 2 and "none.safetensors" in r.stderr and "does not exist" in r.stderr
