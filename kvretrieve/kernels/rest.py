"""Triton estimates of the rest: attention over the blocks a decode step leaves out, merged by LSE.

block_rest (rest_rank 0): each left-out block as block_size keys equal to its mean key, each with its
mean value; grid (Hkv, P), a program runs an online softmax over tiles of contiguous summary rows for
all G query heads at once. It replaced sparse_decode over the summaries as 1-token blocks (a table of
column ids, its own reduce, a division and an addition after it, and merge_attention): alone hardly
faster (13.5 against 18.3 us at 128K on the 8B shape, both streaming ~33 MB), but a layer's whole rest
step went 32.6 -> 22.2 us (H100, bench/results/probe_rest_kernel_h100.md).

lowrank_rest (rest_rank > 0): reference.lowrank_rest in one pass over the sketches, grid (Hkv, P) as
above. A block's weight is its estimated mass (the log-sum-exp of its tokens' sketch scores less their
mean, plus the exact mean-key score); its value is its exact mean value plus the value sketches'
spread weighted by the tokens' softmax inside the block. Every step is a 2-D tl.dot over [G, tile
blocks] (token j of every block at once): a per-head loop with 3-D products took 151 us a layer at
32K on the 1.5B's geometry, this 57 with ieee fp32 products and 21 with tf32 ones (H100,
bench/results/probe_rest_kernel_h100.md).

Both write per program (max, sum, the d-wide and, for lowrank_rest, the rv-wide accumulators);
kernels.partials merges them (and the attended part, into=) and maps the rv part back through the
value basis.
"""
from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl

from kvretrieve.kernels.partials import check_into, merge_partials, store_partials
from kvretrieve.kernels.checks import check_launch_device
from kvretrieve.kernels.scoring import _group_queries, _split_work
from kvretrieve.kernels.sparse_decode import _mma

# Programs a launch aims at (4 an SM of an H100): at 32K on the 1.5B, 512 programs of 2 tiles and
# 1,024 of one took the same 57 us, and fewer partials make the merge cheaper.
_REST_PROGRAMS = 4 * 132


