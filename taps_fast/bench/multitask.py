"""Mixed-batch benchmark: ``taps-fast bench --suite multitask`` (or ``python -m taps_fast.bench --suite multitask``).

One batch whose samples belong to T tasks (uniformly drawn), each task a quarter of the gated
layers open (chosen at random per task), its own norms and its own head (10 to 200 classes).
Inference, eval mode. Providers:

- ``peft``: what a PEFT user has: the base model and each task's tensors; per call, a loop over
  the tasks present, materialising the task's weights (W + ΔW of its open layers, its norms and
  head) and running its rows through the base (torch.func.functional_call).
- ``merged``: a loop over T merged copies of the model (taps_fast.merge of each task): fast,
  T times the memory.
- ``base``: the base model alone on the whole batch: the floor (it computes no task at all).
- ``taps``: taps_fast.MultiTaskModel with every task added from its task file.

Every provider's output is checked against ``merged`` before timing. Reported per provider:
median time (interleaved rounds), the ratio to ``merged`` and to ``peft``, the weight bytes held
(each storage once) and, with --rss (the default on the CPU), the peak resident memory of a fresh
process that builds only that provider and runs it once.
"""
from __future__ import annotations

import argparse
import copy
import os
import resource
import subprocess
import sys
import tempfile
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn

from .harness import ceilings, environment, sync_for, time_interleaved, timer, write_record

MODELS = {"resnet50": 160, "vit_small_patch16_224": 224}
PROVIDERS = ("peft", "merged", "base", "taps")


# ----------------------------------------------------------------------------- the tasks
def resolution(arch: str) -> int:
    return RESOLUTION.get(arch, MODELS.get(arch, 224))


RESOLUTION: Dict[str, int] = {}  # --resolution overrides MODELS' sizes


def make_base(arch: str, device, dtype) -> nn.Module:
    import timm

    torch.manual_seed(0)  # the same base in every process (the task files' fingerprint)
    kw = {"img_size": resolution(arch)} if "vit" in arch else {}
    return timm.create_model(arch, pretrained=False, num_classes=1000, **kw).to(device, dtype).eval()


def synthetic_task(conv: nn.Module, g: torch.Generator, open_frac: float,
                   classes: Union[int, Tuple[int, int]]) -> Dict[str, torch.Tensor]:
    """A random task's tensors for the converted base ``conv`` (save_task's keys): a random
    ``open_frac`` of the gated layers open (score 0.2 above τ = 0.1, a small random ΔW), the
    others closed (score 0.02, no ΔW), the norm state perturbed, a new head of ``classes``
    outputs (a (lo, hi) pair: drawn from ``g``, both ends included)."""
    from ..convert import task_state_keys, taps_layers

    layers = list(taps_layers(conv))
    norm_keys, head_keys = task_state_keys(conv)
    state = conv.state_dict()
    n_open = max(1, round(open_frac * len(layers)))
    opened = set(torch.randperm(len(layers), generator=g)[:n_open].tolist())
    tensors: Dict[str, torch.Tensor] = {}
    for i, (name, m) in enumerate(layers):
        tensors[f"score/{name}"] = torch.tensor(0.2 if i in opened else 0.02)
        if i in opened:
            tensors[f"delta/{name}"] = torch.randn(m.weight.shape, generator=g) * 0.01
    for k in norm_keys:
        v = state[k]
        tensors[f"state/{k}"] = v + 0.05 * torch.rand(v.shape, generator=g) if v.is_floating_point() else v
    if not isinstance(classes, int):
        classes = int(torch.randint(classes[0], classes[1] + 1, (1,), generator=g))
    prefix = [h for h in head_keys if h.endswith(".weight")][0][: -len("weight")]
    tensors[f"state/{prefix}weight"] = torch.randn(classes, conv.get_classifier().in_features, generator=g) * 0.02
    tensors[f"state/{prefix}bias"] = torch.zeros(classes)
    return tensors


def write_tasks(arch: str, T: int, open_frac: float, folder: str) -> List[str]:
    """T task files for the base of ``arch`` (synthetic_task, 10 to 200 classes each)."""
    from ..checkpoint import base_fingerprint, write_task
    from ..convert import convert, taps_layers

    conv = convert(make_base(arch, "cpu", torch.float32))
    fp = base_fingerprint(conv)
    thresholds = {n: 0.1 for n, _ in taps_layers(conv)}
    paths = []
    for t in range(T):
        tensors = synthetic_task(conv, torch.Generator().manual_seed(100 + t), open_frac, (10, 200))
        path = os.path.join(folder, f"{arch}_task{t}.safetensors")
        write_task(tensors, thresholds, fp, path)
        paths.append(path)
    return paths


def _read(path):
    """The tensors of a task file the benchmark wrote itself (checksum verified)."""
    from ..checkpoint import TaskFile

    return TaskFile(path).read_tensors()


