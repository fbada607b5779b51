"""Kernel-level benchmark: ``taps-fast bench --suite kernels`` (or ``python -m taps_fast.bench --suite kernels``).

Per layer shape, forward + backward (and, at small M, forward only), providers:

- ``floor``: plain F.linear / F.conv2d on W alone with a full weight gradient: the FLOPs of a TAPS
  step with no delta to read. Every ratio is to it.
- ``authors``: the authors' style, taps_linear_ref / taps_conv2d_ref (materialise W + I·ΔW, ordinary
  op, autograd).
- ``authors-compiled``: torch.compile of that (on by default on CUDA; ``--compiled`` on the CPU, where
  inductor's C++ compile of every shape takes minutes on 2 cores).
- ``taps``: the taps_fast op through the dispatcher (the Triton kernels on CUDA; the reference
  path on the CPU, where the interpreter is not a fast path and is never timed).

Shapes: the ViT-B/16 projections (N×K = 768×768 proj, 2304×768 qkv, 3072×768 fc1, 768×3072 fc2) at
M = batch·197 rows; small M ∈ {1, 4, 16} at the same N×K; N = K = 8192 at small M; every distinct
conv of timm's ResNet-50 at 224 px (found by running the model once with hooks). Batch 64 on CUDA;
on the CPU batch 8 for ViT and 2 for the convs (--batch / --conv-batch), so the run stays minutes.

Ceilings, measured in the same run: memory bandwidth from a large device-to-device copy
(2·bytes / time) and the matmul rate from a large matmul (bf16 8192³ on CUDA, fp32 2048³ on the
CPU). Each row reports achieved TFLOP/s and GB/s and their fraction of these. The bytes that must
move: x, W, the open ΔW, y (forward); for forward + backward additionally dy, dx, and dΔW.

On CUDA the small-M forward is also measured inside a CUDA graph replaying a stack of L ≥ 12
layers with distinct weights, L chosen so that the weights exceed 4× the L2 cache: the figure is
then memory, not launches or L2 (``graph`` rows; per-layer time = replay / L).
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
    selected_backends,
    timer,
    write_record,
)

VIT_NK = [(768, 768), (2304, 768), (3072, 768), (768, 3072)]
FEW_ROWS = (1, 4, 16)
BIG_NK = (8192, 8192)
TOKENS = 197  # ViT-B/16 at 224 px: 196 patches + the class token
GRAPH_MIN_LAYERS = 12


# ----------------------------------------------------------------------------- providers
def _grad_step(f: Callable[[], torch.Tensor], leaves: List[torch.Tensor], dy: torch.Tensor) -> Callable[[], None]:
    """One forward f() and the gradients of its output (upstream dy) with respect to ``leaves``."""
    def run():
        torch.autograd.grad(f(), leaves, dy)
    return run


def _linear_inputs(M, N, K, dtype, device, seed=0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    mk = lambda *s, scale=1.0: (torch.randn(*s, generator=g) * scale).to(device=device, dtype=dtype)  # noqa: E731
    x = mk(M, K)
    w = mk(N, K, scale=K ** -0.5)
    d = mk(N, K, scale=1e-2 * K ** -0.5)
    s = torch.tensor(0.15, device=device, dtype=dtype)
    dy = mk(M, N)
    return x, w, d, s, dy


def linear_providers(M, N, K, dtype, device, backward: bool, compiled: bool) -> Dict[str, Callable]:
    from ..ops import taps_linear, taps_linear_ref

    x, w, d, s, dy = _linear_inputs(M, N, K, dtype, device)
    ref_c = torch.compile(taps_linear_ref) if compiled else None
    if not backward:
        out = {
            "floor": lambda: F.linear(x, w),
            "authors": lambda: taps_linear_ref(x, w, d, s, None, 0.1),
            "taps": lambda: taps_linear(x, w, d, s, None, 0.1),
        }
        if compiled:
            out["authors-compiled"] = lambda: ref_c(x, w, d, s, None, 0.1)
        return out
    xg = x.clone().requires_grad_(True)
    wg = w.clone().requires_grad_(True)
    dg = d.clone().requires_grad_(True)
    sg = s.clone().requires_grad_(True)
    out = {
        "floor": _grad_step(lambda: F.linear(xg, wg), [xg, wg], dy),
        "authors": _grad_step(lambda: taps_linear_ref(xg, w, dg, sg, None, 0.1), [xg, dg, sg], dy),
        "taps": _grad_step(lambda: taps_linear(xg, w, dg, sg, None, 0.1), [xg, dg, sg], dy),
    }
    if compiled:
        out["authors-compiled"] = _grad_step(lambda: ref_c(xg, w, dg, sg, None, 0.1), [xg, dg, sg], dy)
    return out


def resnet50_convs(resolution: int = 224) -> List[dict]:
    """Every distinct conv of timm's resnet50 (random weights, one batch-1 forward with hooks)."""
    import timm

    model = timm.create_model("resnet50", pretrained=False).eval()
    seen: Dict[tuple, dict] = {}

    def hook(m, inp, out):
        x = inp[0]
        key = (m.in_channels, m.out_channels, m.kernel_size, m.stride, m.padding, m.dilation, x.shape[2], x.shape[3])
        if key not in seen:
            seen[key] = dict(C=m.in_channels, O=m.out_channels, k=m.kernel_size, stride=m.stride,
                             padding=m.padding, dilation=m.dilation, H=x.shape[2], W=x.shape[3], count=0)
        seen[key]["count"] += 1

    hs = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    with torch.no_grad():
        model(torch.zeros(1, 3, resolution, resolution))
    for h in hs:
        h.remove()
    return list(seen.values())


