"""Small-batch serving benchmark: ``taps-fast bench --suite small`` (or ``python -m taps_fast.bench --suite small``).

The case the compiled kernels (csrc/) are written for: a few rows at a time (M ∈ {1, 4, 16}) of
a gated linear layer (N = K ∈ {768, 3072}) whose rows belong to T ∈ {1, 8, 32} tasks (row m has
task m mod T, rows sorted by task, every task's gate open). It is memory-bound: the bytes that
must move are W once, each distinct open ΔW present once (P = min(M, T) of them), x, b and y:

    bytes = e·(N·K·(1 + P) + M·K + N + M·N)        e = the element size
    floor = the time of a device copy moving the same bytes (bytes/2 read, bytes/2 written), per
            layer, timed in the same rounds as the providers (``copy`` rows), so the floor sees
            the same machine state; the run also reports the bandwidth of one 64 MiB (CPU) /
            1 GiB (CUDA) copy, the figure the kernels' %bw is taken against.

Each row also reports the roofline bound max(floor, M·N·K·(1 + ...) FLOPs ÷ the matmul rate measured
in the same run) as ``x roofline``: at M = 16 on a CPU the multiply-adds alone take most of the
byte floor's time (2·16·3072² FLOPs = 2.7 ms at the 0.11 TFLOP/s of a 2-core x86_64 machine, against 3.4 ms of
bytes), so a GEMV there is near the compute roof as well as the memory one.

Providers (median time per layer; on the CPU the providers' rounds are interleaved, one round of
each in turn, so drifts of the shared machine hit them alike):
- ``kernel``: the compiled op torch.ops.taps_fast.small_mt_linear (the mixed batch), and for T=1
  also ``kernel-1task``: small_linear (the single-task op);
- ``taps``: taps_fast.taps_mt_linear through the dispatcher (what a MultiTaskModel layer calls:
  the kernel plus the custom op's checks and dispatch);
- ``authors``: the authors' style, per task present: W + ΔW_t materialised, then F.linear on the
  task's rows (written into y);
- ``torch-best``: the best pure-PyTorch form: y = F.linear(x, W, b), then y[rows_t] += x[rows_t]·ΔW_tᵀ
  per task present (rows as slices: the batch is sorted);
- ``mm-W``: F.linear on W alone (MKL / cuBLAS), reading N·K·e weight bytes instead of
  N·K·e·(1 + P): the dense reference point, and at M = 16 on a CPU a measure of how fast the
  skinny product itself can run;
- ``copy``: the floor (above);
- on CUDA also ``triton`` (the mixed-batch Triton kernel, forced).

Before timing, every provider's output on one layer is checked against float64. So the weights
come from memory, not cache, each timed call runs a round over L layers with
distinct weights, L chosen so that one round touches more than 4x the last-level cache (the L3
on the CPU, the L2 on CUDA); on CUDA the round is captured in a CUDA graph and replayed
(``triton.testing.do_bench``), so launches do not dominate. Only the deltas of tasks present
are allocated (slot -1 for the others): absent tasks move no bytes on any provider.
"""
from __future__ import annotations

import argparse
import math
from typing import Callable, Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F

from .harness import (
    ceilings,
    cuda_graph_round,
    dtype_name,
    environment,
    last_level_cache_bytes,
    measure,
    resolve_device,
    resolve_dtype,
    time_interleaved,
    timer,
    write_record,
)

MS = (1, 4, 16)
NKS = (768, 3072)
TS = (1, 8, 32)
TARGET_FLOOR = 1.2  # kernel within 1.2x of the floor
TARGET_AUTHORS = 1.5  # kernel at least 1.5x faster than the authors' style


class Layers:
    """L layers of one shape: W [N,K], b [N], deltas [P,N,K] (the P tasks present), slot [T]."""

    def __init__(self, M, N, K, T, dtype, device, llc, seed=0):
        g = torch.Generator(device="cpu").manual_seed(seed)
        self.M, self.N, self.K, self.T = M, N, K, T
        self.P = min(M, T)
        e = torch.tensor([], dtype=dtype).element_size()
        touched = e * N * K * (1 + self.P)
        self.L = max(2, math.ceil(4 * llc / touched))
        self.x = (torch.randn(M, K, generator=g) * 0.5).to(device=device, dtype=dtype)
        # rows sorted by task: task m mod T, sorted (so each task's rows are one slice)
        ids = torch.sort(torch.arange(M) % T).values
        self.task_ids = ids.to(device)
        present = sorted(set(ids.tolist()))
        self.present = present
        slot = torch.full((T,), -1, dtype=torch.int64)
        for i, t in enumerate(present):
            slot[t] = i
        self.slot = slot.to(device)
        self.scores = torch.full((T,), 0.5, device=device)
        self.thresholds = torch.full((T,), 0.1, device=device)
        self.score = torch.tensor(0.5, device=device)
        self.rows = {t: slice(int((ids == t).nonzero()[0]), int((ids == t).nonzero()[-1]) + 1) for t in present}
        self.ws, self.bs, self.ds = [], [], []
        for _ in range(self.L):  # uniform_ on the device: fast enough for GBs of weights
            self.ws.append(torch.empty(N, K, device=device, dtype=dtype).uniform_(-K ** -0.5, K ** -0.5))
            self.bs.append(torch.empty(N, device=device, dtype=dtype).uniform_(-0.1, 0.1))
            self.ds.append(torch.empty(self.P, N, K, device=device, dtype=dtype).uniform_(-1e-2 * K ** -0.5, 1e-2 * K ** -0.5))
        self.bytes = e * (N * K * (1 + self.P) + M * K + N + M * N)