@triton.jit
def _rest_kernel(
    q_ptr, proj_ptr, sk_ptr, bm_ptr, vk_ptr, vs_ptr, left_ptr, m_ptr, l_ptr, od_ptr, or_ptr,
    n_blocks, iters, scale,
    stride_qh, stride_qd, stride_ph, stride_pd, stride_pr, stride_sh, stride_st, stride_sr,
    stride_bh, stride_bb, stride_bd, stride_kh, stride_kt, stride_kr, stride_vh, stride_vb, stride_vd,
    stride_lh, stride_lb,
    G: tl.constexpr, GP: tl.constexpr, D: tl.constexpr, DP: tl.constexpr, R: tl.constexpr, RP: tl.constexpr,
    RV: tl.constexpr, RVP: tl.constexpr, BS: tl.constexpr, TB: tl.constexpr, PREC: tl.constexpr,
):
    kvh = tl.program_id(0)
    pid = tl.program_id(1)
    progs = tl.num_programs(1)
    head = kvh.to(tl.int64)
    offs_g = tl.arange(0, GP)
    offs_d = tl.arange(0, DP)
    offs_r = tl.arange(0, RP)
    offs_v = tl.arange(0, RVP)
    d_mask, r_mask, v_mask = offs_d < D, offs_r < R, offs_v < RV
    q = _group_queries(q_ptr, kvh, stride_qh, stride_qd, G, GP, D, DP) * scale                   # [GP, DP]
    proj = tl.load(proj_ptr + head * stride_ph + offs_d[:, None] * stride_pd + offs_r[None, :] * stride_pr,
                   mask=d_mask[:, None] & r_mask[None, :], other=0.0).to(tl.float32)
    qr = tl.dot(q, proj, input_precision=PREC)                                                # [GP, RP]
    run_m = tl.full([GP], float("-inf"), tl.float32)
    run_l = tl.zeros([GP], dtype=tl.float32)
    acc_d = tl.zeros([GP, DP], dtype=tl.float32)
    acc_r = tl.zeros([GP, RVP], dtype=tl.float32)
    for i in range(0, iters):
        blocks = (pid * iters + i) * TB + tl.arange(0, TB)
        left = tl.load(left_ptr + kvh * stride_lh + blocks * stride_lb, mask=blocks < n_blocks, other=0) != 0
        b64 = blocks.to(tl.int64)
        # Masked loads fetch nothing: tiles of blocks nobody left out are never read.
        bm = tl.load(bm_ptr + head * stride_bh + b64[:, None] * stride_bb + offs_d[None, :] * stride_bd,
                     mask=left[:, None] & d_mask[None, :], other=0.0).to(tl.float32)            # [TB, DP]
        vs = tl.load(vs_ptr + head * stride_vh + b64[:, None] * stride_vb + offs_d[None, :] * stride_vd,
                     mask=left[:, None] & d_mask[None, :], other=0.0).to(tl.float32) / BS       # mean values
        # Token j of every block of the tile at once: [GP, TB] scores per position, so each step is a
        # 2-D dot and elementwise work (3-D reshapes over the block's tokens cost the mass kernel ~2x).
        m = tl.full([GP, TB], float("-inf"), tl.float32)
        e = tl.zeros([GP, TB], dtype=tl.float32)
        total = tl.zeros([GP, TB], dtype=tl.float32)
        for j in tl.static_range(BS):
            s = tl.dot(qr, tl.trans(_rows(sk_ptr, head, b64 * BS + j, stride_sh, stride_st, stride_sr,
                                          offs_r, left[:, None] & r_mask[None, :])), input_precision=PREC)
            nm = tl.maximum(m, s)
            e = e * tl.exp(m - nm) + tl.exp(s - nm)
            m, total = nm, total + s
        e = tl.where(left[None, :], e, 1.0)
        x = m + tl.log(e) - total / BS + tl.dot(q, tl.trans(bm), input_precision=PREC)
        x = tl.where(left[None, :], x, float("-inf"))                                              # [GP, TB]
        nm = tl.maximum(run_m, tl.max(x, 1))
        sf = tl.where(nm == float("-inf"), 0.0, nm)
        alpha = tl.exp(run_m - sf)
        w = tl.exp(x - sf[:, None])                                                                  # 0 where not left
        run_l = run_l * alpha + tl.sum(w, 1)
        run_m = nm
        acc_d = acc_d * alpha[:, None] + tl.dot(w, vs, input_precision=PREC)
        # The spread: sum over tokens of w * softmax-in-block * (vsketch - the block's mean vsketch).
        # The scores are redone rather than kept: a static loop cannot hold a list of [GP, TB] tiles,
        # and the second read of the sketch rows hits L1/L2 (the kernel is not bandwidth-bound).
        u = w / e
        spread = tl.zeros([GP, RVP], dtype=tl.float32)
        vmean = tl.zeros([TB, RVP], dtype=tl.float32)
        for j in tl.static_range(BS):
            sk = _rows(sk_ptr, head, b64 * BS + j, stride_sh, stride_st, stride_sr, offs_r,
                       left[:, None] & r_mask[None, :])
            vk = _rows(vk_ptr, head, b64 * BS + j, stride_kh, stride_kt, stride_kr, offs_v,
                       left[:, None] & v_mask[None, :])
            p = tl.exp(tl.dot(qr, tl.trans(sk), input_precision=PREC) - m)
            spread += tl.dot(u * p, vk, input_precision=PREC)
            vmean += vk / BS
        acc_r = acc_r * alpha[:, None] + spread - tl.dot(w, vmean, input_precision=PREC)
    rows = store_partials(m_ptr, l_ptr, od_ptr, kvh, pid, progs, run_m, run_l, acc_d, G, GP, D, DP)
    tl.store(or_ptr + rows[:, None] * RV + offs_v[None, :], acc_r, mask=(offs_g < G)[:, None] & v_mask[None, :])


@triton.jit
def _rows(ptr, head, tok, stride_h, stride_t, stride_c, offs_c, mask):
    # Rows tok [TB] of a [H, T, C] sketch as [TB, CP] fp32 (0 where masked).
    return tl.load(ptr + head * stride_h + tok[:, None] * stride_t + offs_c[None, :] * stride_c,
                   mask=mask, other=0.0).to(tl.float32)


