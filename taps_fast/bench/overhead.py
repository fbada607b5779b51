"""Overhead suite: ``taps-fast bench --suite overhead`` (or ``python -m taps_fast.bench --suite overhead``).

Is taps_fast ever slower than the code it replaces? Every row times a taps_fast path side by side
with its baseline (interleaved rounds: one sample of each in turn, so drifts of the shared machine
hit both alike), reports the medians, their ratio and the target, and says whether it is met.
Six row groups (``--rows``):

- ``overhead``, per-call host overhead: shapes so small that the math is negligible, so the time
  is the Python and dispatch around it. One thread (torch.set_num_threads(1)), eager,
  torch.inference_mode. TAPSLinear 64→64 on M = 1 row (gate open, and gate closed) against
  nn.Linear 64→64; TAPSConv2d 16→16 3×3 pad 1 on 1×16×8×8 (open, closed) against nn.Conv2d. A
  sample is a loop of 200 calls (µs figures need many calls to be stable); reported in µs per
  call. Target ≤ 1.5× nn's.
- ``fwdbwd``, forward + backward per call, the same shapes and thread count: the TAPS layer is
  TAPSLinear.from_module(nn.Linear(...)) (W frozen; ΔW, s and b trainable), the baseline the
  nn layer with every parameter trainable; x requires grad; one call = y = layer(x),
  y.backward(dy) with a fixed dy of ones, then every gradient (x's included) set to None. A
  sample is a loop of 50 calls. Target ≤ 2.0×.
- ``train``, a training step on the machine's default thread count: resnet50 and
  vit_small_patch16_224, batch 8 at 160 px (the models suite's create_model / prepare_taps /
  train_step, sparsity penalty λ = 0.5 on the TAPS steps), providers ``plain`` (full fine-tuning),
  ``authors`` (models.authors_style: W + g·ΔW formed by autograd in every forward, ordinary
  conv / linear, on the same tensors) and ``taps``; every gate open (the start of training) and
  half of them closed. Targets: taps ≤ 1.00× authors and ≤ 1.03× plain.
- ``serving``, few-row serving through the modules (not the op alone), default thread count:
  L TAPSLinear layers N = K = 3072 fp32 with distinct weights, gates open, inference_mode, one
  call = the same M = 1 row through each of the L layers. It is memory-bound: the bytes that must move are W and ΔW of
  every layer once, 2·L·N·K·4 bytes (x, b and y are negligible). The floor is one read-only pass
  over those same tensors, timed in the same rounds, in two forms:
  ``sum`` (torch.sum of each tensor) and ``mv`` (torch.mv of each tensor with a ones vector, the
  GEMV a layer runs); the faster median is the floor, and the row names it. Which is faster
  depends on the load: on a 2-core x86_64, no GPU, torch 2.14.1, ``sum`` when the machine is idle
  (24.8 ms against 41.9 ms for 8 layers), ``mv`` when another process holds a core (45–51 ms
  against 127–130 ms: the two-thread reduction suffers most from the contention). L is 8, or
  more when 8 layers' W and ΔW would not exceed 4× the last-level cache
  (harness.last_level_cache_bytes), so that the bytes come from memory, not cache (8 layers are
  604 MB = 576 MiB: enough on any CPU with up to 151 MB of cache). Target ≤ 1.2× the floor.
- ``mixed``, one mixed-task batch, inference: taps_fast.MultiTaskModel against the loop over merged
  copies (multitask.py's providers ``taps`` and ``merged``, its task files and its check that the
  two agree): resnet50 at 160 px and vit_small_patch16_224 at 224 px, T = 16 tasks, batch 32, a
  quarter of the gated layers open per task. Targets: time ≤ 1.05× the copies', weights held
  (each storage once) ≤ 0.35× the copies'.
- ``infer``, inference with every gate open, unmerged (as while training or evaluating): the taps
  model against the plain one, eval, inference_mode, batch 8 at 160 px. Target ≤ 1.05×.

``--quick`` shrinks every group (test_resnet / test_vit at 32 px, batch 2, T = 3, N = K = 256,
few samples) so the whole suite runs in seconds: a smoke test. Its ratios are computed alike but
mean nothing (the serving buffers then sit in cache). The suite always exits 0 (it is a report);
its last table line says how many targets were met. JSON: benchmarks/results/overhead_<device>_<time>.json.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import math
import tempfile
from dataclasses import asdict, dataclass, field
from typing import Callable, Dict, Iterator, List, Optional, Sequence

import torch
import torch.nn as nn

from . import models as bench_models
from . import multitask as bench_multitask
from .harness import (
    Stats,
    environment,
    last_level_cache_bytes,
    measure,
    resolve_device,
    selected_backends,
    sync_for,
    time_interleaved,
    write_record,
)

GROUPS = ("overhead", "fwdbwd", "train", "serving", "mixed", "infer")
TARGET_OVERHEAD = 1.5  # eager inference call ≤ 1.5x nn's
TARGET_FWDBWD = 2.0  # forward + backward ≤ 2x nn's
TARGET_TRAIN_AUTHORS = 1.00  # training step ≤ the authors' style
TARGET_TRAIN_PLAIN = 1.03  # training step ≤ 1.03x full fine-tuning
TARGET_SERVING = 1.2  # few-row serving ≤ 1.2x one read-only pass over W and ΔW
TARGET_MIXED_TIME = 1.05  # mixed batch ≤ 1.05x the loop over merged copies
TARGET_MIXED_WEIGHTS = 0.35  # weights held ≤ 0.35x the copies'
TARGET_INFER = 1.05  # unmerged inference, every gate open, ≤ 1.05x plain
DTYPE = torch.float32


@dataclass
class Settings:
    """The sizes of one run: the full suite, or ``--quick``'s tiny ones."""

    calls_overhead: int = 200  # calls per timed sample, per-call rows
    calls_fwdbwd: int = 50
    repeats_per_call: int = 30  # samples per provider
    # A 2-core x86_64 machine without a GPU drifts by ±5% between runs of the same model step, so
    # the model-sized groups take more samples than the models suite's 10.
    repeats_model: int = 15
    repeats_serving: int = 15
    repeats_mixed: int = 9
    models: Sequence[str] = ("resnet50", "vit_small_patch16_224")
    batch: int = 8
    resolution: int = 160
    serving_nk: int = 3072
    serving_layers: int = 8
    serving_fit_cache: bool = True  # raise the layer count until W and ΔW exceed 4x the LLC
    mixed_tasks: int = 16
    mixed_batch: int = 32
    mixed_open_frac: float = 0.25
    mixed_resolution: Optional[int] = None  # None: multitask.py's per-model sizes


