"""Pieces shared by the Triton kernels: the interpreter switch, autotune configs, the gate, and
the weight-gradient epilogue (dΔW, dW, ds) used by both the linear and the conv kernels.

Numerics
- Every product accumulates in fp32 (tl.dot's accumulator); inputs are fp16, bf16 or fp32.
  fp32 inputs use TF32 tensor cores on a GPU (the backend only serves fp32 where torch itself
  allows TF32, see taps_fast/ops/triton_backend.py) and exact IEEE fp32 under the interpreter.
- The gate I(s) = 1[s >= τ] is read from the score tensor inside the kernel: no host sync, so a
  layer can be captured in a CUDA graph. τ is passed already rounded to the score's dtype, so the
  fp32 comparison in the kernel equals torch's comparison in that dtype. A NaN score cannot raise
  without a sync; it poisons the output instead (acc += NaN for a NaN score), so it is never silently closed.
- W + g·ΔW is formed tile by tile in registers in the input dtype (as the reference forms it in
  memory), then fed to one tl.dot. A closed gate masks every ΔW load off: predicated-off loads
  move no bytes, so the closed variant reads W only, with the same compiled code.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from ..ops._common import threshold_in as ops_threshold_in

# The interpreter runs kernels on the CPU (numpy); tests use it with small shapes. It must be
# set before the kernels are decorated, i.e. before this package is imported.
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

# Tile configs (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages) each autotuner may choose on a
# GPU, per kernel family, keyed by the input's element size (fp32/TF32 tiles hold twice the
# registers of fp16/bf16 ones). Chosen with the static check (python -m taps_fast.checks triton
# --specs all): every config listed compiles spill-free for sm_80 and sm_90, under triton 3.6 and
# 3.8, both in the generic specialisation and in the ones Triton's JIT makes at run time (unit
# strides constexpr, multiples of 16 marked; odd sizes; the transposed weight of dx), and uses
# wgmma (HGMMA) on sm_90. With the combine W + mask·ΔW in registers the tile loads are pipelined
# through registers, so 4-warp tiles of 64x128 or 128x64 run out: 64x128x32 w4 s4, 128x64x32 w4 s4
# and 64x64x64 w4 s3 spilled 16-2392 bytes at odd sizes (fp16 sm_80 worst) and 64x128x32 w4 s4
# 88-144 bytes in the generic form under triton 3.6; the same tiles with 8 warps take 198-246
# registers and do not. The first tile of each size is the one TAPS_FAST_AUTOTUNE=first keeps.
FWD_TILES = {  # gated linear forward and dx
    2: [(128, 64, 32, 8, 3), (128, 128, 32, 8, 3), (64, 128, 32, 8, 4), (64, 64, 64, 8, 3)],
    # tf32 128x128x32 w8 s3 spilled (odd sizes; triton 3.6 generic too): BLOCK_K 16 there
    4: [(128, 64, 32, 8, 3), (128, 128, 16, 8, 3), (64, 128, 16, 8, 4), (64, 64, 32, 8, 3)],
}
WGRAD_TILES = {  # G passes: (BLOCK_N, BLOCK_K, BLOCK_R) of G = dyᵀ·x
    # 128x128x32 w8 spilled 40 bytes in bf16 on sm_90 at 1, 2 or 3 stages; 64x128x32 w4 s4 16-128
    # bytes under triton 3.6 (generic and odd sizes). These take 128-255 registers.
    2: [(128, 64, 32, 8, 3), (64, 128, 32, 8, 3), (64, 64, 64, 4, 3)],
    # 128x128x32 w8 s3 spilled 120 bytes in tf32 on sm_80; 64x128x32 w4 s4 64-184 bytes (3.6)
    4: [(64, 128, 32, 8, 3), (128, 64, 32, 8, 3), (64, 64, 64, 4, 3)],
}
CONV_TILES = {  # implicit-GEMM conv forward and dx. The gathers keep a 64-bit address per
    # element of each in-flight tile, so conv needs 2 stages (or 8 warps) where linear takes 3-4:
    # at 128x64x32 with 4 warps the fp16 forward spilled 392-448 bytes, 128x128x32 spills on sm_80;
    # 128x64x32 w8 s2 spilled 8-24 bytes on sm_80 at run time (both triton versions), BLOCK_K 16
    # does not; in tf32, 128x64x32 w8 s2 spilled 8 bytes and 64x64x32 w4 s3 120-288 bytes.
    2: [(128, 64, 16, 8, 2), (64, 128, 32, 8, 2), (64, 64, 32, 4, 3)],
    4: [(128, 64, 16, 8, 2), (64, 128, 16, 8, 2), (64, 64, 16, 4, 2)],
}
CONV_WGRAD_TILES = {  # the conv G pass, (BLOCK_N, BLOCK_K, BLOCK_R)
    2: [(128, 64, 32, 8, 2), (64, 128, 32, 8, 2), (64, 64, 32, 4, 3)],
    # tf32: every 4- and 8-warp tile of 64-128 x 64-128 x 16 (1 or 2 stages) but 64x64x16 w8 s2
    # spilled 8-24 bytes on sm_80 under triton 3.6 at 255 registers; 16 warps take 114-128
    4: [(128, 64, 16, 16, 2), (64, 128, 16, 16, 2), (64, 64, 16, 8, 2)],
}


def all_tiles(family: dict) -> list:
    return [t for size in sorted(family) for t in family[size]]


# Under the interpreter one config (autotuning would run every config). With it the odd test
# sizes cross tile edges in every dimension: 17 is one partial tile, 64 one full (two along K),
# 129 three (five along K) with a last partial one. 64-wide M/N tiles halve the interpreter's
# time against 32-wide ones (its cost is per program and per loop step).
INTERPRET_TILES = [(64, 64, 32, 4, 1)]

# Tests set this to fill every buffer a launcher allocates with NaN before the kernels run, so an
# element a kernel fails to write shows up as NaN (torch.empty may hand back zeros by chance).
POISON_OUTPUTS = False


def alloc(shape, dtype, device, memory_format=None):
    """torch.empty for kernel outputs and workspaces (NaN-filled when POISON_OUTPUTS is set)."""
    kw = {} if memory_format is None else {"memory_format": memory_format}
    t = torch.empty(shape, dtype=dtype, device=device, **kw)
    return t.fill_(float("nan")) if POISON_OUTPUTS else t


def alloc_like(t):
    """alloc with t's shape, dtype, device and memory format (torch.empty_like's preserve_format)."""
    out = torch.empty_like(t)
    return out.fill_(float("nan")) if POISON_OUTPUTS else out


# Elementwise epilogue of the split reductions: one [EPI_N, EPI_K] tile per program.
EPI_N, EPI_K = 32, 64


# TAPS_FAST_AUTOTUNE=first: each autotuner keeps only the first tile of each element size, so a
# kernel compiles once per key instead of 2-4 times (a smoke run that must cover every kernel and
# path in minutes; the tiles are then not tuned). Read when the kernels are defined.
AUTOTUNE_FIRST = os.environ.get("TAPS_FAST_AUTOTUNE", "all") == "first"

def config_signature(c) -> tuple:
    """What identifies a tile config: its block sizes, warps and stages (all a config rebuilt
    from its fields keeps: Triton's autotune disk cache reloads configs as Config(**fields))."""
    return tuple(sorted(c.kwargs.items())), c.num_warps, c.num_stages


def _family_tiles(family: dict):
    """(size, tile) for every tile of a family that the autotuners use."""
    return [(size, t) for size in sorted(family) for t in (family[size][:1] if AUTOTUNE_FIRST else family[size])]


def mm_configs(family: dict, m="BLOCK_M", n="BLOCK_N", k="BLOCK_K"):
    """Autotune configs for every element size of a family, each tile once (families list the
    same tiles for several sizes); prune_by_dtype keeps those listed for the call's input dtype."""
    if INTERPRET:
        return [triton.Config({m: bm, n: bn, k: bk}, num_warps=w, num_stages=s)
                for bm, bn, bk, w, s in INTERPRET_TILES]
    out = {}
    for _, (bm, bn, bk, w, s) in _family_tiles(family):
        c = triton.Config({m: bm, n: bn, k: bk}, num_warps=w, num_stages=s)
        out.setdefault(config_signature(c), c)
    return list(out.values())


def prune_by_dtype(arg: str, family: dict, m="BLOCK_M", n="BLOCK_N", k="BLOCK_K"):
    """early_config_prune for the autotuner: keep the configs the family lists for the element
    size of the tensor argument ``arg``, recognised by their fields (config_signature), so
    configs reloaded from Triton's disk cache prune as the originals (the interpreter's single
    config is kept)."""
    allowed: dict = {}
    for size, (bm, bn, bk, w, s) in _family_tiles(family):
        allowed.setdefault(size, set()).add(config_signature(triton.Config({m: bm, n: bn, k: bk}, num_warps=w,
                                                                           num_stages=s)))

    def prune(configs, named_args, **kwargs):
        size = named_args[arg].element_size()
        keep = [c for c in configs if config_signature(c) in allowed.get(size, ())]
        return keep or configs

    prune.arg = arg  # checked against the kernel's arguments by the tests
    prune.family, prune.names = family, (m, n, k)  # for the tests and the static check
    return prune


def tile_autotune(family: dict, arg: str, m="BLOCK_M", n="BLOCK_N", k="BLOCK_K") -> dict:
    """triton.autotune's configs and prune for a tile family, pruned by ``arg``'s element size."""
    return dict(configs=mm_configs(family, m, n, k),
                prune_configs_by={"early_config_prune": prune_by_dtype(arg, family, m, n, k)})


def dot_precision(dtype) -> str:
    """tl.dot input_precision for an input dtype: tf32 for fp32 on a GPU, ieee in the interpreter
    (where tf32 is not emulated and the tests compare with fp64); ignored for 16-bit inputs."""
    if dtype == torch.float32 and not INTERPRET:
        return "tf32"
    return "ieee"


@triton.jit
def gate(s_ptr, threshold):
    """(is_open, g, poison): is_open = s >= τ; g = 1.0 or 0.0; poison = 0, or NaN for a NaN
    score, added to results so a NaN score shows instead of reading as closed. Not s - s: that
    is NaN for s = ±inf too, which are legal gates (+inf open, -inf closed, finite outputs)."""
    s = tl.load(s_ptr).to(tl.float32)
    is_open = s >= threshold
    return is_open, is_open.to(tl.float32), tl.where(s != s, s, 0.0)


@triton.jit
def grouped_tile(pid, num_a, num_b, GROUP: tl.constexpr):
    """Map a 1-D program id to (a, b) tile coordinates in groups of GROUP rows of a, so
    neighbouring programs share operand tiles in L2."""
    width = GROUP * num_b
    group_id = pid // width
    first = group_id * GROUP
    size = tl.minimum(num_a - first, GROUP)
    a = first + ((pid % width) % size)
    b = (pid % width) // size
    return a, b


@triton.jit
def split_range(total, pid_s, SPLIT: tl.constexpr, BLOCK: tl.constexpr):
    """[lo, hi) of the reduction that split pid_s of SPLIT owns: whole BLOCKs, the last short."""
    per = tl.cdiv(tl.cdiv(total, SPLIT), BLOCK) * BLOCK
    lo = pid_s * per
    return lo, tl.minimum(total, lo + per)


@triton.jit
def wgrad_epilogue(acc, rn, rk, kmask, N, C, KW, g, poison,
                   d_ptr, dd_ptr, dw_ptr, part_ptr, part_idx,
                   s0, s1, s2, s3, ds0, ds1, ds2, ds3, ws0, ws1, ws2, ws3,
                   NEEDS_DDELTA: tl.constexpr, NEEDS_DWEIGHT: tl.constexpr, NEEDS_DSCORE: tl.constexpr):
    """Given a tile G[rn, rk] of the weight gradient (fp32), write dΔW = g·G, dW = G and the
    tile's share of ds = ⟨G, ΔW⟩ (to part_ptr[part_idx]; the launcher sums the shares in a fixed
    order, so ds is deterministic). The weight is addressed as [N, K] with k = (kh·KW + kw)·C + c
    and four strides per tensor, which covers a linear weight (C = K, KW = 1, s2 = s3 = 0) and a
    conv weight in any memory format; kmask says which columns of the tile exist. G itself is
    never written unless dW is asked for."""
    c = rk % C
    khw = rk // C
    kh = khw // KW
    kw = khw % KW
    mask = (rn[:, None] < N) & kmask[None, :]
    if NEEDS_DDELTA:
        off = rn[:, None] * ds0 + c[None, :] * ds1 + kh[None, :] * ds2 + kw[None, :] * ds3
        tl.store(dd_ptr + off, (acc * g).to(dd_ptr.dtype.element_ty), mask=mask)
    if NEEDS_DWEIGHT:
        off = rn[:, None] * ws0 + c[None, :] * ws1 + kh[None, :] * ws2 + kw[None, :] * ws3
        tl.store(dw_ptr + off, acc.to(dw_ptr.dtype.element_ty), mask=mask)
    if NEEDS_DSCORE:
        off = rn[:, None] * s0 + c[None, :] * s1 + kh[None, :] * s2 + kw[None, :] * s3
        d = tl.load(d_ptr + off, mask=mask, other=0.0).to(tl.float32)
        tl.store(part_ptr + part_idx, tl.sum(tl.sum(acc * d, axis=1), axis=0) + poison)


@triton.jit
def _taps_wgrad_split_epilogue_kernel(
    ws_ptr, s_ptr, d_ptr, dd_ptr, dw_ptr, part_ptr,
    N, K, C, KW, SPLIT, threshold,
    s0, s1, s2, s3, ds0, ds1, ds2, ds3, ws0, ws1, ws2, ws3,
    NEEDS_DDELTA: tl.constexpr, NEEDS_DWEIGHT: tl.constexpr, NEEDS_DSCORE: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """Second pass of a split weight-gradient reduction: G = Σ_split ws[split] in a fixed order
    (deterministic), then the gated epilogue. ws is fp32 [SPLIT, N, K], contiguous."""
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    mask = (rn[:, None] < N) & (rk[None, :] < K)
    off = rn[:, None] * K + rk[None, :]
    acc = tl.zeros((BLOCK_N, BLOCK_K), tl.float32)
    for i in range(0, SPLIT):
        acc += tl.load(ws_ptr + i * N * K + off, mask=mask, other=0.0)
    _, g, poison = gate(s_ptr, threshold)
    wgrad_epilogue(acc, rn, rk, rk < K, N, C, KW, g, poison, d_ptr, dd_ptr, dw_ptr, part_ptr,
                   pid_n * tl.num_programs(1) + pid_k,
                   s0, s1, s2, s3, ds0, ds1, ds2, ds3, ws0, ws1, ws2, ws3,
                   NEEDS_DDELTA, NEEDS_DWEIGHT, NEEDS_DSCORE)


# ----------------------------------------------------------------------------- launcher helpers
# Shared by the linear and conv launchers.
GROUP = 8  # grouped tile order: 8 rows of tiles per group (L2 reuse of the operand tiles)


def num_sms(device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 1  # the interpreter: no parallelism to fill


def pick_split(tiles: int, red: int, min_chunk: int, sms: int, cap: int = 32) -> int:
    """Split a reduction of length ``red`` when ``tiles`` output tiles (counted at 128x128)
    cannot fill ``sms`` SMs, keeping at least ``min_chunk`` of the reduction per program."""
    if tiles == 0 or tiles >= sms:
        return 1
    return max(1, min(triton.cdiv(sms, tiles), red // min_chunk, cap))


def max_tiles(a: int, b: int, tiles, per_tap=None) -> int:
    """Upper bound, over the configs ``tiles``, on the tile count of an [a, b] output, or with
    per_tap = (taps, C), of a conv G whose columns are tiled per tap (for the ds partials)."""
    if INTERPRET:
        tiles = INTERPRET_TILES
    if per_tap is None:
        return max(triton.cdiv(a, t[0]) * triton.cdiv(b, t[1]) for t in tiles)
    return max(triton.cdiv(a, t[0]) * per_tap[0] * triton.cdiv(per_tap[1], t[1]) for t in tiles)


def gate_operands(score: torch.Tensor, threshold: float):
    """(score, τ) as the kernels' fp32 gate reads them. An fp64 score compares in double (torch's
    rule), which an fp32 load would break (a score one ulp below τ rounds up to it): its gate is
    taken on the device, without a sync, as a ±1 fp32 score against τ = 0 (NaN stays NaN, so
    the poison still shows). Other dtypes pass through."""
    if score.dtype != torch.float64:
        return score, threshold
    return gate_as_sign(score, threshold), 0.0


def gate_as_sign(scores: torch.Tensor, thresholds) -> torch.Tensor:
    """fp32 +1 where scores >= thresholds (compared in the scores' dtype), -1 where not, NaN where
    a score is NaN: a gate an fp32 load reads exactly, against τ = 0."""
    sign = torch.where(scores >= thresholds, 1.0, -1.0).to(torch.float32)
    return torch.where(torch.isnan(scores), scores.float(), sign)


def threshold_in(score, threshold: float) -> float:
    """τ rounded to the score's dtype (torch compares s >= τ in s's dtype): ops._common's."""
    return ops_threshold_in(score.dtype, float(threshold))


def finish_wgrad(ws, score, delta, ddelta, dweight, part, split, N, K, C, KW, threshold,
                 strides_d, strides_dd, strides_dw, needs_ddelta, needs_dweight, needs_dscore):
    """Run the split epilogue (when split > 1) and return ds (0-dim fp32) or None."""
    if split > 1:
        grid = (triton.cdiv(N, EPI_N), triton.cdiv(K, EPI_K))
        _taps_wgrad_split_epilogue_kernel[grid](
            ws, score, delta, ddelta, dweight, part, N, K, C, KW, split,
            threshold_in(score, threshold), *strides_d, *strides_dd, *strides_dw,
            NEEDS_DDELTA=needs_ddelta, NEEDS_DWEIGHT=needs_dweight, NEEDS_DSCORE=needs_dscore,
            BLOCK_N=EPI_N, BLOCK_K=EPI_K,
        )
    return part.sum() if needs_dscore else None  # fixed-order sum of the tile partials


# PARTIALS_RESET: the ds partials buffer is sized for the tiling with the most tiles, and the
# launcher sums all of it. On a GPU the autotuner runs every config on the real arguments on a
# key's first call, so a config with fewer tiles would leave the other configs' partials in the
# unused entries: every kernel that writes part_ptr is autotuned with reset_to_zero=["part_ptr"]
# (tests/kernels/test_triton.py checks it), which zeroes it after benchmarking, before the real run.
def ds_partials(N: int, K: int, split: int, device, per_tap=None):
    if split > 1:
        n = triton.cdiv(N, EPI_N) * triton.cdiv(K, EPI_K)
    else:
        n = max_tiles(N, K, all_tiles(CONV_WGRAD_TILES if per_tap else WGRAD_TILES), per_tap)
    return torch.zeros(n, dtype=torch.float32, device=device)  # tiles a config does not use add 0


# ----------------------------------------------------------------------------- multi-task batches
# A mixed batch: every row (linear) or sample (conv) carries a task id, -1 for the base model.
# Per layer the tasks that opened it share one stacked delta tensor deltas[S, *W.shape]; slot[t]
# is task t's index into it (-1: no delta here), scores[t] / thresholds[t] its gate (thresholds
# in the scores' dtype, so the fp32 comparison in a kernel equals torch's).
def group_rows(task_idx: torch.Tensor, num_tasks: int):
    """Rows grouped by task, built on the device with no host synchronisation.

    Returns (order, seg_start, seg_count), int32: ``order`` is a stable argsort of the ids, so
    segment j = rows order[seg_start[j] : seg_start[j] + seg_count[j]] in their original order;
    segment 0 holds the base rows (id -1), segment t + 1 task t's. Ids outside [-1, num_tasks)
    fall in no segment (callers validate ids first). torch.bincount would sync (it reads the
    largest id to size its output); searchsorted over the sorted ids does not.
    """
    key = task_idx.to(torch.int64)
    order = torch.argsort(key, stable=True)
    edges = torch.arange(-1, num_tasks + 1, device=key.device, dtype=torch.int64)
    bounds = torch.searchsorted(key[order], edges)  # first sorted position of each id, [T + 2]
    return order.to(torch.int32), bounds[:-1].to(torch.int32), (bounds[1:] - bounds[:-1]).to(torch.int32)


def gate_tensors(slot: torch.Tensor, scores: torch.Tensor, thresholds: torch.Tensor):
    """(slot as int32, scores, thresholds) as the kernels' task_gate reads them. With T = 0 (no
    task on this layer) one dummy closed task (slot -1), so the gate loads of task 0 (the base
    segment's) stay in bounds; no row ever names it. Shape-only decisions: no host sync."""
    slot = slot.to(torch.int32)
    if scores.dtype == torch.float64:  # compared in double on the device, as in gate_operands
        scores = gate_as_sign(scores, thresholds)
        thresholds = torch.zeros_like(scores)
    if slot.numel() == 0:
        slot = torch.full((1,), -1, dtype=torch.int32, device=slot.device)
        scores = torch.zeros(1, dtype=scores.dtype, device=scores.device)
        thresholds = torch.ones(1, dtype=thresholds.dtype, device=thresholds.device)
    return slot, scores, thresholds


def task_of_slot(slot: torch.Tensor, num_slots: int) -> torch.Tensor:
    """[S + 1] int32: entry s = the task whose slot is s, -1 if none (S = num_slots). A scatter
    on the device, no host sync; tasks without a slot scatter into the spare entry S, never read.
    Slots are distinct across tasks, so the scatter is deterministic."""
    owner = torch.full((num_slots + 1,), -1, dtype=torch.int32, device=slot.device)
    if slot.numel():
        owner.scatter_(0, torch.where(slot >= 0, slot, num_slots).long(),
                       torch.arange(slot.numel(), dtype=torch.int32, device=slot.device))
    return owner


@triton.jit
def task_gate(task, slot_ptr, s_ptr, thr_ptr):
    """Gate of task ``task`` (a scalar, -1 = base) on this layer: (slot, is_open, poison).
    Open iff task >= 0, slot[task] >= 0 and s[task] >= thr[task]; slot is -1 when closed so the
    callers' ΔW bounds predicate every delta load off; poison as in ``gate`` (NaN only for a
    NaN score)."""
    t = tl.maximum(task, 0)
    has_task = task >= 0
    slot = tl.load(slot_ptr + t)
    s = tl.load(s_ptr + t).to(tl.float32)
    thr = tl.load(thr_ptr + t).to(tl.float32)
    is_open = has_task & (slot >= 0) & (s >= thr)
    poison = tl.where(has_task & (s != s), s, 0.0)
    return tl.where(is_open, slot, -1), is_open, poison
