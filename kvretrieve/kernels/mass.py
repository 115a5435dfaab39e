"""Triton block masses for the low-rank index (its "mass" scores; see reference.lowrank_block_mass).

Per query head h and block b: x = log-sum-exp over b's tokens t of s_t, less their mean, plus the
exact mean-key score, where s_t = (scale * q_h @ proj) . sketch_t; then the head's normaliser (the
log-sum-exp of x over all blocks) and the group's shares, log sum_h exp(x - lse_h). Two launches:
the masses with each program's partial normaliser, then the shares (_group_share_kernel).

The masses take every head at once on tensor cores: token position j of every block of a tile is
one dot ([G, rank] x [rank, blocks]), the blocks' log-sum-exp kept online across j, the mean keys one
more dot, so a tile costs elementwise work and 2 reductions. The form before it took one head at a
time as fp32 multiply-adds over a [blocks, tokens, rank] tile reduced along each axis (~8 block-wide
reductions a head and tile): on an H100 34 us a layer at the 1.5B's 32K against 9.0 now, 73 against 58
at the 8B shape's 128K (bench/results/probe_mass_kernel_h100.md; the max kernel: 5.1 and 29).
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from kvretrieve.kernels.checks import check_launch_device, check_lowrank_mass, check_lowrank_rows
from kvretrieve.kernels.rows import MASS, RowTensors
from kvretrieve.kernels.scoring import _LOWRANK_PROGRAMS, _dot_f32, _group_queries, _split_work
from kvretrieve.kernels.sparse_decode import _row_operands


@triton.jit
def _mass_kernel(
    q_ptr, proj_ptr, sk_ptr, bm_ptr, x_ptr, part_ptr, addr_ptr, n_blocks, iters, scale,
    hkv, off_p, off_s, off_b, stride_qb,
    stride_qh, stride_qd, stride_ph, stride_pd, stride_pr, stride_sh, stride_st, stride_sr,
    stride_bh, stride_bb, stride_bd, stride_xh, stride_xg, stride_ah, stride_ap,
    G: tl.constexpr, GP: tl.constexpr, D: tl.constexpr, DP: tl.constexpr, R: tl.constexpr,
    RP: tl.constexpr, BS: tl.constexpr, TB: tl.constexpr, SK_F32: tl.constexpr, BM_F32: tl.constexpr,
    UPCAST: tl.constexpr, ROWS: tl.constexpr,
):
    kvh = tl.program_id(0)
    pid = tl.program_id(1)
    out_h = kvh  # x and the partial normalisers are [B * Hkv, ...]: one row after another
    if ROWS:  # grid axis 0 is (row, KV head): the row's proj, sketch, block means through addr_ptr [B, 3]
        row, kvh, proj_ptr, sk_ptr, bm_ptr = _row_operands(addr_ptr, kvh, hkv, proj_ptr, off_p, sk_ptr, off_s,
                                                           bm_ptr, off_b)
        q_ptr += row.to(tl.int64) * stride_qb
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
        tl.store(x_ptr + out_h * stride_xh + offs_g[:, None] * stride_xg + blocks[None, :], x,
                 mask=g_mask[:, None] & b_ok[None, :])
        # each head's running log-sum-exp over its blocks
        nm = tl.maximum(run_m, tl.max(x, 1))
        sf = tl.where(nm == float("-inf"), 0.0, nm)
        run_s = run_s * tl.exp(run_m - sf) + tl.sum(tl.exp(x - sf[:, None]), 1)
        run_m = nm
    lse = tl.where(run_s > 0, run_m + tl.log(run_s), float("-inf"))
    tl.store(part_ptr + out_h * stride_ah + pid * stride_ap + offs_g, lse, mask=g_mask)


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


def lowrank_block_mass(q, proj, sketch, block_means, n_blocks, block_size, scale, tile: int = 64,
                       num_warps: int = 4, programs: int = _LOWRANK_PROGRAMS):
    """Triton version of reference.lowrank_block_mass -> [Hkv, n_blocks] float32. Tuning knobs
    (bench/probes/probe_mass_kernel.py): tile (blocks a tile, >= 16: a dot's N), num_warps and programs
    (about, in all). Tiles of 64 with 4 warps were the fastest at blocks of 4 (the layout the defaults score
    by mass); at the 8B shape's 128K with blocks of 16, tiles of 32 were faster (43 against 58 us)."""
    hkv, g, r = check_lowrank_mass(q, proj, sketch, block_means, n_blocks, block_size)
    check_launch_device("lowrank_block_mass", q, proj, sketch, block_means)
    return _launch(q, proj, sketch, block_means, int(n_blocks), int(block_size), scale, hkv, g, r,
                   tile=tile, num_warps=num_warps, programs=programs)


def lowrank_block_mass_rows(q, rows: RowTensors, layer: int, n_blocks: int, block_size: int, scale: float):
    """lowrank_block_mass of B rows in one launch of each kernel: q [B, Hq, d], row b scoring blocks
    0..n_blocks-1 of layer `layer` of its own index (rows: kernels.rows.mass_rows) -> [B, Hkv, n_blocks]
    float32. Every row's normaliser runs over the same n_blocks, so a row's scores equal its own
    launch's only where it would score as many."""
    op = "lowrank_block_mass_rows"
    hkv, g, r = check_lowrank_rows(q, rows, layer, n_blocks, block_size, op)
    proj, sketch, means = (rows[name][0] for name in MASS)
    check_launch_device(op, q, proj, rows.addresses)
    offs = tuple(layer * t.stride(0) for t in (proj, sketch, means))
    # select, not [0]: the lowering test's fake CUDA tensors refuse integer indexing on a CPU-only torch
    return _launch(q, proj.select(0, 0), sketch.select(0, 0), means.select(0, 0), int(n_blocks), int(block_size),
                   scale, hkv, g, r, rows=(rows.addresses, offs)).view(q.shape[0], hkv, -1)


def _launch(q, proj, sketch, block_means, n_blocks, block_size, scale, hkv, g, r, tile: int = 64,
            num_warps: int = 4, programs: int = _LOWRANK_PROGRAMS, rows: tuple | None = None):
    """Both kernels over q [Hq, d] (or [B, Hq, d] with rows = (addresses [B, 3], element offsets of the
    layer): proj, sketch and block_means are then row 0's layer, for strides and types) -> [B * Hkv,
    n_blocks] float32 (B = 1 without rows)."""
    B = q.shape[0] if rows else 1
    heads = B * hkv
    out = torch.empty(heads, n_blocks, dtype=torch.float32, device=q.device)
    if n_blocks == 0:
        return out
    d, g_pad = q.shape[-1], max(16, triton.next_power_of_2(g))
    tb = max(16, min(tile, triton.next_power_of_2(n_blocks)))
    progs, iters = _split_work(triton.cdiv(n_blocks, tb), heads, programs)
    x = torch.empty(heads, g, n_blocks, dtype=torch.float32, device=q.device)
    parts = torch.empty(heads, progs, g, dtype=torch.float32, device=q.device)
    addresses, offs = rows if rows else (out, (0, 0, 0))
    _mass_kernel[(heads, progs)](
        q, proj, sketch, block_means, x, parts, addresses, n_blocks, iters, float(scale), hkv, *offs,
        q.stride(0) if rows else 0, q.stride(-2), q.stride(-1), *proj.stride(), *sketch.stride(),
        *block_means.stride(), x.stride(0), x.stride(1), parts.stride(0), parts.stride(1), G=g, GP=g_pad, D=d,
        DP=max(16, triton.next_power_of_2(d)), R=r, RP=max(16, triton.next_power_of_2(r)), BS=block_size,
        TB=tb, SK_F32=sketch.dtype == torch.float32, BM_F32=block_means.dtype == torch.float32,
        UPCAST=os.environ.get("TRITON_INTERPRET") == "1", ROWS=rows is not None, num_warps=num_warps)
    chunk = min(1024, triton.next_power_of_2(n_blocks))
    _group_share_kernel[(heads, triton.cdiv(n_blocks, chunk))](
        x, parts, out, n_blocks, progs, x.stride(0), x.stride(1), parts.stride(0), parts.stride(1), out.stride(0),
        G=g, GP=g_pad, PP=max(16, triton.next_power_of_2(progs)), CHUNK=chunk)
    return out


__all__ = ["lowrank_block_mass", "lowrank_block_mass_rows"]
