"""Triton block masses for the low-rank index (its "mass" scores; see reference.lowrank_block_mass).

Per query head h and block b: x = log-sum-exp over b's tokens t of s_t, less their mean, plus the
exact mean-key score, where s_t = (scale * q_h @ proj) . sketch_t; then the head's normaliser (the
log-sum-exp of x over all blocks) and the group's shares, log sum_h exp(x - lse_h). Two launches:
the masses with each program's partial normaliser, then the shares (_group_share_kernel).

Two forms of the first launch, pending their measurement on a GPU (bench/probes/probe_mass_kernel.py):
- "fma": one head at a time as fp32 multiply-adds over a [blocks, tokens, rank] tile, reduced along
  each axis. Every head costs ~8 block-wide reductions a tile; on the H200 at 128K (8B shape, blocks
  of 16) it took 70 us a layer against 23 for the max kernel, and 59 us at the 1.5B's 32K (H100).
- "dot": every head at once on tensor cores, token position j of every block of the tile as one dot
  ([G, rank] x [rank, blocks]), the blocks' log-sum-exp kept online across j, the mean keys as one
  more dot: elementwise work and 2 reductions a tile instead of ~8 a head.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from kvretrieve.kernels.checks import check_launch_device, check_lowrank_mass
from kvretrieve.kernels.scoring import _dot_f32, _group_queries, _split_work

# About this many programs in all (4 per H100 SM, as the max kernel runs fastest with).
_PROGRAMS = 4 * 132


@triton.jit
def _mass_dot_kernel(
    q_ptr, proj_ptr, sk_ptr, bm_ptr, x_ptr, part_ptr, n_blocks, iters, scale,
    stride_qh, stride_qd, stride_ph, stride_pd, stride_pr, stride_sh, stride_st, stride_sr,
    stride_bh, stride_bb, stride_bd, stride_xh, stride_xg, stride_ah, stride_ap,
    G: tl.constexpr, GP: tl.constexpr, D: tl.constexpr, DP: tl.constexpr, R: tl.constexpr,
    RP: tl.constexpr, BS: tl.constexpr, TB: tl.constexpr, SK_F32: tl.constexpr, BM_F32: tl.constexpr,
    UPCAST: tl.constexpr,
):
    kvh = tl.program_id(0)
    pid = tl.program_id(1)
    offs_g = tl.arange(0, GP)
    offs_d = tl.arange(0, DP)
    offs_r = tl.arange(0, RP)
    g_mask = offs_g < G
    q = _group_queries(q_ptr, kvh, stride_qh, stride_qd, G, GP, D, DP) * scale                  # [GP, DP]
    proj = tl.load(proj_ptr + kvh.to(tl.int64) * stride_ph + offs_d[:, None] * stride_pd + offs_r[None, :] * stride_pr,
                   mask=(offs_d < D)[:, None] & (offs_r < R)[None, :], other=0.0).to(tl.float32)
    qr = tl.dot(q, proj, input_precision="ieee")                                              # once, exact fp32
    s_head = sk_ptr + kvh.to(tl.int64) * stride_sh
    b_head = bm_ptr + kvh.to(tl.int64) * stride_bh
    run_m = tl.full([GP], float("-inf"), tl.float32)
    run_s = tl.zeros([GP], dtype=tl.float32)
    for i in range(0, iters):
        blocks = (pid * iters + i) * TB + tl.arange(0, TB)
        b_ok = blocks < n_blocks
        b64 = blocks.to(tl.int64)
        bm = tl.load(b_head + b64[:, None] * stride_bb + offs_d[None, :] * stride_bd,
                     mask=b_ok[:, None] & (offs_d < D)[None, :], other=0.0)                   # [TB, DP]
        x = _dot_f32(q, tl.trans(bm), BM_F32, UPCAST)                                         # [GP, TB]
        # Token j of every block at once; m, e: the running max and sum of exp(s - m) per block.
        m = tl.full([GP, TB], float("-inf"), tl.float32)
        e = tl.zeros([GP, TB], dtype=tl.float32)
        total = tl.zeros([GP, TB], dtype=tl.float32)
        for j in tl.static_range(BS):
            sk = tl.load(s_head + (b64 * BS + j)[:, None] * stride_st + offs_r[None, :] * stride_sr,
                         mask=b_ok[:, None] & (offs_r < R)[None, :], other=0.0)               # [TB, RP]
            s = _dot_f32(qr, tl.trans(sk), SK_F32, UPCAST)
            m_new = tl.maximum(m, s)
            e = e * tl.exp(m - m_new) + tl.exp(s - m_new)
            m = m_new
            total += s
        x = tl.where(g_mask[:, None] & b_ok[None, :], x + m + tl.log(e) - total / BS, float("-inf"))
        tl.store(x_ptr + kvh * stride_xh + offs_g[:, None] * stride_xg + blocks[None, :], x,
                 mask=g_mask[:, None] & b_ok[None, :])
        # each head's running log-sum-exp over its blocks
        nm = tl.maximum(run_m, tl.max(x, 1))
        sf = tl.where(nm == float("-inf"), 0.0, nm)
        run_s = run_s * tl.exp(run_m - sf) + tl.sum(tl.exp(x - sf[:, None]), 1)
        run_m = nm
    lse = tl.where(run_s > 0, run_m + tl.log(run_s), float("-inf"))
    tl.store(part_ptr + kvh * stride_ah + pid * stride_ap + offs_g, lse, mask=g_mask)


@triton.jit
def _mass_fma_kernel(
    q_ptr, proj_ptr, sk_ptr, bm_ptr, x_ptr, part_ptr, n_blocks, iters, scale,
    stride_qh, stride_qd, stride_ph, stride_pd, stride_pr, stride_sh, stride_st, stride_sr,
    stride_bh, stride_bb, stride_bd, stride_xh, stride_xg, stride_ah, stride_ap,
    G: tl.constexpr, GP: tl.constexpr, D: tl.constexpr, DP: tl.constexpr, R: tl.constexpr,
    RP: tl.constexpr, BS: tl.constexpr, BSP: tl.constexpr, TB: tl.constexpr,
):
    kvh = tl.program_id(0)
    pid = tl.program_id(1)
    offs_g = tl.arange(0, GP)
    offs_d = tl.arange(0, DP)
    offs_r = tl.arange(0, RP)
    d_mask = offs_d < D
    r_mask = offs_r < R
    q = _group_queries(q_ptr, kvh, stride_qh, stride_qd, G, GP, D, DP) * scale
    proj = tl.load(proj_ptr + kvh.to(tl.int64) * stride_ph + offs_d[:, None] * stride_pd + offs_r[None, :] * stride_pr,
                   mask=d_mask[:, None] & r_mask[None, :], other=0.0).to(tl.float32)
    qr = tl.sum(q[:, :, None] * proj[None, :, :], 1)                                          # [GP, RP], exact fp32
    j = tl.arange(0, BSP)
    s_head = sk_ptr + kvh.to(tl.int64) * stride_sh
    b_head = bm_ptr + kvh.to(tl.int64) * stride_bh
    run_m = tl.full([GP], float("-inf"), tl.float32)
    run_s = tl.zeros([GP], dtype=tl.float32)
    for i in range(0, iters):
        blocks = (pid * iters + i) * TB + tl.arange(0, TB)
        b_ok = blocks < n_blocks
        ok2 = b_ok[:, None] & (j[None, :] < BS)
        tok = blocks.to(tl.int64)[:, None] * BS + j[None, :]                                   # [TB, BSP]
        sk = tl.load(s_head + tok[:, :, None] * stride_st + offs_r[None, None, :] * stride_sr,
                     mask=ok2[:, :, None] & r_mask[None, None, :], other=0.0).to(tl.float32)   # [TB, BSP, RP]
        bm = tl.load(b_head + blocks.to(tl.int64)[:, None] * stride_bb + offs_d[None, :] * stride_bd,
                     mask=b_ok[:, None] & d_mask[None, :], other=0.0).to(tl.float32)           # [TB, DP]
        for g in tl.static_range(G):
            row = offs_g == g
            s = tl.sum(sk * tl.sum(tl.where(row[:, None], qr, 0.0), 0)[None, None, :], 2)     # [TB, BSP]
            m = tl.where(b_ok, tl.max(tl.where(ok2, s, float("-inf")), 1), 0.0)
            e = tl.sum(tl.where(ok2, tl.exp(s - m[:, None]), 0.0), 1)
            avg = tl.sum(tl.where(ok2, s, 0.0), 1) / BS
            x = m + tl.log(e) - avg + tl.sum(bm * tl.sum(tl.where(row[:, None], q, 0.0), 0)[None, :], 1)
            x = tl.where(b_ok, x, float("-inf"))
            tl.store(x_ptr + kvh * stride_xh + g * stride_xg + blocks, x, mask=b_ok)
            # head g's running log-sum-exp (scalars picked out of the [GP] state)
            rm = tl.max(tl.where(row, run_m, float("-inf")), 0)
            rs = tl.sum(tl.where(row, run_s, 0.0), 0)
            nm = tl.maximum(rm, tl.max(x, 0))
            sf = tl.where(nm == float("-inf"), 0.0, nm)
            run_s = tl.where(row, rs * tl.exp(rm - sf) + tl.sum(tl.exp(x - sf), 0), run_s)
            run_m = tl.where(row, nm, run_m)
    lse = tl.where(run_s > 0, run_m + tl.log(run_s), float("-inf"))
    tl.store(part_ptr + kvh * stride_ah + pid * stride_ap + offs_g, lse, mask=offs_g < G)


@triton.jit
def _group_share_kernel(x_ptr, part_ptr, out_ptr, n_blocks, n_parts, stride_xh, stride_xg, stride_ah, stride_ap,
                        stride_oh, G: tl.constexpr, GP: tl.constexpr, PP: tl.constexpr, CHUNK: tl.constexpr):
    # out[b] = log sum_g exp(x[g, b] - lse_g), lse_g = the head's log-sum-exp over every block.
    kvh = tl.program_id(0)
    pid = tl.program_id(1)
    offs_g = tl.arange(0, GP)
    offs_p = tl.arange(0, PP)
    g_mask = offs_g < G
    parts = tl.load(part_ptr + kvh * stride_ah + offs_p[:, None] * stride_ap + offs_g[None, :],
                    mask=(offs_p[:, None] < n_parts) & g_mask[None, :], other=float("-inf"))
    pm = tl.max(parts, 0)
    pm = tl.where(pm == float("-inf"), 0.0, pm)
    lse = pm + tl.log(tl.sum(tl.exp(parts - pm[None, :]), 0))                          # [GP]
    blocks = pid * CHUNK + tl.arange(0, CHUNK)
    b_ok = blocks < n_blocks
    keep = g_mask[:, None] & b_ok[None, :]
    x = tl.load(x_ptr + kvh * stride_xh + offs_g[:, None] * stride_xg + blocks[None, :], mask=keep,
                other=float("-inf"))
    y = tl.where(keep, x - tl.where(g_mask, lse, 0.0)[:, None], float("-inf"))
    ym = tl.max(y, 0)
    ym = tl.where(ym == float("-inf"), 0.0, ym)
    out = ym + tl.log(tl.sum(tl.exp(y - ym[None, :]), 0))
    tl.store(out_ptr + kvh * stride_oh + blocks, out, mask=b_ok)


def lowrank_block_mass(q, proj, sketch, block_means, n_blocks, block_size, scale, form: str = "dot",
                       tile: int | None = None, num_warps: int | None = None, programs: int = _PROGRAMS):
    """Triton version of reference.lowrank_block_mass -> [Hkv, n_blocks] float32. Tuning knobs
    (bench/probes/probe_mass_kernel.py): form ("fma" or "dot", above), tile (fma: sketch values a tile,
    default 8,192; dot: blocks a tile, default 64), num_warps (fma 2; dot 8, the fewest with which its
    tiles of 64 blocks fit the registers: compiled offline for sm90 with Triton 3.6's ptxas, 4 warps
    spill), programs (about, in all)."""
    hkv, g, r = check_lowrank_mass(q, proj, sketch, block_means, n_blocks, block_size)
    check_launch_device("lowrank_block_mass", q, proj, sketch, block_means)
    n_blocks, block_size = int(n_blocks), int(block_size)
    out = torch.empty(hkv, n_blocks, dtype=torch.float32, device=q.device)
    if n_blocks == 0:
        return out
    d, rp = q.shape[1], triton.next_power_of_2(r)
    dp = max(16, triton.next_power_of_2(d))
    if form == "dot":
        tb = max(16, min(tile or 64, triton.next_power_of_2(n_blocks)))        # >= 16: a dot's N
        gp, rp = max(16, triton.next_power_of_2(g)), max(16, rp)
    elif form == "fma":
        # The tile lives in registers in fp32 (8K values: 16 blocks of 16 at rank 32).
        tb = max(1, min((tile or 8192) // rp // triton.next_power_of_2(block_size), triton.next_power_of_2(n_blocks)))
        gp = max(2, triton.next_power_of_2(g))
    else:
        raise ValueError(f"lowrank_block_mass: form must be 'dot' or 'fma', got {form!r}")
    progs, iters = _split_work(triton.cdiv(n_blocks, tb), hkv, programs)
    x = torch.empty(hkv, g, n_blocks, dtype=torch.float32, device=q.device)
    parts = torch.empty(hkv, progs, g, dtype=torch.float32, device=q.device)
    args = (q, proj, sketch, block_means, x, parts, n_blocks, iters, float(scale), q.stride(0), q.stride(1),
            *proj.stride(), *sketch.stride(), *block_means.stride(), x.stride(0), x.stride(1), parts.stride(0),
            parts.stride(1))
    if form == "dot":
        _mass_dot_kernel[(hkv, progs)](
            *args, G=g, GP=gp, D=d, DP=dp, R=r, RP=rp, BS=block_size, TB=tb, SK_F32=sketch.dtype == torch.float32,
            BM_F32=block_means.dtype == torch.float32, UPCAST=os.environ.get("TRITON_INTERPRET") == "1",
            num_warps=num_warps or 4)
    else:
        _mass_fma_kernel[(hkv, progs)](*args, G=g, GP=gp, D=d, DP=dp, R=r, RP=rp, BS=block_size,
                                       BSP=triton.next_power_of_2(block_size), TB=tb, num_warps=num_warps or 2)
    chunk = min(1024, triton.next_power_of_2(n_blocks))
    _group_share_kernel[(hkv, triton.cdiv(n_blocks, chunk))](
        x, parts, out, n_blocks, progs, x.stride(0), x.stride(1), parts.stride(0), parts.stride(1), out.stride(0),
        G=g, GP=gp, PP=max(16, triton.next_power_of_2(progs)), CHUNK=chunk)
    return out


__all__ = ["lowrank_block_mass"]