QUICK = Settings(calls_overhead=20, calls_fwdbwd=5, repeats_per_call=3, repeats_model=2, repeats_serving=2,
                 repeats_mixed=2, models=("test_resnet", "test_vit"), batch=2, resolution=32, serving_nk=256,
                 serving_layers=4, serving_fit_cache=False, mixed_tasks=3, mixed_batch=6, mixed_resolution=32)


# ----------------------------------------------------------------------------- rows and table
@dataclass
class Row:
    """One comparison: ``provider``'s median against ``baseline``'s, measured in the same rounds."""

    group: str
    name: str
    provider: str
    median: float
    baseline: str
    baseline_median: float
    unit: str  # "µs" (per call), "ms" (per step / call), "MiB" (weights held)
    target: Optional[float]  # the ratio must be ≤ target; None: shown for reference, not a target
    ratio: float = 0.0
    met: Optional[bool] = None
    extra: Dict[str, object] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.ratio = self.median / self.baseline_median if self.baseline_median > 0 else float("inf")
        self.met = None if self.target is None else bool(self.ratio <= self.target)


def _fmt(v: float, unit: str) -> str:
    return f"{v:.3g} {unit}" if v < 100 else f"{v:.0f} {unit}"


def format_table(rows: Sequence[Row]) -> str:
    """One line per row: the row, provider and median, baseline and median, ratio, target, met."""
    head = ("group", "row", "provider", "median", "baseline", "median", "ratio", "target", "met")
    body = [(r.group, r.name, r.provider, _fmt(r.median, r.unit), r.baseline, _fmt(r.baseline_median, r.unit),
             f"{r.ratio:.3f}", "-" if r.target is None else f"≤ {r.target:.2f}",
             "-" if r.met is None else ("yes" if r.met else "NO")) for r in rows]
    widths = [max([len(h)] + [len(b[i]) for b in body]) for i, h in enumerate(head)]
    right = {3, 5, 6}

    def line(cells) -> str:
        return "  ".join(c.rjust(w) if i in right else c.ljust(w)
                         for i, (c, w) in enumerate(zip(cells, widths))).rstrip()

    return "\n".join([line(head), line("-" * w for w in widths)] + [line(b) for b in body])


