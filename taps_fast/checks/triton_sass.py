"""Static GPU check of the Triton kernels: ``python -m taps_fast.info --kernels`` (or
``python -m taps_fast.checks triton``).

Compiles every kernel ahead of time for sm_80 and sm_90 (``triton.compile`` with a ``GPUTarget``
needs no GPU) at every config its autotuner can choose, and reads the cubin with Triton's bundled
``cuobjdump``: registers per thread, shared memory, local memory (spills show as STACK/LOCAL
bytes), and whether the sm_90 SASS uses wgmma (HGMMA instructions). Fails (exit 1) on any spill,
on any matmul kernel that does not use HGMMA on sm_90, and on any compile error, the ways a
kernel can compile fine (or not at all) and still run at a fraction of the card.

Each (kernel, dtype, config, arch) is compiled in two kinds of specialisation (the ``spec`` column):
- ``generic``: pointers 16-byte aligned (as torch allocates them), every integer argument a plain
  i32; the flags of the TAPS training case (bias in the forward; dΔW and ds in the G pass, no dW,
  no db).
- ``runtime``: what Triton's JIT compiles for a typical call. The kernel's own launcher is run on
  small CPU tensors (contiguous, sizes multiples of 16; the kernels are replaced by recorders, so
  nothing is launched) and its arguments go through the installed Triton's own specialisation
  (``create_function_from_signature`` and ``JITFunction._pack_args``, as ``JITFunction.run`` does):
  an integer equal to 1 (the unit stride of a contiguous tensor's last dimension; stride,
  dilation or padding 1 of a conv) becomes a constexpr, an integer divisible by 16 gets
  ``tt.divisibility`` 16. Further typical calls where they compile differently: the forward
  kernels launched for dx (``runtime dx``, the transposed weight: its unit stride is the other
  one), sizes not divisible by 16 (``runtime odd``: a classifier head, odd K or N), and for conv
  channels_last tensors (``runtime cl``) and 1x1 convs (``runtime 1x1``).
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

from ._cuobjdump import parse_res_usage, parse_sass, run_cuobjdump

ARCHS = (80, 90)
POINTER_TYPES = {"fp16": "fp16", "bf16": "bf16", "tf32": "fp32"}  # name -> Triton pointer element type
# All three: bf16 is not a copy of fp16 (its converts differ; one config spilled in bf16 only).
DEFAULT_DTYPES = ("fp16", "bf16", "tf32")


@dataclass(frozen=True)
class Call:
    """A typical launch of a kernel, whose run-time specialisation the check compiles."""
    name: str                   # the row's spec column
    dx: bool = False            # a forward kernel launched for dx (transposed weight view)
    odd: bool = False           # sizes not divisible by 16 (so neither are the strides made of them)
    channels_last: bool = False  # conv: x, W, ΔW, y in channels_last
    ksize: int = 3              # conv: KH = KW (stride 1, padding ksize // 2, dilation 1)


RUNTIME = Call("runtime")
RUNTIME_DX = Call("runtime dx", dx=True)
RUNTIME_ODD = Call("runtime odd", odd=True)
RUNTIME_DX_ODD = Call("runtime dx odd", dx=True, odd=True)
RUNTIME_CL = Call("runtime cl", channels_last=True)
RUNTIME_1X1 = Call("runtime 1x1", ksize=1)
GENERIC = "generic"


@dataclass
class Spec:
    module: str           # taps_fast.kernels.<module>
    name: str             # the @triton.jit function (wrapped by @triton.autotune or not)
    fp32_ptrs: Tuple[str, ...]  # pointer args that are fp32 buffers whatever the input dtype
    constexprs: Dict[str, object]
    matmul: bool = True
    tiles: Optional[Tuple[str, str, str]] = ("BLOCK_M", "BLOCK_N", "BLOCK_K")
    i32_ptrs: Tuple[str, ...] = ()  # int32 index buffers (multi-task: order, segments, slots)
    calls: Tuple[Call, ...] = field(default_factory=tuple)  # the run-time specialisations compiled


_LINEAR_FWD_CALLS = (RUNTIME, RUNTIME_DX, RUNTIME_ODD, RUNTIME_DX_ODD)
_LINEAR_CALLS = (RUNTIME, RUNTIME_ODD)
_CONV_CALLS = (RUNTIME, RUNTIME_CL, RUNTIME_1X1)

SPECS: List[Spec] = [
    Spec("linear", "_taps_linear_fwd_kernel", (), dict(HAS_BIAS=True, SPLIT_K=1, GROUP_M=8),
         calls=_LINEAR_FWD_CALLS),
    Spec("linear", "_taps_linear_wgrad_kernel", ("part_ptr", "ws_ptr", "db_ptr"),
         dict(NEEDS_DDELTA=True, NEEDS_DWEIGHT=False, NEEDS_DSCORE=True, HAS_DBIAS=False, SPLIT=1, GROUP_M=8),
         tiles=("BLOCK_N", "BLOCK_K", "BLOCK_R"), calls=_LINEAR_CALLS),
    Spec("conv", "_taps_conv2d_fwd_kernel", (), dict(HAS_BIAS=True, GROUP_M=8), calls=_CONV_CALLS),
    Spec("conv", "_taps_conv2d_dgrad_kernel", (), dict(GROUP_M=8), calls=_CONV_CALLS),
    Spec("mt_linear", "_taps_mt_linear_fwd_kernel", (), dict(HAS_BIAS=True, GROUP_M=8, BLOCK_T=8),
         i32_ptrs=("order_ptr", "seg_start_ptr", "seg_count_ptr", "slot_ptr"), calls=_LINEAR_FWD_CALLS),
    Spec("mt_linear", "_taps_mt_linear_wgrad_kernel", ("part_ptr",),
         dict(NEEDS_DDELTA=True, NEEDS_DSCORE=True, GROUP_M=8), tiles=("BLOCK_N", "BLOCK_K", "BLOCK_R"),
         i32_ptrs=("order_ptr", "seg_start_ptr", "seg_count_ptr", "task_of_slot_ptr", "slot_ptr"),
         calls=_LINEAR_CALLS),
    Spec("conv", "_taps_conv2d_wgrad_kernel", ("part_ptr", "ws_ptr", "db_ptr"),
         dict(NEEDS_DDELTA=True, NEEDS_DWEIGHT=False, NEEDS_DSCORE=True, HAS_DBIAS=False, SPLIT=1, GROUP_M=8),
         tiles=("BLOCK_N", "BLOCK_K", "BLOCK_R"), calls=_CONV_CALLS),
    Spec("mt_conv", "_taps_mt_conv2d_fwd_kernel", (), dict(HAS_BIAS=True, GROUP_M=8),
         i32_ptrs=("order_ptr", "seg_start_ptr", "seg_count_ptr", "slot_ptr"), calls=_CONV_CALLS),
    Spec("mt_conv", "_taps_mt_conv2d_dgrad_kernel", (), dict(GROUP_M=8),
         i32_ptrs=("order_ptr", "seg_start_ptr", "seg_count_ptr", "slot_ptr"), calls=_CONV_CALLS),
    Spec("mt_conv", "_taps_mt_conv2d_wgrad_kernel", ("part_ptr",),
         dict(NEEDS_DDELTA=True, NEEDS_DSCORE=True, GROUP_M=8), tiles=("BLOCK_N", "BLOCK_K", "BLOCK_R"),
         i32_ptrs=("order_ptr", "seg_start_ptr", "seg_count_ptr", "task_of_slot_ptr", "slot_ptr"),
         calls=_CONV_CALLS),
    Spec("_common", "_taps_wgrad_split_epilogue_kernel", ("ws_ptr", "part_ptr"),
         dict(NEEDS_DDELTA=True, NEEDS_DWEIGHT=False, NEEDS_DSCORE=True, BLOCK_N=32, BLOCK_K=64),
         matmul=False, tiles=None, calls=_LINEAR_CALLS),
]


def _kernel(spec: Spec):
    """(the JITFunction, its Autotuner or None)."""
    import importlib

    from triton.runtime.autotuner import Autotuner

    obj = getattr(importlib.import_module(f"taps_fast.kernels.{spec.module}"), spec.name)
    return (obj.fn, obj) if isinstance(obj, Autotuner) else (obj, None)  # an Autotuner wraps the JITFunction


def _signature(fn, spec: Spec, elem: str, constexprs: Dict[str, object]) -> Dict[str, str]:
    sig = {}
    for a in fn.arg_names:
        if a in constexprs:
            sig[a] = "constexpr"
        elif a in spec.i32_ptrs:
            sig[a] = "*i32"
        elif a.endswith("_ptr"):
            sig[a] = "*fp32" if (a in spec.fp32_ptrs or elem == "fp32") else f"*{elem}"
        elif a == "threshold":
            sig[a] = "fp32"
        else:
            sig[a] = "i32"
    return sig


# ----------------------------------------------------------------------------- run-time specialisation
def _torch_dtype(dtype: str) -> torch.dtype:
    return {"fp16": torch.float16, "bf16": torch.bfloat16, "tf32": torch.float32}[dtype]


def _launch(spec: Spec, dtype: str, call: Call) -> None:
    """Run spec's launcher (taps_fast.kernels) for ``call`` on CPU tensors, with the flags of the
    TAPS training case (as the generic specialisation); the kernels must be recorders (_capture)."""
    from taps_fast.kernels import conv, linear, mt_conv, mt_linear

    dt = _torch_dtype(dtype)
    M, N, K = (97, 81, 113) if call.odd else (256, 192, 128)  # x [M, K], W [N, K]
    T = S = 4  # tasks, delta slots (BLOCK_T = 8)
    score = torch.zeros((), dtype=dt)
    scores, thr = torch.zeros(T, dtype=dt), torch.zeros(T, dtype=dt)
    slot = torch.arange(S, dtype=torch.int32)
    if spec.module in ("linear", "mt_linear") or spec.module == "_common":
        w, d = torch.empty(N, K, dtype=dt), torch.empty(N, K, dtype=dt)
        x = torch.empty(M, N if call.dx else K, dtype=dt)
        dy = torch.empty(M, N, dtype=dt)
        rows = torch.arange(M) % (T + 1) - 1  # base rows and each task's
        deltas = torch.empty(S, N, K, dtype=dt)
        if spec.name == "_taps_linear_fwd_kernel":
            linear.linear_fwd(x, w, d, score, None if call.dx else torch.empty(N, dtype=dt), 0.5,
                              transpose_weight=call.dx)
        elif spec.name == "_taps_linear_wgrad_kernel":
            linear.linear_wgrad(dy, x, w, d, score, 0.5, False, True, True, False)
        elif spec.name == "_taps_wgrad_split_epilogue_kernel":  # the second pass of a split G pass
            linear.linear_wgrad(dy, x, w, d, score, 0.5, False, True, True, False, split=2)
        elif spec.name == "_taps_mt_linear_fwd_kernel":
            mt_linear.mt_linear_fwd(x, rows, w, deltas, slot, scores, thr,
                                    None if call.dx else torch.empty(N, dtype=dt), transpose_weight=call.dx)
        elif spec.name == "_taps_mt_linear_wgrad_kernel":
            mt_linear.mt_linear_wgrad(dy, x, rows, deltas, slot, scores, thr, True, True)
        else:
            raise ValueError(f"no typical call for {spec.name}")
        return
    B, C, H, W, OC, k = 4, 128, 16, 16, 128, call.ksize  # a "same" conv: OH, OW = H, W
    fmt = torch.channels_last if call.channels_last else torch.contiguous_format
    x = torch.empty(B, C, H, W, dtype=dt).to(memory_format=fmt)
    dy = torch.empty(B, OC, H, W, dtype=dt).to(memory_format=fmt)
    w, d = (torch.empty(OC, C, k, k, dtype=dt).to(memory_format=fmt) for _ in range(2))
    # the stacked deltas [S, OC, C, k, k]: each slot in W's layout
    deltas = torch.stack([d] * S) if not call.channels_last else \
        torch.empty(S, OC, k, k, C, dtype=dt).permute(0, 1, 4, 2, 3)
    geo = ((1, 1), (k // 2, k // 2), (1, 1))  # stride, padding, dilation
    tasks = torch.arange(B) % (T + 1) - 1
    bias = torch.empty(OC, dtype=dt)
    if spec.name == "_taps_conv2d_fwd_kernel":
        conv.conv2d_fwd(x, w, d, score, bias, *geo, 0.5, memory_format=fmt)
    elif spec.name == "_taps_conv2d_dgrad_kernel":
        conv.conv2d_dgrad(dy, x, w, d, score, *geo, 0.5)
    elif spec.name == "_taps_conv2d_wgrad_kernel":
        conv.conv2d_wgrad(dy, x, w, d, score, *geo, 0.5, False, True, True, False)
    elif spec.name == "_taps_mt_conv2d_fwd_kernel":
        mt_conv.mt_conv2d_fwd(x, tasks, w, deltas, slot, scores, thr, bias, *geo)
    elif spec.name == "_taps_mt_conv2d_dgrad_kernel":
        mt_conv.mt_conv2d_dgrad(dy, x, tasks, w, deltas, slot, scores, thr, *geo)
    elif spec.name == "_taps_mt_conv2d_wgrad_kernel":
        mt_conv.mt_conv2d_wgrad(dy, x, tasks, deltas, slot, scores, thr, *geo, True, True)
    else:
        raise ValueError(f"no typical call for {spec.name}")


class _Recorder:
    """Stands in for a kernel: ``k[grid](*args, **kwargs)`` records the call, launches nothing."""

    def __init__(self, name: str, log: list):
        self.name, self.log = name, log

    def __getitem__(self, grid) -> Callable:
        return lambda *args, **kwargs: self.log.append((self.name, args, kwargs))


@lru_cache(maxsize=None)
def captured_call(spec_i: int, dtype: str, call: Call) -> Tuple[tuple, dict]:
    """(args, kwargs) that spec's launcher passes to its kernel in ``call`` (the last such launch)."""
    import importlib

    spec = SPECS[spec_i]
    log: list = []
    saved = []
    for s in SPECS:  # every kernel: a launcher may launch several (the split G pass)
        mod = importlib.import_module(f"taps_fast.kernels.{s.module}")
        saved.append((mod, s.name, getattr(mod, s.name)))
        setattr(mod, s.name, _Recorder(s.name, log))
    try:
        _launch(spec, dtype, call)
    finally:
        for mod, name, obj in saved:
            setattr(mod, name, obj)
    mine = [(a, k) for n, a, k in log if n == spec.name]
    if not mine:
        raise RuntimeError(f"the launcher did not launch {spec.name} for {call.name}")
    return mine[-1]


