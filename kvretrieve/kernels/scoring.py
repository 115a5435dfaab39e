"""Triton block-scoring kernels for the retrieval index: Loki low-rank scores and Quest bounds.

Both are memory-bound (they stream a sketch or per-block min/max once per decode step), so the
arithmetic is done in fp32 with "ieee" dots: exact enough to rank blocks identically to the
reference, and the FMA cost stays below the bandwidth cost at these tiny M (the G query heads,
padded to 16 rows for tl.dot). Grid (Hkv, block tiles); each program scores one tile of blocks for
all G query heads of one KV head, so the stream is read once per KV head.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kvretrieve.kernels.reference import check_bounds, check_launch_device, check_lowrank


@triton.jit
def _lowrank_kernel(
    q_ptr, proj_ptr, mean_ptr, sk_ptr, out_ptr, n_blocks,
    stride_qh, stride_qd, stride_ph, stride_pd, stride_pr, stride_mh, stride_md,
    stride_sh, stride_st, stride_sr, stride_oh,
    G: tl.constexpr, GP: tl.constexpr, D: tl.constexpr, DP: tl.constexpr, R: tl.constexpr,
    RP: tl.constexpr, BS: tl.constexpr, BSP: tl.constexpr, TB: tl.constexpr,
):
    kvh = tl.program_id(0)
    tile = tl.program_id(1)
    offs_g = tl.arange(0, GP)
    offs_d = tl.arange(0, DP)
    offs_r = tl.arange(0, RP)
    g_mask = offs_g < G
    d_mask = offs_d < D
    r_mask = offs_r < R
    heads = kvh * G + offs_g
    q = tl.load(q_ptr + heads[:, None] * stride_qh + offs_d[None, :] * stride_qd,
                mask=g_mask[:, None] & d_mask[None, :], other=0.0).to(tl.float32)
    p_head = proj_ptr + kvh.to(tl.int64) * stride_ph
    proj = tl.load(p_head + offs_d[:, None] * stride_pd + offs_r[None, :] * stride_pr,
                   mask=d_mask[:, None] & r_mask[None, :], other=0.0).to(tl.float32)
    mean = tl.load(mean_ptr + kvh * stride_mh + offs_d * stride_md, mask=d_mask, other=0.0).to(tl.float32)
    # Projecting q once per program (GP x d x r) is far cheaper than touching full keys.
    qr = tl.dot(q, proj, input_precision="ieee")
    qm = tl.sum(q * mean[None, :], 1)

    # Tokens are laid out as a [TB, BSP] grid (BSP = block size padded to a power of two) and
    # flattened so one dot covers the tile; the padding columns are masked to -inf below.
    blocks = tile * TB + tl.arange(0, TB)
    j = tl.arange(0, BSP)
    valid2d = (blocks[:, None] < n_blocks) & (j[None, :] < BS)
    tok = tl.reshape(blocks[:, None] * BS + j[None, :], [TB * BSP])
    valid = tl.reshape(valid2d, [TB * BSP])
    s_head = sk_ptr + kvh.to(tl.int64) * stride_sh
    sk = tl.load(s_head + tok.to(tl.int64)[:, None] * stride_st + offs_r[None, :] * stride_sr,
                 mask=valid[:, None] & r_mask[None, :], other=0.0).to(tl.float32)
    s = tl.dot(qr, tl.trans(sk), input_precision="ieee") + qm[:, None]
    s = tl.where(g_mask[:, None] & valid[None, :], s, float("-inf"))
    best = tl.max(tl.reshape(tl.max(s, 0), [TB, BSP]), 1)
    tl.store(out_ptr + kvh * stride_oh + blocks, best, mask=blocks < n_blocks)


@triton.jit
def _bounds_kernel(
    q_ptr, kmin_ptr, kmax_ptr, out_ptr, n_blocks,
    stride_qh, stride_qd, stride_nh, stride_nb, stride_nd, stride_xh, stride_xb, stride_xd, stride_oh,
    G: tl.constexpr, GP: tl.constexpr, D: tl.constexpr, DP: tl.constexpr, TB: tl.constexpr,
):
    kvh = tl.program_id(0)
    tile = tl.program_id(1)
    offs_g = tl.arange(0, GP)
    offs_d = tl.arange(0, DP)
    g_mask = offs_g < G
    d_mask = offs_d < D
    heads = kvh * G + offs_g
    q = tl.load(q_ptr + heads[:, None] * stride_qh + offs_d[None, :] * stride_qd,
                mask=g_mask[:, None] & d_mask[None, :], other=0.0).to(tl.float32)
    blocks = tile * TB + tl.arange(0, TB)
    b_mask = blocks < n_blocks
    m2 = b_mask[:, None] & d_mask[None, :]
    b64 = blocks.to(tl.int64)[:, None]
    lo = tl.load(kmin_ptr + kvh.to(tl.int64) * stride_nh + b64 * stride_nb + offs_d[None, :] * stride_nd,
                 mask=m2, other=0.0).to(tl.float32)
    hi = tl.load(kmax_ptr + kvh.to(tl.int64) * stride_xh + b64 * stride_xb + offs_d[None, :] * stride_xd,
                 mask=m2, other=0.0).to(tl.float32)
    # max(q*lo, q*hi) takes hi where q >= 0 and lo where q < 0: two dots over the sign-split q give
    # every head of the group at once (each product is exact; only the summation order differs).
    ub = tl.dot(tl.maximum(q, 0.0), tl.trans(hi), input_precision="ieee")
    ub += tl.dot(tl.minimum(q, 0.0), tl.trans(lo), input_precision="ieee")
    ub = tl.where(g_mask[:, None], ub, float("-inf"))
    tl.store(out_ptr + kvh * stride_oh + blocks, tl.max(ub, 0), mask=b_mask)


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
    d = q.shape[1]
    bsp = triton.next_power_of_2(block_size)
    # ~128 tokens per program; tb*bsp >= 16 so the token dimension is a legal dot N.
    tb = max(1, min(128 // bsp, triton.next_power_of_2(n_blocks)))
    tb = max(tb, triton.cdiv(16, bsp))
    grid = (hkv, triton.cdiv(n_blocks, tb))
    _lowrank_kernel[grid](
        q, proj, mean, sketch, out, n_blocks,
        q.stride(0), q.stride(1), *proj.stride(), *mean.stride(), *sketch.stride(), out.stride(0),
        G=g, GP=max(16, triton.next_power_of_2(g)), D=d, DP=max(16, triton.next_power_of_2(d)),
        R=r, RP=max(16, triton.next_power_of_2(r)), BS=block_size, BSP=bsp, TB=tb,
    )
    return out


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
    tb = _tile(n_blocks, 32)
    _bounds_kernel[(hkv, triton.cdiv(n_blocks, tb))](
        q, kmin, kmax, out, n_blocks,
        q.stride(0), q.stride(1), *kmin.stride(), *kmax.stride(), out.stride(0),
        G=g, GP=max(16, triton.next_power_of_2(g)), D=d, DP=max(16, triton.next_power_of_2(d)), TB=tb,
    )
    return out


__all__ = ["lowrank_block_scores", "bounds_block_scores"]