def _head_name(model: nn.Module) -> str:
    from ..convert import resolve_head

    return resolve_head(model)[0]


def build(provider: str, arch: str, paths: List[str], device, dtype):
    """The provider's model(s) and its run(x, ids) -> [B, C_max] (padded with -inf)."""
    plain = make_base(arch, device, dtype)
    head = _head_name(plain)
    tasks = [{k: v.to(device, dtype) if v.is_floating_point() else v.to(device) for k, v in _read(p).items()}
             for p in paths]
    sizes = [t[f"state/{head}.weight"].shape[0] for t in tasks]
    cmax = max(sizes + [plain.get_classifier().out_features])

    def loop(run_task):
        def run(x, ids):
            out = x.new_full((x.shape[0], cmax), float("-inf"))
            for t in torch.unique(ids).tolist():
                idx = (ids == t).nonzero().flatten()
                y = run_task(t, x.index_select(0, idx))
                out[idx, : y.shape[1]] = y
            return out
        return run

    if provider == "base":
        return [plain], lambda x, ids: plain(x)
    if provider == "peft":
        params = dict(plain.named_parameters())
        base_state = {**params, **dict(plain.named_buffers())}

        def run_task(t, xt):
            w = dict(base_state)
            for k, v in tasks[t].items():
                kind, name = k.split("/", 1)
                if kind == "delta":
                    w[name + ".weight"] = params[name + ".weight"] + v  # materialised per call
                elif kind == "state":
                    w[name] = v
            return torch.func.functional_call(plain, w, (xt,))

        return [plain] + tasks, loop(run_task)
    if provider == "merged":
        copies = [merged_copy(plain, t, head) for t in tasks]
        return copies, loop(lambda t, xt: copies[t](xt))
    if provider == "taps":
        from ..multitask import MultiTaskModel

        mt = MultiTaskModel(plain)
        for i, p in enumerate(paths):
            mt.add_task(f"task{i}", p)
        mt.to(device, dtype).eval()
        return [mt], lambda x, ids: mt(x, ids)
    raise ValueError(f"unknown provider {provider!r}; choose from {PROVIDERS}")


def merged_copy(plain: nn.Module, tensors: Dict[str, torch.Tensor], head: str) -> nn.Module:
    m = copy.deepcopy(plain)
    w = tensors[f"state/{head}.weight"]
    parent, _, leaf = head.rpartition(".")
    setattr(m.get_submodule(parent) if parent else m, leaf,
            nn.Linear(w.shape[1], w.shape[0], device=w.device, dtype=w.dtype))
    state = m.state_dict()
    with torch.no_grad():
        for k, v in tensors.items():
            kind, name = k.split("/", 1)
            if kind == "delta":
                state[name + ".weight"].add_(v)
            elif kind == "state":
                state[name].copy_(v)
    return m.eval()


def weight_bytes(objs) -> int:
    """Bytes held by a provider's models and tensor dicts (each storage once)."""
    from ..multitask import storage_bytes

    ts = []
    for o in objs:
        ts += list(o.parameters()) + list(o.buffers()) if isinstance(o, nn.Module) else list(o.values())
    return storage_bytes(ts)


def batch(arch: str, B: int, T: int, device, dtype, seed: int = 1):
    res = resolution(arch)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, 3, res, res, generator=g).to(device, dtype)
    ids = torch.randint(0, T, (B,), generator=g).to(device)
    return x, ids