def conv_providers(c: dict, B: int, dtype, device, compiled: bool) -> Dict[str, Callable]:
    from ..ops import taps_conv2d, taps_conv2d_ref

    g = torch.Generator(device="cpu").manual_seed(0)
    fan = c["C"] * c["k"][0] * c["k"][1]
    cl = torch.channels_last
    x = torch.randn(B, c["C"], c["H"], c["W"], generator=g).to(device=device, dtype=dtype).contiguous(memory_format=cl)
    w = (torch.randn(c["O"], c["C"], *c["k"], generator=g) * fan ** -0.5).to(device=device, dtype=dtype)
    d = w * 1e-2
    s = torch.tensor(0.15, device=device, dtype=dtype)
    geo = dict(stride=c["stride"], padding=c["padding"], dilation=c["dilation"])
    with torch.no_grad():
        y0 = F.conv2d(x, w, None, **geo)
    dy = torch.randn(y0.shape, generator=g).to(device=device, dtype=dtype).contiguous(memory_format=cl)
    xg, wg, dg, sg = (t.clone().requires_grad_(True) for t in (x, w, d, s))
    ref_c = torch.compile(taps_conv2d_ref) if compiled else None
    out = {
        "floor": _grad_step(lambda: F.conv2d(xg, wg, None, **geo), [xg, wg], dy),
        "authors": _grad_step(lambda: taps_conv2d_ref(xg, w, dg, sg, None, threshold=0.1, **geo), [xg, dg, sg], dy),
        "taps": _grad_step(lambda: taps_conv2d(xg, w, dg, sg, None, threshold=0.1, **geo), [xg, dg, sg], dy),
    }
    if compiled:
        out["authors-compiled"] = _grad_step(lambda: ref_c(xg, w, dg, sg, None, threshold=0.1, **geo),
                                             [xg, dg, sg], dy)
    return out


def graph_stack_forward(M, N, K, dtype, device, t, l2_bytes: int) -> Dict[str, dict]:
    """Small-M forward per layer inside a CUDA graph over a stack of L layers with distinct
    weights (L >= 12 and the weights >= 4x L2), for floor (W only) and taps (W + open ΔW)."""
    from ..ops import taps_linear

    esz = torch.tensor([], dtype=dtype).element_size()
    per_layer = 2 * N * K * esz
    L = max(GRAPH_MIN_LAYERS, math.ceil(4 * l2_bytes / per_layer))
    x, _, _, s, _ = _linear_inputs(M, N, K, dtype, device)
    ws = [torch.randn(N, K, device=device, dtype=dtype) * K ** -0.5 for _ in range(L)]
    ds = [w * 1e-2 for w in ws]
    res = {}
    for name, fn in (("floor", lambda i: F.linear(x, ws[i])),
                     ("taps", lambda i: taps_linear(x, ws[i], ds[i], s, None, 0.1))):
        replay = cuda_graph_round(fn, L)  # L distinct outputs, alive while timed
        ms = t(replay) / L
        del replay  # frees the graph and its outputs before the next provider's
        bytes_ = (M * K + N * K * (2 if name == "taps" else 1) + M * N) * esz
        res[name] = dict(ms=ms, bytes=bytes_, layers=L)
    return res


