"""What every benchmark suite shares: timing, the machine's measured ceilings, the environment
record and the one JSON writer.

Timing. :func:`time_interleaved` times several functions round-robin (one call of each in turn
per repeat), so slow drifts of the machine (thermal, other processes) hit every function alike;
:class:`Stats` holds the per-call wall times. :func:`timer` is the per-device median: Triton's
``do_bench`` on CUDA, :func:`time_fn` (wall clock) on the CPU.

Ceilings (:func:`ceilings`), measured in the same run as the figures they bound:

    bandwidth = 2·bytes / t_copy        (a device-to-device copy reads and writes every byte)
    matmul    = 2·n³ / t_matmul         (bf16 8192³ on CUDA, fp32 2048³ on the CPU)
"""
from __future__ import annotations

import datetime as _dt
import json
import math
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence

import torch

RESULTS_DIR = os.path.join("benchmarks", "results")
DTYPE_BY_NAME = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


# ----------------------------------------------------------------------------- timing
@dataclass
class Stats:
    """Per-call wall times of one function, in milliseconds."""

    times_ms: List[float]

    @property
    def median(self) -> float:
        return statistics.median(self.times_ms)

    @property
    def q1(self) -> float:
        return _quantile(self.times_ms, 0.25)

    @property
    def q3(self) -> float:
        return _quantile(self.times_ms, 0.75)

    @property
    def iqr(self) -> float:
        return self.q3 - self.q1

    @property
    def min(self) -> float:
        return min(self.times_ms)

    @property
    def max(self) -> float:
        return max(self.times_ms)