def summary_line(rows: Sequence[Row]) -> str:
    targets = [r for r in rows if r.target is not None]
    return f"{sum(bool(r.met) for r in targets)} of {len(targets)} targets met"


@contextlib.contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """torch's intra-op thread count set to ``n`` inside the block, restored after."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _per_call_us(stats: Stats, calls: int) -> float:
    return stats.median / calls * 1e3


# ----------------------------------------------------------------------------- per-call layers
def small_layers(device: torch.device,
                 closed_score: float = bench_models.CLOSED_SCORE) -> Dict[str, Dict[str, nn.Module]]:
    """kind -> {"nn": the nn layer, "open": TAPS, gate open, "closed": TAPS, gate closed}, each
    built from its own seeded nn layer (TAPS layers via from_module: W frozen, ΔW ~ N(0, 1e-3²))."""
    from ..modules import TAPSConv2d, TAPSLinear

    def build(kind: str) -> nn.Module:
        torch.manual_seed(0)
        if kind == "linear":
            return nn.Linear(64, 64)
        return nn.Conv2d(16, 16, 3, padding=1)

    out: Dict[str, Dict[str, nn.Module]] = {}
    for kind, cls in (("linear", TAPSLinear), ("conv", TAPSConv2d)):
        layers = {"nn": build(kind)}
        for state in ("open", "closed"):
            m = cls.from_module(build(kind))
            with torch.no_grad():
                m.delta.normal_(0.0, bench_models.DELTA_STD)
                if state == "closed":
                    m.score.fill_(closed_score)
            layers[state] = m
        out[kind] = {k: v.to(device=device, dtype=DTYPE) for k, v in layers.items()}
    return out


LAYER_NAMES = {"linear": ("TAPSLinear 64→64, M=1", "nn.Linear"),
               "conv": ("TAPSConv2d 16→16 3×3 on 1×16×8×8", "nn.Conv2d")}


def _small_input(kind: str, device: torch.device) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    shape = (1, 64) if kind == "linear" else (1, 16, 8, 8)
    return torch.randn(shape, generator=g).to(device=device, dtype=DTYPE)


def _per_call_rows(group: str, kind: str, what: str, stats: Dict[str, Stats], calls: int, repeats: int,
                   target: float) -> List[Row]:
    """The gate-open and gate-closed rows of one layer kind: µs per call against the nn layer."""
    name, base = LAYER_NAMES[kind]
    return [Row(group, f"{name}, gate {state}, {what}", "taps", _per_call_us(stats[state], calls), base,
                _per_call_us(stats["nn"], calls), "µs", target, extra={"calls_per_sample": calls, "samples": repeats})
            for state in ("open", "closed")]


def run_overhead(st: Settings, device: torch.device, repeats: int, say) -> List[Row]:
    """Eager inference calls, one thread: µs per call of each TAPS layer against its nn layer."""
    rows: List[Row] = []
    sync, n = sync_for(device), st.calls_overhead
    for kind, layers in small_layers(device).items():
        x = _small_input(kind, device)
        say(f"overhead: {kind}, {repeats} samples of {n} calls")

        def loop(m: nn.Module) -> Callable[[], None]:
            def calls() -> None:
                for _ in range(n):
                    m(x)
            return calls

        with torch_threads(1), torch.inference_mode():
            stats = time_interleaved({k: loop(m) for k, m in layers.items()}, repeats, warmup=1, sync=sync)
        rows += _per_call_rows("overhead", kind, "inference", stats, n, repeats, TARGET_OVERHEAD)
    return rows


def run_fwdbwd(st: Settings, device: torch.device, repeats: int, say) -> List[Row]:
    """Forward + backward per call, one thread: TAPS (W frozen) against nn (all trainable)."""
    rows: List[Row] = []
    sync, n = sync_for(device), st.calls_fwdbwd
    for kind, layers in small_layers(device).items():
        x = _small_input(kind, device).requires_grad_(True)
        dy = torch.ones_like(layers["nn"](x.detach()))
        say(f"fwdbwd: {kind}, {repeats} samples of {n} calls")

        def loop(m: nn.Module) -> Callable[[], None]:
            leaves = [x] + [p for p in m.parameters() if p.requires_grad]

            def calls() -> None:
                for _ in range(n):
                    m(x).backward(dy)
                    for t in leaves:
                        t.grad = None
            return calls

        with torch_threads(1):
            stats = time_interleaved({k: loop(m) for k, m in layers.items()}, repeats, warmup=1, sync=sync)
        rows += _per_call_rows("fwdbwd", kind, "forward + backward", stats, n, repeats, TARGET_FWDBWD)
    return rows


# ----------------------------------------------------------------------------- models: train and infer
def run_models(st: Settings, groups: Sequence[str], device: torch.device, repeats: int, lam: float,
               say) -> List[Row]:
    """The ``train`` and ``infer`` groups, per model (built once for both)."""
    rows: List[Row] = []
    sync = sync_for(device)
    for arch in st.models:
        say(f"{arch}: building")
        torch.manual_seed(bench_models.SEED)
        plain = bench_models.create_model(arch, st.resolution).to(device=device, dtype=DTYPE)
        n_classes = getattr(plain, "num_classes", 1000) or 1000
        g = torch.Generator().manual_seed(bench_models.SEED)
        x = torch.randn(st.batch, 3, st.resolution, st.resolution, generator=g).to(device=device, dtype=DTYPE)
        y = torch.randint(0, n_classes, (st.batch,), generator=g).to(device)
        where = f"{arch}, batch {st.batch}, {st.resolution} px"
        opened = bench_models.prepare_taps(plain, 1.0)
        if "train" in groups:
            for frac in (1.0, 0.5):
                taps = opened if frac == 1.0 else bench_models.prepare_taps(plain, frac)
                authors = bench_models.authors_style(taps)
                say(f"{arch}: train, {frac:.0%} of the gates open")
                stats = time_interleaved({
                    "plain": lambda m=plain: bench_models.train_step(m, x, y),
                    "authors": lambda m=authors: bench_models.train_step(m, x, y, lam=lam),
                    "taps": lambda m=taps: bench_models.train_step(m, x, y, lam=lam),
                }, repeats, warmup=1, sync=sync)
                med = {k: s.median for k, s in stats.items()}
                name = f"train step, {where}, {frac:.0%} of the gates open"
                rows += [Row("train", name, "taps", med["taps"], "authors", med["authors"], "ms", TARGET_TRAIN_AUTHORS),
                         Row("train", name, "taps", med["taps"], "plain", med["plain"], "ms", TARGET_TRAIN_PLAIN),
                         Row("train", name, "authors", med["authors"], "plain", med["plain"], "ms", None)]
                del authors, taps
        if "infer" in groups:
            say(f"{arch}: inference, every gate open")
            stats = time_interleaved({"plain": lambda m=plain: bench_models.infer_step(m, x),
                                      "taps": lambda m=opened: bench_models.infer_step(m, x)},
                                     repeats, warmup=1, sync=sync)
            rows.append(Row("infer", f"inference, {where}, every gate open, unmerged", "taps",
                            stats["taps"].median, "plain", stats["plain"].median, "ms", TARGET_INFER))
        del plain, opened
    return rows


# ----------------------------------------------------------------------------- few-row serving
def serving_layer_count(nk: int, layers: int, llc: int, fit_cache: bool) -> int:
    """``layers``, raised (when ``fit_cache``) until their W and ΔW exceed 4x the last-level cache."""
    per_layer = 2 * nk * nk * torch.tensor([], dtype=DTYPE).element_size()
    if fit_cache:
        layers = max(layers, math.floor(4 * llc / per_layer) + 1)
    return layers


def run_serving(st: Settings, device: torch.device, repeats: int, llc: int, say) -> List[Row]:
    """L TAPSLinear layers, M = 1, gates open: the modules against one read-only pass over W, ΔW."""
    from ..modules import TAPSLinear

    nk = st.serving_nk
    L = serving_layer_count(nk, st.serving_layers, llc, st.serving_fit_cache)
    say(f"serving: {L} layers N=K={nk}")
    torch.manual_seed(0)
    layers = []
    for _ in range(L):
        m = TAPSLinear(nk, nk, device=device, dtype=DTYPE)
        with torch.no_grad():
            m.delta.uniform_(-1e-2 * nk ** -0.5, 1e-2 * nk ** -0.5)
        layers.append(m.eval())
    x = torch.randn(1, nk, generator=torch.Generator().manual_seed(1)).to(device=device, dtype=DTYPE)
    tensors = [t for m in layers for t in (m.weight, m.delta)]
    ones = torch.ones(nk, device=device, dtype=DTYPE)
    fns = {
        "taps": lambda ms=layers: [m(x) for m in ms],
        "sum": lambda ts=tensors: [torch.sum(t) for t in ts],
        "mv": lambda ts=tensors: [torch.mv(t, ones) for t in ts],
    }
    with torch.inference_mode():
        stats = time_interleaved(fns, repeats, warmup=1, sync=sync_for(device))
    floor = min(("sum", "mv"), key=lambda k: stats[k].median)
    nbytes = sum(t.numel() * t.element_size() for t in tensors)
    extra = {"layers": L, "N": nk, "K": nk, "bytes": nbytes, "last_level_cache_bytes": llc,
             "floor_form": floor, "floor_ms": {k: stats[k].median for k in ("sum", "mv")},
             "taps_GBps": nbytes / (stats["taps"].median * 1e-3) / 1e9}
    del layers, tensors
    return [Row("serving", f"{L} TAPSLinear N=K={nk} fp32, M=1, gates open ({nbytes / 2**20:.0f} MiB)", "taps",
                stats["taps"].median, f"floor ({floor})", stats[floor].median, "ms", TARGET_SERVING, extra=extra)]


# ----------------------------------------------------------------------------- mixed batch
def run_mixed(st: Settings, device: torch.device, repeats: int, say) -> List[Row]:
    """MultiTaskModel against the loop over merged copies, through multitask.py's run_model."""
    rows: List[Row] = []
    args = argparse.Namespace(tasks=st.mixed_tasks, open_frac=st.mixed_open_frac, batch=st.mixed_batch,
                              providers=["merged", "taps"], repeats=repeats, warmup=1, rss=False)
    saved = dict(bench_multitask.RESOLUTION)
    if st.mixed_resolution is not None:
        bench_multitask.RESOLUTION.update({a: st.mixed_resolution for a in st.models})
    try:
        with tempfile.TemporaryDirectory(prefix="taps_overhead_mixed_") as folder:
            for arch in st.models:
                say(f"mixed: {arch}, T={st.mixed_tasks}, batch {st.mixed_batch}")
                got = {r["provider"]: r for r in bench_multitask.run_model(arch, args, device, DTYPE, folder)}
                taps, merged = got["taps"], got["merged"]
                name = (f"mixed batch, {arch} {taps['resolution']} px, T={st.mixed_tasks}, batch {st.mixed_batch}, "
                        f"{st.mixed_open_frac:.0%} open per task")
                extra = {"tasks_present": taps["tasks_present"]}
                rows.append(Row("mixed", name + ", time", "taps", taps["median_ms"], "merged copies",
                                merged["median_ms"], "ms", TARGET_MIXED_TIME, extra=extra))
                rows.append(Row("mixed", name + ", weights held", "taps", taps["weight_bytes"] / 2**20,
                                "merged copies", merged["weight_bytes"] / 2**20, "MiB", TARGET_MIXED_WEIGHTS,
                                extra=extra))
    finally:
        bench_multitask.RESOLUTION.clear()
        bench_multitask.RESOLUTION.update(saved)
    return rows


