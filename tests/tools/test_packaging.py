"""Packaging: kernels/ ships as taps_fast.kernels, never as a top-level `kernels` package."""
import glob
import os
import subprocess
import sys
import zipfile

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.mark.slow
def test_wheel_layout(tmp_path):
    env = dict(os.environ, TAPS_FAST_NO_EXT="1")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                    "-w", str(tmp_path), ROOT], check=True, env=env, capture_output=True)
    (whl,) = glob.glob(str(tmp_path / "taps_fast-*.whl"))
    names = zipfile.ZipFile(whl).namelist()
    assert "taps_fast/kernels/__init__.py" in names
    assert "taps_fast/ops/linear.py" in names
    tops = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert tops == {"taps_fast"}, tops


def test_console_script_entry_point():
    from importlib.metadata import entry_points
    eps = [e for e in entry_points(group="console_scripts") if e.name == "taps-fast"]
    assert eps and eps[0].value == "taps_fast.cli:main"
