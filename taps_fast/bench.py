"""End-to-end benchmark: converted timm models against the plain model, training step and inference.

Run ``python -m taps_fast.bench`` (or ``taps-fast bench``); ``--help`` lists the options. With no
arguments it benchmarks resnet50 and vit_small_patch16_224 (random weights, nothing downloaded)
on the device present, prints a table of medians and ratios to the plain model and writes the
rows as JSON under ``benchmarks/results/``.

Providers, per model:

- ``plain``: the unconverted timm model. Train step = full fine-tuning (every parameter gets a
  gradient), the cost TAPS is measured against.
- ``taps``: a copy converted with :func:`taps_fast.convert`, deltas filled with small random values
  so the open path computes something real; ``--open-fraction`` closes the gates of a seeded
  random share of the layers (score below threshold), as late in training. Train step = forward +
  cross-entropy + :func:`taps_fast.sparsity_penalty` + backward.
- ``taps-merged`` (inference only): :func:`taps_fast.merge` of that copy: plain layers again, so it
  should run at the plain model's speed.

A train step is model.train(), forward, loss, backward, then zeroing the gradients (set_to_none);
no optimizer step. Inference is model.eval() under torch.inference_mode(). The providers of one
model and mode are timed interleaved (one step of each in turn per repeat), so slow drifts of
the machine (thermal, other processes) hit every provider alike; each repeat is one step.

Suites: "models" (the above); "kernels" (layer shapes against the floor and the machine's
ceilings: taps_fast/bench_kernels.py). Others are added to :data:`SUITES`.
"""
from __future__ import annotations

import argparse
import copy
import datetime as _dt
import json
import logging
import math
import os
import platform
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Dict, List, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

log = logging.getLogger("taps_fast.bench")

DEFAULT_MODELS = ("resnet50", "vit_small_patch16_224", "densenet121")
DEFAULT_BATCH = 8
DEFAULT_RESOLUTION = 160
DEFAULT_REPEATS = 10
DEFAULT_WARMUP = 1
DEFAULT_OPEN_FRACTION = 1.0
CLOSED_SCORE = 0.05  # below the default threshold 0.1: a closed gate
DELTA_STD = 1e-3
SEED = 0
RESULTS_DIR = os.path.join("benchmarks", "results")
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
MODES = ("train", "infer")


# ----------------------------------------------------------------------------- timing
@dataclass
class Stats:
    """Per-step wall times of one provider, in milliseconds."""

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


# ----------------------------------------------------------------------------- rows and table
@dataclass
class Row:
    suite: str
    model: str
    mode: str  # "train" or "infer"
    provider: str
    batch: int
    resolution: int
    median_ms: float
    q1_ms: float
    q3_ms: float
    iqr_ms: float
    min_ms: float
    max_ms: float
    img_per_s: float
    ratio: Optional[float] = None  # median / plain median, same model and mode
    times_ms: List[float] = field(default_factory=list)
    extra: Dict[str, object] = field(default_factory=dict)


def make_row(suite: str, model: str, mode: str, provider: str, batch: int, resolution: int,
             stats: Stats, extra: Optional[Dict[str, object]] = None) -> Row:
    med = stats.median
    return Row(suite=suite, model=model, mode=mode, provider=provider, batch=batch,
               resolution=resolution, median_ms=med, q1_ms=stats.q1, q3_ms=stats.q3,
               iqr_ms=stats.iqr, min_ms=stats.min, max_ms=stats.max,
               img_per_s=batch / (med / 1e3) if med > 0 else float("inf"),
               times_ms=list(stats.times_ms), extra=dict(extra or {}))


def add_ratios(rows: List[Row], baseline: str = "plain") -> List[Row]:
    """Set each row's ratio to its median over the baseline provider's median for the same suite,
    model and mode (None where there is no baseline row). Returns the rows."""
    base = {(r.suite, r.model, r.mode): r.median_ms for r in rows if r.provider == baseline}
    for r in rows:
        b = base.get((r.suite, r.model, r.mode))
        r.ratio = r.median_ms / b if b else None
    return rows


def _fmt_ms(v: float) -> str:
    return f"{v:.3f}" if v < 10 else f"{v:.1f}"