# ----------------------------------------------------------------------------- the suite
def run(args: argparse.Namespace, say: Callable[..., None] = lambda *a: None) -> dict:
    """Measure the row groups of ``args.rows``; ``say`` receives progress lines."""
    st = copy.copy(QUICK if args.quick else Settings())
    if args.models:
        st.models = tuple(args.models)
    device = resolve_device(args.device)
    default_threads = torch.get_num_threads()
    llc = last_level_cache_bytes(device)
    env = environment(device)

    def reps(default: int) -> int:
        return args.repeats or default

    rows: List[Row] = []
    if "overhead" in args.rows:
        rows += run_overhead(st, device, reps(st.repeats_per_call), say)
    if "fwdbwd" in args.rows:
        rows += run_fwdbwd(st, device, reps(st.repeats_per_call), say)
    if "train" in args.rows or "infer" in args.rows:
        rows += run_models(st, args.rows, device, reps(st.repeats_model), args.lam, say)
    if "serving" in args.rows:
        rows += run_serving(st, device, reps(st.repeats_serving), llc, say)
    if "mixed" in args.rows:
        rows += run_mixed(st, device, reps(st.repeats_mixed), say)
    rows.sort(key=lambda r: GROUPS.index(r.group))
    targets = [r for r in rows if r.target is not None]
    return {"environment": env, "default_threads": default_threads, "last_level_cache_bytes": llc,
            "backends": selected_backends(device, DTYPE), "settings": asdict(st), "dtype": "float32",
            "summary": {"met": sum(bool(r.met) for r in targets), "targets": len(targets)},
            "rows": [asdict(r) for r in rows], "_rows": rows}