# ----------------------------------------------------------------------------- rows
def _row(group, shape, mode, provider, ms, flops, bytes_, ceil, extra=None) -> dict:
    r = dict(group=group, shape=shape, mode=mode, provider=provider, median_ms=ms,
             TFLOPs=flops / (ms * 1e-3) / 1e12 if ms > 0 else None,
             GBps=bytes_ / (ms * 1e-3) / 1e9 if ms > 0 else None, flops=flops, bytes=bytes_)
    r["frac_matmul"] = r["TFLOPs"] / ceil["matmul_TFLOPs"] if r["TFLOPs"] else None
    r["frac_bandwidth"] = r["GBps"] / ceil["bandwidth_GBps"] if r["GBps"] else None
    r.update(extra or {})
    return r


def add_floor_ratios(rows: List[dict]) -> None:
    floor = {(r["group"], r["shape"], r["mode"]): r["median_ms"] for r in rows if r["provider"] == "floor"}
    for r in rows:
        f = floor.get((r["group"], r["shape"], r["mode"]))
        r["ratio_to_floor"] = r["median_ms"] / f if f else None


def format_rows(rows: List[dict]) -> str:
    head = ("group", "shape", "mode", "provider", "median ms", "x floor", "TFLOP/s", "%mm", "GB/s", "%bw")
    out = [head]
    for r in rows:
        f = lambda v, p="{:.3g}": "-" if v is None else p.format(v)  # noqa: E731
        out.append((r["group"], r["shape"], r["mode"], r["provider"], f(r["median_ms"], "{:.4g}"),
                    f(r.get("ratio_to_floor"), "{:.2f}"), f(r["TFLOPs"]), f(r["frac_matmul"] and 100 * r["frac_matmul"], "{:.0f}"),
                    f(r["GBps"]), f(r["frac_bandwidth"] and 100 * r["frac_bandwidth"], "{:.0f}")))
    w = [max(len(x[i]) for x in out) for i in range(len(head))]
    return "\n".join("  ".join(c.ljust(wd) for c, wd in zip(x, w)).rstrip() for x in out)


