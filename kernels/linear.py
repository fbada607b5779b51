r"""Triton kernels for the gated linear y = x·(W + g·ΔW)ᵀ + b, g = 1[s ≥ τ], and their launchers.

Math (x: [M, K], W, ΔW: [N, K], dy: [M, N], G = dyᵀ·x):

    forward   y   = x·W_effᵀ + b         (_taps_linear_fwd_kernel)
    backward  dx  = dy·W_eff              (the same kernel on the transposed weight view)
              dΔW = g·G, dW = G, ds = ⟨G, ΔW⟩, db = Σ_m dy
                                          (_taps_linear_wgrad_kernel: one pass over G)

W_eff is formed tile by tile in registers (never in memory); a closed gate predicates the ΔW
loads off. The G pass writes G only where it is asked for (dΔW when open, dW if unfrozen) and
reduces ds in-kernel: per tile a partial, summed by the launcher in a fixed order.

Bytes and FLOPs that must move (fp16/bf16, the floor the benchmarks compare with):
    forward  2MNK FLOPs; bytes 2(MK + NK[+NK if open] + MN)
    backward 4MNK FLOPs (dx and G); bytes 2(MN + MK) per product, + NK for ΔW (ds), + NK for dΔW
Split reductions: when the output tiles cannot fill the GPU (small M in the forward, a small
weight in the G pass) the reduction is split across programs into an fp32 workspace and summed
in a fixed order (no atomics: deterministic).
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from ._common import (
    FWD_TILES,
    GROUP,
    WGRAD_TILES,
    alloc,
    dot_precision,
    ds_partials,
    finish_wgrad,
    gate,
    grouped_tile,
    num_sms,
    pick_split,
    tile_autotune,
    split_range,
    gate_operands,
    threshold_in,
    wgrad_epilogue,
)

@triton.autotune(**tile_autotune(FWD_TILES, "x_ptr"), key=["M", "N", "K", "SPLIT_K"])
@triton.jit
def _taps_linear_fwd_kernel(
    x_ptr, w_ptr, d_ptr, s_ptr, b_ptr, y_ptr,
    M, N, K, threshold,
    sxm, sxk, swn, swk, sdn, sdk, sym, syn, sys,
    HAS_BIAS: tl.constexpr, SPLIT_K: tl.constexpr, PREC: tl.constexpr, GROUP_M: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """y[M, N] = x[M, K]·(W + g·ΔW)ᵀ (+ b). With SPLIT_K > 1, program (tile, j) reduces the j-th
    K range into y = an fp32 workspace [SPLIT_K, M, N] (stride sys), and no bias is added."""
    pid_m, pid_n = grouped_tile(tl.program_id(0), tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N), GROUP_M)
    pid_s = tl.program_id(1)
    is_open, _, poison = gate(s_ptr, threshold)
    # The ΔW loads' column bound: N when open, 0 when closed (every ΔW load predicated off).
    # A bound rather than `mask & is_open`: the interpreter cannot AND a scalar into a mask.
    n_open = N * is_open.to(tl.int32)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    k_lo, k_hi = split_range(K, pid_s, SPLIT_K, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        kk = k0 + rk
        km = kk < k_hi
        a = tl.load(x_ptr + rm[:, None] * sxm + kk[None, :] * sxk,
                    mask=(rm[:, None] < M) & km[None, :], other=0.0)
        wmask = km[:, None] & (rn[None, :] < N)
        w = tl.load(w_ptr + kk[:, None] * swk + rn[None, :] * swn, mask=wmask, other=0.0)
        d = tl.load(d_ptr + kk[:, None] * sdk + rn[None, :] * sdn, mask=km[:, None] & (rn[None, :] < n_open), other=0.0)
        acc = tl.dot(a, w + d, acc, input_precision=PREC)
    acc += poison
    if HAS_BIAS:
        acc += tl.load(b_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
    ymask = (rm[:, None] < M) & (rn[None, :] < N)
    tl.store(y_ptr + pid_s * sys + rm[:, None] * sym + rn[None, :] * syn,
             acc.to(y_ptr.dtype.element_ty), mask=ymask)


@triton.autotune(**tile_autotune(WGRAD_TILES, "x_ptr", "BLOCK_N", "BLOCK_K", "BLOCK_R"), key=["M", "N", "K", "SPLIT"],
                 reset_to_zero=["part_ptr"])  # see PARTIALS_RESET in _common.py
@triton.jit
def _taps_linear_wgrad_kernel(
    dy_ptr, x_ptr, s_ptr, d_ptr, dd_ptr, dw_ptr, part_ptr, ws_ptr, db_ptr,
    M, N, K, threshold,
    sdym, sdyn, sxm, sxk, s0, s1, ds0, ds1, ws0, ws1,
    NEEDS_DDELTA: tl.constexpr, NEEDS_DWEIGHT: tl.constexpr, NEEDS_DSCORE: tl.constexpr,
    HAS_DBIAS: tl.constexpr, SPLIT: tl.constexpr, PREC: tl.constexpr, GROUP_M: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
):
    """One pass over G[N, K] = dyᵀ·x (reduction over the M rows, BLOCK_R at a time). SPLIT = 1:
    the gated epilogue runs here (dΔW, dW, ds partial per tile). SPLIT > 1: program (tile, j)
    reduces the j-th row range into ws [SPLIT, N, K] fp32 for the split epilogue kernel.
    HAS_DBIAS: the programs of the first K column of tiles also sum dy over their rows
    (db partials [SPLIT, N], summed by the launcher)."""
    pid = tl.program_id(0)
    num_k = tl.cdiv(K, BLOCK_K)
    pid_n, pid_k = grouped_tile(pid, tl.cdiv(N, BLOCK_N), num_k, GROUP_M)
    pid_s = tl.program_id(1)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    rr = tl.arange(0, BLOCK_R)
    r_lo, r_hi = split_range(M, pid_s, SPLIT, BLOCK_R)
    acc = tl.zeros((BLOCK_N, BLOCK_K), tl.float32)
    db = tl.zeros((BLOCK_N,), tl.float32)
    for r0 in range(r_lo, r_hi, BLOCK_R):
        r = r0 + rr
        rmask = r < r_hi
        a = tl.load(dy_ptr + r[None, :] * sdym + rn[:, None] * sdyn,
                    mask=(rn[:, None] < N) & rmask[None, :], other=0.0)
        b = tl.load(x_ptr + r[:, None] * sxm + rk[None, :] * sxk,
                    mask=rmask[:, None] & (rk[None, :] < K), other=0.0)
        acc = tl.dot(a, b, acc, input_precision=PREC)
        if HAS_DBIAS:
            db += tl.sum(a.to(tl.float32), axis=1)
    if HAS_DBIAS:
        tl.store(db_ptr + pid_s * N + rn, db, mask=(rn < N) & (pid_k == 0))
    if SPLIT == 1:
        _, g, poison = gate(s_ptr, threshold)
        wgrad_epilogue(acc, rn, rk, rk < K, N, K, 1, g, poison, d_ptr, dd_ptr, dw_ptr, part_ptr, pid,
                       s0, s1, 0, 0, ds0, ds1, 0, 0, ws0, ws1, 0, 0,
                       NEEDS_DDELTA, NEEDS_DWEIGHT, NEEDS_DSCORE)
    else:
        tl.store(ws_ptr + pid_s * N * K + rn[:, None] * K + rk[None, :], acc,
                 mask=(rn[:, None] < N) & (rk[None, :] < K))


# ----------------------------------------------------------------------------- launchers
def linear_fwd(x: torch.Tensor, weight: torch.Tensor, delta: torch.Tensor, score: torch.Tensor,
               bias: Optional[torch.Tensor], threshold: float, split_k: Optional[int] = None,
               transpose_weight: bool = False) -> torch.Tensor:
    """y = x·W_effᵀ + b for x [M, K] and W, ΔW [N, K]; with transpose_weight, W and ΔW are
    used as their transposes (the dx = dy·W_eff of the backward; x is then [M, N])."""
    score, threshold = gate_operands(score, threshold)
    M, K = x.shape
    sw = weight.stride()
    sd = delta.stride()
    if transpose_weight:
        N = weight.shape[1]
        swn, swk, sdn, sdk = sw[1], sw[0], sd[1], sd[0]
    else:
        N = weight.shape[0]
        swn, swk, sdn, sdk = sw[0], sw[1], sd[0], sd[1]
    if split_k is None:
        split_k = pick_split(triton.cdiv(M, 128) * triton.cdiv(N, 128), K, 128, num_sms(x.device))
    y = alloc((M, N), x.dtype, x.device)
    if y.numel() == 0:  # an empty batch: nothing to launch (a zero-size grid)
        return y
    if split_k == 1:
        out, has_bias, sys = y, bias is not None, 0
    else:
        out = alloc((split_k, M, N), torch.float32, x.device)
        has_bias, sys = False, M * N
    grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]), split_k)  # noqa: E731
    _taps_linear_fwd_kernel[grid](
        x, weight, delta, score, bias if has_bias else x, out,
        M, N, K, threshold_in(score, threshold),
        x.stride(0), x.stride(1), swn, swk, sdn, sdk, out.stride(-2), out.stride(-1), sys,
        HAS_BIAS=has_bias, SPLIT_K=split_k, PREC=dot_precision(x.dtype), GROUP_M=GROUP,
    )
    if split_k > 1:
        acc = out.sum(0)  # fixed-order reduction: deterministic
        if bias is not None:
            acc += bias.float()
        y.copy_(acc)
    return y


def linear_wgrad(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, delta: torch.Tensor,
                 score: torch.Tensor, threshold: float, needs_dweight: bool, needs_ddelta: bool,
                 needs_dscore: bool, needs_dbias: bool, split: Optional[int] = None,
                 ) -> Tuple[Optional[torch.Tensor], Optional[torch.Tensor], Optional[torch.Tensor],
                            Optional[torch.Tensor]]:
    """One pass over G = dyᵀ·x for dy [M, N], x [M, K]: returns (dW, dΔW, ds, db), None where
    not asked for."""
    score, threshold = gate_operands(score, threshold)
    M, N = dy.shape
    K = x.shape[1]
    dev = x.device
    if split is None:
        split = pick_split(triton.cdiv(N, 128) * triton.cdiv(K, 128), M, 512, num_sms(dev))
    ddelta = alloc(delta.shape, delta.dtype, delta.device) if needs_ddelta else None
    dweight = alloc(weight.shape, weight.dtype, weight.device) if needs_dweight else None
    part = ds_partials(N, K, split, dev)
    ws = alloc((split, N, K), torch.float32, dev) if split > 1 else part
    dbp = alloc((split, N), torch.float32, dev) if needs_dbias else part
    dd, dw = (ddelta if ddelta is not None else delta), (dweight if dweight is not None else delta)
    grid = lambda meta: (triton.cdiv(N, meta["BLOCK_N"]) * triton.cdiv(K, meta["BLOCK_K"]), split)  # noqa: E731
    _taps_linear_wgrad_kernel[grid](
        dy, x, score, delta, dd, dw, part, ws, dbp,
        M, N, K, threshold_in(score, threshold),
        dy.stride(0), dy.stride(1), x.stride(0), x.stride(1),
        delta.stride(0), delta.stride(1), dd.stride(0), dd.stride(1), dw.stride(0), dw.stride(1),
        NEEDS_DDELTA=needs_ddelta, NEEDS_DWEIGHT=needs_dweight, NEEDS_DSCORE=needs_dscore,
        HAS_DBIAS=needs_dbias, SPLIT=split, PREC=dot_precision(x.dtype), GROUP_M=GROUP,
    )
    ds = finish_wgrad(ws, score, delta, dd, dw, part, split, N, K, K, 1, threshold,
                      (delta.stride(0), delta.stride(1), 0, 0), (dd.stride(0), dd.stride(1), 0, 0),
                      (dw.stride(0), dw.stride(1), 0, 0), needs_ddelta, needs_dweight, needs_dscore)
    db = dbp.sum(0).to(dy.dtype) if needs_dbias else None
    return dweight, ddelta, ds, db