def _quantile(xs: Sequence[float], q: float) -> float:
    """Linear-interpolation quantile (numpy's default), defined for a single sample too."""
    if not xs:
        raise ValueError("no samples")
    s = sorted(xs)
    pos = q * (len(s) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def _null_sync() -> None:
    pass


def sync_for(device: torch.device) -> Callable[[], None]:
    """The function that waits for the device's queued work (a no-op on CPU)."""
    if device.type == "cuda":
        return lambda: torch.cuda.synchronize(device)
    return _null_sync


def time_interleaved(
    fns: Dict[str, Callable[[], object]],
    repeats: int,
    warmup: int = 1,
    sync: Callable[[], None] = _null_sync,
    tick: Optional[Callable[[], None]] = None,
    clock: Callable[[], float] = time.perf_counter,
) -> Dict[str, Stats]:
    """Time each function ``repeats`` times after ``warmup`` untimed calls, round-robin over the
    functions (one call of each in turn), with ``sync()`` before and after every timed call.
    ``tick()`` is called after every call, warmup included (for a progress bar)."""
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    if warmup < 0:
        raise ValueError(f"warmup must be >= 0, got {warmup}")
    for _ in range(warmup):
        for fn in fns.values():
            fn()
            sync()
            if tick is not None:
                tick()
    times: Dict[str, List[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            sync()
            t0 = clock()
            fn()
            sync()
            times[name].append((clock() - t0) * 1e3)
            if tick is not None:
                tick()
    return {name: Stats(ts) for name, ts in times.items()}


def time_fn(fn: Callable[[], object], repeats: int, warmup: int = 1,
            sync: Callable[[], None] = _null_sync) -> Stats:
    """Time one function: see :func:`time_interleaved`."""
    return time_interleaved({"fn": fn}, repeats, warmup, sync)["fn"]


def timer(device: torch.device, repeats: int) -> Callable[[Callable[[], object]], float]:
    """Median milliseconds of fn(): triton.testing.do_bench on CUDA (at least 100 ms of calls,
    so the median is not one launch's jitter), the wall clock of ``repeats`` calls after one
    warm-up call on the CPU (:func:`time_fn`)."""
    if device.type == "cuda":
        from triton.testing import do_bench

        return lambda fn: float(do_bench(fn, warmup=25, rep=max(100, 10 * repeats), return_mode="median"))
    return lambda fn: time_fn(fn, repeats, warmup=1).median


def cuda_graph_round(fn: Callable[[int], object], layers: int) -> Callable[[], None]:
    """fn(0), ..., fn(layers - 1) captured once in a CUDA graph; returns its replay. Each fn(i) is
    run once before capture (Triton autotunes and compiles there, never inside a capture), then
    once more on the capture stream. The outputs stay alive with the graph (``graph.outputs``),
    so the replay writes the same buffers each time."""
    for i in range(layers):
        fn(i)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn(0)
        with torch.cuda.graph(graph, stream=stream):
            graph.outputs = [fn(i) for i in range(layers)]
    torch.cuda.current_stream().wait_stream(stream)
    return graph.replay


# ----------------------------------------------------------------------------- ceilings
def _copy_ms(n: int, device: torch.device, t: Callable) -> float:
    """Time of copying n fp32 elements device to device (the buffers are freed on return)."""
    src = torch.empty(n, dtype=torch.float32, device=device).fill_(1.0)
    dst = torch.empty_like(src)
    return t(lambda: dst.copy_(src))


def ceilings(device: torch.device, t: Callable) -> Dict[str, object]:
    """Measured memory bandwidth (GB/s, from a copy of 1 GiB on CUDA / 64 MiB on the CPU) and
    matmul rate (TFLOP/s), timed with ``t`` (see :func:`timer`)."""
    n_copy = (1 << 28) if device.type == "cuda" else (1 << 24)  # 1 GiB / 64 MiB of fp32
    bw = 2 * n_copy * 4 / (_copy_ms(n_copy, device, t) * 1e-3) / 1e9
    if device.type == "cuda":
        n, dt = 8192, torch.bfloat16
    else:
        n, dt = 2048, torch.float32
    a = torch.randn(n, n, device=device, dtype=dt)
    b = torch.randn(n, n, device=device, dtype=dt)
    ms = t(lambda: a @ b)
    return {"bandwidth_GBps": bw, "matmul_TFLOPs": 2 * n ** 3 / (ms * 1e-3) / 1e12,
            "matmul": f"{str(dt).replace('torch.', '')} {n}^3", "copy_bytes": n_copy * 4}


def last_level_cache_bytes(device: torch.device) -> int:
    """The L2 on CUDA (50 MiB when the driver does not say), the largest CPU cache level in sysfs
    on the CPU (32 MiB when there is none)."""
    if device.type == "cuda":
        return int(getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 50 << 20))
    best = 0
    base = "/sys/devices/system/cpu/cpu0/cache"
    try:
        for d in os.listdir(base):
            with open(os.path.join(base, d, "size")) as f:
                s = f.read().strip()
            mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(s[-1], 1)
            best = max(best, int(s.rstrip("KMG")) * mult)
    except OSError:
        pass
    return best or (32 << 20)


# ----------------------------------------------------------------------------- environment
def resolve_device(name: Optional[str]) -> torch.device:
    if name in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("taps_fast.bench: --device cuda, but CUDA is not available here")
    return dev


def resolve_dtype(name: Optional[str], device: torch.device) -> torch.dtype:
    """float32 on CPU; bfloat16 on CUDA (the usual training dtype there), unless given."""
    if name in (None, "auto"):
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return DTYPE_BY_NAME[name]


def dtype_name(dtype: torch.dtype) -> str:
    """torch.bfloat16 -> 'bfloat16'."""
    return str(dtype).replace("torch.", "")


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return platform.processor() or platform.machine() or "cpu"


def selected_backends(device: torch.device, dtype: torch.dtype) -> Dict[str, str]:
    """The backend each op would use here (honouring a forced backend), or why none can."""
    from .. import dispatch

    out = {}
    for op in dispatch.OPS:
        try:
            out[op] = dispatch.select(op, device=device, dtype=dtype, groups=1).name
        except dispatch.NoBackendError as e:
            out[op] = f"none ({e})"
    return out


def environment(device: torch.device) -> Dict[str, object]:
    """Versions, the machine, the thread count, the date and the load at the start."""
    import taps_fast

    env: Dict[str, object] = {
        "taps_fast": taps_fast.__version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "device": str(device),
        "device_name": device_name(device),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "date": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
    }
    try:
        import timm

        env["timm"] = timm.__version__
    except ImportError:
        env["timm"] = None
    if hasattr(os, "getloadavg"):
        env["loadavg_1min_at_start"] = os.getloadavg()[0]
    if device.type == "cuda":
        env["cuda"] = torch.version.cuda
        env["cudnn"] = torch.backends.cudnn.version()
    return env


# ----------------------------------------------------------------------------- running and writing
def progress_printer(quiet: bool) -> Callable[..., None]:
    """``say(*parts)``: a progress line on stderr, or nothing when ``quiet``."""
    if quiet:
        return lambda *a: None
    return lambda *a: print(*a, file=sys.stderr, flush=True)


def measure(run: Callable, args) -> dict:
    """``run(args, say)``'s record with ``elapsed_s`` (wall seconds) and ``arguments`` added."""
    t0 = time.perf_counter()
    rec = run(args, progress_printer(args.quiet))
    rec["elapsed_s"] = time.perf_counter() - t0
    rec["arguments"] = vars(args)
    return rec


def default_out_path(prefix: str, device: torch.device, now: Optional[_dt.datetime] = None) -> str:
    """benchmarks/results/<prefix>_<device type>_<YYYYmmdd-HHMMSS>.json."""
    now = now or _dt.datetime.now()
    return os.path.join(RESULTS_DIR, f"{prefix}_{device.type}_{now.strftime('%Y%m%d-%H%M%S')}.json")


def _json_safe(v):
    """The value with every non-finite float (inf, NaN: not JSON) replaced by None."""
    if isinstance(v, float):
        return v if math.isfinite(v) else None
    if isinstance(v, dict):
        return {k: _json_safe(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_json_safe(x) for x in v]
    return v


def write_record(rec: dict, out: Optional[str], prefix: str, now: Optional[_dt.datetime] = None) -> str:
    """Write a suite's record as indented JSON to ``out`` (default :func:`default_out_path` for
    the record's device, stamped ``now`` or the current time); returns the path. Values JSON has no
    form for are written as their str(); non-finite floats as null."""
    out = out or default_out_path(prefix, torch.device(rec["environment"]["device"]), now)
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "w") as f:
        json.dump(_json_safe(rec), f, indent=2, default=str)
        f.write("\n")
    return out
