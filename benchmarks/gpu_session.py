"""The GPU tests and benchmarks in one command, staged by value, for a CUDA machine available for
a few minutes (written for torch 2.11, triton 3.6, Python 3.12, no network; stdlib only, so it runs
before the package is built):

    python benchmarks/gpu_session.py [--out DIR] [--deadline-s 570]
    python benchmarks/gpu_session.py --dry-run --out DIR     # the same plan on a CPU machine

Plan (each step in its own process group, capped by min(its budget, the time left before the
global deadline); a step that overruns is killed and the next one starts):

  env          nvidia-smi, `python -m taps_fast.info`
  build        the extension with its CUDA part for this card only (MAX_JOBS = cores); skipped when
               taps_fast._C already imports with CUDA (a warm machine)
  ext          the compiled kernels' tests (tests/ext)
  smoke        every Triton kernel and path once, autotuning trimmed to one config per element
               size (TAPS_FAST_AUTOTUNE=first)
  small        `bench --suite small` (few-row serving, CUDA graphs, bf16)
  kernels      `bench --suite kernels --groups vit,small` (ViT-B projections, small M)
  mt_layer     `bench --suite multitask --layer 4096,4096,4096,32`
  full         the Triton tests again with every autotune config, with whatever time is left

After every step, every log and JSON so far is packed into OUT/gpu_session.tar.gz, and
OUT/summary.txt says what each step did (rc, seconds, the log's last line): a kill of the whole
command still returns everything finished before it. OUT holds those two files only (the machine
returns at most 8 files of 16 MiB, at most 2 folders deep). Triton's cache lives in
build/triton_cache inside the checkout, so a second call on a warm machine reuses the compiled
kernels. pytest runs with --timeout per test where pytest-timeout is installed, and never with -x:
one failing test must not cost the rest of the run.

--dry-run runs the same plan and packing on the CPU: the GPU steps become their CPU equivalents (a
few tests under TRITON_INTERPRET=1, each benchmark on one tiny shape) or are skipped with the
reason (build, full), and the layout of
OUT is checked (tests/tools/test_gpu_session.py runs it in `make test`).
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import io
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable
ARCHIVE = "gpu_session.tar.gz"
SUMMARY = "summary.txt"
# What the machine returns from OUT: at most 8 files of 16 MiB each, at most 2 folders deep.
MAX_FILES, MAX_FILE_BYTES, MAX_DEPTH = 8, 16 << 20, 2
# One log is cut to its head and tail past this size, so the archive stays far under 16 MiB.
MAX_LOG_BYTES = 2 << 20
# Seconds kept back from the deadline for the final packing after the last step.
RESERVE_S = 10.0
DEFAULT_DEADLINE_S = 570.0  # under the machine's 10-minute command limit, with margin for its exit


@dataclasses.dataclass
class Step:
    """One stage: `cmd` on the GPU, `dry` (or None: skipped, with `dry_why`) under --dry-run.
    `budget_s` caps the step; `expect_s` is what it is planned to take on an H200 (the summary
    prints both). `skip` is a function returning a reason to skip the step, or None."""
    name: str
    cmd: List[str]
    budget_s: float
    expect_s: float
    dry: Optional[List[str]] = None
    dry_why: str = "needs a CUDA device"
    env: Dict[str, str] = dataclasses.field(default_factory=dict)
    skip: Optional[object] = None
    shell: bool = False


@dataclasses.dataclass
class Result:
    name: str
    status: str          # ok, failed (rc != 0), timeout, skipped
    rc: Optional[int]
    seconds: float
    note: str


def _has_pytest_timeout() -> bool:
    return importlib.util.find_spec("pytest_timeout") is not None


def pytest_cmd(paths: Sequence[str], per_test_s: int, workers: int, extra: Sequence[str] = ()) -> List[str]:
    """pytest without -x, with a per-test timeout where pytest-timeout exists, and xdist workers
    where pytest-xdist exists."""
    cmd = [PY, "-m", "pytest", *paths, "-q", "-p", "no:cacheprovider"]
    if _has_pytest_timeout():
        cmd += [f"--timeout={per_test_s}"]
    if workers > 1 and importlib.util.find_spec("xdist") is not None:
        cmd += ["-n", str(workers)]
    return cmd + list(extra)


def _built_with_cuda() -> Optional[str]:
    """The reason to skip the build: taps_fast._C imports in a fresh process and has its CUDA part."""
    probe = ("import taps_fast._ext as e; m, why = e.load(); "
             "import sys; sys.exit(0 if m is not None and e.build_info().get('cuda') else 1)")
    r = subprocess.run([PY, "-c", probe], cwd=ROOT, capture_output=True, timeout=120)
    return "taps_fast._C already imports with its CUDA part" if r.returncode == 0 else None


def _cores() -> int:
    return os.cpu_count() or 1


TRITON_TESTS = ["tests/kernels", "tests/ops/test_triton_dispatch.py", "tests/ops/test_mt_ops.py",
                "tests/ops/test_precision.py", "tests/multitask/test_multitask.py"]


def plan(results_dir: Path) -> List[Step]:
    """The run's steps, in order of value (see the module docstring)."""
    j = lambda name: str(results_dir / f"{name}.json")  # noqa: E731
    bench = [PY, "-m", "taps_fast.bench"]
    workers = max(1, min(8, _cores() // 2))
    first = {"TAPS_FAST_AUTOTUNE": "first"}
    return [
        Step("env", ["bash", "-c", "date -u; nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,"
                     "clocks.max.mem,compute_cap --format=csv; nvidia-smi; " + f"{PY} -m taps_fast.info"],
             budget_s=60, expect_s=15,
             dry=["bash", "-c", f"date -u; {PY} -m taps_fast.info"]),
        # Only this card's architecture: one arch compiles in about half the time of the default two.
        Step("build", ["bash", "-c", "export TORCH_CUDA_ARCH_LIST=\"$(nvidia-smi --query-gpu=compute_cap "
                       "--format=csv,noheader | head -1)\"; echo TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST; "
                       f"{PY} -m pip install -e . --no-deps --no-build-isolation -q"],
             budget_s=240, expect_s=100, env={"MAX_JOBS": str(_cores())}, skip=_built_with_cuda,
             dry=None, dry_why="the CPU build is make setup's; a dry run does not repeat it"),
        Step("ext", pytest_cmd(["tests/ext"], 60, 1), budget_s=90, expect_s=30,
             dry=pytest_cmd(["tests/ext/test_ext.py"], 60, 1, ["-k", "every_part_the_machine_allows or compute_capability"])),
        Step("smoke", pytest_cmd(TRITON_TESTS, 120, workers), budget_s=150, expect_s=110, env=first,
             dry=pytest_cmd(["tests/kernels/test_triton.py"], 120, 1, ["-k", "closed_gate_reads_weight_only"]),
             ),
        Step("small", bench + ["--suite", "small", "--quiet", "--out", j("small_cuda")], budget_s=90,
             expect_s=45, env=first,
             dry=bench + ["--suite", "small", "--m", "1", "--nk", "768", "--t", "1", "--repeats", "1",
                          "--quiet", "--out", j("small_cpu")]),
        Step("kernels", bench + ["--suite", "kernels", "--groups", "vit,small", "--quiet", "--out",
                                 j("kernels_cuda")], budget_s=150, expect_s=90,
             dry=bench + ["--suite", "kernels", "--groups", "vit,small", "--quick", "--quiet", "--out",
                          j("kernels_cpu")]),
        Step("mt_layer", bench + ["--suite", "multitask", "--layer", "4096,4096,4096,32", "--out",
                                  j("mt_layer_cuda")], budget_s=90, expect_s=40,
             dry=bench + ["--suite", "multitask", "--layer", "64,64,64,4", "--out", j("mt_layer_cpu")]),
        Step("full", pytest_cmd(["tests/kernels", "tests/ops/test_triton_dispatch.py"], 240, workers),
             budget_s=600, expect_s=0, dry=None, dry_why="needs a CUDA device (the smoke step's tests, "
             "every autotune config)"),
    ]


# ----------------------------------------------------------------------------- running
def _kill_group(p: subprocess.Popen) -> None:
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(p.pid, sig)
        except ProcessLookupError:
            return
        try:
            p.wait(timeout=5)
            return
        except subprocess.TimeoutExpired:
            continue


def _last_line(log: Path) -> str:
    try:
        with open(log, "rb") as f:
            f.seek(max(0, log.stat().st_size - 4096))
            lines = [ln.strip() for ln in f.read().decode("utf-8", "replace").splitlines() if ln.strip()]
    except OSError:
        return ""
    return lines[-1][:160] if lines else ""


def run_step(step: Step, cmd: List[str], log: Path, cap_s: float, base_env: Dict[str, str]) -> Result:
    """Run cmd with its output in log, killed (its whole process group) after cap_s seconds."""
    env = dict(base_env, **step.env)
    t0 = time.monotonic()
    with open(log, "w") as f:
        f.write(f"$ {' '.join(cmd)}\n# env: {step.env}\n# cap: {cap_s:.0f} s\n")
        f.flush()
        p = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT,
                             start_new_session=True)
        try:
            rc = p.wait(timeout=cap_s)
            timed_out = False
        except subprocess.TimeoutExpired:
            _kill_group(p)
            rc, timed_out = p.returncode, True
        dt = time.monotonic() - t0
        f.flush()
        note = f"killed at the {cap_s:.0f} s cap" if timed_out else _last_line(log)
        f.write(f"\n# {'killed after' if timed_out else 'finished in'} {dt:.1f} s, rc={rc}\n")
    status = "timeout" if timed_out else ("ok" if rc == 0 else "failed")
    return Result(step.name, status, rc, dt, note)


def _add_capped(tar: tarfile.TarFile, path: Path, arcname: str) -> None:
    size = path.stat().st_size
    if size <= MAX_LOG_BYTES:
        tar.add(path, arcname=arcname)
        return
    half = MAX_LOG_BYTES // 2
    with open(path, "rb") as f:
        head = f.read(half)
        f.seek(size - half)
        tail = f.read()
    data = head + f"\n... [{size - 2 * half} bytes cut] ...\n".encode() + tail
    info = tarfile.TarInfo(arcname)
    info.size, info.mtime = len(data), int(time.time())
    tar.addfile(info, io.BytesIO(data))


def summary_text(results: List[Result], steps: List[Step], started: float, deadline_s: float,
                 dry_run: bool) -> str:
    done = {r.name: r for r in results}
    lines = [f"taps_fast GPU run{' (dry run)' if dry_run else ''}: "
             f"{time.monotonic() - started:.0f} s of a {deadline_s:.0f} s deadline",
             f"{'step':<10} {'status':<8} {'rc':>4} {'s':>6} {'plan s':>6}  note"]
    for s in steps:
        r = done.get(s.name)
        if r is None:
            lines.append(f"{s.name:<10} {'pending':<8} {'':>4} {'':>6} {s.expect_s:>6.0f}")
        else:
            rc = "" if r.rc is None else str(r.rc)
            lines.append(f"{s.name:<10} {r.status:<8} {rc:>4} {r.seconds:>6.1f} {s.expect_s:>6.0f}  {r.note}")
    return "\n".join(lines) + "\n"


def pack(work: Path, out: Path, summary: str) -> None:
    """OUT/gpu_session.tar.gz (work/logs, work/results, the summary) and OUT/summary.txt, each
    written beside and renamed, so a kill mid-write leaves the previous pair whole."""
    out.mkdir(parents=True, exist_ok=True)
    (work / SUMMARY).write_text(summary)
    tmp = out / (ARCHIVE + ".part")
    with tarfile.open(tmp, "w:gz") as tar:
        for path in sorted(work.rglob("*")):
            if path.is_file():
                _add_capped(tar, path, f"gpu_session/{path.relative_to(work)}")
    os.replace(tmp, out / ARCHIVE)
    stmp = out / (SUMMARY + ".part")
    stmp.write_text(summary)
    os.replace(stmp, out / SUMMARY)


def check_layout(out: Path) -> List[str]:
    """What would not come back from OUT: too many files, too large, too deep, odd names, links."""
    problems = []
    files = [p for p in out.rglob("*") if not p.is_dir()]
    if len(files) > MAX_FILES:
        problems.append(f"{len(files)} files in {out} (at most {MAX_FILES} come back)")
    for p in files:
        rel = p.relative_to(out)
        if p.is_symlink() or not p.is_file():
            problems.append(f"{rel}: not a plain file")
        elif p.stat().st_size > MAX_FILE_BYTES:
            problems.append(f"{rel}: {p.stat().st_size} bytes (at most {MAX_FILE_BYTES})")
        if len(rel.parts) - 1 > MAX_DEPTH:
            problems.append(f"{rel}: more than {MAX_DEPTH} folders deep")
        if not all(c.isalnum() or c in "._-/" for c in str(rel)):
            problems.append(f"{rel}: a name with characters that may not come back")
    return problems


def run_plan(steps: List[Step], out: Path, work: Path, deadline_s: float, dry_run: bool = False) -> List[Result]:
    """Run the steps in order under one deadline, packing after each; returns their results."""
    started = time.monotonic()
    for sub in ("logs", "results"):
        (work / sub).mkdir(parents=True, exist_ok=True)
    cache = ROOT / "build" / "triton_cache"
    cache.mkdir(parents=True, exist_ok=True)
    base_env = dict(os.environ, TRITON_CACHE_DIR=str(cache), PYTHONUNBUFFERED="1")
    base_env.pop("TRITON_INTERPRET", None)
    if dry_run:
        base_env.update(TRITON_INTERPRET="1", TAPS_FAST_AUTOTUNE="first")
    results: List[Result] = []
    pack(work, out, summary_text(results, steps, started, deadline_s, dry_run))
    for step in steps:
        left = deadline_s - (time.monotonic() - started) - RESERVE_S
        cmd = step.dry if dry_run else step.cmd
        why = None
        if dry_run and cmd is None:
            why = f"dry run: {step.dry_why}"
        elif left < 5:
            why = f"no time left ({left:.0f} s before the deadline)"
        elif step.skip is not None and not dry_run:
            why = step.skip()
        if why:
            results.append(Result(step.name, "skipped", None, 0.0, why))
        else:
            results.append(run_step(step, cmd, work / "logs" / f"{step.name}.txt", min(step.budget_s, left),
                                    base_env))
        pack(work, out, summary_text(results, steps, started, deadline_s, dry_run))
    return results


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=os.environ.get("OUT") or str(ROOT / "benchmarks" / "results" / "gpu_session"),
                   help="the folder that comes back (default: $OUT)")
    p.add_argument("--deadline-s", type=float, default=DEFAULT_DEADLINE_S,
                   help="global deadline in seconds from the start")
    p.add_argument("--dry-run", action="store_true", help="the same plan on the CPU (see the docstring)")
    p.add_argument("--steps", default="", help="comma-separated subset of the steps, in plan order")
    args = p.parse_args(argv)
    out = Path(args.out)
    work = ROOT / "build" / "gpu_session" / time.strftime("%Y%m%d-%H%M%S")
    if work.exists():
        shutil.rmtree(work)
    steps = plan(work / "results")
    if args.steps:
        want = args.steps.split(",")
        unknown = sorted(set(want) - {s.name for s in steps})
        if unknown:
            p.error(f"unknown step(s) {unknown}; the plan has {[s.name for s in steps]}")
        steps = [s for s in steps if s.name in want]
    results = run_plan(steps, out, work, args.deadline_s, args.dry_run)
    problems = check_layout(out)
    sys.stdout.write((out / SUMMARY).read_text())
    for pr in problems:
        sys.stdout.write(f"layout: {pr}\n")
    bad = [r.name for r in results if r.status in ("failed", "timeout")]
    return 1 if problems or bad else 0


if __name__ == "__main__":
    sys.exit(main())