def format_table(rows: Sequence[Row]) -> str:
    """The rows as an aligned text table (one line per row, a blank line between models)."""
    head = ("model", "mode", "provider", "median ms", "IQR ms", "img/s", "vs plain")
    body = []
    for r in rows:
        ratio = "-" if r.ratio is None else f"{r.ratio:.2f}x"
        body.append((r.model, r.mode, r.provider, _fmt_ms(r.median_ms), _fmt_ms(r.iqr_ms),
                     f"{r.img_per_s:.1f}", ratio))
    widths = [max([len(h)] + [len(b[i]) for b in body]) for i, h in enumerate(head)]
    left = (True, True, True, False, False, False, False)

    def line(cells) -> str:
        return "  ".join(c.ljust(w) if lj else c.rjust(w) for c, w, lj in zip(cells, widths, left)).rstrip()

    out = [line(head), line("-" * w for w in widths)]
    prev = None
    for r, b in zip(rows, body):
        if prev is not None and r.model != prev:
            out.append("")
        out.append(line(b))
        prev = r.model
    return "\n".join(out)


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
    return DTYPES[name]


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return platform.processor() or platform.machine() or "cpu"


def selected_backends(device: torch.device, dtype: torch.dtype) -> Dict[str, str]:
    """The backend each op would use here (honouring a forced backend), or why none can."""
    from . import dispatch

    out = {}
    for op in dispatch.OPS:
        try:
            out[op] = dispatch.select(op, device=device, dtype=dtype, groups=1).name
        except dispatch.NoBackendError as e:
            out[op] = f"none ({e})"
    return out


def backend_label(forced: Optional[str], selected: Dict[str, str]) -> str:
    names = sorted(set(selected.values()))
    chosen = names[0] if len(names) == 1 else ",".join(f"{op}={n}" for op, n in selected.items())
    return f"{forced} (forced)" if forced else f"auto -> {chosen}"


def environment(device: torch.device) -> Dict[str, object]:
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


# ----------------------------------------------------------------------------- models suite
def create_model(name: str, resolution: int) -> nn.Module:
    """A timm model with random weights (nothing downloaded) built for ``resolution``: models with
    a fixed input size (ViT and friends) get ``img_size=resolution``."""
    import timm
    from timm.models import get_pretrained_cfg

    cfg = get_pretrained_cfg(name)
    kwargs = {}
    if cfg is not None and getattr(cfg, "fixed_input_size", False):
        kwargs["img_size"] = resolution
    try:
        return timm.create_model(name, pretrained=False, **kwargs)
    except TypeError:
        if not kwargs:
            raise
        log.info("%s does not take img_size; building it at its default size", name)
        return timm.create_model(name, pretrained=False)


def prepare_taps(plain: nn.Module, open_fraction: float, seed: int = SEED,
                 delta_std: float = DELTA_STD) -> nn.Module:
    """A converted deep copy of ``plain``: deltas ~ N(0, delta_std²), and all but
    round(open_fraction·L) of the L gates closed (score CLOSED_SCORE), chosen with a seeded
    generator."""
    import taps_fast

    if not 0.0 <= open_fraction <= 1.0:
        raise ValueError(f"open_fraction must be in [0, 1], got {open_fraction}")
    model = taps_fast.convert(copy.deepcopy(plain))
    layers = [m for _, m in taps_fast.taps_layers(model)]
    gen = torch.Generator().manual_seed(seed)
    n_open = round(open_fraction * len(layers))
    closed = set(torch.randperm(len(layers), generator=gen)[n_open:].tolist())
    with torch.no_grad():
        for i, m in enumerate(layers):
            noise = torch.randn(m.delta.shape, generator=gen, dtype=torch.float32) * delta_std
            m.delta.copy_(noise.to(device=m.delta.device, dtype=m.delta.dtype))
            if i in closed:
                m.score.fill_(CLOSED_SCORE)
    return model


def train_step(model: nn.Module, x: torch.Tensor, y: torch.Tensor, lam: float = 0.0) -> None:
    """forward, cross-entropy (+ the TAPS sparsity penalty when lam > 0), backward, zero grads."""
    model.train()
    loss = F.cross_entropy(model(x), y)
    if lam > 0:
        import taps_fast

        loss = loss + taps_fast.sparsity_penalty(model, lam)
    loss.backward()
    model.zero_grad(set_to_none=True)


def infer_step(model: nn.Module, x: torch.Tensor) -> None:
    model.eval()
    with torch.inference_mode():
        model(x)


def _model_info(plain: nn.Module, taps: nn.Module) -> Dict[str, object]:
    import taps_fast

    layers = [m for _, m in taps_fast.taps_layers(taps)]
    return {
        "params": sum(p.numel() for p in plain.parameters()),
        "gated_layers": len(layers),
        "open_layers": sum(m.is_open for m in layers),
        "trainable_params_plain": sum(p.numel() for p in plain.parameters() if p.requires_grad),
        "trainable_params_taps": sum(p.numel() for p in taps.parameters() if p.requires_grad),
    }


