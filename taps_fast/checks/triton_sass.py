"""Static GPU check of the Triton kernels: ``python -m taps_fast.info --kernels`` (or
``python -m taps_fast.checks triton``).

Compiles every kernel ahead of time for sm_80 and sm_90 (``triton.compile`` with a ``GPUTarget``
needs no GPU) at every config its autotuner can choose, and reads the cubin with Triton's bundled
``cuobjdump``: registers per thread, shared memory, local memory (spills show as STACK/LOCAL
bytes), and whether the sm_90 SASS uses wgmma (HGMMA instructions). Fails (exit 1) on any spill,
and on any matmul kernel that does not use HGMMA on sm_90, the two ways a kernel can compile fine
and still run at a fraction of the card.

Representative specialisation: pointers 16-byte aligned (as torch allocates them); the flags of
the TAPS training case (bias in the forward; dΔW and ds in the G pass, no dW, no db).
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from ._cuobjdump import parse_res_usage, parse_sass, run_cuobjdump

ARCHS = (80, 90)
POINTER_TYPES = {"fp16": "fp16", "bf16": "bf16", "tf32": "fp32"}  # name -> Triton pointer element type
# All three: bf16 is not a copy of fp16 (its converts differ; one config spilled in bf16 only).
DEFAULT_DTYPES = ("fp16", "bf16", "tf32")


@dataclass
class Spec:
    module: str           # taps_fast.kernels.<module>
    name: str             # the @triton.jit function (wrapped by @triton.autotune or not)
    fp32_ptrs: Tuple[str, ...]  # pointer args that are fp32 buffers whatever the input dtype
    constexprs: Dict[str, object]
    matmul: bool = True
    tiles: Optional[Tuple[str, str, str]] = ("BLOCK_M", "BLOCK_N", "BLOCK_K")
    i32_ptrs: Tuple[str, ...] = ()  # int32 index buffers (multi-task: order, segments, slots)


SPECS: List[Spec] = [
    Spec("linear", "_taps_linear_fwd_kernel", (), dict(HAS_BIAS=True, SPLIT_K=1, GROUP_M=8)),
    Spec("linear", "_taps_linear_wgrad_kernel", ("part_ptr", "ws_ptr", "db_ptr"),
         dict(NEEDS_DDELTA=True, NEEDS_DWEIGHT=False, NEEDS_DSCORE=True, HAS_DBIAS=False, SPLIT=1, GROUP_M=8),
         tiles=("BLOCK_N", "BLOCK_K", "BLOCK_R")),
    Spec("conv", "_taps_conv2d_fwd_kernel", (), dict(HAS_BIAS=True, GROUP_M=8)),
    Spec("conv", "_taps_conv2d_dgrad_kernel", (), dict(GROUP_M=8)),
    Spec("mt_linear", "_taps_mt_linear_fwd_kernel", (), dict(HAS_BIAS=True, GROUP_M=8, BLOCK_T=8),
         i32_ptrs=("order_ptr", "seg_start_ptr", "seg_count_ptr", "slot_ptr")),
    Spec("mt_linear", "_taps_mt_linear_wgrad_kernel", ("part_ptr",),
         dict(NEEDS_DDELTA=True, NEEDS_DSCORE=True, GROUP_M=8), tiles=("BLOCK_N", "BLOCK_K", "BLOCK_R"),
         i32_ptrs=("order_ptr", "seg_start_ptr", "seg_count_ptr", "task_of_slot_ptr", "slot_ptr")),
    Spec("conv", "_taps_conv2d_wgrad_kernel", ("part_ptr", "ws_ptr", "db_ptr"),
         dict(NEEDS_DDELTA=True, NEEDS_DWEIGHT=False, NEEDS_DSCORE=True, HAS_DBIAS=False, SPLIT=1, GROUP_M=8),
         tiles=("BLOCK_N", "BLOCK_K", "BLOCK_R")),
    Spec("mt_conv", "_taps_mt_conv2d_fwd_kernel", (), dict(HAS_BIAS=True, GROUP_M=8),
         i32_ptrs=("order_ptr", "seg_start_ptr", "seg_count_ptr", "slot_ptr")),
    Spec("mt_conv", "_taps_mt_conv2d_dgrad_kernel", (), dict(GROUP_M=8),
         i32_ptrs=("order_ptr", "seg_start_ptr", "seg_count_ptr", "slot_ptr")),
    Spec("mt_conv", "_taps_mt_conv2d_wgrad_kernel", ("part_ptr",),
         dict(NEEDS_DDELTA=True, NEEDS_DSCORE=True, GROUP_M=8), tiles=("BLOCK_N", "BLOCK_K", "BLOCK_R"),
         i32_ptrs=("order_ptr", "seg_start_ptr", "seg_count_ptr", "task_of_slot_ptr", "slot_ptr")),
    Spec("_common", "_taps_wgrad_split_epilogue_kernel", ("ws_ptr", "part_ptr"),
         dict(NEEDS_DDELTA=True, NEEDS_DWEIGHT=False, NEEDS_DSCORE=True, BLOCK_N=32, BLOCK_K=64),
         matmul=False, tiles=None),
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


_HGMMA = re.compile(r"\bHGMMA\b")  # sm_90's wgmma, as SASS spells it


def compile_one(job) -> dict:
    """Compile one (kernel, dtype, config, arch); returns a result row (runs in a worker)."""
    spec_i, dtype, tile, arch = job
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    spec = SPECS[spec_i]
    fn, _ = _kernel(spec)
    cx = dict(spec.constexprs)
    warps, stages = 4, 1
    if tile is not None:
        bm, bn, bk, warps, stages = tile
        cx.update(dict(zip(spec.tiles, (bm, bn, bk))))
    if "PREC" in fn.arg_names:
        cx["PREC"] = "tf32" if dtype == "tf32" else "ieee"
    sig = _signature(fn, spec, POINTER_TYPES[dtype], cx)
    attrs = {(i,): [["tt.divisibility", 16]] for i, a in enumerate(fn.arg_names) if a.endswith("_ptr")}
    row = dict(kernel=spec.name, dtype=dtype, arch=f"sm_{arch}", matmul=spec.matmul,
               config="-" if tile is None else "{}x{}x{} w{} s{}".format(*tile))
    try:
        try:
            src = ASTSource(fn=fn, signature=sig, constexprs=cx, attrs=attrs)
        except TypeError:  # an older Triton without attrs in this form
            src = ASTSource(fn=fn, signature=sig, constexprs=cx)
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


def jobs(dtypes: Sequence[str], archs: Sequence[int]) -> list:
    out = []
    for i, spec in enumerate(SPECS):
        for dtype in dtypes:
            for tile in autotune_tiles(spec, dtype):
                for arch in archs:
                    out.append((i, dtype, tile, arch))
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
        workers: Optional[int] = None) -> Tuple[str, int]:
    """Compile everything and return (the table, the number of failing rows)."""
    todo = jobs(dtypes, archs)
    with ProcessPoolExecutor(max_workers=workers or os.cpu_count() or 1) as ex:
        rows = list(ex.map(compile_one, todo))
    head = ("kernel", "dtype", "config (MxNxK warps stages)", "arch", "regs", "smem B", "local B", "HGMMA", "verdict")
    table = [head]
    bad = 0
    for r in rows:
        p = problems(r)
        bad += bool(p)
        table.append((r["kernel"], r["dtype"], r["config"], r["arch"], str(r["regs"]), str(r["smem"]),
                      str(r["local"]), ("yes" if r["hgmma"] else "no") if r["matmul"] else "n/a",
                      "; ".join(p) or "ok"))
    w = [max(len(t[i]) for t in table) for i in range(len(head))]
    lines = ["  ".join(c.ljust(wd) for c, wd in zip(t, w)).rstrip() for t in table]
    lines.append(f"{len(rows)} compiles, {bad} failing")
    return "\n".join(lines), bad


def main(argv: Optional[Sequence[str]] = None) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="python -m taps_fast.info --kernels")
    p.add_argument("--dtypes", default=",".join(DEFAULT_DTYPES), help="fp16,bf16,tf32")
    p.add_argument("--archs", default=",".join(map(str, ARCHS)))
    args, _ = p.parse_known_args(argv)
    dtypes = [d for d in args.dtypes.split(",") if d]
    bad_d = [d for d in dtypes if d not in POINTER_TYPES]
    if bad_d:
        p.error(f"unknown dtype(s) {bad_d}; choose from {list(POINTER_TYPES)}")
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        # The interpreter replaces @triton.jit functions; compile in a clean process instead.
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        cmd = [sys.executable, "-m", "taps_fast.checks", "triton", "--dtypes", args.dtypes, "--archs", args.archs]
        sys.stdout.flush()
        return subprocess.run(cmd, env=env).returncode
    table, bad = run(dtypes, [int(a) for a in args.archs.split(",")])
    print(table)
    return 1 if bad else 0