def _csv(s: str) -> List[str]:
    return [p.strip() for p in s.split(",") if p.strip()]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="taps-fast bench --suite overhead",
        description="Every taps_fast path side by side with the naive code it replaces: one table of "
                    "medians, ratios and targets (the row groups: taps_fast/bench/overhead.py's "
                    "docstring, docs/benchmarks.md).")
    p.add_argument("--suite", default="overhead", choices=["overhead"], help=argparse.SUPPRESS)
    p.add_argument("--rows", type=_csv, default=",".join(GROUPS),
                   help=f"comma-separated row groups (default all): {', '.join(GROUPS)}")
    p.add_argument("--repeats", type=int, default=None,
                   help="timed samples per provider in every group (default: 30 per-call, 15 train / "
                        "infer, 15 serving, 9 mixed)")
    p.add_argument("--models", type=_csv, default=None,
                   help="timm models of the train, infer and mixed groups (default resnet50,vit_small_patch16_224)")
    p.add_argument("--lam", type=float, default=bench_models.DEFAULT_LAM,
                   help="sparsity penalty weight of the taps and authors train steps (default %(default)s)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                   help="default auto: CUDA when present, else the CPU")
    p.add_argument("--quick", action="store_true",
                   help="tiny models and shapes, few samples (a smoke test: the ratios mean nothing)")
    p.add_argument("--out", default=None, help="JSON path (default benchmarks/results/overhead_<device>_<time>.json)")
    p.add_argument("--quiet", action="store_true", help="no progress lines")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = build_parser()
    args = p.parse_args(argv)
    bad = [g for g in args.rows if g not in GROUPS]
    if bad or not args.rows:
        p.error(f"--rows: unknown {bad}; choose from {', '.join(GROUPS)}")
    if args.repeats is not None and args.repeats < 1:
        p.error("--repeats must be >= 1")
    rec = measure(run, args)
    rows = rec.pop("_rows")
    env = rec["environment"]
    print(f"device={env['device']} ({env.get('device_name')})  torch={env['torch']}  dtype=float32  "
          f"threads: 1 (overhead, fwdbwd), {rec['default_threads']} (the rest)  "
          f"last-level cache {rec['last_level_cache_bytes'] >> 20} MiB  quick={args.quick}")
    print(format_table(rows))
    print(summary_line(rows))
    out = write_record(rec, args.out, "overhead")
    print(f"wrote {out} ({rec['elapsed_s']:.0f} s)")
    return 0