@triton.jit
def _block_rest_kernel(
    q_ptr, bm_ptr, vs_ptr, left_ptr, m_ptr, l_ptr, od_ptr, n_blocks, iters, scale, log_bs,
    stride_qh, stride_qd, stride_bh, stride_bb, stride_bd, stride_vh, stride_vb, stride_vd, stride_lh, stride_lb,
    G: tl.constexpr, GP: tl.constexpr, D: tl.constexpr, DP: tl.constexpr, BS: tl.constexpr, TB: tl.constexpr,
    UPCAST: tl.constexpr,
):
    kvh = tl.program_id(0)
    pid = tl.program_id(1)
    progs = tl.num_programs(1)
    head = kvh.to(tl.int64)
    offs_d = tl.arange(0, DP)
    d_mask = offs_d < D
    # q in the summaries' dtype (the model's: exact) so the scores run on tensor cores; UPCAST (the
    # interpreter, or q and summaries of different dtypes) multiplies in fp32 instead.
    q = _group_queries(q_ptr, kvh, stride_qh, stride_qd, G, GP, D, DP)
    if not UPCAST:
        q = q.to(bm_ptr.dtype.element_ty)
    run_m = tl.full([GP], float("-inf"), tl.float32)
    run_l = tl.zeros([GP], dtype=tl.float32)
    acc = tl.zeros([GP, DP], dtype=tl.float32)
    for i in range(0, iters):
        blocks = (pid * iters + i) * TB + tl.arange(0, TB)
        left = tl.load(left_ptr + kvh * stride_lh + blocks * stride_lb, mask=blocks < n_blocks, other=0) != 0
        rows = blocks.to(tl.int64)[:, None]
        tile = left[:, None] & d_mask[None, :]
        bm = tl.load(bm_ptr + head * stride_bh + rows * stride_bb + offs_d[None, :] * stride_bd, mask=tile, other=0.0)
        vs = tl.load(vs_ptr + head * stride_vh + rows * stride_vb + offs_d[None, :] * stride_vd, mask=tile, other=0.0)
        # A block is bs keys equal to its mean key: its score gains log(bs), its value is the mean.
        s = _mma(q, tl.trans(bm), UPCAST) * scale + log_bs
        s = tl.where(left[None, :], s, float("-inf"))                                        # [GP, TB]
        nm = tl.maximum(run_m, tl.max(s, 1))
        sf = tl.where(nm == float("-inf"), 0.0, nm)
        alpha = tl.exp(run_m - sf)
        w = tl.exp(s - sf[:, None])
        run_l = run_l * alpha + tl.sum(w, 1)
        run_m = nm
        # w rounded to the sums' dtype so the dot runs on tensor cores; the accumulator stays fp32.
        acc = acc * alpha[:, None] + _mma(w.to(vs.dtype), vs, UPCAST)
    store_partials(m_ptr, l_ptr, od_ptr, kvh, pid, progs, run_m, run_l, acc / BS, G, GP, D, DP)


def block_rest(q, block_means, vsums, left_out, block_size, scale, into=None, tile_blocks: int = 32,
               num_warps: int = 4, merge_chunk: int = 64, programs: int = _REST_PROGRAMS):
    """Triton version of reference.block_rest -> (out [Hq, d] in q.dtype, lse [Hq] float32), merged with
    into's (out, lse) when given. tile_blocks (summary rows a step), num_warps, merge_chunk (partials a
    merge step) and programs (about how many the launch has in all) are tuning knobs: at 128K on the 8B
    shape (H100) 32 or 256 rows with 4 warps took 13.3-13.5 us, 64 or 128 rows 14-15 us, 8 warps up to
    19 (bench/results/probe_rest_kernel_h100.md)."""
    hkv, n = left_out.shape
    hq, d = q.shape
    check_launch_device("block_rest", q, block_means, vsums, left_out, *(into or ()))
    if hq % hkv or n > block_means.shape[1] or n > vsums.shape[1] or block_means.dtype != vsums.dtype:
        raise ValueError(f"block_rest: {hq} query heads over {hkv} KV heads, {n} blocks against block means "
                         f"{tuple(block_means.shape)} {block_means.dtype}, vsums {tuple(vsums.shape)} {vsums.dtype}")
    check_into("block_rest", into, q)
    if n == 0:
        return into or (q.new_zeros(hq, d), torch.full((hq,), float("-inf"), device=q.device))
    tb = max(16, min(triton.next_power_of_2(tile_blocks), triton.next_power_of_2(n)))
    progs, iters = _split_work(triton.cdiv(n, tb), hkv, programs)
    f32 = dict(dtype=torch.float32, device=q.device)
    m, l_, od = torch.empty(hq, progs, **f32), torch.empty(hq, progs, **f32), torch.empty(hq, progs, d, **f32)
    left = left_out.view(torch.uint8)  # bool is a byte: no copy
    upcast = os.environ.get("TRITON_INTERPRET") == "1" or q.dtype != block_means.dtype
    _block_rest_kernel[(hkv, progs)](
        q, block_means, vsums, left, m, l_, od, n, iters, float(scale), math.log(block_size),
        q.stride(0), q.stride(1), *block_means.stride(), *vsums.stride(), left.stride(0), left.stride(1),
        G=hq // hkv, GP=max(16, triton.next_power_of_2(hq // hkv)), D=d, DP=max(16, triton.next_power_of_2(d)),
        BS=int(block_size), TB=tb, UPCAST=upcast, num_warps=num_warps)
    return merge_partials(m, l_, od, None, None, q.dtype, merge_chunk, into)


