"""The models suite: converted timm models against the plain model, training step and inference.

Run ``python -m taps_fast.bench`` (or ``taps-fast bench``); ``--help`` lists the options. With no
arguments it benchmarks resnet50, vit_small_patch16_224 and densenet121 (random weights, nothing
downloaded) on the device present, prints a table of medians and ratios to the plain model and
writes the rows as JSON under ``benchmarks/results/``.

Providers, per model:

- ``plain``: the unconverted timm model. Train step = full fine-tuning (every parameter gets a
  gradient), the cost TAPS is measured against.
- ``taps``: a copy converted with :func:`taps_fast.convert`, deltas filled with small random values
  so the open path computes something real; ``--open-fraction`` closes the gates of a seeded
  random share of the layers (score below threshold), as late in training. Train step = forward +
  cross-entropy + :func:`taps_fast.sparsity_penalty` + backward.
- ``authors``: the TAPS authors' style on the same tensors (:func:`authors_style`: a deep copy of
  the ``taps`` model whose gated layers compute with W + g·ΔW formed by autograd in every forward,
  then an ordinary F.linear / F.conv2d: the formulas of taps_fast.ops.taps_linear_ref and
  taps_conv2d_ref, the gate's straight-through estimator g + s − s.detach()). It is the naive code
  taps_fast replaces: taps should be no slower. Same train step as ``taps`` (penalty included).
- ``taps-merged`` (inference only): :func:`taps_fast.merge` of that copy: plain layers again, so it
  should run at the plain model's speed.

A train step is model.train(), forward, loss, backward, then zeroing the gradients (set_to_none);
no optimizer step. Inference is model.eval() under torch.inference_mode(). The providers of one
model and mode are timed interleaved (one step of each in turn per repeat), so slow drifts of
the machine (thermal, other processes) hit every provider alike; each repeat is one step.

The other suites (``--suite kernels|multitask|small|overhead``) have their own modules and options:
taps_fast/bench/__main__.py routes to them.
"""
from __future__ import annotations

import argparse
import copy
import datetime as _dt
import logging
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Dict, List, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..modules import TAPSConv2d, TAPSLinear
from ..ops import taps_conv2d_ref, taps_linear_ref
from .harness import (
    DTYPE_BY_NAME,
    RESULTS_DIR,
    Stats,
    dtype_name,
    environment,
    resolve_device,
    resolve_dtype,
    selected_backends,
    sync_for,
    time_interleaved,
    write_record,
)

log = logging.getLogger("taps_fast.bench")

DEFAULT_MODELS = ("resnet50", "vit_small_patch16_224", "densenet121")
DEFAULT_BATCH = 8
DEFAULT_RESOLUTION = 160
DEFAULT_REPEATS = 10
DEFAULT_WARMUP = 1
DEFAULT_OPEN_FRACTION = 1.0
DEFAULT_LAM = 0.5  # the sparsity penalty weight of the taps and authors train steps
CLOSED_SCORE = 0.05  # below the default threshold 0.1: a closed gate
DELTA_STD = 1e-3
SEED = 0
MODES = ("train", "infer")


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


class _AuthorsLinear(TAPSLinear):
    """A TAPSLinear computing as the authors' code does: taps_linear_ref (W + g·ΔW by autograd,
    then F.linear)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return taps_linear_ref(x, self.weight, self.delta, self.score, self.bias, self.threshold)


class _AuthorsConv2d(TAPSConv2d):
    """A TAPSConv2d computing as the authors' code does: taps_conv2d_ref (W + g·ΔW by autograd,
    then F.conv2d), padding modes as nn.Conv2d."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        padding = self.padding
        if self.padding_mode != "zeros":
            x = F.pad(x, self._reversed_padding_repeated_twice, mode=self.padding_mode)
            padding = 0
        return taps_conv2d_ref(x, self.weight, self.delta, self.score, self.bias, self.stride, padding,
                               self.dilation, self.groups, self.threshold)


_AUTHORS_CLASS = {TAPSLinear: _AuthorsLinear, TAPSConv2d: _AuthorsConv2d}


