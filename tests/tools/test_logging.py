"""The library logs through `logging` ("taps_fast" logger) and never prints; only the command
entry points (a module's ``main``) write to stdout/stderr."""
import ast
import logging
import pathlib

import torch
import torch.nn as nn

import taps_fast

ROOT = pathlib.Path(__file__).resolve().parents[2]
# Functions allowed to print: a command's main (its report is its output) and the benchmark's
# child-process probe, whose stdout is the protocol its parent reads.
PRINTERS = {"main", "_probe", "progress_printer"}  # progress_printer: the bench commands' stderr progress line


def _writes(node: ast.AST) -> bool:
    if not isinstance(node, ast.Call):
        return False
    f = node.func
    if isinstance(f, ast.Name) and f.id == "print":
        return True
    # sys.stdout.write(...) / sys.stderr.write(...)
    return (isinstance(f, ast.Attribute) and f.attr == "write" and isinstance(f.value, ast.Attribute)
            and f.value.attr in ("stdout", "stderr"))


def _offenders(path: pathlib.Path):
    tree = ast.parse(path.read_text(), filename=str(path))
    allowed = set()
    for fn in ast.walk(tree):
        if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)) and fn.name in PRINTERS:
            allowed |= {id(n) for n in ast.walk(fn)}
    return [f"{'/'.join(path.parts[-2:])}:{n.lineno}" for n in ast.walk(tree) if _writes(n) and id(n) not in allowed]


def test_no_print_outside_command_mains():
    files = sorted((ROOT / "taps_fast").rglob("*.py")) + sorted((ROOT / "kernels").rglob("*.py"))
    assert len(files) > 20
    bad = [o for f in files for o in _offenders(f)]
    assert not bad, f"library code writes to stdout/stderr (use logging.getLogger('taps_fast')): {bad}"


def test_scanner_sees_prints(tmp_path):
    p = tmp_path / "scan.py"
    p.write_text("import sys\ndef f():\n    print('x')\n    sys.stderr.write('y')\ndef main():\n    print('ok')\n")
    assert _offenders(p) == [f"{tmp_path.name}/scan.py:3", f"{tmp_path.name}/scan.py:4"]


def test_library_calls_log_and_stay_silent(tmp_path, capfd, caplog):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4 * 4 * 4, 5))
    with caplog.at_level(logging.INFO, logger="taps_fast"):
        taps_fast.convert(model, head="3")
        with torch.no_grad():
            model[0].score.fill_(0.0)  # closed
        str(taps_fast.summary(model))
        taps_fast.freeze_gates(model)
        taps_fast.save_task(model, tmp_path / "t.safetensors")
        mt = taps_fast.MultiTaskModel(model)
        mt.add_task("a", tmp_path / "t.safetensors")
        mt.eval()(torch.randn(2, 3, 6, 6), [0, -1])
    out, err = capfd.readouterr()
    assert out == "" and err == ""
    assert any("freeze_gates" in r.getMessage() for r in caplog.records if r.name.startswith("taps_fast"))
    assert any(isinstance(h, logging.NullHandler) for h in logging.getLogger("taps_fast").handlers)