# ----------------------------------------------------------------------------- run
def run(args, say: Callable[..., None] = lambda *a: None) -> dict:
    """Measure the suite; ``say`` receives progress lines (main passes a stderr printer)."""
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    cuda = device.type == "cuda"
    t = timer(device, args.repeats)
    compiled = args.compiled if args.compiled is not None else cuda
    esz = torch.tensor([], dtype=dtype).element_size()
    batch = args.batch or (64 if cuda else 8)
    conv_batch = args.conv_batch or (64 if cuda else 2)
    ceil = ceilings(device, t)
    rows: List[dict] = []
    groups = args.groups

    vit = VIT_NK if not args.quick else [(24, 40)]
    if "vit" in groups:
        M = batch * TOKENS if not args.quick else 37
        for N, K in vit:
            shape = f"M={M} N={N} K={K}"
            say("vit", shape)
            flops = 3 * 2 * M * N * K
            for p, fn in linear_providers(M, N, K, dtype, device, True, compiled).items():
                moved = (M * K + 2 * N * K + 2 * M * N + M * K + N * K) * esz  # x, W, ΔW, y, dy, dx, dΔW
                rows.append(_row("vit-b", shape, "fwd+bwd", p, t(fn), flops, moved, ceil))
    if "small" in groups:
        sizes = vit + ([BIG_NK] if not args.quick else [])
        for N, K in sizes:
            for M in FEW_ROWS:
                shape = f"M={M} N={N} K={K}"
                say("small-M", shape)
                for p, fn in linear_providers(M, N, K, dtype, device, False, compiled).items():
                    moved = (M * K + N * K * (1 if p == "floor" else 2) + M * N) * esz
                    rows.append(_row("small-M", shape, "fwd", p, t(fn), 2 * M * N * K, moved, ceil))
                if cuda and not args.no_graph:
                    l2 = last_level_cache_bytes(device)
                    for p, r in graph_stack_forward(M, N, K, dtype, device, t, l2).items():
                        rows.append(_row("small-M", shape, "fwd graph", p, r["ms"], 2 * M * N * K, r["bytes"],
                                         ceil, {"graph_layers": r["layers"]}))
    if "conv" in groups:
        convs = resnet50_convs() if not args.quick else [dict(C=3, O=8, k=(3, 3), stride=(2, 2), padding=(1, 1),
                                                              dilation=(1, 1), H=9, W=9, count=1)]
        for c in convs:
            oh = (c["H"] + 2 * c["padding"][0] - c["k"][0]) // c["stride"][0] + 1
            ow = (c["W"] + 2 * c["padding"][1] - c["k"][1]) // c["stride"][1] + 1
            shape = (f"B={conv_batch} {c['C']}->{c['O']} {c['k'][0]}x{c['k'][1]} s{c['stride'][0]} "
                     f"{c['H']}x{c['W']} (x{c['count']})")
            say("conv", shape)
            flops = 3 * 2 * conv_batch * oh * ow * c["O"] * c["C"] * c["k"][0] * c["k"][1]
            wsz = c["O"] * c["C"] * c["k"][0] * c["k"][1]
            xsz = conv_batch * c["C"] * c["H"] * c["W"]
            ysz = conv_batch * c["O"] * oh * ow
            moved = (2 * xsz + 3 * wsz + 2 * ysz) * esz
            for p, fn in conv_providers(c, conv_batch, dtype, device, compiled).items():
                rows.append(_row("resnet50-conv", shape, "fwd+bwd", p, t(fn), flops, moved, ceil))
    add_floor_ratios(rows)
    env = environment(device)
    return {"environment": env, "ceilings": ceil, "dtype": dtype_name(dtype),
            "backends": selected_backends(device, dtype), "batch": batch, "conv_batch": conv_batch,
            "compiled": compiled, "rows": rows}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="taps-fast bench --suite kernels", description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--suite", default="kernels", help=argparse.SUPPRESS)
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--dtype", choices=("auto", "float32", "float16", "bfloat16"), default="auto",
                   help="auto: float32 on CPU, bfloat16 on CUDA")
    p.add_argument("--groups", type=lambda s: [g for g in s.split(",") if g], default=["vit", "small", "conv"],
                   help="comma-separated: vit, small, conv")
    p.add_argument("--batch", type=int, default=None, help="ViT batch (M = batch*197); default 64 CUDA, 8 CPU")
    p.add_argument("--conv-batch", type=int, default=None, help="default 64 CUDA, 2 CPU")
    p.add_argument("--repeats", type=int, default=5, help="CPU: timed calls per provider")
    p.add_argument("--compiled", dest="compiled", action="store_true", default=None,
                   help="include torch.compile of the authors' style (default: on CUDA only)")
    p.add_argument("--no-compiled", dest="compiled", action="store_false")
    p.add_argument("--no-graph", action="store_true", help="CUDA: skip the CUDA-graph stack rows")
    p.add_argument("--quick", action="store_true", help="tiny shapes (a smoke test of the suite)")
    p.add_argument("--out", default=None, help="JSON path (default benchmarks/results/kernels_<device>_<ts>.json)")
    p.add_argument("--quiet", action="store_true")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = build_parser()
    args = p.parse_args(argv)
    bad = [g for g in args.groups if g not in ("vit", "small", "conv")]
    if bad or not args.groups:
        p.error(f"--groups: unknown {bad}; choose from vit, small, conv")
    if args.repeats < 1:
        p.error("--repeats must be >= 1")
    rec = measure(run, args)
    c = rec["ceilings"]
    dev = rec["environment"]["device"]
    print(f"device={dev} ({rec['environment'].get('device_name')})  dtype={rec['dtype']}  "
          f"backends={rec['backends']}  ceilings: copy {c['bandwidth_GBps']:.1f} GB/s, "
          f"matmul ({c['matmul']}) {c['matmul_TFLOPs']:.3g} TFLOP/s")
    print(format_rows(rec["rows"]))
    out = write_record(rec, args.out, "kernels")
    print(f"wrote {out} ({rec['elapsed_s']:.0f} s)")
    return 0