def runtime_specialisation(spec_i: int, dtype: str, call: Call, tile_cx: Dict[str, object], arch: int):
    """(signature, constexprs, attrs) for ASTSource, as the installed Triton's JIT derives them from
    the arguments of ``call`` plus the config's block sizes (JITFunction.run: the binder built by
    create_function_from_signature, then _pack_args)."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature

    fn, _ = _kernel(SPECS[spec_i])
    args, kwargs = captured_call(spec_i, dtype, call)
    kwargs = {**kwargs, **tile_cx}
    backend = make_backend(GPUTarget("cuda", arch, 32))
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    bound, specialization, options = binder(*args, **kwargs)
    _, sig, cx, attrs = fn._pack_args(backend, kwargs, bound, specialization, options)
    return sig, cx, attrs


_HGMMA = re.compile(r"\bHGMMA\b")  # sm_90's wgmma, as SASS spells it


def compile_one(job) -> dict:
    """Compile one (kernel, dtype, config, arch, spec); returns a result row (runs in a worker).
    ``spec`` is GENERIC or a Call (a run-time specialisation)."""
    spec_i, dtype, tile, arch, variant = job
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    spec = SPECS[spec_i]
    warps, stages = 4, 1
    tile_cx: Dict[str, object] = {}
    if tile is not None:
        bm, bn, bk, warps, stages = tile
        tile_cx = dict(zip(spec.tiles, (bm, bn, bk)))
    row = dict(kernel=spec.name, dtype=dtype, arch=f"sm_{arch}", matmul=spec.matmul,
               spec=variant if variant == GENERIC else variant.name,
               config="-" if tile is None else "{}x{}x{} w{} s{}".format(*tile))
    try:
        fn, _ = _kernel(spec)
        if variant == GENERIC:
            cx = {**spec.constexprs, **tile_cx}
            if "PREC" in fn.arg_names:
                cx["PREC"] = "tf32" if dtype == "tf32" else "ieee"
            sig = _signature(fn, spec, POINTER_TYPES[dtype], cx)
            attrs = {(i,): [["tt.divisibility", 16]] for i, a in enumerate(fn.arg_names) if a.endswith("_ptr")}
        else:
            sig, cx, attrs = runtime_specialisation(spec_i, dtype, variant, tile_cx, arch)
        src = ASTSource(fn=fn, signature=sig, constexprs=cx, attrs=attrs)
        ck = triton.compile(src, target=GPUTarget("cuda", arch, 32),
                            options={"num_warps": warps, "num_stages": stages})
        with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
            f.write(ck.asm["cubin"])
            f.flush()
            res = run_cuobjdump(["-res-usage", f.name], check=True).stdout
            sass = run_cuobjdump(["-sass", f.name], check=True).stdout
        use = list(parse_res_usage(res).values())[-1]  # the cubin holds this one kernel
        row.update(regs=use.get("REG", -1), smem=int(ck.metadata.shared),
                   local=use.get("STACK", 0) + use.get("LOCAL", 0), hgmma=any(parse_sass(sass, _HGMMA).values()),
                   error=None)
    except Exception as e:  # report, do not crash the table
        row.update(regs=-1, smem=-1, local=-1, hgmma=False, error=f"{type(e).__name__}: {str(e)[:200]}")
    return row


def autotune_tiles(spec: Spec, dtype: str) -> list:
    """The (BM, BN, BK, warps, stages) of every config the kernel's autotuner can choose for
    inputs of this dtype (the configs are made per element size, see kernels/_common.py)."""
    _, tuner = _kernel(spec)
    if tuner is None:
        return [None]
    prune = tuner.early_config_prune  # the kernel's own prune_by_dtype, on a tensor of that size
    probe = torch.empty(0, dtype=torch.float32 if dtype == "tf32" else torch.float16)
    kept = prune(tuner.configs, {prune.arg: probe}) if prune is not None else tuner.configs
    return [tuple(c.kwargs[k] for k in spec.tiles) + (c.num_warps, c.num_stages) for c in kept]


ALL_SPECS = ("generic", "runtime", "runtime dx", "runtime odd", "runtime dx odd", "runtime cl", "runtime 1x1")
# The default compiles every specialisation: 768 compiles for both archs, none failing under
# triton 3.8.0 and 3.6.0 since the configs that spilled were replaced (before: 37 and 61 failing,
# tables in benchmarks/results/static_check_triton3{6,8}_*_20261205.txt; after:
# static_check_triton3{6,8}_all_20261205.txt). ``--specs generic`` is the quick form.
DEFAULT_SPECS = ALL_SPECS


def variants(spec: Spec, specs: Sequence[str] = DEFAULT_SPECS) -> list:
    """GENERIC and the Calls of spec that ``specs`` names."""
    return ([GENERIC] if GENERIC in specs else []) + [c for c in spec.calls if c.name in specs]


def jobs(dtypes: Sequence[str], archs: Sequence[int], specs: Sequence[str] = DEFAULT_SPECS) -> list:
    out = []
    for i, spec in enumerate(SPECS):
        for dtype in dtypes:
            for tile in autotune_tiles(spec, dtype):
                for v in variants(spec, specs):
                    for arch in archs:
                        out.append((i, dtype, tile, arch, v))
    return out


def problems(row: dict) -> List[str]:
    p = []
    if row["error"]:
        p.append("compile error: " + row["error"])
    if row["local"] > 0:
        p.append(f"spills {row['local']} bytes to local memory")
    if row["matmul"] and row["arch"] == "sm_90" and not row["hgmma"] and not row["error"]:
        p.append("matmul without HGMMA (wgmma) on sm_90")
    return p


def run(dtypes: Sequence[str] = DEFAULT_DTYPES, archs: Sequence[int] = ARCHS,
        workers: Optional[int] = None, specs: Sequence[str] = DEFAULT_SPECS) -> Tuple[str, int]:
    """Compile everything and return (the table, the number of failing rows)."""
    import triton

    todo = jobs(dtypes, archs, specs)
    with ProcessPoolExecutor(max_workers=workers or os.cpu_count() or 1) as ex:
        rows = list(ex.map(compile_one, todo))
    head = ("kernel", "dtype", "config (MxNxK warps stages)", "spec", "arch", "regs", "smem B", "local B", "HGMMA",
            "verdict")
    table = [head]
    bad = 0
    for r in rows:
        p = problems(r)
        bad += bool(p)
        table.append((r["kernel"], r["dtype"], r["config"], r["spec"], r["arch"], str(r["regs"]), str(r["smem"]),
                      str(r["local"]), ("yes" if r["hgmma"] else "no") if r["matmul"] else "n/a",
                      "; ".join(p) or "ok"))
    w = [max(len(t[i]) for t in table) for i in range(len(head))]
    lines = [f"triton {triton.__version__}, torch {torch.__version__}"]
    lines += ["  ".join(c.ljust(wd) for c, wd in zip(t, w)).rstrip() for t in table]
    lines.append(f"{len(rows)} compiles, {bad} failing")
    return "\n".join(lines), bad


def main(argv: Optional[Sequence[str]] = None) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="python -m taps_fast.info --kernels")
    p.add_argument("--dtypes", default=",".join(DEFAULT_DTYPES), help="fp16,bf16,tf32")
    p.add_argument("--archs", default=",".join(map(str, ARCHS)))
    p.add_argument("--specs", default=",".join(DEFAULT_SPECS), help="|".join(ALL_SPECS) + " (comma-separated), or all")
    args, _ = p.parse_known_args(argv)
    dtypes = [d for d in args.dtypes.split(",") if d]
    bad_d = [d for d in dtypes if d not in POINTER_TYPES]
    if bad_d:
        p.error(f"unknown dtype(s) {bad_d}; choose from {list(POINTER_TYPES)}")
    specs = list(ALL_SPECS) if args.specs == "all" else [s.strip() for s in args.specs.split(",") if s.strip()]
    bad_s = [s for s in specs if s not in ALL_SPECS]
    if bad_s:
        p.error(f"unknown spec(s) {bad_s}; choose from {list(ALL_SPECS)}")
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        # The interpreter replaces @triton.jit functions; compile in a clean process instead.
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        cmd = [sys.executable, "-m", "taps_fast.checks", "triton", "--dtypes", args.dtypes, "--archs", args.archs,
               "--specs", args.specs]
        sys.stdout.flush()
        return subprocess.run(cmd, env=env).returncode
    table, bad = run(dtypes, [int(a) for a in args.archs.split(",")], specs=specs)
    print(table)
    return 1 if bad else 0
