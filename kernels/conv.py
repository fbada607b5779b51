r"""Triton implicit-GEMM kernels for the gated conv2d y = conv2d(x, W + g·ΔW) + b, g = 1[s ≥ τ],
and their launchers. groups = 1 only (grouped and depthwise convs route to the reference path;
the backend's why_not says so).

No im2col buffer exists: every kernel computes the input/output pixel addresses of its tile from
the conv geometry and gathers with masks (zero padding = masked-off loads). Any stride, padding
and dilation; any memory format (NCHW, channels_last, or strided), through four strides per
tensor. The GEMM's reduction index is ordered k = (kh·KW + kw)·C + c, channel innermost, so
that channels_last inputs are read along their contiguous dimension.

    forward  y[b,o,p,q]  = Σ_{c,i,j} x[b, c, p·sh - ph + i·dh, q·sw - pw + j·dw]·W_eff[o,c,i,j] + b[o]
             GEMM: M = B·OH·OW rows, N = O, K = KH·KW·C          (_taps_conv2d_fwd_kernel)
    dx       dx[b,c,h,w] = Σ_{o,i,j} dy[b, o, (h + ph - i·dh)/sh, (w + pw - j·dw)/sw]·W_eff[o,c,i,j]
             over the (i, j) whose division is exact and in range
             GEMM: M = B·H·W, N = C, K = KH·KW·O                  (_taps_conv2d_dgrad_kernel)
    G        G[o, (i,j,c)] = Σ_{b,p,q} dy[b,o,p,q]·x[b, c, p·sh - ph + i·dh, q·sw - pw + j·dw]
             GEMM: N = O, K = KH·KW·C, reduction over B·OH·OW    (_taps_conv2d_wgrad_kernel)
             then dΔW = g·G, dW = G, ds = ⟨G, ΔW⟩ in the epilogue (see _common.wgrad_epilogue)

dx with a stride > 1 visits every (i, j) and masks the ones that do not land on an output pixel
(a factor sh·sw of wasted tile work on those layers, a few downsampling convs per network).
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import triton
import triton.language as tl

from ..ops._common import conv_out_size
from ._common import (
    CONV_TILES,
    CONV_WGRAD_TILES,
    GROUP,
    alloc,
    alloc_like,
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

_KEY = ["B", "C", "H", "W", "OC", "OH", "OW", "KH", "KW"]


# ----------------------------------------------------------------------------- shared reduction loops
# The implicit-GEMM reductions, shared by these kernels and the multi-task ones (mt_conv.py);
# @triton.jit calls are inlined, so the compiled kernels are what the loops written in place
# gave (the static check's registers did not change).
@triton.jit
def conv_fwd_taps(acc, x_ptr, w_ptr, d_ptr, bi, oh, ow, mrow, rn, n_open, taps,
                  C, H, W, OC, KW, str_h, str_w, pad_h, pad_w, dil_h, dil_w,
                  sxb, sxc, sxh, sxw, sw0, sw1, sw2, sw3, sd0, sd1, sd2, sd3,
                  PREC: tl.constexpr, BLOCK_K: tl.constexpr):
    """acc[rows, rn] += Σ over the first ``taps`` taps (i, j) and the C input channels of
    x[bi, c, oh·sh - ph + i·dh, ow·sw - pw + j·dw]·(W + ΔW)[rn, c, i, j]; ΔW columns ≥ n_open
    are predicated off (a closed gate reads W only). Taps outer, channel blocks inner: the pixel
    address and the padding mask are per-row vectors computed once per tap (an earlier version
    decomposed every k of the tile and spilled 200-1400 bytes per thread on sm_80/sm_90)."""
    rk = tl.arange(0, BLOCK_K)
    for ij in range(0, taps):
        ki = ij // KW
        kj = ij % KW
        ih = oh * str_h - pad_h + ki * dil_h
        iw = ow * str_w - pad_w + kj * dil_w
        rowok = mrow & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
        xrow = bi * sxb + ih * sxh + iw * sxw
        wtap = ki * sw2 + kj * sw3
        dtap = ki * sd2 + kj * sd3
        for c0 in range(0, C, BLOCK_K):
            c = c0 + rk
            cm = c < C
            a = tl.load(x_ptr + xrow[:, None] + c[None, :] * sxc, mask=rowok[:, None] & cm[None, :], other=0.0)
            w = tl.load(w_ptr + wtap + c[:, None] * sw1 + rn[None, :] * sw0,
                        mask=cm[:, None] & (rn[None, :] < OC), other=0.0)
            d = tl.load(d_ptr + dtap + c[:, None] * sd1 + rn[None, :] * sd0,
                        mask=cm[:, None] & (rn[None, :] < n_open), other=0.0)
            acc = tl.dot(a, w + d, acc, input_precision=PREC)
    return acc


@triton.jit
def conv_dgrad_taps(acc, dy_ptr, w_ptr, d_ptr, bi, ih, iw, mrow, rn, n_open, taps,
                    C, OC, OH, OW, KW, str_h, str_w, pad_h, pad_w, dil_h, dil_w,
                    syb, syc, syh, syw, sw0, sw1, sw2, sw3, sd0, sd1, sd2, sd3,
                    PREC: tl.constexpr, BLOCK_K: tl.constexpr):
    """acc[rows, rn] += Σ over the taps (i, j) that land on an output pixel and the OC output
    channels of dy[bi, o, (ih + ph - i·dh)/sh, (iw + pw - j·dw)/sw]·(W + ΔW)[o, rn, i, j]."""
    rk = tl.arange(0, BLOCK_K)
    for ij in range(0, taps):  # taps outer, output-channel blocks inner (as the forward)
        ki = ij // KW
        kj = ij % KW
        th = ih + pad_h - ki * dil_h
        tw = iw + pad_w - kj * dil_w
        oh = th // str_h
        ow = tw // str_w
        # th >= 0 is part of the mask: the // and % of a negative th never reach memory.
        rowok = mrow & (th >= 0) & (tw >= 0) & (th % str_h == 0) & (tw % str_w == 0) & (oh < OH) & (ow < OW)
        dyrow = bi * syb + oh * syh + ow * syw
        wtap = ki * sw2 + kj * sw3
        dtap = ki * sd2 + kj * sd3
        for o0 in range(0, OC, BLOCK_K):
            o = o0 + rk
            om = o < OC
            a = tl.load(dy_ptr + dyrow[:, None] + o[None, :] * syc, mask=rowok[:, None] & om[None, :], other=0.0)
            w = tl.load(w_ptr + wtap + o[:, None] * sw0 + rn[None, :] * sw1,
                        mask=om[:, None] & (rn[None, :] < C), other=0.0)
            d = tl.load(d_ptr + dtap + o[:, None] * sd0 + rn[None, :] * sd1,
                        mask=om[:, None] & (rn[None, :] < n_open), other=0.0)
            acc = tl.dot(a, w + d, acc, input_precision=PREC)
    return acc


@triton.jit
def conv_wgrad_rows(acc, db, dy_ptr, x_ptr, order_ptr, start, r_lo, r_hi, rn, c, cm, ki, kj,
                    OC, H, W, OH, OW, str_h, str_w, pad_h, pad_w, dil_h, dil_w,
                    syb, syc, syh, syw, sxb, sxc, sxh, sxw,
                    GATHER: tl.constexpr, HAS_DBIAS: tl.constexpr, PREC: tl.constexpr,
                    BLOCK_R: tl.constexpr):
    """(acc, db) after the weight-gradient reduction of tap (ki, kj) over the rows r in
    [r_lo, r_hi), BLOCK_R at a time: acc[rn, c] += Σ_r dy[bi, rn, oh, ow]·x[bi, c, oh·sh - ph +
    ki·dh, ow·sw - pw + kj·dw], and with HAS_DBIAS db[rn] += Σ_r dy[bi, rn, oh, ow]. Row r is
    pixel (oh, ow) = r % (OH·OW) of sample bi = r // (OH·OW), or with GATHER of sample
    order[start + r // (OH·OW)] (the samples of one task)."""
    P = OH * OW
    for r0 in range(r_lo, r_hi, BLOCK_R):
        r = r0 + tl.arange(0, BLOCK_R)
        rmask = r < r_hi
        if GATHER:
            bi = tl.load(order_ptr + start + r // P, mask=rmask, other=0)
        else:
            bi = r // P
        pq = r % P
        oh = pq // OW
        ow = pq % OW
        a = tl.load(dy_ptr + (bi * syb + oh * syh + ow * syw)[None, :] + rn[:, None] * syc,
                    mask=(rn[:, None] < OC) & rmask[None, :], other=0.0)
        ih = oh * str_h - pad_h + ki * dil_h
        iw = ow * str_w - pad_w + kj * dil_w
        rowok = rmask & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
        b = tl.load(x_ptr + (bi * sxb + ih * sxh + iw * sxw)[:, None] + c[None, :] * sxc,
                    mask=rowok[:, None] & cm[None, :], other=0.0)
        acc = tl.dot(a, b, acc, input_precision=PREC)
        if HAS_DBIAS:
            db += tl.sum(a.to(tl.float32), axis=1)
    return acc, db


@triton.autotune(**tile_autotune(CONV_TILES, "x_ptr"), key=_KEY)
@triton.jit
def _taps_conv2d_fwd_kernel(
    x_ptr, w_ptr, d_ptr, s_ptr, b_ptr, y_ptr,
    B, C, H, W, OC, OH, OW, KH, KW, threshold,
    str_h, str_w, pad_h, pad_w, dil_h, dil_w,
    sxb, sxc, sxh, sxw, sw0, sw1, sw2, sw3, sd0, sd1, sd2, sd3, syb, syc, syh, syw,
    HAS_BIAS: tl.constexpr, PREC: tl.constexpr, GROUP_M: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    M = B * OH * OW
    pid_m, pid_n = grouped_tile(tl.program_id(0), tl.cdiv(M, BLOCK_M), tl.cdiv(OC, BLOCK_N), GROUP_M)
    is_open, _, poison = gate(s_ptr, threshold)
    n_open = OC * is_open.to(tl.int32)  # ΔW column bound: 0 when closed (see linear.py)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    bi = rm // (OH * OW)
    pq = rm % (OH * OW)
    oh = pq // OW
    ow = pq % OW
    mrow = rm < M
    acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    acc = conv_fwd_taps(acc, x_ptr, w_ptr, d_ptr, bi, oh, ow, mrow, rn, n_open, KH * KW,
                        C, H, W, OC, KW, str_h, str_w, pad_h, pad_w, dil_h, dil_w,
                        sxb, sxc, sxh, sxw, sw0, sw1, sw2, sw3, sd0, sd1, sd2, sd3, PREC, BLOCK_K)
    acc += poison
    if HAS_BIAS:
        acc += tl.load(b_ptr + rn, mask=rn < OC, other=0.0).to(tl.float32)[None, :]
    yoff = (bi * syb + oh * syh + ow * syw)[:, None] + rn[None, :] * syc
    tl.store(y_ptr + yoff, acc.to(y_ptr.dtype.element_ty), mask=mrow[:, None] & (rn[None, :] < OC))


@triton.autotune(**tile_autotune(CONV_TILES, "dy_ptr"), key=_KEY)
@triton.jit
def _taps_conv2d_dgrad_kernel(
    dy_ptr, w_ptr, d_ptr, s_ptr, dx_ptr,
    B, C, H, W, OC, OH, OW, KH, KW, threshold,
    str_h, str_w, pad_h, pad_w, dil_h, dil_w,
    syb, syc, syh, syw, sw0, sw1, sw2, sw3, sd0, sd1, sd2, sd3, sxb, sxc, sxh, sxw,
    PREC: tl.constexpr, GROUP_M: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    M = B * H * W
    pid_m, pid_n = grouped_tile(tl.program_id(0), tl.cdiv(M, BLOCK_M), tl.cdiv(C, BLOCK_N), GROUP_M)
    is_open, _, poison = gate(s_ptr, threshold)
    n_open = C * is_open.to(tl.int32)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # input channels
    bi = rm // (H * W)
    hw = rm % (H * W)
    ih = hw // W
    iw = hw % W
    mrow = rm < M
    acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    acc = conv_dgrad_taps(acc, dy_ptr, w_ptr, d_ptr, bi, ih, iw, mrow, rn, n_open, KH * KW,
                          C, OC, OH, OW, KW, str_h, str_w, pad_h, pad_w, dil_h, dil_w,
                          syb, syc, syh, syw, sw0, sw1, sw2, sw3, sd0, sd1, sd2, sd3, PREC, BLOCK_K)
    acc += poison
    xoff = (bi * sxb + ih * sxh + iw * sxw)[:, None] + rn[None, :] * sxc
    tl.store(dx_ptr + xoff, acc.to(dx_ptr.dtype.element_ty), mask=mrow[:, None] & (rn[None, :] < C))


@triton.autotune(**tile_autotune(CONV_WGRAD_TILES, "x_ptr", "BLOCK_N", "BLOCK_K", "BLOCK_R"), key=_KEY + ["SPLIT"],
                 reset_to_zero=["part_ptr"])  # see PARTIALS_RESET in _common.py
@triton.jit
def _taps_conv2d_wgrad_kernel(
    dy_ptr, x_ptr, s_ptr, d_ptr, dd_ptr, dw_ptr, part_ptr, ws_ptr, db_ptr,
    B, C, H, W, OC, OH, OW, KH, KW, threshold,
    str_h, str_w, pad_h, pad_w, dil_h, dil_w,
    syb, syc, syh, syw, sxb, sxc, sxh, sxw,
    s0, s1, s2, s3, ds0, ds1, ds2, ds3, ws0, ws1, ws2, ws3,
    NEEDS_DDELTA: tl.constexpr, NEEDS_DWEIGHT: tl.constexpr, NEEDS_DSCORE: tl.constexpr,
    HAS_DBIAS: tl.constexpr, SPLIT: tl.constexpr, PREC: tl.constexpr, GROUP_M: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
):
    """G[OC, KH·KW·C] = Σ over the B·OH·OW output pixels of dy ⊗ (gathered x); each program
    owns BLOCK_N output channels × BLOCK_K input channels of one tap (i, j), so its x gather is
    a per-row address broadcast with the channel offsets. Then the same epilogue / split
    workspace / db partials as _taps_linear_wgrad_kernel."""
    R = B * OH * OW
    K = KH * KW * C
    num_c = tl.cdiv(C, BLOCK_K)
    pid = tl.program_id(0)
    pid_n, pid_k = grouped_tile(pid, tl.cdiv(OC, BLOCK_N), KH * KW * num_c, GROUP_M)
    pid_s = tl.program_id(1)
    ij = pid_k // num_c
    ki = ij // KW
    kj = ij % KW
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    c = (pid_k % num_c) * BLOCK_K + tl.arange(0, BLOCK_K)
    cm = c < C
    r_lo, r_hi = split_range(R, pid_s, SPLIT, BLOCK_R)
    acc = tl.zeros((BLOCK_N, BLOCK_K), tl.float32)
    db = tl.zeros((BLOCK_N,), tl.float32)
    # rows r_lo..r_hi in batch order (GATHER off: no order buffer, dy_ptr stands in for it)
    acc, db = conv_wgrad_rows(acc, db, dy_ptr, x_ptr, dy_ptr, 0, r_lo, r_hi, rn, c, cm, ki, kj,
                              OC, H, W, OH, OW, str_h, str_w, pad_h, pad_w, dil_h, dil_w,
                              syb, syc, syh, syw, sxb, sxc, sxh, sxw, False, HAS_DBIAS, PREC, BLOCK_R)
    if HAS_DBIAS:
        tl.store(db_ptr + pid_s * OC + rn, db, mask=(rn < OC) & (pid_k == 0))
    rk = ij * C + c  # the G column of each channel (k = (i·KW + j)·C + c)
    if SPLIT == 1:
        _, g, poison = gate(s_ptr, threshold)
        wgrad_epilogue(acc, rn, rk, cm, OC, C, KW, g, poison, d_ptr, dd_ptr, dw_ptr, part_ptr, pid,
                       s0, s1, s2, s3, ds0, ds1, ds2, ds3, ws0, ws1, ws2, ws3,
                       NEEDS_DDELTA, NEEDS_DWEIGHT, NEEDS_DSCORE)
    else:
        tl.store(ws_ptr + pid_s * OC * K + rn[:, None] * K + rk[None, :], acc,
                 mask=(rn[:, None] < OC) & cm[None, :])


# ----------------------------------------------------------------------------- launchers
# Shared with the multi-task launchers (mt_conv.py).
def conv_dims(x, weight, stride, padding, dilation):
    """(B, C, H, W, OC, OH, OW, KH, KW): the kernels' size arguments for x [B, C, H, W] and a
    weight [OC, C, KH, KW]."""
    B, C, H, W = x.shape
    OC, _, KH, KW = weight.shape
    OH = conv_out_size(H, KH, stride[0], padding[0], dilation[0])
    OW = conv_out_size(W, KW, stride[1], padding[1], dilation[1])
    return B, C, H, W, OC, OH, OW, KH, KW


def conv_params(stride, padding, dilation):
    """(str_h, str_w, pad_h, pad_w, dil_h, dil_w): the kernels' conv arguments."""
    return (stride[0], stride[1], padding[0], padding[1], dilation[0], dilation[1])


def conv2d_fwd(x, weight, delta, score, bias, stride: Sequence[int], padding: Sequence[int],
               dilation: Sequence[int], threshold: float, memory_format=torch.contiguous_format):
    score, threshold = gate_operands(score, threshold)
    geo = conv_dims(x, weight, stride, padding, dilation)
    B, C, H, W, OC, OH, OW, KH, KW = geo
    y = alloc((B, OC, OH, OW), x.dtype, x.device, memory_format)
    if y.numel() == 0:  # an empty batch: nothing to launch
        return y
    M = B * OH * OW
    grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(OC, meta["BLOCK_N"]),)  # noqa: E731
    _taps_conv2d_fwd_kernel[grid](
        x, weight, delta, score, bias if bias is not None else x, y,
        *geo, threshold_in(score, threshold), *conv_params(stride, padding, dilation),
        *x.stride(), *weight.stride(), *delta.stride(), *y.stride(),
        HAS_BIAS=bias is not None, PREC=dot_precision(x.dtype), GROUP_M=GROUP,
    )
    return y


def conv2d_dgrad(dy, x, weight, delta, score, stride, padding, dilation, threshold):
    score, threshold = gate_operands(score, threshold)
    geo = conv_dims(x, weight, stride, padding, dilation)
    B, C, H, W = x.shape
    dx = alloc_like(x)  # x's memory format (preserve_format)
    if dx.numel() == 0:
        return dx
    M = B * H * W
    grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(C, meta["BLOCK_N"]),)  # noqa: E731
    _taps_conv2d_dgrad_kernel[grid](
        dy, weight, delta, score, dx,
        *geo, threshold_in(score, threshold), *conv_params(stride, padding, dilation),
        *dy.stride(), *weight.stride(), *delta.stride(), *dx.stride(),
        PREC=dot_precision(x.dtype), GROUP_M=GROUP,
    )
    return dx


def conv2d_wgrad(dy, x, weight, delta, score, stride, padding, dilation, threshold,
                 needs_dweight: bool, needs_ddelta: bool, needs_dscore: bool, needs_dbias: bool,
                 split: Optional[int] = None):
    """One implicit-GEMM pass over G: returns (dW, dΔW, ds, db), None where not asked for.
    dW and dΔW come out in the memory format of W and ΔW."""
    score, threshold = gate_operands(score, threshold)
    geo = conv_dims(x, weight, stride, padding, dilation)
    B, C, H, W, OC, OH, OW, KH, KW = geo
    K = KH * KW * C
    dev = x.device
    if split is None:
        split = pick_split(triton.cdiv(OC, 128) * triton.cdiv(K, 128), B * OH * OW, 512, num_sms(dev))
    ddelta = alloc_like(delta) if needs_ddelta else None
    dweight = alloc_like(weight) if needs_dweight else None
    part = ds_partials(OC, K, split, dev, per_tap=(KH * KW, C))
    ws = alloc((split, OC, K), torch.float32, dev) if split > 1 else part
    dbp = alloc((split, OC), torch.float32, dev) if needs_dbias else part
    dd, dw = (ddelta if ddelta is not None else delta), (dweight if dweight is not None else delta)
    grid = lambda meta: (triton.cdiv(OC, meta["BLOCK_N"]) * KH * KW * triton.cdiv(C, meta["BLOCK_K"]), split)  # noqa: E731
    _taps_conv2d_wgrad_kernel[grid](
        dy, x, score, delta, dd, dw, part, ws, dbp,
        *geo, threshold_in(score, threshold), *conv_params(stride, padding, dilation),
        *dy.stride(), *x.stride(), *delta.stride(), *dd.stride(), *dw.stride(),
        NEEDS_DDELTA=needs_ddelta, NEEDS_DWEIGHT=needs_dweight, NEEDS_DSCORE=needs_dscore,
        HAS_DBIAS=needs_dbias, SPLIT=split, PREC=dot_precision(x.dtype), GROUP_M=GROUP,
    )
    ds = finish_wgrad(ws, score, delta, dd, dw, part, split, OC, K, C, KW, threshold,
                      delta.stride(), dd.stride(), dw.stride(), needs_ddelta, needs_dweight, needs_dscore)
    db = dbp.sum(0).to(dy.dtype) if needs_dbias else None
    return dweight, ddelta, ds, db