def run_models_suite(args: argparse.Namespace, device: torch.device, dtype: torch.dtype,
                     progress) -> List[Row]:
    """plain / taps / taps-merged for each model, train and infer."""
    import taps_fast

    rows: List[Row] = []
    sync = sync_for(device)
    for name in args.models:
        progress.set_description(f"{name}: building")
        torch.manual_seed(SEED)
        plain = create_model(name, args.resolution).to(device=device, dtype=dtype)
        taps = prepare_taps(plain, args.open_fraction)
        merged = taps_fast.merge(taps)
        info = _model_info(plain, taps)
        log.info("%s: %d params, %d gated layers (%d open)", name, info["params"], info["gated_layers"],
                 info["open_layers"])
        n_classes = getattr(plain, "num_classes", 1000) or 1000
        g = torch.Generator().manual_seed(SEED)
        x = torch.randn(args.batch, 3, args.resolution, args.resolution, generator=g)
        x = x.to(device=device, dtype=dtype)
        y = torch.randint(0, n_classes, (args.batch,), generator=g).to(device)

        plans = {
            "train": {
                "plain": lambda: train_step(plain, x, y),
                "taps": lambda: train_step(taps, x, y, lam=args.lam),
            },
            "infer": {
                "plain": lambda: infer_step(plain, x),
                "taps": lambda: infer_step(taps, x),
                "taps-merged": lambda: infer_step(merged, x),
            },
        }
        for mode in args.modes:
            progress.set_description(f"{name}: {mode}")
            stats = time_interleaved(plans[mode], args.repeats, args.warmup, sync, tick=lambda: progress.update(1))
            for prov, st in stats.items():
                rows.append(make_row("models", name, mode, prov, args.batch, args.resolution, st, extra=info))
        del plain, taps, merged, plans
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


def _models_steps(args: argparse.Namespace) -> int:
    per_model = sum({"train": 2, "infer": 3}[m] for m in args.modes)
    return len(args.models) * per_model * (args.warmup + args.repeats)


# A suite: (run(args, device, dtype, progress) -> rows, number of progress steps(args)).
SUITES: Dict[str, tuple] = {
    "models": (run_models_suite, _models_steps),
}


# ----------------------------------------------------------------------------- CLI
def _csv(s: str) -> List[str]:
    return [p.strip() for p in s.split(",") if p.strip()]


def build_parser() -> argparse.ArgumentParser:
    from . import dispatch

    p = argparse.ArgumentParser(
        prog="python -m taps_fast.bench",
        description="Benchmark TAPS-converted timm models against the plain model (train step and "
                    "inference); prints a table and writes JSON.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--suite", choices=sorted(SUITES) + ["kernels", "multitask", "small"], default="models",
                   help="what to benchmark; 'kernels' is the layer-kernel suite (taps_fast/bench_kernels.py, "
                        "its own options: --suite kernels --help)")
    p.add_argument("--models", type=_csv, default=",".join(DEFAULT_MODELS),
                   help="comma-separated timm model names (random weights, nothing is downloaded)")
    p.add_argument("--modes", type=_csv, default=",".join(MODES), help="comma-separated: train, infer")
    p.add_argument("--batch", type=int, default=DEFAULT_BATCH)
    p.add_argument("--resolution", type=int, default=DEFAULT_RESOLUTION,
                   help="input height = width (fixed-size models such as ViT are built for it)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--dtype", choices=("auto",) + tuple(DTYPES), default="auto",
                   help="auto: float32 on CPU, bfloat16 on CUDA")
    p.add_argument("--backend", choices=dispatch.backend_names(), default=None,
                   help="force a taps_fast backend (default: automatic choice)")
    p.add_argument("--repeats", type=int, default=DEFAULT_REPEATS, help="timed steps per provider")
    p.add_argument("--warmup", type=int, default=DEFAULT_WARMUP, help="untimed steps per provider first")
    p.add_argument("--open-fraction", type=float, default=DEFAULT_OPEN_FRACTION,
                   help="fraction of gated layers whose gate is open (1.0: start of training); the "
                        f"others get score {CLOSED_SCORE}, chosen with a seeded generator")
    p.add_argument("--lam", type=float, default=0.5, help="sparsity penalty weight in the taps train step")
    p.add_argument("--out", default=None,
                   help=f"JSON output path (default: {RESULTS_DIR}/bench_<device>_<YYYYmmdd-HHMMSS>.json)")
    p.add_argument("--quiet", "--no-progress", dest="quiet", action="store_true",
                   help="no progress bar")
    p.add_argument("-v", "--verbose", action="store_true", help="INFO logging from taps_fast")
    return p


