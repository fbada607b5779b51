"""Serving benchmark: ``taps-fast bench --suite serve`` (or ``python -m taps_fast.bench --suite serve``).

One HTTP stack (taps_fast.serve: FastAPI + uvicorn, the same batcher settings) in front of three
systems, each in its own server process, driven by the same seeded request stream (JPEG bodies,
zipf(1.0) task popularity over T tasks, a quarter of the gated layers open per task):

- ``taps``: this server: a MultiTaskModel holding every task, mixed-task batches.
- ``merged_equal``: per-task batching (``max_tasks_per_batch=1``) over merged per-task models
  (W + ΔW, the task's norms and head: a full copy of the model per task) with an LRU of at most
  K models resident, K chosen so that it holds the bytes ``taps`` holds: the multiplexing
  pattern of general model servers.
- ``merged_all``: the same with every task's merged model resident.
- ``base``: the base model alone, every request sent to "base": the upper bound.

Per system: throughput at saturation (closed loop, ``--concurrency`` requests in flight), then
open-loop Poisson arrivals at 50% and 80% of ``base``'s saturation throughput (p50 / p99 latency,
from each request's scheduled send time, and the requests refused or failed), the bytes of model
weights the server holds, and the server process's peak RSS. The load generator (httpx, asyncio)
runs in this process; each server runs its model on ``--threads`` torch threads.
"""
from __future__ import annotations

import argparse
import asyncio
import copy
import io
import math
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time
from typing import Dict, List, Optional, Sequence

import torch
import torch.nn as nn

from .harness import environment, write_record
from .multitask import RESOLUTION, make_base, merged_copy, resolution, weight_bytes, write_tasks

MODELS = {"resnet18": 128, "vit_tiny_patch16_224": 128}
SYSTEMS = ("base", "taps", "merged_equal", "merged_all")


# ----------------------------------------------------------------------------- the per-task-model baseline
class PreparedModel:
    """A merged per-task model, read and built on the loader thread (the engine's PreparedTask)."""

    def __init__(self, name: str, model: nn.Module, nbytes: int) -> None:
        self.name, self.plan, self.nbytes, self.labels = name, model, nbytes, None


class MergedModels(nn.Module):
    """What the engine drives for ``merged_*``: one merged copy of the model per resident task
    (taps_fast.serve's task API over a dict of models). A batch must be task-pure
    (``max_tasks_per_batch=1``); "base" rows run the base."""

    def __init__(self, base: nn.Module) -> None:
        from ..checkpoint import base_fingerprint
        from ..convert import convert, resolve_head

        super().__init__()
        self.base = base.eval()
        self.fingerprint = base_fingerprint(convert(copy.deepcopy(base)))
        self.head = resolve_head(base)[0]
        self.models: Dict[str, nn.Module] = {}

    @property
    def tasks(self) -> List[str]:
        return list(self.models)

    def prepare_task(self, name: str, path: str) -> PreparedModel:
        from ..checkpoint import TaskFile

        p = next(self.base.parameters())
        tensors = {k: v.to(p.device, p.dtype) if v.is_floating_point() else v
                   for k, v in TaskFile(path).read_tensors().items()}
        model = merged_copy(self.base, tensors, self.head)
        return PreparedModel(name, model, weight_bytes([model]))

    def add_prepared(self, prepared: PreparedModel) -> None:
        self.models[prepared.name] = prepared.plan

    def remove_task(self, name: str) -> None:
        del self.models[name]

    def task_bytes(self, name: str) -> int:
        return weight_bytes([self.models[name]])

    def task_labels(self, name: str):
        return None

    def num_outputs(self, task: str) -> int:
        m = self.base if task == "base" else self.models[task]
        return m.get_classifier().out_features

    def pool_stats(self) -> Dict[str, int]:
        used = sum(self.task_bytes(n) for n in self.models)
        return {"tasks": len(self.models), "rows": len(self.models), "free_rows": 0, "delta_slots": 0,
                "delta_slots_used": 0, "bytes_allocated": used, "bytes_used": used}

    def weight_bytes(self) -> int:
        return weight_bytes([self.base] + list(self.models.values()))

    def forward(self, x, names):
        if len(set(names)) != 1:
            raise ValueError("MergedModels runs task-pure batches only (max_tasks_per_batch=1)")
        return (self.base if names[0] == "base" else self.models[names[0]])(x)


class BaseOnly(MergedModels):
    """The base model alone (no task can be added)."""

    def prepare_task(self, name: str, path: str):
        raise ValueError("the base-only server holds no task")


