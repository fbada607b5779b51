"""benchmarks/gpu_session.py: the staged GPU run. The dry run (the same plan and packing on the
CPU) and the driver's deadline, kill and packing rules."""
import importlib.util
import re
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "gpu_session.py"


@pytest.fixture(scope="module")
def gs():
    spec = importlib.util.spec_from_file_location("gpu_session", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    sys.modules["gpu_session"] = mod  # (dataclasses look their module up there)
    spec.loader.exec_module(mod)
    return mod


def members(archive):
    with tarfile.open(archive) as tar:
        return {m.name: m for m in tar.getmembers()}


def test_dry_run_returns_two_files_with_every_step(tmp_path, gs):
    out = tmp_path / "out"
    r = subprocess.run([sys.executable, str(SCRIPT), "--dry-run", "--out", str(out)], cwd=ROOT,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    assert sorted(p.name for p in out.iterdir()) == [gs.ARCHIVE, gs.SUMMARY]
    assert gs.check_layout(out) == []
    summary = (out / gs.SUMMARY).read_text()
    names = [s.name for s in gs.plan(tmp_path)]
    for name in names:
        assert f"\n{name} " in summary, (name, summary)
    assert "failed" not in summary and "timeout" not in summary and "pending" not in summary, summary
    got = members(out / gs.ARCHIVE)
    ran = {"env", "ext", "smoke", "small", "kernels", "mt_layer"}
    for name in ran:
        assert f"gpu_session/logs/{name}.txt" in got, sorted(got)
    for name in ("small_cpu", "kernels_cpu", "mt_layer_cpu"):
        assert f"gpu_session/results/{name}.json" in got, sorted(got)
    assert "gpu_session/summary.txt" in got


def test_a_step_past_its_cap_is_killed_and_what_came_before_is_packed(tmp_path, gs):
    # The slow step's grandchild (sleep) must die with it: the whole process group is killed.
    steps = [gs.Step("first", [sys.executable, "-c", "print('first done')"], budget_s=30, expect_s=1),
             gs.Step("slow", ["bash", "-c", "echo started; sleep 60 & wait"], budget_s=30, expect_s=1),
             gs.Step("late", [sys.executable, "-c", "print('late')"], budget_s=30, expect_s=1)]
    out, work = tmp_path / "out", tmp_path / "work"
    t0 = time.monotonic()
    results = gs.run_plan(steps, out, work, deadline_s=gs.RESERVE_S + 8)
    took = time.monotonic() - t0
    assert took < 20, f"the run took {took:.1f} s: the slow step was not killed at the deadline"
    status = {r.name: r.status for r in results}
    assert status == {"first": "ok", "slow": "timeout", "late": "skipped"}, status
    assert results[0].note == "first done"
    assert "no time left" in results[2].note
    got = members(out / gs.ARCHIVE)
    assert {"gpu_session/logs/first.txt", "gpu_session/logs/slow.txt"} <= set(got)
    assert re.search(r"^slow\s+timeout", (out / gs.SUMMARY).read_text(), re.M)
    assert gs.check_layout(out) == []


def test_a_failing_step_does_not_stop_the_run(tmp_path, gs):
    steps = [gs.Step("bad", [sys.executable, "-c", "import sys; print('boom'); sys.exit(3)"], 30, 1),
             gs.Step("good", [sys.executable, "-c", "print('ok')"], 30, 1)]
    results = gs.run_plan(steps, tmp_path / "out", tmp_path / "work", deadline_s=120)
    assert [(r.name, r.status, r.rc) for r in results] == [("bad", "failed", 3), ("good", "ok", 0)]


def test_logs_are_capped_in_the_archive(tmp_path, gs):
    big = gs.MAX_LOG_BYTES * 3
    steps = [gs.Step("loud", [sys.executable, "-c", f"import sys; sys.stdout.write('x' * {big}); print('END')"],
                     30, 1)]
    gs.run_plan(steps, tmp_path / "out", tmp_path / "work", deadline_s=120)
    m = members(tmp_path / "out" / gs.ARCHIVE)["gpu_session/logs/loud.txt"]
    assert m.size <= gs.MAX_LOG_BYTES + 200
    with tarfile.open(tmp_path / "out" / gs.ARCHIVE) as tar:
        text = tar.extractfile(m).read().decode()
    assert "bytes cut" in text and "END" in text  # the head and the tail (the verdict) are kept


def test_check_layout_names_what_would_not_come_back(tmp_path, gs):
    for i in range(gs.MAX_FILES + 1):
        (tmp_path / f"f{i}.txt").write_text("x")
    deep = tmp_path / "a" / "b" / "c"
    deep.mkdir(parents=True)
    (deep / "x.txt").write_text("x")
    problems = gs.check_layout(tmp_path)
    assert any("files in" in p for p in problems), problems
    assert any("folders deep" in p for p in problems), problems


def test_plan_fits_the_deadline_and_never_stops_at_the_first_failure(tmp_path, gs, monkeypatch):
    monkeypatch.setattr(gs, "_has_pytest_timeout", lambda: True)
    steps = gs.plan(tmp_path)
    names = [s.name for s in steps]
    assert len(set(names)) == len(names)
    assert names[:4] == ["env", "build", "ext", "smoke"], names
    assert sum(s.expect_s for s in steps) <= gs.DEFAULT_DEADLINE_S - gs.RESERVE_S
    for s in steps:
        if "pytest" in s.cmd:
            assert "-x" not in s.cmd and "--exitfirst" not in s.cmd, s.name
            assert any(a.startswith("--timeout=") for a in s.cmd), s.name
    assert dict(next(s for s in steps if s.name == "smoke").env) == {"TAPS_FAST_AUTOTUNE": "first"}