def authors_style(taps: nn.Module) -> nn.Module:
    """A deep copy of the converted model ``taps`` whose gated layers compute in the authors' style
    (the same tensors: W, ΔW, s, τ, b copied as they are). The layers stay TAPSLinear / TAPSConv2d
    (isinstance holds: taps_layers and sparsity_penalty see them); only their forward changes."""
    import taps_fast

    model = copy.deepcopy(taps)
    for _, m in taps_fast.taps_layers(model):
        if type(m) not in _AUTHORS_CLASS:
            raise TypeError(f"authors_style: no authors' form of {type(m).__name__}")
        m.__class__ = _AUTHORS_CLASS[type(m)]
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
    """plain / authors / taps / taps-merged for each model, train and infer."""
    import taps_fast

    rows: List[Row] = []
    sync = sync_for(device)
    for name in args.models:
        progress.set_description(f"{name}: building")
        torch.manual_seed(SEED)
        plain = create_model(name, args.resolution).to(device=device, dtype=dtype)
        taps = prepare_taps(plain, args.open_fraction)
        authors = authors_style(taps)
        merged = taps_fast.merge(taps)
        info = _model_info(plain, taps)
        log.info("%s: %d params, %d gated layers (%d open)", name, info["params"], info["gated_layers"],
                 info["open_layers"])
        n_classes = getattr(plain, "num_classes", 1000) or 1000
        g = torch.Generator().manual_seed(SEED)
        x = torch.randn(args.batch, 3, args.resolution, args.resolution, generator=g)
        x = x.to(device=device, dtype=dtype)
        y = torch.randint(0, n_classes, (args.batch,), generator=g).to(device)

        # Models bound as default arguments: the names are deleted at the end of each model's turn.
        plans = {
            "train": {
                "plain": lambda m=plain: train_step(m, x, y),
                "authors": lambda m=authors: train_step(m, x, y, lam=args.lam),
                "taps": lambda m=taps: train_step(m, x, y, lam=args.lam),
            },
            "infer": {
                "plain": lambda m=plain: infer_step(m, x),
                "authors": lambda m=authors: infer_step(m, x),
                "taps": lambda m=taps: infer_step(m, x),
                "taps-merged": lambda m=merged: infer_step(m, x),
            },
        }
        for mode in args.modes:
            progress.set_description(f"{name}: {mode}")
            stats = time_interleaved(plans[mode], args.repeats, args.warmup, sync, tick=lambda: progress.update(1))
            for prov, st in stats.items():
                rows.append(make_row("models", name, mode, prov, args.batch, args.resolution, st, extra=info))
        del plain, taps, authors, merged, plans
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


def _models_steps(args: argparse.Namespace) -> int:
    per_model = sum({"train": 3, "infer": 4}[m] for m in args.modes)
    return len(args.models) * per_model * (args.warmup + args.repeats)


# ----------------------------------------------------------------------------- CLI
def _csv(s: str) -> List[str]:
    return [p.strip() for p in s.split(",") if p.strip()]