# ----------------------------------------------------------------------------- one server process
def serve_process(args) -> int:
    """``--_server SYSTEM``: run one system's server until SIGTERM (the parent drives it)."""
    import uvicorn

    from ..serve.app import create_app
    from ..serve.service import ServeConfig, Service

    torch.set_num_threads(args.threads)
    arch, system = args.models, args._server
    RESOLUTION[arch] = args.resolution
    base = make_base(arch, "cpu", torch.float32)
    cfg = ServeConfig(model=arch, img_size=args.resolution, tasks=[] if system == "base" else [args._tasks_dir],
                      task_budget_mb=args._budget_mb, host_cache_mb=0.0, max_batch=args.max_batch,
                      max_wait_ms=args.max_wait_ms, max_queue=args.max_queue,
                      max_tasks_per_batch=args.max_tasks_per_batch if system == "taps" else 1,
                      preload=system in ("taps", "merged_all"), pad_buckets=False)
    model = {"taps": None, "base": BaseOnly, "merged_equal": MergedModels, "merged_all": MergedModels}[system]
    service = Service(cfg, base=base, model=None if model is None else model(base))
    uvicorn.run(create_app(service), host="127.0.0.1", port=args._port, log_level="warning")
    return 0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(system: str, arch: str, args, tasks_dir: str, budget_mb: Optional[float]):
    import httpx

    port = free_port()
    cmd = [sys.executable, "-m", "taps_fast.bench", "--suite", "serve", "--_server", system, "--models", arch,
           "--resolution", str(resolution(arch)), "--threads", str(args.threads), "--max-batch", str(args.max_batch),
           "--max-wait-ms", str(args.max_wait_ms), "--max-tasks-per-batch", str(args.max_tasks_per_batch),
           "--max-queue", str(args.max_queue), "--_port", str(port), "--_tasks_dir", tasks_dir]
    if budget_mb is not None:
        cmd += ["--_budget_mb", repr(budget_mb)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the {system} server exited ({proc.returncode}): {proc.stderr.read()[-2000:]}")
        try:
            if httpx.get(url + "/healthz", timeout=1.0).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    proc.kill()
    raise RuntimeError(f"the {system} server did not start within 600 s")


def stop_server(proc) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def peak_rss_of(pid: int) -> Optional[int]:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


# ----------------------------------------------------------------------------- the request stream
def zipf_tasks(names: List[str], n: int, seed: int, s: float = 1.0) -> List[str]:
    """n draws from zipf(s) over ``names`` (rank i has weight 1 / (i+1)^s)."""
    rng = random.Random(seed)
    weights = [1.0 / (i + 1) ** s for i in range(len(names))]
    return rng.choices(names, weights, k=n)


def sample_jpegs(size: int, n: int = 8) -> List[bytes]:
    """``n`` JPEG photos of about ``size`` pixels a side: crops of scikit-learn's sample photos when
    it is installed, seeded noise otherwise."""
    from PIL import Image

    imgs = []
    try:
        from sklearn.datasets import load_sample_images

        photos = [Image.fromarray(a) for a in load_sample_images().images]
    except Exception:
        g = torch.Generator().manual_seed(0)
        photos = [Image.fromarray((torch.rand(256, 256, 3, generator=g) * 255).byte().numpy())]
    rng = random.Random(0)
    for i in range(n):
        p = photos[i % len(photos)]
        side = min(p.size) // 2
        x, y = rng.randrange(p.width - side), rng.randrange(p.height - side)
        crop = p.crop((x, y, x + side, y + side)).resize((size + size // 7, size + size // 7))
        buf = io.BytesIO()
        crop.save(buf, format="JPEG", quality=90)
        imgs.append(buf.getvalue())
    return imgs


async def _post(client, url: str, task: str, body: bytes):
    t = time.perf_counter()
    try:
        r = await client.post(f"{url}/v1/tasks/{task}/predict", content=body,
                              headers={"content-type": "image/jpeg"})
        status = r.status_code
    except Exception:
        status = -1
    return status, time.perf_counter() - t


async def closed_loop(url: str, tasks: List[str], images: List[bytes], concurrency: int, warmup_s: float,
                      seconds: float) -> Dict:
    """``concurrency`` clients, each sending its next request when the last is answered."""
    import httpx

    it = iter(range(10 ** 9))
    done: List[float] = []
    errors = [0]
    t_start = time.perf_counter()
    t_measure, t_end = t_start + warmup_s, t_start + warmup_s + seconds
    limits = httpx.Limits(max_connections=concurrency + 8, max_keepalive_connections=concurrency + 8)
    async with httpx.AsyncClient(limits=limits, timeout=120.0) as client:
        async def worker():
            while True:
                i = next(it)
                status, _ = await _post(client, url, tasks[i % len(tasks)], images[i % len(images)])
                now = time.perf_counter()
                if now >= t_end:
                    return
                if now >= t_measure:
                    if status == 200:
                        done.append(now)
                    else:
                        errors[0] += 1

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return {"throughput_rps": len(done) / seconds, "errors": errors[0]}


async def open_loop(url: str, tasks: List[str], images: List[bytes], rate: float, seconds: float, seed: int) -> Dict:
    """Poisson arrivals at ``rate`` per second for ``seconds``; latency from each request's
    scheduled send time (so a client that falls behind is charged to the server it waits on)."""
    import httpx

    rng = random.Random(seed)
    lat: List[float] = []
    status_counts: Dict[int, int] = {}
    pending = []
    limits = httpx.Limits(max_connections=2048, max_keepalive_connections=512)
    async with httpx.AsyncClient(limits=limits, timeout=120.0) as client:
        async def one(i: int, due: float):
            status, _ = await _post(client, url, tasks[i % len(tasks)], images[i % len(images)])
            status_counts[status] = status_counts.get(status, 0) + 1
            if status == 200:
                lat.append(time.perf_counter() - due)

        t0 = time.perf_counter()
        t, i = 0.0, 0
        while True:
            t += rng.expovariate(rate)
            if t >= seconds:
                break
            delay = t0 + t - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            pending.append(asyncio.ensure_future(one(i, t0 + t)))
            i += 1
        await asyncio.gather(*pending)
    lat.sort()
    def q(p):
        return (lat[min(len(lat) - 1, int(math.ceil(p * len(lat))) - 1)] * 1e3 if lat else float("nan"))
    return {"rate_rps": rate, "sent": i, "ok": len(lat), "status": status_counts, "p50_ms": q(0.50),
            "p99_ms": q(0.99)}


# ----------------------------------------------------------------------------- one model, one T
def run_case(arch: str, T: int, args, say) -> List[dict]:
    from ..checkpoint import TaskFile

    rows: List[dict] = []
    with tempfile.TemporaryDirectory(prefix="taps_serve_bench_") as folder:
        paths = write_tasks(arch, T, args.open_frac, folder)
        names = [os.path.basename(p)[: -len(".safetensors")] for p in paths]
        stream = zipf_tasks(names, 200_000, seed=args.seed)
        images = sample_jpegs(resolution(arch))
        # bytes: the plain model, one merged copy, each task's own bytes (what taps adds per task)
        base = make_base(arch, "cpu", torch.float32)
        model_bytes = weight_bytes([base])
        del base
        sizes = {n: os.path.getsize(p) for n, p in zip(names, paths)}
        TaskFile(paths[0])  # the files are readable before servers start
        results: Dict[str, dict] = {}
        for system in SYSTEMS:
            budget_mb = None
            if system == "merged_equal":
                held = results["taps"]["model_bytes"] - model_bytes  # what taps holds beyond the base
                k = max(1, round(held / model_bytes))  # the nearest K: bytes as equal as whole models allow
                budget_mb = (k * model_bytes + 1) / 2 ** 20
            say(f"  {arch} T={T} {system}: starting")
            proc, url = start_server(system, arch, args, folder, budget_mb)
            try:
                req_tasks = ["base"] * len(stream) if system == "base" else stream
                sat = asyncio.run(closed_loop(url, req_tasks, images, args.concurrency, args.warmup_s, args.seconds))
                say(f"  {arch} T={T} {system}: saturation {sat['throughput_rps']:.1f} req/s")
                if system == "base":
                    cap = sat["throughput_rps"]
                open_runs = []
                for frac in args.loads:
                    res = asyncio.run(open_loop(url, req_tasks, images, frac * cap, args.seconds, args.seed + 1))
                    res["load_frac"] = frac
                    open_runs.append(res)
                    say(f"  {arch} T={T} {system}: {frac:.0%} of base: p50 {res['p50_ms']:.1f} ms, "
                        f"p99 {res['p99_ms']:.1f} ms, {res['ok']}/{res['sent']} ok")
                import httpx

                info = httpx.get(url + "/v1/tasks", timeout=30).json()
                rss = peak_rss_of(proc.pid)
            finally:
                stop_server(proc)
            row = dict(model=arch, tasks=T, system=system, resolution=resolution(arch),
                       throughput_rps=sat["throughput_rps"], saturation_errors=sat["errors"], open_loop=open_runs,
                       model_bytes=info["model_bytes"], resident_tasks=sum(t["resident"] for t in info["tasks"]),
                       peak_rss_bytes=rss, task_file_bytes=sum(sizes.values()))
            if system == "merged_equal":
                row["k_resident"] = k
            results[system] = row
            rows.append(row)
    a = results["taps"]
    for r in rows:
        r["throughput_vs_base"] = r["throughput_rps"] / results["base"]["throughput_rps"]
        r["taps_throughput_vs_this"] = a["throughput_rps"] / r["throughput_rps"]
        r["taps_bytes_vs_this"] = a["model_bytes"] / r["model_bytes"]
    return rows


def format_table(rows: List[dict]) -> str:
    head = ["model", "T", "system", "req/s sat", "taps vs it", "vs base", "p50@50%", "p99@50%", "p50@80%",
            "p99@80%", "ok@80%", "weights MB", "taps bytes vs it", "peak RSS MB"]
    out = [head]
    for r in rows:
        ol = {o["load_frac"]: o for o in r["open_loop"]}
        o5, o8 = ol.get(0.5, {}), ol.get(0.8, {})
        out.append([r["model"], str(r["tasks"]), r["system"] + (f" (K={r['k_resident']})" if "k_resident" in r else ""),
                    f"{r['throughput_rps']:.1f}", f"{r['taps_throughput_vs_this']:.2f}", f"{r['throughput_vs_base']:.2f}",
                    f"{o5.get('p50_ms', float('nan')):.0f}", f"{o5.get('p99_ms', float('nan')):.0f}",
                    f"{o8.get('p50_ms', float('nan')):.0f}", f"{o8.get('p99_ms', float('nan')):.0f}",
                    f"{o8.get('ok', 0)}/{o8.get('sent', 0)}", f"{r['model_bytes'] / 2**20:.0f}",
                    f"{r['taps_bytes_vs_this']:.2f}", f"{(r['peak_rss_bytes'] or 0) / 2**20:.0f}"])
    w = [max(len(t[i]) for t in out) for i in range(len(head))]
    return "\n".join("  ".join(c.rjust(wd) if i > 2 else c.ljust(wd) for i, (c, wd) in enumerate(zip(t, w)))
                     for t in out)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="taps-fast bench --suite serve", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--suite", default="serve", choices=["serve"], help=argparse.SUPPRESS)
    p.add_argument("--models", default=",".join(MODELS), help=f"timm models (random weights); sizes {MODELS}")
    p.add_argument("--resolution", type=int, default=None, help="image size for every model (default: per model)")
    p.add_argument("--tasks", default="8,64", help="comma-separated T values")
    p.add_argument("--open-frac", type=float, default=0.25)
    p.add_argument("--systems", default=",".join(SYSTEMS), help=argparse.SUPPRESS)
    p.add_argument("--max-batch", type=int, default=32)
    p.add_argument("--max-wait-ms", type=float, default=5.0)
    p.add_argument("--max-tasks-per-batch", type=int, default=16)
    p.add_argument("--max-queue", type=int, default=1024)
    p.add_argument("--concurrency", type=int, default=64, help="requests in flight at saturation")
    p.add_argument("--loads", default="0.5,0.8", help="open-loop rates, as fractions of base's saturation")
    p.add_argument("--seconds", type=float, default=8.0, help="measured seconds per phase")
    p.add_argument("--warmup-s", type=float, default=3.0)
    p.add_argument("--threads", type=int, default=1, help="torch threads of each server's model")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quiet", action="store_true")
    p.add_argument("--out", default=None, help="JSON path (default benchmarks/results/serve_cpu_<time>.json)")
    p.add_argument("--_server", default=None, help=argparse.SUPPRESS)
    p.add_argument("--_port", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--_tasks_dir", default=None, help=argparse.SUPPRESS)
    p.add_argument("--_budget_mb", type=float, default=None, help=argparse.SUPPRESS)
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = build_parser()
    args = p.parse_args(list(sys.argv[1:] if argv is None else argv))
    models = [m for m in args.models.split(",") if m]
    for m in models:
        RESOLUTION[m] = args.resolution or MODELS.get(m, 128)
    if args._server:
        args.resolution = RESOLUTION[args.models]
        return serve_process(args)
    args.loads = [float(v) for v in args.loads.split(",") if v]
    say = (lambda *a: None) if args.quiet else (lambda *a: print(*a, file=sys.stderr, flush=True))
    rows: List[dict] = []
    for arch in models:
        for T in [int(v) for v in args.tasks.split(",") if v]:
            rows += run_case(arch, T, args, say)
    env = environment(torch.device("cpu"))
    print(f"taps_fast serve bench: {env.get('device_name')}, float32, {args.threads} model thread(s) per server, "
          f"max batch {args.max_batch}, max wait {args.max_wait_ms} ms, zipf(1.0) tasks, "
          f"{args.open_frac:.0%} of layers open per task, torch {env['torch']}")
    print(format_table(rows))
    record = {"environment": env, "arguments": {k: v for k, v in vars(args).items() if not k.startswith("_")},
              "rows": rows}
    print(f"wrote {write_record(record, args.out, 'serve')}")
    return 0
