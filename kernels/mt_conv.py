r"""Triton implicit-GEMM kernels for the multi-task (mixed-batch) gated conv2d, groups = 1.

A mixed batch: sample b carries a task id τ(b) (-1 = the base model, else 0..T-1). The tasks
that have a delta on this layer share one stacked tensor deltas[S, OC, C, KH, KW]; slot[t] is
task t's index into it (-1: no delta here), scores[t] / thresholds[t] its gate:

    g_t   = 1[slot[t] ≥ 0 and s_t ≥ τ_t]        (compared in fp32, both in the scores' dtype)
    W_b   = W + g_τ(b)·ΔW_slot[τ(b)]            (W alone for base samples and closed tasks)

    forward  y[b]  = conv2d(x[b], W_b) + bias                                 (stride, padding,
    backward dx[b] = conv_transpose2d(dy[b], W_b)   (= ∂L/∂x[b])                dilation any)
             G_t   = Σ_{b: τ(b)=t} ∂conv2d(x[b], ·)ᵀ dy[b]   the weight gradient of t's samples
             ddeltas[slot[t]] = g_t·G_t         (0 for a closed task, an unused slot, no samples)
             dscores[t]       = ⟨G_t, ΔW_slot[t]⟩  (straight-through: also when closed; 0 when
                                                slot[t] = -1 or t has no samples)
Derivation: y[b] depends on ΔW_slot[t] only through W_b with weight g_t for the samples of t, so
∂L/∂ΔW_slot[t] = g_t·Σ_{τ(b)=t} ∂L/∂W_b = g_t·G_t; the straight-through gate ∂g/∂s := 1 gives
∂L/∂s_t = ⟨Σ_{τ(b)=t} ∂L/∂W_b, ΔW_slot[t]⟩ = ⟨G_t, ΔW_slot[t]⟩. The base W and bias are frozen
(no dW, no db here).

GEMM layout (as kernels/conv.py, reduction index k = (kh·KW + kw)·C + c, channel innermost):
rows are (sample, pixel) pairs with the samples grouped by task (_common.group_rows: segment 0
the base samples, segment t + 1 task t's, stable order). With P pixels per sample, segment j
covers seg_count[j]·P rows; its row r is sample order[seg_start[j] + r // P], pixel r % P. Every
row tile lies in ONE segment, so the tile has one W_eff: W + ΔW_slot formed tile by tile in
registers (never in memory), one tl.dot per K step; a closed gate (or base segment) predicates
every ΔW load off (the closed variant reads W only, same compiled code).

    forward  M = B·OH·OW rows (P = OH·OW), N = OC, K = KH·KW·C     (_taps_mt_conv2d_fwd_kernel)
    dx       M = B·H·W rows  (P = H·W),   N = C,  K = KH·KW·OC     (_taps_mt_conv2d_dgrad_kernel)
    G        per slot s: N = OC, K = KH·KW·C, reduction over the rows of task_of_slot[s]
                                                                    (_taps_mt_conv2d_wgrad_kernel)

The grid depends on shapes and T only, never on the data (no host sync: a layer can be captured
in a CUDA graph): the forward and dx use cdiv(M, BLOCK_M) + T + 1 row tiles × the N tiles; each
program scans seg_count (T + 1 loads) for the segment holding its row tile (segment j has
cdiv(seg_count[j]·P, BLOCK_M) tiles; the sum is at most cdiv(M, BLOCK_M) + T + 1 since each
segment wastes at most one partial tile); programs past the last tile run no K step and store
nothing (a loop bound of 0, not an early return, which spilled: see the forward kernel). The G
pass runs on (G tiles, S slots): each program loops over the rows of its slot's task and runs
the shared epilogue (_common.wgrad_epilogue): ddeltas = g·G and a ds partial per tile, summed by
the launcher per slot in a fixed order (no atomics: deterministic).

Numerics: fp32 accumulation (tl.dot); fp32 inputs are TF32 on a GPU. A NaN score of task t adds
s - s (NaN) to t's rows of y and dx and to its ds if t has samples (the kernels cannot raise
without a sync). Slots must be distinct across tasks (task_of_slot is a scatter). Task ids
outside [-1, T) fall in no segment: callers validate them (their rows would stay unwritten).

Bytes and FLOPs that must move (fp16/bf16, 2 bytes an element; |W| = OC·C·KH·KW, S_o = the
slots of open tasks that have samples, R_s = the samples of tasks with a slot):
    forward  2·B·OH·OW·OC·K FLOPs; bytes 2(|x| + |W|(1 + S_o) + |y|)
    dx       2·B·H·W·C·KH·KW·OC FLOPs (a stride-1 same conv: the forward's); bytes 2(|dy| + |W|(1 + S_o) + |x|)
    G        2·R_s·OH·OW·OC·K FLOPs (base samples and tasks without a slot cost nothing);
             bytes 2(|dy[R_s]| + |x[R_s]| + S·|W| (ΔW read for ds) + S·|W| (ddeltas written))
dx with a stride > 1 visits every tap and masks the ones that miss an output pixel (a factor
sh·sw of tile work, as in kernels/conv.py). The G pass does not split its reduction: a slot with
few weight tiles and many rows runs on few programs.
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch
import triton
import triton.language as tl

from ..ops._common import out_format
from ._common import (
    CONV_TILES,
    CONV_WGRAD_TILES,
    GROUP,
    alloc,
    alloc_like,
    all_tiles,
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
from .conv import conv_dgrad_taps, conv_dims, conv_fwd_taps, conv_params, conv_wgrad_rows

# Tiles (BLOCK_M, BLOCK_N, BLOCK_K, warps, stages), per element size, from the static check
# (python -m taps_fast.checks triton --specs all: spill-free on sm_80 and sm_90 under triton 3.6
# and 3.8, generic and run-time specialisations). The multi-task kernels add a gathered sample
# index per row to the single-task conv kernels' budget (CONV_TILES in _common.py), so a few of
# those configs no longer fit, all on sm_80 at run time:
# forward: 64x128x32 w8 s2 spilled 8 bytes with channels_last, 64x64x32 w4 s3 8 bytes, tf32
# 64x128x16 w8 s2 8 bytes with channels_last; one stage or BLOCK_K 16 fits.
MT_CONV_TILES = {
    2: [(128, 64, 16, 8, 2), (64, 128, 32, 8, 1), (64, 64, 16, 4, 3)],
    4: [(128, 64, 16, 8, 2), (64, 128, 16, 8, 1), (64, 64, 16, 4, 2)],
}
# dx: 64x64x32 w4 (s2 or s3) spilled 8 bytes on sm_90 in fp16/bf16 at 255 registers (w8: 24
# bytes on sm_80); 64x64x16 w4 s3 takes 190 / 184. The others: 181-255, tf32 195-242.
MT_DGRAD_TILES = {
    2: [(128, 64, 16, 8, 2), (64, 128, 32, 8, 2), (64, 64, 16, 4, 3)],
    4: CONV_TILES[4],
}
# G pass, (BLOCK_N, BLOCK_K, BLOCK_R): tf32 64x64x16 w4 s2 and 64x128x16 w8 s2 spilled 8-16
# bytes on sm_80 (triton 3.6; 168-255 registers); these take 114-192. fp16/bf16: 183-225, no spill.
MT_WGRAD_TILES = {
    2: CONV_WGRAD_TILES[2],
    4: [(128, 64, 16, 8, 2), (128, 64, 16, 16, 2), (64, 64, 16, 8, 2)],
}

_KEY = ["B", "C", "H", "W", "OC", "OH", "OW", "KH", "KW", "T"]


@triton.jit
def _segment_tile(pid_m, seg_count_ptr, T, P, BLOCK_M: tl.constexpr):
    """(seg, tile, rows) of row tile pid_m: the segment j (0 = base, t + 1 = task t) whose tiles
    hold it, the tile's index inside the segment, and the segment's row count seg_count[j]·P.
    Segment j owns cdiv(seg_count[j]·P, BLOCK_M) consecutive tiles; seg = -1 past the last."""
    seg = pid_m * 0 - 1
    tile = pid_m * 0
    rows = pid_m * 0
    first = pid_m * 0
    for j in range(0, T + 1):
        n = tl.load(seg_count_ptr + j) * P
        last = first + tl.cdiv(n, BLOCK_M)
        hit = (pid_m >= first) & (pid_m < last)
        seg = tl.where(hit, j, seg)
        tile = tl.where(hit, pid_m - first, tile)
        rows = tl.where(hit, n, rows)
        first = last
    return seg, tile, rows


@triton.jit
def _segment_rows(seg, tile, rows, order_ptr, seg_start_ptr, P, BLOCK_M: tl.constexpr):
    """The tile's rows: (sample index, pixel index, row mask) of rows tile·BLOCK_M + [0, BLOCK_M)
    of segment seg (sample order[seg_start[seg] + r // P], pixel r % P)."""
    r = tile * BLOCK_M + tl.arange(0, BLOCK_M)
    mrow = r < rows
    start = tl.load(seg_start_ptr + seg)
    bi = tl.load(order_ptr + start + r // P, mask=mrow, other=0)
    return bi, r % P, mrow


@triton.jit
def _reload_samples(seg, tile, rows, order_ptr, seg_start_ptr, P, BLOCK_M: tl.constexpr):
    """The tile's sample indices again, for the epilogue's store. A loaded vector cannot be
    recomputed in the store's layout, and keeping the first load live across the K loop (in a
    second layout) spilled 56-336 bytes; the eviction policy makes this a distinct load that
    the compiler does not merge with the first (an L1/L2 hit)."""
    r = tile * BLOCK_M + tl.arange(0, BLOCK_M)
    start = tl.load(seg_start_ptr + seg)
    return tl.load(order_ptr + start + r // P, mask=r < rows, other=0, eviction_policy="evict_last")


@triton.autotune(**tile_autotune(MT_CONV_TILES, "x_ptr"), key=_KEY)
@triton.jit
def _taps_mt_conv2d_fwd_kernel(
    x_ptr, w_ptr, d_ptr, slot_ptr, s_ptr, thr_ptr, order_ptr, seg_start_ptr, seg_count_ptr, b_ptr, y_ptr,
    B, C, H, W, OC, OH, OW, KH, KW, T,
    str_h, str_w, pad_h, pad_w, dil_h, dil_w,
    sxb, sxc, sxh, sxw, sw0, sw1, sw2, sw3, sdS, sd0, sd1, sd2, sd3, syb, syc, syh, syw,
    HAS_BIAS: tl.constexpr, PREC: tl.constexpr, GROUP_M: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """y tile [BLOCK_M (sample, pixel) rows of one segment, BLOCK_N output channels]."""
    P = OH * OW
    num_m = tl.cdiv(B * P, BLOCK_M) + T + 1
    pid_m, pid_n = grouped_tile(tl.program_id(0), num_m, tl.cdiv(OC, BLOCK_N), GROUP_M)
    seg, tile, rows = _segment_tile(pid_m, seg_count_ptr, T, P, BLOCK_M)
    # A spare tile of the data-independent grid (seg = -1) runs no tap and stores nothing. Not an
    # early return: `if seg < 0: return` spilled 168-424 bytes (it splits the kernel's body).
    taps = KH * KW * (seg >= 0).to(tl.int32)
    rows = tl.where(seg < 0, 0, rows)
    seg = tl.maximum(seg, 0)
    slot, is_open, poison = task_gate(seg - 1, slot_ptr, s_ptr, thr_ptr)
    n_open = OC * is_open.to(tl.int32)  # ΔW column bound: 0 when closed or base (no ΔW bytes)
    d_ptr += tl.maximum(slot, 0).to(tl.int64) * sdS
    bi, pq, mrow = _segment_rows(seg, tile, rows, order_ptr, seg_start_ptr, P, BLOCK_M)
    oh = pq // OW
    ow = pq % OW
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    acc = conv_fwd_taps(acc, x_ptr, w_ptr, d_ptr, bi, oh, ow, mrow, rn, n_open, taps,
                        C, H, W, OC, KW, str_h, str_w, pad_h, pad_w, dil_h, dil_w,
                        sxb, sxc, sxh, sxw, sw0, sw1, sw2, sw3, sd0, sd1, sd2, sd3, PREC, BLOCK_K)
    acc += poison
    if HAS_BIAS:
        acc += tl.load(b_ptr + rn, mask=rn < OC, other=0.0).to(tl.float32)[None, :]
    bi = _reload_samples(seg, tile, rows, order_ptr, seg_start_ptr, P, BLOCK_M)
    yoff = (bi * syb + oh * syh + ow * syw)[:, None] + rn[None, :] * syc
    tl.store(y_ptr + yoff, acc.to(y_ptr.dtype.element_ty), mask=mrow[:, None] & (rn[None, :] < OC))


@triton.autotune(**tile_autotune(MT_DGRAD_TILES, "dy_ptr"), key=_KEY)
@triton.jit
def _taps_mt_conv2d_dgrad_kernel(
    dy_ptr, w_ptr, d_ptr, slot_ptr, s_ptr, thr_ptr, order_ptr, seg_start_ptr, seg_count_ptr, dx_ptr,
    B, C, H, W, OC, OH, OW, KH, KW, T,
    str_h, str_w, pad_h, pad_w, dil_h, dil_w,
    syb, syc, syh, syw, sw0, sw1, sw2, sw3, sdS, sd0, sd1, sd2, sd3, sxb, sxc, sxh, sxw,
    PREC: tl.constexpr, GROUP_M: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """dx tile [BLOCK_M (sample, input pixel) rows of one segment, BLOCK_N input channels]."""
    P = H * W
    num_m = tl.cdiv(B * P, BLOCK_M) + T + 1
    pid_m, pid_n = grouped_tile(tl.program_id(0), num_m, tl.cdiv(C, BLOCK_N), GROUP_M)
    seg, tile, rows = _segment_tile(pid_m, seg_count_ptr, T, P, BLOCK_M)
    # A spare tile of the data-independent grid (seg = -1) runs no tap and stores nothing. Not an
    # early return: `if seg < 0: return` spilled 168-424 bytes (it splits the kernel's body).
    taps = KH * KW * (seg >= 0).to(tl.int32)
    rows = tl.where(seg < 0, 0, rows)
    seg = tl.maximum(seg, 0)
    slot, is_open, poison = task_gate(seg - 1, slot_ptr, s_ptr, thr_ptr)
    n_open = C * is_open.to(tl.int32)
    d_ptr += tl.maximum(slot, 0).to(tl.int64) * sdS
    bi, hw, mrow = _segment_rows(seg, tile, rows, order_ptr, seg_start_ptr, P, BLOCK_M)
    ih = hw // W
    iw = hw % W
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # input channels
    acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    acc = conv_dgrad_taps(acc, dy_ptr, w_ptr, d_ptr, bi, ih, iw, mrow, rn, n_open, taps,
                          C, OC, OH, OW, KW, str_h, str_w, pad_h, pad_w, dil_h, dil_w,
                          syb, syc, syh, syw, sw0, sw1, sw2, sw3, sd0, sd1, sd2, sd3, PREC, BLOCK_K)
    acc += poison
    bi = _reload_samples(seg, tile, rows, order_ptr, seg_start_ptr, P, BLOCK_M)
    xoff = (bi * sxb + ih * sxh + iw * sxw)[:, None] + rn[None, :] * sxc
    tl.store(dx_ptr + xoff, acc.to(dx_ptr.dtype.element_ty), mask=mrow[:, None] & (rn[None, :] < C))


# reset_to_zero: the ds partials of a tiling with fewer tiles than the buffer holds must read 0,
# also after the autotuner benchmarked a config with more tiles (it resets before the final run).
@triton.autotune(**tile_autotune(MT_WGRAD_TILES, "x_ptr", "BLOCK_N", "BLOCK_K", "BLOCK_R"), key=_KEY,
                 reset_to_zero=["part_ptr"])
@triton.jit
def _taps_mt_conv2d_wgrad_kernel(
    dy_ptr, x_ptr, d_ptr, dd_ptr, part_ptr,
    slot_ptr, s_ptr, thr_ptr, task_of_slot_ptr, order_ptr, seg_start_ptr, seg_count_ptr,
    B, C, H, W, OC, OH, OW, KH, KW, T, NP,
    str_h, str_w, pad_h, pad_w, dil_h, dil_w,
    syb, syc, syh, syw, sxb, sxc, sxh, sxw,
    sdS, sd0, sd1, sd2, sd3, sddS, sdd0, sdd1, sdd2, sdd3,
    NEEDS_DDELTA: tl.constexpr, NEEDS_DSCORE: tl.constexpr, PREC: tl.constexpr, GROUP_M: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
):
    """Program (tile, s): the G_t tile [BLOCK_N output channels, BLOCK_K input channels of one
    tap] of the task t that owns slot s, reduced over t's (sample, output pixel) rows, then
    ddeltas[s] = g_t·G_t and the tile's ds partial part[s, tile] (0 for an unused slot)."""
    P = OH * OW
    num_c = tl.cdiv(C, BLOCK_K)
    pid = tl.program_id(0)
    pid_n, pid_k = grouped_tile(pid, tl.cdiv(OC, BLOCK_N), KH * KW * num_c, GROUP_M)
    sl = tl.program_id(1)
    task = tl.load(task_of_slot_ptr + sl)  # -1: no task uses this slot (no rows, G = 0)
    seg = task + 1  # its segment (0, the base samples', for an unused slot: rows forced to 0)
    rows = tl.load(seg_count_ptr + seg) * P * (task >= 0).to(tl.int32)
    start = tl.load(seg_start_ptr + seg)
    _, is_open, poison = task_gate(task, slot_ptr, s_ptr, thr_ptr)
    g = is_open.to(tl.float32)
    poison = tl.where(rows > 0, poison, 0.0)  # a task with no samples has ds = 0, even if NaN
    ij = pid_k // num_c
    ki = ij // KW
    kj = ij % KW
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    c = (pid_k % num_c) * BLOCK_K + tl.arange(0, BLOCK_K)
    cm = c < C
    acc = tl.zeros((BLOCK_N, BLOCK_K), tl.float32)
    # the task's rows, gathered through order (no db here: 0.0 stands in for its accumulator)
    acc, _ = conv_wgrad_rows(acc, 0.0, dy_ptr, x_ptr, order_ptr, start, 0, rows, rn, c, cm, ki, kj,
                             OC, H, W, OH, OW, str_h, str_w, pad_h, pad_w, dil_h, dil_w,
                             syb, syc, syh, syw, sxb, sxc, sxh, sxw, True, False, PREC, BLOCK_R)
    slot64 = sl.to(tl.int64)
    # dW is never asked for here: its pointer/strides slots take ddeltas' (unused, constexpr off).
    wgrad_epilogue(acc, rn, ij * C + c, cm, OC, C, KW, g, poison,
                   d_ptr + slot64 * sdS, dd_ptr + slot64 * sddS, dd_ptr, part_ptr, sl * NP + pid,
                   sd0, sd1, sd2, sd3, sdd0, sdd1, sdd2, sdd3, sdd0, sdd1, sdd2, sdd3,
                   NEEDS_DDELTA, False, NEEDS_DSCORE)


# ----------------------------------------------------------------------------- launchers


def mt_conv2d_fwd(x, sample_task, weight, deltas, slot, scores, thresholds, bias,
                  stride: Sequence[int], padding: Sequence[int], dilation: Sequence[int]) -> torch.Tensor:
    """y[b] = conv2d(x[b], W + g_τ(b)·ΔW_slot[τ(b)]) + bias for sample_task τ [B] (-1 = base);
    y [B, OC, OH, OW] in x's memory format (channels_last stays channels_last)."""
    geo = conv_dims(x, weight, stride, padding, dilation)
    B, C, H, W, OC, OH, OW, KH, KW = geo
    T = slot.numel()
    y = alloc((B, OC, OH, OW), x.dtype, x.device, out_format(x))
    if y.numel() == 0:  # an empty batch: nothing to launch
        return y
    order, seg_start, seg_count = group_rows(sample_task, T)
    slot, scores, thresholds = gate_tensors(slot, scores, thresholds)
    M = B * OH * OW
    grid = lambda meta: ((triton.cdiv(M, meta["BLOCK_M"]) + T + 1) * triton.cdiv(OC, meta["BLOCK_N"]),)  # noqa: E731
    _taps_mt_conv2d_fwd_kernel[grid](
        x, weight, deltas, slot, scores, thresholds, order, seg_start, seg_count,
        bias if bias is not None else x, y,
        *geo, T, *conv_params(stride, padding, dilation),
        *x.stride(), *weight.stride(), *deltas.stride(), *y.stride(),
        HAS_BIAS=bias is not None, PREC=dot_precision(x.dtype), GROUP_M=GROUP,
    )
    return y


def mt_conv2d_dgrad(dy, x, sample_task, weight, deltas, slot, scores, thresholds,
                    stride: Sequence[int], padding: Sequence[int], dilation: Sequence[int]) -> torch.Tensor:
    """dx[b] = conv_transpose2d(dy[b], W + g_τ(b)·ΔW_slot[τ(b)]), in x's shape and memory format."""
    geo = conv_dims(x, weight, stride, padding, dilation)
    B, C, H, W, OC, OH, OW, KH, KW = geo
    T = slot.numel()
    dx = alloc_like(x)  # x's memory format (preserve_format)
    if dx.numel() == 0:
        return dx
    order, seg_start, seg_count = group_rows(sample_task, T)
    slot, scores, thresholds = gate_tensors(slot, scores, thresholds)
    M = B * H * W
    grid = lambda meta: ((triton.cdiv(M, meta["BLOCK_M"]) + T + 1) * triton.cdiv(C, meta["BLOCK_N"]),)  # noqa: E731
    _taps_mt_conv2d_dgrad_kernel[grid](
        dy, weight, deltas, slot, scores, thresholds, order, seg_start, seg_count, dx,
        *geo, T, *conv_params(stride, padding, dilation),
        *dy.stride(), *weight.stride(), *deltas.stride(), *dx.stride(),
        PREC=dot_precision(x.dtype), GROUP_M=GROUP,
    )
    return dx


def mt_conv2d_wgrad(dy, x, sample_task, deltas, slot, scores, thresholds,
                    stride: Sequence[int], padding: Sequence[int], dilation: Sequence[int],
                    needs_ddeltas: bool, needs_dscores: bool,
                    ) -> Tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
    """(ddeltas [S, OC, C, KH, KW] in deltas' dtype and memory format, dscores [T] in the
    scores' dtype), None where not asked for. ddeltas[slot[t]] = g_t·G_t, zero for slots of
    closed tasks, of tasks without samples and slots no task uses; dscores[t] = ⟨G_t, ΔW_slot[t]⟩
    (also when closed), 0 where slot[t] = -1. Slots must be distinct across tasks."""
    S = deltas.shape[0]
    geo = conv_dims(x, torch.empty(deltas.shape[1:], device="meta"), stride, padding, dilation)
    B, C, H, W, OC, OH, OW, KH, KW = geo
    T = slot.numel()
    dev = x.device
    ddeltas = alloc_like(deltas) if needs_ddeltas else None
    dscores = torch.zeros(T, dtype=scores.dtype, device=scores.device) if needs_dscores else None
    if not (needs_ddeltas or needs_dscores):
        return None, None
    if S == 0 or B * OH * OW == 0 or OC * C * KH * KW == 0:  # nothing to reduce: zero gradients
        if ddeltas is not None:
            ddeltas.zero_()
        return ddeltas, dscores
    order, seg_start, seg_count = group_rows(sample_task, T)
    slot32 = slot.to(torch.int32)
    owner = task_of_slot(slot32, S)
    slot_k, scores_k, thr_k = gate_tensors(slot32, scores, thresholds)
    NP = max_tiles(OC, KH * KW * C, all_tiles(MT_WGRAD_TILES), per_tap=(KH * KW, C))
    part = torch.zeros((S, NP), dtype=torch.float32, device=dev)  # tiles a config does not use add 0
    dd = ddeltas if ddeltas is not None else deltas
    grid = lambda meta: (triton.cdiv(OC, meta["BLOCK_N"]) * KH * KW * triton.cdiv(C, meta["BLOCK_K"]), S)  # noqa: E731
    _taps_mt_conv2d_wgrad_kernel[grid](
        dy, x, deltas, dd, part, slot_k, scores_k, thr_k, owner, order, seg_start, seg_count,
        *geo, T, NP, *conv_params(stride, padding, dilation),
        *dy.stride(), *x.stride(), *deltas.stride(), *dd.stride(),
        NEEDS_DDELTA=needs_ddeltas, NEEDS_DSCORE=needs_dscores, PREC=dot_precision(x.dtype), GROUP_M=GROUP,
    )
    if needs_dscores and T:
        ds_slot = part.sum(1)  # fixed-order sum of each slot's tile partials: deterministic
        ds = ds_slot.index_select(0, slot32.clamp_min(0).long())
        dscores = torch.where(slot32 >= 0, ds, torch.zeros_like(ds)).to(scores.dtype)
    return ddeltas, dscores