def _validate(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if args.repeats < 1:
        p.error("--repeats must be >= 1")
    if args.warmup < 0:
        p.error("--warmup must be >= 0")
    if args.batch < 1 or args.resolution < 1:
        p.error("--batch and --resolution must be >= 1")
    if not 0.0 <= args.open_fraction <= 1.0:
        p.error("--open-fraction must be in [0, 1]")
    bad = [m for m in args.modes if m not in MODES]
    if bad or not args.modes:
        p.error(f"--modes: unknown {bad}; choose from {', '.join(MODES)}")
    if args.suite == "models":
        if not args.models:
            p.error("--models is empty")
        try:
            import timm
        except ImportError:
            p.error("the models suite needs timm (pip install timm)")
        unknown = [m for m in args.models if not timm.is_model(m)]
        if unknown:
            p.error(f"--models: unknown timm model(s): {', '.join(unknown)}")


def default_out_path(device: torch.device, now: Optional[_dt.datetime] = None) -> str:
    now = now or _dt.datetime.now()
    return os.path.join(RESULTS_DIR, f"bench_{device.type}_{now.strftime('%Y%m%d-%H%M%S')}.json")


def header_line(env: Dict[str, object], dtype: torch.dtype, args: argparse.Namespace, backend: str) -> str:
    return (f"device={env['device']} ({env['device_name']})  torch={env['torch']}  "
            f"threads={env['torch_threads']}  dtype={str(dtype).replace('torch.', '')}  "
            f"batch={args.batch}  resolution={args.resolution}  backend={backend}  "
            f"open_fraction={args.open_fraction}  repeats={args.repeats}  warmup={args.warmup}")


def _json_safe(v):
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


def main(argv: Optional[Sequence[str]] = None) -> int:
    from tqdm import tqdm
    from tqdm.contrib.logging import logging_redirect_tqdm

    from . import dispatch

    argv = list(sys.argv[1:] if argv is None else argv)
    for name in ("kernels", "multitask", "small"):  # suites with their own options and module
        if f"--suite={name}" in argv or any(a == "--suite" and i + 1 < len(argv) and argv[i + 1] == name
                                            for i, a in enumerate(argv)):
            import importlib

            return importlib.import_module(f"taps_fast.bench_{name}").main(argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    _validate(parser, args)
    if not logging.getLogger().handlers:
        level = logging.INFO if args.verbose else logging.WARNING
        logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)

    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    if args.backend is None:
        try:
            dispatch.forced_backend()  # a bad TAPS_FAST_BACKEND fails here, not mid-run
        except dispatch.NoBackendError as e:
            parser.error(str(e))
    run, steps = SUITES[args.suite]
    env = environment(device)
    out = args.out or default_out_path(device)
    load = env.get("loadavg_1min_at_start")
    if device.type == "cpu" and load is not None and load > (os.cpu_count() or 1):
        log.warning("the machine is busy (1-min load average %.2f on %s CPUs): CPU timings will be noisy "
                    "and slow; run the benchmark on an idle machine", load, os.cpu_count())

    with dispatch.use_backend(args.backend):
        backend = backend_label(args.backend, selected_backends(device, dtype))
        header = header_line(env, dtype, args, backend)
        log.info(header)
        t0 = time.perf_counter()
        with tqdm(total=steps(args), disable=args.quiet, file=sys.stderr, unit="step",
                  dynamic_ncols=True, leave=False) as bar, logging_redirect_tqdm():
            rows = run(args, device, dtype, bar)
        elapsed = time.perf_counter() - t0
    add_ratios(rows)

    print(header)
    print(format_table(rows))
    record = {
        "environment": env,
        "arguments": {k: v for k, v in vars(args).items()},
        "resolved": {"device": str(device), "dtype": str(dtype).replace("torch.", ""), "backend": backend},
        "elapsed_s": elapsed,
        "rows": [{k: _json_safe(v) for k, v in asdict(r).items()} for r in rows],
    }
    parent = os.path.dirname(os.path.abspath(out))
    os.makedirs(parent, exist_ok=True)
    with open(out, "w") as f:
        json.dump(record, f, indent=2)
        f.write("\n")
    print(f"wrote {out} ({elapsed:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
