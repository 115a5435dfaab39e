"""Triton block-scoring kernels for the retrieval index: Loki low-rank scores and Quest bounds.

Both stream a sketch or per-block min/max once per decode step, so they are memory-bound and the
design goal is one pass at full bandwidth. Grid (Hkv, P): each program loops over a contiguous run
of block tiles for all G query heads of one KV head (the G rows padded to 16 for tl.dot), so the
stream is read once per KV head and per-program setup (loading q, projecting it) is amortised.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from kvretrieve.kernels.checks import (check_bounds, check_launch_device, check_lowrank, check_lowrank_rows,
                                         check_max_dot)
from kvretrieve.kernels.rows import LOWRANK, RowTensors
from kvretrieve.kernels.sparse_decode import _mma, _row_operands

# Enough programs to cover an H100 (132 SMs) several times over, whatever Hkv is.
_TARGET_PROGRAMS = 1024
# The low-rank stream runs fastest with 4 programs per H100 SM, each looping over more tiles
# (bench/results/probe_scoring_h100.json, 8B shape at 128K: 36.9 -> 31.1 us per layer).
_LOWRANK_PROGRAMS = 4 * 132


@triton.jit
def _dot_f32(a, b, B_F32: tl.constexpr, UPCAST: tl.constexpr):
    # a is fp32. Against fp32 b use exact fp32 FMAs; against 16-bit b split a into hi + lo in b's
    # dtype: both products are exact in the fp32 accumulator, so two tensor-core dots give ~16-22
    # bits of a's mantissa instead of the 8-11 a single rounding would keep.
    if B_F32:
        return tl.dot(a, b, input_precision="ieee")
    else:
        hi = a.to(b.dtype)
        lo = (a - hi.to(tl.float32)).to(b.dtype)
        return _mma(hi, b, UPCAST) + _mma(lo, b, UPCAST)


@triton.jit
def _group_queries(q_ptr, kvh, stride_qh, stride_qd, G: tl.constexpr, GP: tl.constexpr, D: tl.constexpr,
                   DP: tl.constexpr):
    # The G query rows of KV head kvh as [GP, DP] fp32, padding rows and columns 0 (GP >= 16 where
    # they feed tl.dot).
    offs_g = tl.arange(0, GP)
    offs_d = tl.arange(0, DP)
    return tl.load(q_ptr + (kvh * G + offs_g)[:, None] * stride_qh + offs_d[None, :] * stride_qd,
                   mask=(offs_g < G)[:, None] & (offs_d < D)[None, :], other=0.0).to(tl.float32)


@triton.jit
def _lowrank_kernel(
    q_ptr, proj_ptr, mean_ptr, sk_ptr, out_ptr, addr_ptr, n_blocks, iters,
    hkv, off_p, off_m, off_s, stride_qb, stride_ob,
    stride_qh, stride_qd, stride_ph, stride_pd, stride_pr, stride_mh, stride_md,
    stride_sh, stride_st, stride_sr, stride_oh,
    G: tl.constexpr, GP: tl.constexpr, D: tl.constexpr, DP: tl.constexpr, R: tl.constexpr,
    RP: tl.constexpr, BS: tl.constexpr, BSP: tl.constexpr, TB: tl.constexpr,
    SK_F32: tl.constexpr, UPCAST: tl.constexpr, PROJ: tl.constexpr, ROWS: tl.constexpr,
):
    kvh = tl.program_id(0)
    pid = tl.program_id(1)
    if ROWS:  # grid axis 0 is (row, KV head): the row's proj, mean, sketch through addr_ptr [B, 3]
        row, kvh, proj_ptr, mean_ptr, sk_ptr = _row_operands(addr_ptr, kvh, hkv, proj_ptr, off_p, mean_ptr, off_m,
                                                             sk_ptr, off_s)
        q_ptr += row.to(tl.int64) * stride_qb
        out_ptr += row.to(tl.int64) * stride_ob
    offs_g = tl.arange(0, GP)
    offs_d = tl.arange(0, DP)
    offs_r = tl.arange(0, RP)
    g_mask = offs_g < G
    d_mask = offs_d < D
    r_mask = offs_r < R
    q = _group_queries(q_ptr, kvh, stride_qh, stride_qd, G, GP, D, DP)
    if PROJ:
        p_head = proj_ptr + kvh.to(tl.int64) * stride_ph
        proj = tl.load(p_head + offs_d[:, None] * stride_pd + offs_r[None, :] * stride_pr,
                       mask=d_mask[:, None] & r_mask[None, :], other=0.0).to(tl.float32)
        mean = tl.load(mean_ptr + kvh * stride_mh + offs_d * stride_md, mask=d_mask, other=0.0).to(tl.float32)
        qr = tl.dot(q, proj, input_precision="ieee")  # once per program, exact fp32
        qm = tl.sum(q * mean[None, :], 1)
    else:  # the "sketch" is the keys themselves (R = D): plain q.k
        qr = q
        qm = tl.zeros([GP], dtype=tl.float32)

    # Tokens of a tile form a [TB, BSP] grid (BSP = block size padded to a power of two),
    # flattened so one dot covers the tile; padding columns are masked to -inf.
    j = tl.arange(0, BSP)
    s_head = sk_ptr + kvh.to(tl.int64) * stride_sh
    for i in range(0, iters):
        blocks = (pid * iters + i) * TB + tl.arange(0, TB)
        valid = tl.reshape((blocks[:, None] < n_blocks) & (j[None, :] < BS), [TB * BSP])
        tok = tl.reshape(blocks[:, None] * BS + j[None, :], [TB * BSP]).to(tl.int64)
        sk = tl.load(s_head + tok[:, None] * stride_st + offs_r[None, :] * stride_sr,
                     mask=valid[:, None] & r_mask[None, :], other=0.0)
        s = _dot_f32(qr, tl.trans(sk), SK_F32, UPCAST) + qm[:, None]
        s = tl.where(g_mask[:, None] & valid[None, :], s, float("-inf"))
        best = tl.max(tl.reshape(tl.max(s, 0), [TB, BSP]), 1)
        tl.store(out_ptr + kvh * stride_oh + blocks, best, mask=blocks < n_blocks)


@triton.jit
def _bounds_kernel(
    q_ptr, kmin_ptr, kmax_ptr, out_ptr, n_blocks, iters,
    stride_qh, stride_qd, stride_nh, stride_nb, stride_nd, stride_xh, stride_xb, stride_xd, stride_oh,
    G: tl.constexpr, GP: tl.constexpr, D: tl.constexpr, DP: tl.constexpr, TB: tl.constexpr,
    K_F32: tl.constexpr, UPCAST: tl.constexpr,
):
    kvh = tl.program_id(0)
    pid = tl.program_id(1)
    offs_g = tl.arange(0, GP)
    offs_d = tl.arange(0, DP)
    g_mask = offs_g < G
    d_mask = offs_d < D
    q = _group_queries(q_ptr, kvh, stride_qh, stride_qd, G, GP, D, DP)
    # max(q*lo, q*hi) takes hi where q >= 0 and lo where q < 0, so the bound is two dots over the
    # sign-split q, for every head of the group at once.
    q_pos = tl.maximum(q, 0.0)
    q_neg = tl.minimum(q, 0.0)
    lo_head = kmin_ptr + kvh.to(tl.int64) * stride_nh
    hi_head = kmax_ptr + kvh.to(tl.int64) * stride_xh
    for i in range(0, iters):
        blocks = (pid * iters + i) * TB + tl.arange(0, TB)
        b_mask = blocks < n_blocks
        m2 = b_mask[:, None] & d_mask[None, :]
        b64 = blocks.to(tl.int64)[:, None]
        lo = tl.load(lo_head + b64 * stride_nb + offs_d[None, :] * stride_nd, mask=m2, other=0.0)
        hi = tl.load(hi_head + b64 * stride_xb + offs_d[None, :] * stride_xd, mask=m2, other=0.0)
        ub = _dot_f32(q_pos, tl.trans(hi), K_F32, UPCAST) + _dot_f32(q_neg, tl.trans(lo), K_F32, UPCAST)
        ub = tl.where(g_mask[:, None], ub, float("-inf"))
        tl.store(out_ptr + kvh * stride_oh + blocks, tl.max(ub, 0), mask=b_mask)


def _split_work(n_tiles: int, hkv: int, target: int = _TARGET_PROGRAMS) -> tuple[int, int]:
    """(programs per KV head, tiles per program) for about `target` programs in all."""
    iters = triton.cdiv(n_tiles, max(1, target // hkv))
    return triton.cdiv(n_tiles, iters), iters


def _tile(n_blocks: int, want: int) -> int:
    # Power of two, >= 16 where it feeds tl.dot's N, no larger than the work needs.
    return max(16, min(want, triton.next_power_of_2(max(n_blocks, 1))))


def lowrank_block_scores(q, proj, mean, sketch, n_blocks, block_size):
    """Triton Loki scores. q [Hq, d], proj [Hkv, d, r], mean [Hkv, d], sketch [Hkv, cap, r]
    -> [Hkv, n_blocks] float32 (max over block tokens and the group's query heads)."""
    hkv, g, r = check_lowrank(q, proj, mean, sketch, n_blocks, block_size)
    check_launch_device("lowrank_block_scores", q, proj, mean, sketch)
    n_blocks, block_size = int(n_blocks), int(block_size)
    out = torch.empty(hkv, n_blocks, dtype=torch.float32, device=q.device)
    if n_blocks == 0:
        return out
    _launch_lowrank(q, proj, mean, sketch, out, n_blocks, block_size, g, r, True)
    return out


def lowrank_block_scores_rows(q, rows: RowTensors, layer: int, n_blocks: int, block_size: int):
    """lowrank_block_scores of B rows in one launch: q [B, Hq, d], row b scoring blocks 0..n_blocks-1
    of layer `layer` of its own index (rows: kernels.rows.lowrank_rows) -> [B, Hkv, n_blocks] float32."""
    hkv, g, r = check_lowrank_rows(q, rows, layer, n_blocks, block_size)
    proj, mean, sketch = (rows[name][0] for name in LOWRANK)
    check_launch_device("lowrank_block_scores_rows", q, proj, rows.addresses)
    n_blocks, block_size = int(n_blocks), int(block_size)
    out = torch.empty(q.shape[0], hkv, n_blocks, dtype=torch.float32, device=q.device)
    if n_blocks == 0:
        return out
    offs = tuple(layer * t.stride(0) for t in (proj, mean, sketch))
    _launch_lowrank(q, proj, mean, sketch, out, n_blocks, block_size, g, r, True, rows=(rows.addresses, offs))
    return out


def max_dot_block_scores(q, keys, n_blocks, block_size):
    """Triton block maxima of q.k: the low-rank kernel with the keys as sketch and no projection.
    q [Hq, d], keys [Hkv, cap, d] -> [Hkv, n_blocks] float32."""
    hkv, g = check_max_dot(q, keys, n_blocks, block_size)
    check_launch_device("max_dot_block_scores", q, keys)
    n_blocks, block_size = int(n_blocks), int(block_size)
    out = torch.empty(hkv, n_blocks, dtype=torch.float32, device=q.device)
    if n_blocks:
        _launch_lowrank(q, keys, keys, keys, out, n_blocks, block_size, g, keys.shape[2], False)  # proj, mean unused
    return out


def _launch_lowrank(q, proj, mean, sketch, out, n_blocks, block_size, g, r, use_proj, tile_elems: int = 8192,
                    programs: int = _LOWRANK_PROGRAMS, rows: tuple | None = None, **launch):
    """q [Hq, d] (or [B, Hq, d] with rows = (addresses [B, 3], offsets): each row's proj, mean and sketch
    [L, ...] by address, plus the layer's offset (elements) into each; proj/mean/sketch are then row 0's
    [L, ...] tensors, for their strides and types, and out is [B, Hkv, n]). tile_elems, programs and
    launch (num_warps, num_stages) are tuning knobs (bench/probe_scoring.py)."""
    d, rp = q.shape[-1], max(16, triton.next_power_of_2(r))
    bsp = triton.next_power_of_2(block_size)
    hkv, B = q.shape[-2] // g, (q.shape[0] if rows else 1)
    # ~tile_elems sketch elements per tile (256 tokens at rank 32); tb*bsp >= 16 so the token
    # dimension is a legal dot N.
    tb = max(1, min(max(1, tile_elems // rp // bsp), triton.next_power_of_2(n_blocks)), triton.cdiv(16, bsp))
    progs, iters = _split_work(triton.cdiv(n_blocks, tb), B * hkv, programs)
    addresses, offs = rows if rows else (out, (0, 0, 0))
    _lowrank_kernel[(B * hkv, progs)](
        q, proj, mean, sketch, out, addresses, n_blocks, iters, hkv, *offs,
        q.stride(0) if rows else 0, out.stride(0) if rows else 0,
        q.stride(-2), q.stride(-1), *proj.stride()[-3:], *mean.stride()[-2:], *sketch.stride()[-3:], out.stride(-2),
        G=g, GP=max(16, triton.next_power_of_2(g)), D=d, DP=max(16, triton.next_power_of_2(d)),
        R=r, RP=rp, BS=block_size, BSP=bsp, TB=tb, SK_F32=sketch.dtype == torch.float32,
        UPCAST=os.environ.get("TRITON_INTERPRET") == "1", PROJ=use_proj, ROWS=rows is not None, **launch,
    )


def bounds_block_scores(q, kmin, kmax, n_blocks):
    """Triton Quest bounds. q [Hq, d], kmin/kmax [Hkv, cap_blocks, d] -> [Hkv, n_blocks] float32
    (max over the group's query heads of sum_c max(q_c*kmin_c, q_c*kmax_c))."""
    hkv, g = check_bounds(q, kmin, kmax, n_blocks)
    check_launch_device("bounds_block_scores", q, kmin, kmax)
    n_blocks = int(n_blocks)
    out = torch.empty(hkv, n_blocks, dtype=torch.float32, device=q.device)
    if n_blocks == 0:
        return out
    d = q.shape[1]
    tb = _tile(n_blocks, max(16, 8192 // d))  # ~8K elements of each of kmin/kmax per tile
    progs, iters = _split_work(triton.cdiv(n_blocks, tb), hkv)
    _bounds_kernel[(hkv, progs)](
        q, kmin, kmax, out, n_blocks, iters,
        q.stride(0), q.stride(1), *kmin.stride(), *kmax.stride(), out.stride(0),
        G=g, GP=max(16, triton.next_power_of_2(g)), D=d, DP=max(16, triton.next_power_of_2(d)), TB=tb,
        K_F32=kmin.dtype == torch.float32, UPCAST=os.environ.get("TRITON_INTERPRET") == "1",
    )
    return out


__all__ = ["lowrank_block_scores", "max_dot_block_scores", "bounds_block_scores"]