def lowrank_rest(q, proj, sketch, block_means, vproj, vsketch, vsums, left_out, block_size, scale, into=None,
                 tile_elems: int = 2048, num_warps: int = 4, merge_chunk: int = 64, precision: str | None = None,
                 programs: int = _REST_PROGRAMS):
    """Triton version of reference.lowrank_rest -> (out [Hq, d] in q.dtype, lse [Hq] float32), merged with
    into's (out, lse) when given. tile_elems (key-sketch values a tile), num_warps, merge_chunk (partials
    a merge step), precision (tl.dot's input_precision for the fp32 tiles: ieee, tf32x3, tf32) and
    programs (about how many the launch has in all) are tuning knobs. precision None: tf32 for 16-bit
    q, whose output rounds away more than tf32's 10-bit products lose (1.5B at 32K on an H100: 64 -> 32
    us, max error 5e-4; tf32x3 59 us), else ieee."""
    hkv, n = left_out.shape
    hq, d = q.shape
    bs = int(block_size)
    check_launch_device("lowrank_rest", q, proj, sketch, block_means, vproj, vsketch, vsums, left_out, *(into or ()))
    if hq % hkv or n * bs > sketch.shape[1] or n > block_means.shape[1] or n > vsums.shape[1]:
        raise ValueError(f"lowrank_rest: {hq} query heads over {hkv} KV heads, {n} blocks of {bs} against "
                         f"sketch {tuple(sketch.shape)}, block means {tuple(block_means.shape)}, "
                         f"vsums {tuple(vsums.shape)}")
    check_into("lowrank_rest", into, q)
    if n == 0:
        return into or (q.new_zeros(hq, d), torch.full((hq,), float("-inf"), device=q.device))
    if precision is None:
        precision = "tf32" if q.element_size() == 2 else "ieee"
    parts = _partials(q, proj, sketch, block_means, vsketch, vsums, left_out, bs, scale, tile_elems, num_warps,
                      precision, programs)
    return merge_partials(*parts, vproj, q.dtype, merge_chunk, into)


def _partials(q, proj, sketch, block_means, vsketch, vsums, left_out, bs, scale, tile_elems, num_warps,
              precision="ieee", programs=_REST_PROGRAMS):
    """The kernel's launch -> per program (max, sum, d-wide and rv-wide accumulators) [Hq, P, ...]."""
    hkv, n = left_out.shape
    hq, d = q.shape
    g, r, rv = hq // hkv, proj.shape[-1], vsketch.shape[-1]
    # tl.dot wants every side >= 16: the group's rows, the rank and the tile's blocks are padded to it.
    rp = max(16, triton.next_power_of_2(r))
    tb = max(16, min(tile_elems // rp // bs, triton.next_power_of_2(n)))
    progs, iters = _split_work(triton.cdiv(n, tb), hkv, programs)
    f32 = dict(dtype=torch.float32, device=q.device)
    m, l_ = torch.empty(hq, progs, **f32), torch.empty(hq, progs, **f32)
    od, orv = torch.empty(hq, progs, d, **f32), torch.empty(hq, progs, rv, **f32)
    left = left_out.view(torch.uint8)  # bool is a byte: no copy
    _rest_kernel[(hkv, progs)](
        q, proj, sketch, block_means, vsketch, vsums, left, m, l_, od, orv, n, iters, float(scale),
        q.stride(0), q.stride(1), *proj.stride(), *sketch.stride(), *block_means.stride(), *vsketch.stride(),
        *vsums.stride(), left.stride(0), left.stride(1),
        G=g, GP=max(16, triton.next_power_of_2(g)), D=d, DP=max(16, triton.next_power_of_2(d)), R=r, RP=rp,
        RV=rv, RVP=max(16, triton.next_power_of_2(rv)), BS=bs, TB=tb, PREC=precision, num_warps=num_warps)
    return m, l_, od, orv