# ----------------------------------------------------------------------------- peak RSS probe
def rss_probe(provider: str, arch: str, paths: List[str], B: int, device: str, dtype: str) -> int:
    """Peak resident set (bytes) of a fresh process that builds ``provider`` and runs it once."""
    cmd = [sys.executable, "-m", "taps_fast.bench", "--suite", "multitask", "--_probe", provider, "--models", arch,
           "--resolution", str(resolution(arch)), "--batch", str(B), "--tasks", str(len(paths)), "--device", device, "--dtype", dtype,
           "--_paths", ",".join(paths)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    return int(out.strip().splitlines()[-1])


def _probe(args) -> int:
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    paths = args._paths.split(",")
    _, run = build(args._probe, args.models, paths, device, dtype)
    x, ids = batch(args.models, args.batch, len(paths), device, dtype)
    with torch.inference_mode():
        run(x, ids)
    print(peak_rss())
    return 0


def peak_rss() -> int:
    """This process's peak resident set in bytes: VmHWM (per address space, so a fresh process
    starts from zero; getrusage's ru_maxrss survives exec on Linux and would report the parent's)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


# ----------------------------------------------------------------------------- one linear layer
def run_layer(args, device, dtype) -> List[dict]:
    """One gated linear, M rows over T tasks (uniform), open_frac of the tasks open on it:
    ``base`` (F.linear on W for every row), ``peft`` (a loop over the tasks present: W + ΔW_t
    materialised, F.linear on the task's rows), ``taps`` (taps_mt_linear: the Triton kernel on
    CUDA), against the floor max(2MNK / matmul rate, bytes / bandwidth) with bytes = x, y, W and
    every open ΔW once, the ceilings measured in the same run."""
    from ..ops import taps_mt_linear

    M, N, K, T = args.layer
    g = torch.Generator().manual_seed(0)
    n_open = max(1, round(args.open_frac * T))
    x = torch.randn(M, K, generator=g).to(device, dtype)
    w = (torch.randn(N, K, generator=g) / K ** 0.5).to(device, dtype)
    deltas = (torch.randn(n_open, N, K, generator=g) * 1e-2).to(device, dtype)
    slot = torch.full((T,), -1, dtype=torch.int32)
    slot[torch.randperm(T, generator=g)[:n_open]] = torch.arange(n_open, dtype=torch.int32)
    slot = slot.to(device)
    scores = torch.full((T,), 0.2, dtype=dtype, device=device)
    thr = torch.full((T,), 0.1, dtype=dtype, device=device)
    ids = torch.randint(0, T, (M,), generator=g).to(device)
    slots = slot.tolist()

    def peft():
        y = torch.empty(M, N, device=device, dtype=dtype)
        for t in torch.unique(ids).tolist():
            idx = (ids == t).nonzero().flatten()
            wt = w if slots[t] < 0 else w + deltas[slots[t]]
            y[idx] = torch.nn.functional.linear(x[idx], wt)
        return y

    fns = {"base": lambda: torch.nn.functional.linear(x, w),
           "peft": peft,
           "taps": lambda: taps_mt_linear(x, ids, w, deltas, slot, scores, thr, check_ids=False)}
    with torch.inference_mode():
        ref = peft()
        got = fns["taps"]()
        err = float((got.float() - ref.float()).abs().max() / ref.float().abs().max())
        if device.type == "cuda":
            t = timer(device, args.repeats)
            ms = {k: t(f) for k, f in fns.items()}
            ceil = ceilings(device, t)
        else:
            st = time_interleaved(fns, args.repeats, args.warmup, sync_for(device))
            ms = {k: v.median for k, v in st.items()}
            ceil = ceilings(device, timer(device, args.repeats))
    es = torch.tensor([], dtype=dtype).element_size()
    nbytes = es * (M * K + M * N + N * K + n_open * N * K)
    flops = 2 * M * N * K
    floor_ms = max(flops / (ceil["matmul_TFLOPs"] * 1e12), nbytes / (ceil["bandwidth_GBps"] * 1e9)) * 1e3
    rows = []
    for k, v in ms.items():
        rows.append(dict(model=f"linear M={M} N={N} K={K}", provider=k, tasks=T, open_tasks=n_open,
                         median_ms=v, floor_ms=floor_ms, vs_floor=v / floor_ms,
                         throughput_vs_base=ms["base"] / v, throughput_vs_peft=ms["peft"] / v,
                         max_rel_err_vs_peft=err if k == "taps" else None, ceilings=ceil))
    return rows


# ----------------------------------------------------------------------------- the suite
def run_model(arch: str, args, device, dtype, folder: str) -> List[dict]:
    paths = write_tasks(arch, args.tasks, args.open_frac, folder)
    x, ids = batch(arch, args.batch, args.tasks, device, dtype)
    built = {p: build(p, arch, paths, device, dtype) for p in args.providers}
    with torch.inference_mode():
        ref = built["merged"][1](x, ids) if "merged" in built else None
        for p, (_, run) in built.items():
            if ref is not None and p != "base":
                y = run(x, ids)
                finite = torch.isfinite(ref)
                if not (torch.equal(finite, torch.isfinite(y))
                        and torch.allclose(y[finite], ref[finite], rtol=1e-3, atol=1e-3 * float(ref[finite].abs().max()))):
                    raise AssertionError(f"{arch}: provider {p!r} disagrees with the merged copies")
        stats = time_interleaved({p: (lambda r=run: r(x, ids)) for p, (_, run) in built.items()},
                                 args.repeats, args.warmup, sync_for(device))
    rows = []
    for p, (objs, _) in built.items():
        rows.append(dict(model=arch, provider=p, batch=args.batch, resolution=resolution(arch), tasks=args.tasks,
                         tasks_present=len(torch.unique(ids)), open_frac=args.open_frac,
                         median_ms=stats[p].median, q1_ms=stats[p].q1, q3_ms=stats[p].q3,
                         times_ms=stats[p].times_ms, weight_bytes=weight_bytes(objs)))
    del built
    if args.rss:
        for r in rows:
            r["peak_rss_bytes"] = rss_probe(r["provider"], arch, paths, args.batch, str(device),
                                            str(dtype).replace("torch.", ""))
    by = {r["provider"]: r for r in rows}
    for r in rows:
        for base in ("merged", "peft", "base"):
            if base in by:
                r[f"time_vs_{base}"] = r["median_ms"] / by[base]["median_ms"]
        if "merged" in by:
            r["weights_vs_merged"] = r["weight_bytes"] / by["merged"]["weight_bytes"]
    return rows


def format_table(rows: List[dict]) -> str:
    head = ("model", "provider", "median ms", "IQR ms", "vs merged", "vs peft", "vs base", "weights MB",
            "weights vs merged", "peak RSS MB")
    out = [head]
    for r in rows:
        out.append((r["model"], r["provider"], f"{r['median_ms']:.1f}", f"{r['q3_ms'] - r['q1_ms']:.1f}",
                    f"{r.get('time_vs_merged', float('nan')):.3f}", f"{r.get('time_vs_peft', float('nan')):.3f}",
                    f"{r.get('time_vs_base', float('nan')):.3f}", f"{r['weight_bytes'] / 2**20:.0f}",
                    f"{r.get('weights_vs_merged', float('nan')):.3f}",
                    f"{r['peak_rss_bytes'] / 2**20:.0f}" if "peak_rss_bytes" in r else "-"))
    w = [max(len(t[i]) for t in out) for i in range(len(head))]
    return "\n".join("  ".join(c.rjust(wd) if i > 1 else c.ljust(wd) for i, (c, wd) in enumerate(zip(t, w)))
                     for t in out)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="taps-fast bench --suite multitask",
                                description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--suite", default="multitask", choices=["multitask"], help=argparse.SUPPRESS)
    p.add_argument("--models", default=",".join(MODELS),
                   help=f"comma-separated timm models (random weights); defaults {MODELS}")
    p.add_argument("--resolution", type=int, default=None, help="image size for every model (default: per model)")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--tasks", type=int, default=16, help="T, tasks in the model (the batch draws uniformly)")
    p.add_argument("--open-frac", type=float, default=0.25, help="fraction of the gated layers open per task")
    p.add_argument("--providers", default=",".join(PROVIDERS))
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default=None, help="float32 on the CPU, bfloat16 on CUDA")
    p.add_argument("--rss", action=argparse.BooleanOptionalAction, default=None,
                   help="measure each provider's peak RSS in a fresh process (default: on the CPU)")
    p.add_argument("--layer", default=None, help="M,N,K,T: benchmark one multi-task linear layer instead "
                   "of models (the GPU case: 4096,4096,4096,32)")
    p.add_argument("--out", default=None, help="JSON path (default benchmarks/results/multitask_<device>_<time>.json)")
    p.add_argument("--_probe", default=None, help=argparse.SUPPRESS)
    p.add_argument("--_paths", default=None, help=argparse.SUPPRESS)
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = build_parser()
    args = p.parse_args(list(sys.argv[1:] if argv is None else argv))
    if args.dtype is None:
        args.dtype = "bfloat16" if args.device.startswith("cuda") else "float32"
    if args.resolution is not None:
        RESOLUTION.update({m: args.resolution for m in args.models.split(",") if m})
    if args._probe:
        return _probe(args)
    args.providers = [s for s in args.providers.split(",") if s]
    bad = [s for s in args.providers if s not in PROVIDERS]
    models = [s for s in args.models.split(",") if s]
    if bad:
        p.error(f"unknown provider(s) {bad}; choose from {PROVIDERS}")
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    if args.rss is None:
        args.rss = device.type == "cpu"
    rows: List[dict] = []
    if args.layer:
        args.layer = [int(v) for v in args.layer.split(",")]
        rows = run_layer(args, device, dtype)
        for r in rows:
            print(f"{r['model']} T={r['tasks']} ({r['open_tasks']} open)  {r['provider']:<5} {r['median_ms']:9.3f} ms"
                  f"  vs floor {r['vs_floor']:.2f}  throughput vs base {r['throughput_vs_base']:.2f}"
                  f"  vs peft {r['throughput_vs_peft']:.2f}")
        models = []
    with tempfile.TemporaryDirectory(prefix="taps_mt_bench_") as folder:
        for arch in models:
            rows += run_model(arch, args, device, dtype, folder)
    env = environment(device)
    header = (f"taps_fast multitask bench: {env.get('device_name')}, {args.dtype}, batch {args.batch}, "
              f"T={args.tasks}, {args.open_frac:.0%} of layers open per task, torch {env['torch']}, "
              f"{env.get('torch_threads')} threads")
    print(header)
    if models:
        print(format_table(rows))
    record = {"environment": env, "arguments": {k: v for k, v in vars(args).items() if not k.startswith("_")},
              "rows": rows}
    out = write_record(record, args.out, "multitask")
    print(f"wrote {out}")
    return 0
