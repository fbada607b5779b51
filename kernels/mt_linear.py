r"""Triton kernels for the multi-task (mixed-batch) gated linear, and their launchers.

A mixed batch: row m of x [M, K] carries a task id τ(m) ∈ {-1, 0, …, T-1} (-1 = the base model).
The tasks that have a delta on this layer share one stacked ΔW = deltas[S, N, K]; slot[t] is task
t's index into it (-1: none here; slots of different tasks are distinct), scores[t] / thresholds[t]
its gate. With open_t = slot[t] ≥ 0 ∧ s_t ≥ τ_t and g_t = 1[open_t]:

    forward   y[m]  = x[m]·(W + g_t·ΔW_slot[t])ᵀ + b          t = τ(m); base rows use W only
    backward  dx[m] = dy[m]·(W + g_t·ΔW_slot[t])               (the same kernel, transposed weight)
              G_t   = dy[R_t]ᵀ·x[R_t]                           R_t = the rows of task t
              dΔW_s = g_t·G_t   for s = slot[t]; 0 for a slot of no task, of a closed task, or
                                of a task without rows
              ds_t  = ⟨G_t, ΔW_slot[t]⟩   (straight-through: also when t is closed); 0 when
                                slot[t] = -1 or t has no rows
W and b are frozen (no dW, db): the multi-task batch trains the tasks' deltas and scores only.

Layout. group_rows (kernels/_common.py, on the device, no host sync) sorts the rows stably by
task: ``order`` lists the rows of segment 0 (base), then of task 0, 1, …; seg_start / seg_count
delimit the segments. Every kernel tile belongs to one segment, so its W_eff is one tile of
W + g_t·ΔW_slot[t], formed in registers (never in memory) and fed to one tl.dot per K step, as in
the single-task kernels (kernels/linear.py). Rows are gathered through ``order`` (one x row pointer
per tile row) and the results scattered back the same way.

_taps_mt_linear_fwd_kernel (y, and dx with the transposed weight view): a 1-D grid of
(cdiv(M, BLOCK_M) + T)·cdiv(N, BLOCK_N) programs: the sum over the T + 1 segments of
cdiv(count_j, BLOCK_M) is at most cdiv(M, BLOCK_M) + T (each segment wastes under one tile). The
grid depends on M, N, T and the tile only, never on the ids (a layer can be captured in a CUDA
graph); each program finds its segment from the cumulative tile counts (a cumsum over the T + 1
counts, in-kernel) and programs past the last tile return at once. A closed gate or a base
segment sets the ΔW loads' column bound to 0: predicated-off loads move no bytes, so those rows
read W only, with the same compiled code. A NaN score poisons its task's rows (acc += s - s).

_taps_mt_linear_wgrad_kernel (dΔW and ds): grid (weight tiles, S); program (tile, s) reduces
G_t's tile over the rows of the task t that owns slot s (task_of_slot, built by the launcher with a
scatter, no sync), BLOCK_R rows at a time, then the shared epilogue (wgrad_epilogue): dΔW_s = g·G
for its tile, and the tile's share of ds_t into part[s, tile]. G_t is never written to memory. A
slot of no task reduces no rows and writes zeros; a closed task's rows are reduced only when ds is
asked for. ds_t = Σ_tiles part[slot[t], tile], summed by the launcher in a fixed order (no atomics):
deterministic.

Bytes and FLOPs that must move (fp16/bf16, the floor the benchmarks compare with); M_t = rows of
task t, n_open = open tasks with rows, S' = slots of tasks with rows:
    forward   2MNK FLOPs; bytes 2(MK + NK + n_open·NK + MN) (+ 4M for the row order)
    dx        the same with K and N swapped
    G pass    2·M_t·NK FLOPs per task with a slot (open, or closed when ds is asked for); bytes
              2·M_t·(N + K) read per such task, 2·S·NK written (dΔW), 2·S'·NK read (ds)
The gathered row loads are as wide as the ungathered ones (one contiguous row per tile row); the
gather costs registers, not bytes (see MT_FWD_TILES below).
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from ._common import (
    GROUP,
    WGRAD_TILES,
    all_tiles,
    alloc,
    dot_precision,
    gate_tensors,
    group_rows,
    grouped_tile,
    max_tiles,
    tile_autotune,
    task_gate,
    task_of_slot,
    wgrad_epilogue,
)

# Tile families, chosen with the static check (python -m taps_fast.info --kernels: spill-free on
# sm_80 and sm_90, HGMMA on sm_90). The forward (and dx) keeps the tile's row indices live across
# the K loop and scatters its stores through them, on top of the single-task forward's registers
# (248-255 per thread at its 4-warp tiles): at those tiles the check spilled 8-176 bytes (fp16
# sm_90: 128x128x32 w8 s3 176, 64x128x32 w4 s4 144, 128x64x32 w4 s4 8; 128x128x16 w8 s3 72 on
# sm_80; fewer stages did not help). 8 warps per tile fix it.
# The check compiles every integer argument unspecialised; at run time Triton makes a stride of 1
# a constexpr and marks multiples of 16. The configs below were also compiled so specialised
# (y and dx, fp16 / tf32), with unit strides alone too (odd K or N: rows not 16-aligned), where
# 64x64x32 w4 s4 (fp16) and 128x64x32 w8 s3 (tf32, dx, sm_80) spilled 8-136 bytes; these did not.
# Registers per thread, static check sm_80 / sm_90 [aligned run-time specialisation, sm_90]:
#   fp16, bf16  128x64x32 w8 s4 239 / 252 [76]  64x128x16 w8 s4 178 / 175 [73]  64x64x64 w8 s3 205 / 210 [62]
#   tf32        128x64x16 w8 s4 182 / 195 [88]  64x128x16 w8 s4 180 / 179 [96]  64x64x32 w8 s3 144 / 129 [70]
# The G pass: WGRAD_TILES for 16-bit inputs (128-255 registers, no spill); in tf32 its
# 64x128x32 w4 s4 and 64x64x64 w4 s3 spilled 8 and 16 bytes on sm_80, the tiles below do not.
MT_FWD_TILES = {
    2: [(128, 64, 32, 8, 4), (64, 128, 16, 8, 4), (64, 64, 64, 8, 3)],
    # tf32 64x128x32 w8 s3-s4 and 64x64x32 w4 s3-s4 spilled 32 bytes on sm_80 (static check)
    4: [(128, 64, 16, 8, 4), (64, 128, 16, 8, 4), (64, 64, 32, 8, 3)],
}
MT_WGRAD_TILES = {
    2: WGRAD_TILES[2],
    4: [(64, 128, 32, 8, 3), (128, 64, 32, 8, 3), (64, 64, 32, 4, 3)],
}


@triton.autotune(**tile_autotune(MT_FWD_TILES, "x_ptr"), key=["M", "N", "K", "T"])
@triton.jit
def _taps_mt_linear_fwd_kernel(
    x_ptr, w_ptr, d_ptr, b_ptr, y_ptr,
    order_ptr, seg_start_ptr, seg_count_ptr, slot_ptr, s_ptr, thr_ptr,
    M, N, K, T,
    sxm, sxk, swn, swk, sds, sdn, sdk, sym, syn,
    HAS_BIAS: tl.constexpr, PREC: tl.constexpr, GROUP_M: tl.constexpr, BLOCK_T: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """y[order[p], :] = x[order[p], :]·(W + g_t·ΔW_slot[t])ᵀ (+ b) for the positions p of one
    segment's BLOCK_M-row tile (t = the segment's task). BLOCK_T ≥ T + 1 (a power of two)."""
    num_m = tl.cdiv(M, BLOCK_M) + T  # row tiles the grid provides (an upper bound, see above)
    pid_m, pid_n = grouped_tile(tl.program_id(0), num_m, tl.cdiv(N, BLOCK_N), GROUP_M)
    # Segment lookup: tiles_j = cdiv(count_j, BLOCK_M), ends = their inclusive cumsum; tile pid_m
    # lies in segment seg = #{j : ends_j <= pid_m} (empty segments have no tiles and are skipped).
    jj = tl.arange(0, BLOCK_T)
    cnt = tl.load(seg_count_ptr + jj, mask=jj < T + 1, other=0)
    tiles = (cnt + BLOCK_M - 1) // BLOCK_M
    ends = tl.cumsum(tiles, axis=0)
    seg = tl.sum((ends <= pid_m).to(tl.int32), axis=0)
    if seg > T:  # past the last tile of the last segment
        return
    hit = jj == seg
    first_tile = tl.sum(tl.where(hit, ends - tiles, 0), axis=0)
    count = tl.sum(tl.where(hit, cnt, 0), axis=0)
    start = tl.load(seg_start_ptr + seg)

    slot, is_open, poison = task_gate(seg - 1, slot_ptr, s_ptr, thr_ptr)
    # The ΔW loads' column bound: N when open, 0 for a closed task or the base segment (every ΔW
    # load predicated off). A bound rather than `mask & is_open`: the interpreter cannot AND a
    # scalar into a mask. The slot offset in int64: S·N·K may pass 2^31.
    n_open = N * is_open.to(tl.int32)
    d_base = d_ptr + tl.maximum(slot, 0).to(tl.int64) * sds

    p = (pid_m - first_tile) * BLOCK_M + tl.arange(0, BLOCK_M)  # positions within the segment
    pmask = p < count
    rows = tl.load(order_ptr + start + p, mask=pmask, other=0)  # x / y row of each tile row
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + rk
        km = kk < K
        a = tl.load(x_ptr + rows[:, None] * sxm + kk[None, :] * sxk,
                    mask=pmask[:, None] & km[None, :], other=0.0)
        w = tl.load(w_ptr + kk[:, None] * swk + rn[None, :] * swn,
                    mask=km[:, None] & (rn[None, :] < N), other=0.0)
        d = tl.load(d_base + kk[:, None] * sdk + rn[None, :] * sdn,
                    mask=km[:, None] & (rn[None, :] < n_open), other=0.0)
        acc = tl.dot(a, w + d, acc, input_precision=PREC)
    acc += poison
    if HAS_BIAS:
        acc += tl.load(b_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + rows[:, None] * sym + rn[None, :] * syn, acc.to(y_ptr.dtype.element_ty),
             mask=pmask[:, None] & (rn[None, :] < N))


@triton.autotune(**tile_autotune(MT_WGRAD_TILES, "x_ptr", "BLOCK_N", "BLOCK_K", "BLOCK_R"), key=["M", "N", "K", "T"],
                 # the ds partials are indexed by tile, whose count differs between configs: zero
                 # them before each benchmarked config and after tuning, so none leaves stale shares
                 reset_to_zero=["part_ptr"])
@triton.jit
def _taps_mt_linear_wgrad_kernel(
    dy_ptr, x_ptr, order_ptr, seg_start_ptr, seg_count_ptr, task_of_slot_ptr,
    slot_ptr, s_ptr, thr_ptr, d_ptr, dd_ptr, part_ptr,
    M, N, K, T,
    sdym, sdyn, sxm, sxk, sds, s0, s1, sdds, ds0, ds1, sps,
    NEEDS_DDELTA: tl.constexpr, NEEDS_DSCORE: tl.constexpr, PREC: tl.constexpr, GROUP_M: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
):
    """Program (tile, s): the tile of G_t = dy[R_t]ᵀ·x[R_t] for the task t owning slot s
    (reduced over t's rows, gathered through order, BLOCK_R at a time), then dΔW_s = g_t·G_t and
    the tile's share of ds_t into part[s, tile]."""
    pid = tl.program_id(0)
    pid_s = tl.program_id(1)
    pid_n, pid_k = grouped_tile(pid, tl.cdiv(N, BLOCK_N), tl.cdiv(K, BLOCK_K), GROUP_M)
    task = tl.load(task_of_slot_ptr + pid_s)  # -1: no task has this slot
    _, is_open, poison = task_gate(task, slot_ptr, s_ptr, thr_ptr)
    seg = tl.maximum(task + 1, 1)  # never the base segment 0
    start = tl.load(seg_start_ptr + seg)
    count = tl.load(seg_count_ptr + seg) * (task >= 0).to(tl.int32)
    if not NEEDS_DSCORE:
        count = count * is_open.to(tl.int32)  # a closed task's G is then only multiplied by 0
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    rr = tl.arange(0, BLOCK_R)
    acc = tl.zeros((BLOCK_N, BLOCK_K), tl.float32)
    for r0 in range(0, count, BLOCK_R):
        p = r0 + rr
        pm = p < count
        r = tl.load(order_ptr + start + p, mask=pm, other=0)
        a = tl.load(dy_ptr + r[None, :] * sdym + rn[:, None] * sdyn,
                    mask=(rn[:, None] < N) & pm[None, :], other=0.0)
        b = tl.load(x_ptr + r[:, None] * sxm + rk[None, :] * sxk,
                    mask=pm[:, None] & (rk[None, :] < K), other=0.0)
        acc = tl.dot(a, b, acc, input_precision=PREC)
    d_base = d_ptr + pid_s.to(tl.int64) * sds
    dd_base = dd_ptr + pid_s.to(tl.int64) * sdds
    wgrad_epilogue(acc, rn, rk, rk < K, N, K, 1, is_open.to(tl.float32), poison,
                   d_base, dd_base, dd_base, part_ptr, pid_s * sps + pid,
                   s0, s1, 0, 0, ds0, ds1, 0, 0, 0, 0, 0, 0,
                   NEEDS_DDELTA, False, NEEDS_DSCORE)


# ----------------------------------------------------------------------------- launchers
def fwd_grid(M: int, N: int, T: int):
    """The forward's launch grid as a function of the config: shapes and T only, never the ids."""
    return lambda meta: ((triton.cdiv(M, meta["BLOCK_M"]) + T) * triton.cdiv(N, meta["BLOCK_N"]),)  # noqa: E731


def mt_linear_fwd(x2: torch.Tensor, row_task: torch.Tensor, weight: torch.Tensor, deltas: torch.Tensor,
                  slot: torch.Tensor, scores: torch.Tensor, thresholds: torch.Tensor,
                  bias: Optional[torch.Tensor], transpose_weight: bool = False) -> torch.Tensor:
    """y[m] = x2[m]·(W + g_t·ΔW_slot[t])ᵀ + b with t = row_task[m] (x2 [M, K], W [N, K], deltas
    [S, N, K]); with transpose_weight, W and ΔW are used as their transposes (dx = dy2·W_eff of the
    backward, x2 = dy2 [M, N], result [M, K], bias None). No host synchronisation."""
    M, K = x2.shape
    T = slot.numel()
    sw, sd = weight.stride(), deltas.stride()
    if transpose_weight:
        N = weight.shape[1]
        swn, swk, sdn, sdk = sw[1], sw[0], sd[2], sd[1]
    else:
        N = weight.shape[0]
        swn, swk, sdn, sdk = sw[0], sw[1], sd[1], sd[2]
    y = alloc((M, N), x2.dtype, x2.device)
    if y.numel() == 0:  # an empty batch: nothing to launch
        return y
    order, seg_start, seg_count = group_rows(row_task, T)
    slot_i, s, thr = gate_tensors(slot, scores, thresholds)
    _taps_mt_linear_fwd_kernel[fwd_grid(M, N, T)](
        x2, weight, deltas, bias if bias is not None else x2, y,
        order, seg_start, seg_count, slot_i, s, thr,
        M, N, K, T,
        x2.stride(0), x2.stride(1), swn, swk, sd[0], sdn, sdk, y.stride(0), y.stride(1),
        HAS_BIAS=bias is not None, PREC=dot_precision(x2.dtype), GROUP_M=GROUP,
        BLOCK_T=triton.next_power_of_2(T + 1),
    )
    return y


def mt_linear_wgrad(dy2: torch.Tensor, x2: torch.Tensor, row_task: torch.Tensor, deltas: torch.Tensor,
                    slot: torch.Tensor, scores: torch.Tensor, thresholds: torch.Tensor,
                    needs_ddeltas: bool, needs_dscores: bool,
                    ) -> Tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
    """(dΔW [S, N, K], ds [T]) of the mixed batch for dy2 [M, N], x2 [M, K]: dΔW_slot[t] =
    g_t·dy2[R_t]ᵀ·x2[R_t] (zeros for slots of closed, absent or no tasks), ds_t = ⟨G_t, ΔW_slot[t]⟩
    (also when closed; 0 without a slot or rows). None where not asked for. No host sync."""
    M, N = dy2.shape
    K = x2.shape[1]
    S = deltas.shape[0]
    T = slot.numel()
    dev = x2.device
    if not (needs_ddeltas or needs_dscores):
        return None, None
    if M == 0 or S * N * K == 0:  # nothing to reduce: every gradient is 0; launch nothing
        return (torch.zeros_like(deltas) if needs_ddeltas else None,
                torch.zeros(T, dtype=scores.dtype, device=scores.device) if needs_dscores else None)
    order, seg_start, seg_count = group_rows(row_task, T)
    slot_i, s, thr = gate_tensors(slot, scores, thresholds)
    owner = task_of_slot(slot_i[:T], S)
    ddeltas = alloc(deltas.shape, deltas.dtype, deltas.device) if needs_ddeltas else None
    dd = ddeltas if ddeltas is not None else deltas
    # ds partials: one row per slot plus a zero row for tasks without one; per row, one entry per
    # tile of the config with the most tiles (tiles a config does not use stay 0)
    n_part = max_tiles(N, K, all_tiles(MT_WGRAD_TILES))
    part = torch.zeros((S + 1, n_part), dtype=torch.float32, device=dev)
    grid = lambda meta: (triton.cdiv(N, meta["BLOCK_N"]) * triton.cdiv(K, meta["BLOCK_K"]), S)  # noqa: E731
    _taps_mt_linear_wgrad_kernel[grid](
        dy2, x2, order, seg_start, seg_count, owner, slot_i, s, thr, deltas, dd, part,
        M, N, K, T,
        dy2.stride(0), dy2.stride(1), x2.stride(0), x2.stride(1),
        deltas.stride(0), deltas.stride(1), deltas.stride(2), dd.stride(0), dd.stride(1), dd.stride(2),
        n_part,
        NEEDS_DDELTA=needs_ddeltas, NEEDS_DSCORE=needs_dscores, PREC=dot_precision(x2.dtype), GROUP_M=GROUP,
    )
    dscores = None
    if needs_dscores:
        per_slot = part.sum(1)  # fixed-order sum of the tile partials: deterministic
        dscores = per_slot[torch.where(slot_i[:T] >= 0, slot_i[:T], S).long()].to(scores.dtype)
    return ddeltas, dscores