def providers(lay: Layers, device: torch.device) -> Dict[str, Callable[[int], torch.Tensor]]:
    """name -> fn(layer index) computing that layer's y."""
    from .. import _ext, dispatch
    from ..ops import taps_mt_linear

    x, ids, slot, sc, th = lay.x, lay.task_ids, lay.slot, lay.scores, lay.thresholds
    out: Dict[str, Callable[[int], torch.Tensor]] = {}
    half = max(1, lay.bytes // 2 // 4)  # fp32 elements: bytes/2 read + bytes/2 written per layer
    src = torch.ones(lay.L, half, device=device)
    dst = torch.empty_like(src)
    out["copy"] = lambda i: dst[i].copy_(src[i])
    if _ext.load()[0] is not None:
        out["kernel"] = lambda i: torch.ops.taps_fast.small_mt_linear(x, ids, lay.ws[i], lay.ds[i], slot, sc, th, lay.bs[i])
        if lay.T == 1:
            out["kernel-1task"] = lambda i: torch.ops.taps_fast.small_linear(x, lay.ws[i], lay.ds[i][0], lay.score,
                                                                             lay.bs[i], 0.1)
    # check_ids=False, as a MultiTaskModel layer calls it: the range check reads the ids on the
    # host, which CUDA-graph capture (the CUDA rounds) refuses; the ids are in range by
    # construction, and check_agree compares every provider with the float64 result first.
    out["taps"] = lambda i: taps_mt_linear(x, ids, lay.ws[i], lay.ds[i], slot, sc, th, lay.bs[i], check_ids=False)

    def authors(i):
        y = x.new_empty(lay.M, lay.N)
        for j, t in enumerate(lay.present):
            r = lay.rows[t]
            torch.addmm(lay.bs[i], x[r], (lay.ws[i] + lay.ds[i][j]).t(), out=y[r])
        return y

    def best(i):
        y = F.linear(x, lay.ws[i], lay.bs[i])
        for j, t in enumerate(lay.present):
            r = lay.rows[t]
            y[r].addmm_(x[r], lay.ds[i][j].t())
        return y

    out["authors"] = authors
    out["torch-best"] = best
    out["mm-W"] = lambda i: F.linear(x, lay.ws[i], lay.bs[i])
    if device.type == "cuda":
        def triton(i):
            with dispatch.use_backend("triton"):
                return taps_mt_linear(x, ids, lay.ws[i], lay.ds[i], slot, sc, th, lay.bs[i], check_ids=False)
        out["triton"] = triton
    return out


AGREE_RTOL = {torch.float32: 1e-4, torch.float16: 4e-3, torch.bfloat16: 3e-2}


def check_agree(lay: Layers, provs: Dict[str, Callable[[int], torch.Tensor]]) -> None:
    """Every provider that computes the layer (all but ``copy`` and ``mm-W``) must give the
    float64 result on layer 0 (max error relative to max |y|): a benchmark never times a wrong
    answer."""
    w = lay.ws[0].double()
    ref = lay.x.double() @ w.t() + lay.bs[0].double()
    for j, t in enumerate(lay.present):
        r = lay.rows[t]
        ref[r] += lay.x[r].double() @ lay.ds[0][j].double().t()
    tol = AGREE_RTOL[lay.x.dtype] * float(ref.abs().max())
    for name, fn in provs.items():
        if name in ("copy", "mm-W"):
            continue
        err = float((fn(0).double() - ref).abs().max())
        if not err <= tol:
            raise RuntimeError(f"bench --suite small: provider {name!r} disagrees with the float64 result "
                               f"(M={lay.M} N={lay.N} K={lay.K} T={lay.T}): max error {err:.3g} > {tol:.3g}")


def round_maker(device: torch.device) -> Callable[[Callable[[int], torch.Tensor], int], Callable[[], object]]:
    """round(fn, L) -> the callable timed for one round of L layers: fn(0), ..., fn(L - 1); on CUDA
    captured in a CUDA graph and replayed, so launches do not dominate."""
    if device.type == "cuda":
        return cuda_graph_round
    return lambda fn, L: (lambda: [fn(i) for i in range(L)])


def run(args, say: Callable[..., None] = lambda *a: None) -> dict:
    """Measure the suite; ``say`` receives progress lines (main passes a stderr printer)."""
    from ..ops.ext_backend import SERVING_ROWS

    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    t, make_round = timer(device, args.repeats), round_maker(device)
    llc = args.cache_mib << 20 if args.cache_mib else last_level_cache_bytes(device)
    ceil = ceilings(device, t)  # copy bandwidth and matmul rate, measured now
    bw, rate = ceil["bandwidth_GBps"], ceil["matmul_TFLOPs"]
    rows: List[dict] = []
    for nk in args.nk:
        for M in args.m:
            for T in args.t:
                lay = Layers(M, nk, nk, T, dtype, device, llc)
                say(f"M={M} N=K={nk} T={T}: P={lay.P} layers={lay.L}")
                provs = providers(lay, device)
                check_agree(lay, provs)
                rounds = {name: make_round(fn, lay.L) for name, fn in provs.items()}
                if device.type == "cpu":  # interleaved: one round of each provider in turn
                    stats = time_interleaved(rounds, args.repeats, warmup=1)
                    res = {name: st.median / lay.L for name, st in stats.items()}
                else:
                    res = {name: t(r) / lay.L for name, r in rounds.items()}
                floor_ms = res["copy"]
                flops = 2 * M * nk * nk  # the W product; an open ΔW is added to W, not multiplied
                roof_ms = max(floor_ms, flops / (rate * 1e12) * 1e3)
                kern = res.get("kernel")
                for name, ms in res.items():
                    moved = lay.bytes if name != "mm-W" else lay.bytes - lay.P * nk * nk * torch.tensor([], dtype=dtype).element_size()
                    if name == "copy":
                        moved = 2 * (lay.bytes // 2 // 4) * 4
                    rows.append(dict(M=M, N=nk, K=nk, T=T, P=lay.P, layers=lay.L, provider=name, median_ms=ms,
                                     floor_ms=floor_ms, x_floor=ms / floor_ms, roofline_ms=roof_ms,
                                     x_roofline=ms / roof_ms, GBps=moved / (ms * 1e-3) / 1e9,
                                     frac_bandwidth=moved / (ms * 1e-3) / 1e9 / bw,
                                     speedup_of_kernel=(ms / kern) if kern else None))
                del lay
    return {"environment": environment(device), "dtype": dtype_name(dtype),
            "copy_bandwidth_GBps": bw, "ceilings": ceil, "last_level_cache_bytes": llc, "small_m": SERVING_ROWS,
            "targets": {"kernel_x_floor_max": TARGET_FLOOR, "authors_over_kernel_min": TARGET_AUTHORS},
            "rows": rows}


def format_rows(rows: List[dict]) -> str:
    head = ("M", "N=K", "T", "P", "provider", "median ms", "x floor", "x roofline", "GB/s", "%bw", "÷ kernel")
    out = [head]
    for r in rows:
        f = lambda v, p="{:.3g}": "-" if v is None else p.format(v)  # noqa: E731
        out.append((str(r["M"]), str(r["N"]), str(r["T"]), str(r["P"]), r["provider"], f(r["median_ms"], "{:.4g}"),
                    f(r["x_floor"], "{:.2f}"), f(r["x_roofline"], "{:.2f}"), f(r["GBps"]), f(100 * r["frac_bandwidth"], "{:.0f}"),
                    f(r["speedup_of_kernel"], "{:.2f}")))
    w = [max(len(x[i]) for x in out) for i in range(len(head))]
    return "\n".join("  ".join(c.ljust(wd) for c, wd in zip(x, w)).rstrip() for x in out)


def _ints(s: str) -> List[int]:
    return [int(v) for v in s.split(",") if v]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="taps-fast bench --suite small", description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--suite", default="small", help=argparse.SUPPRESS)
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--dtype", choices=("auto", "float32", "float16", "bfloat16"), default="auto",
                   help="auto: float32 on the CPU, bfloat16 on CUDA")
    p.add_argument("--m", type=_ints, default=list(MS), help="rows per call, comma-separated")
    p.add_argument("--nk", type=_ints, default=list(NKS), help="N = K sizes, comma-separated")
    p.add_argument("--t", type=_ints, default=list(TS), help="task counts, comma-separated")
    p.add_argument("--repeats", type=int, default=7, help="CPU: timed rounds per provider")
    p.add_argument("--cache-mib", type=int, default=None,
                   help="last-level cache size the layer count is sized against (default: detected)")
    p.add_argument("--out", default=None, help="JSON path (default benchmarks/results/small_<device>_<ts>.json)")
    p.add_argument("--quiet", action="store_true")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = build_parser()
    args = p.parse_args(argv)
    if args.repeats < 1:
        p.error("--repeats must be >= 1")
    if not args.m or not args.nk or not args.t or min(args.m + args.nk + args.t) < 1:
        p.error("--m, --nk and --t need positive integers")
    rec = measure(run, args)
    env = rec["environment"]
    c = rec["ceilings"]
    print(f"device={env['device']} ({env.get('device_name')})  dtype={rec['dtype']}  copy bandwidth "
          f"{c['bandwidth_GBps']:.1f} GB/s  matmul ({c['matmul']}) {c['matmul_TFLOPs']:.3g} TFLOP/s  "
          f"last-level cache {rec['last_level_cache_bytes'] >> 20} MiB")
    print(format_rows(rec["rows"]))
    out = write_record(rec, args.out, "small")
    print(f"wrote {out} ({rec['elapsed_s']:.0f} s)")
    return 0