def build_parser(suites: Sequence[str] = ("models",)) -> argparse.ArgumentParser:
    """The models suite's options; ``suites``: the --suite choices the help lists (every suite of
    ``python -m taps_fast.bench``, which passes them)."""
    from .. import dispatch

    p = argparse.ArgumentParser(
        prog="python -m taps_fast.bench",
        description="Benchmark TAPS-converted timm models against the plain model (train step and "
                    "inference); prints a table and writes JSON.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--suite", choices=list(suites), default="models",
                   help="what to benchmark; 'kernels' is the layer-kernel suite (taps_fast/bench/kernels.py, "
                        "its own options: --suite kernels --help)")
    p.add_argument("--models", type=_csv, default=",".join(DEFAULT_MODELS),
                   help="comma-separated timm model names (random weights, nothing is downloaded)")
    p.add_argument("--modes", type=_csv, default=",".join(MODES), help="comma-separated: train, infer")
    p.add_argument("--batch", type=int, default=DEFAULT_BATCH)
    p.add_argument("--resolution", type=int, default=DEFAULT_RESOLUTION,
                   help="input height = width (fixed-size models such as ViT are built for it)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--dtype", choices=("auto",) + tuple(DTYPE_BY_NAME), default="auto",
                   help="auto: float32 on CPU, bfloat16 on CUDA")
    p.add_argument("--backend", choices=dispatch.backend_names(), default=None,
                   help="force a taps_fast backend (default: automatic choice)")
    p.add_argument("--repeats", type=int, default=DEFAULT_REPEATS, help="timed steps per provider")
    p.add_argument("--warmup", type=int, default=DEFAULT_WARMUP, help="untimed steps per provider first")
    p.add_argument("--open-fraction", type=float, default=DEFAULT_OPEN_FRACTION,
                   help="fraction of gated layers whose gate is open (1.0: start of training); the "
                        f"others get score {CLOSED_SCORE}, chosen with a seeded generator")
    p.add_argument("--lam", type=float, default=DEFAULT_LAM,
                   help="sparsity penalty weight in the taps and authors train steps")
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
    if not args.models:
        p.error("--models is empty")
    try:
        import timm
    except ImportError:
        p.error("the models suite needs timm (pip install timm)")
    unknown = [m for m in args.models if not timm.is_model(m)]
    if unknown:
        p.error(f"--models: unknown timm model(s): {', '.join(unknown)}")


def backend_label(forced: Optional[str], selected: Dict[str, str]) -> str:
    names = sorted(set(selected.values()))
    chosen = names[0] if len(names) == 1 else ",".join(f"{op}={n}" for op, n in selected.items())
    return f"{forced} (forced)" if forced else f"auto -> {chosen}"


def header_line(env: Dict[str, object], dtype: torch.dtype, args: argparse.Namespace, backend: str) -> str:
    return (f"device={env['device']} ({env['device_name']})  torch={env['torch']}  "
            f"threads={env['torch_threads']}  dtype={dtype_name(dtype)}  "
            f"batch={args.batch}  resolution={args.resolution}  backend={backend}  "
            f"open_fraction={args.open_fraction}  repeats={args.repeats}  warmup={args.warmup}")


def main(argv: Optional[Sequence[str]] = None, suites: Sequence[str] = ("models",)) -> int:
    """The models suite's command line (``suites``: see :func:`build_parser`)."""
    from tqdm import tqdm
    from tqdm.contrib.logging import logging_redirect_tqdm

    from .. import dispatch

    parser = build_parser(suites)
    args = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
    if args.suite != "models":
        parser.error(f"--suite {args.suite} is not the models suite: run it with python -m taps_fast.bench")
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
    env = environment(device)
    started = _dt.datetime.now()  # the default file name is stamped with the start
    load = env.get("loadavg_1min_at_start")
    if device.type == "cpu" and load is not None and load > (os.cpu_count() or 1):
        log.warning("the machine is busy (1-min load average %.2f on %s CPUs): CPU timings will be noisy "
                    "and slow; run the benchmark on an idle machine", load, os.cpu_count())

    with dispatch.use_backend(args.backend):
        backend = backend_label(args.backend, selected_backends(device, dtype))
        header = header_line(env, dtype, args, backend)
        log.info(header)
        t0 = time.perf_counter()
        with tqdm(total=_models_steps(args), disable=args.quiet, file=sys.stderr, unit="step",
                  dynamic_ncols=True, leave=False) as bar, logging_redirect_tqdm():
            rows = run_models_suite(args, device, dtype, bar)
        elapsed = time.perf_counter() - t0
    add_ratios(rows)

    print(header)
    print(format_table(rows))
    record = {
        "environment": env,
        "arguments": dict(vars(args)),
        "resolved": {"device": str(device), "dtype": dtype_name(dtype), "backend": backend},
        "elapsed_s": elapsed,
        "rows": [asdict(r) for r in rows],
    }
    out = write_record(record, args.out, "bench", now=started)
    print(f"wrote {out} ({elapsed:.0f} s)")
    return 0
