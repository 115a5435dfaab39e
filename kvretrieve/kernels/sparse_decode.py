"""Triton split-K (flash-decoding) sparse attention for one decode step over a paged KV pool.

Grid (Hkv, num_splits): a program owns one KV head and a contiguous run of slot-table columns,
and computes all G query heads of that KV head at once, so each K/V block is read from memory once
per KV head rather than once per query head. Partial results (normalised out, lse) go to an fp32
workspace; a second kernel merges the splits.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from kvretrieve.kernels.reference import check_launch_device, check_sparse_decode

_LOG2E = 1.4426950408889634
_MAX_SPLITS = 64
_COLS_PER_SPLIT = 8


@triton.jit
def _mma(a, b, UPCAST: tl.constexpr):
    if UPCAST:
        # The Triton interpreter multiplies bf16 operands as their raw uint16 bits; upcasting is
        # exact and the accumulator is fp32 either way, so results match the GPU path.
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    else:
        # "ieee" only affects fp32 operands (no silent TF32); 16-bit operands use tensor cores.
        return tl.dot(a, b, input_precision="ieee")


@triton.jit
def _split_kernel(
    q_ptr, k_ptr, v_ptr, slots_ptr, tail_ptr, o_part_ptr, lse_part_ptr,
    n_cols, cols_per_split, num_splits, qk_scale,
    stride_qh, stride_qd,
    stride_kh, stride_ks, stride_kt, stride_kd,
    stride_vh, stride_vs, stride_vt, stride_vd,
    stride_sh, stride_sc,
    G: tl.constexpr, GP: tl.constexpr, BS: tl.constexpr, BN: tl.constexpr, D: tl.constexpr,
    UPCAST: tl.constexpr,
):
    kvh = tl.program_id(0)
    split = tl.program_id(1)
    offs_g = tl.arange(0, GP)
    offs_t = tl.arange(0, BN)
    offs_d = tl.arange(0, D)
    g_mask = offs_g < G
    heads = kvh * G + offs_g
    # Rows beyond G are zero padding so tl.dot gets its minimum M of 16; they are never stored.
    q = tl.load(q_ptr + heads[:, None] * stride_qh + offs_d[None, :] * stride_qd, mask=g_mask[:, None], other=0.0)

    tail = tl.load(tail_ptr).to(tl.int32)
    tail = tl.minimum(tl.maximum(tail, 0), BS)
    # int64 head/slot offsets: a pool of a few thousand 64x128 blocks per head overflows int32.
    k_head = k_ptr + kvh.to(tl.int64) * stride_kh
    v_head = v_ptr + kvh.to(tl.int64) * stride_vh
    k_tok = offs_t[:, None] * stride_kt + offs_d[None, :] * stride_kd
    v_tok = offs_t[:, None] * stride_vt + offs_d[None, :] * stride_vd

    # Scores live in the log2 domain (exp2 is the native instruction); lse is converted back at the end.
    m_i = tl.full([GP], float("-inf"), tl.float32)
    l_i = tl.zeros([GP], tl.float32)
    acc = tl.zeros([GP, D], tl.float32)
    # A fixed trip count with out-of-range columns masked (rather than tensor-valued range
    # bounds) keeps the loop portable across Triton versions and the interpreter.
    for i in range(0, cols_per_split):
        c = split * cols_per_split + i
        in_range = c < n_cols
        slot = tl.load(slots_ptr + kvh * stride_sh + c * stride_sc, mask=in_range, other=-1)
        n_valid = tl.where(c == n_cols - 1, tail, BS)
        n_valid = tl.where(slot >= 0, n_valid, 0)
        slot64 = tl.maximum(slot, 0).to(tl.int64)
        # Masked-off tokens (padding up to BN, the tail, -1 entries) are never read from memory.
        t_mask = offs_t < n_valid
        k = tl.load(k_head + slot64 * stride_ks + k_tok, mask=t_mask[:, None], other=0.0)
        s = _mma(q, tl.trans(k), UPCAST) * qk_scale
        s = tl.where(t_mask[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        # While a row has seen no valid key m_new is -inf; a finite stand-in avoids (-inf) - (-inf).
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_safe)
        p = tl.exp2(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_head + slot64 * stride_vs + v_tok, mask=t_mask[:, None], other=0.0)
        # p is rounded to the V dtype so the dot runs on tensor cores; the sum stays in fp32.
        acc = acc * alpha[:, None] + _mma(p.to(v.dtype), v, UPCAST)
        m_i = m_new

    has = l_i > 0.0
    o = acc / tl.where(has, l_i, 1.0)[:, None]
    lse = tl.where(has, (m_i + tl.log2(tl.where(has, l_i, 1.0))) * 0.6931471805599453, float("-inf"))
    row = heads * num_splits + split
    tl.store(o_part_ptr + row[:, None] * D + offs_d[None, :], o, mask=g_mask[:, None])
    tl.store(lse_part_ptr + row, lse, mask=g_mask)


@triton.jit
def _reduce_kernel(
    o_part_ptr, lse_part_ptr, out_ptr, lse_ptr, num_splits, stride_oh, stride_od,
    SP: tl.constexpr, D: tl.constexpr,
):
    h = tl.program_id(0)
    offs_s = tl.arange(0, SP)
    offs_d = tl.arange(0, D)
    s_mask = offs_s < num_splits
    row = h * num_splits + offs_s
    lse_s = tl.load(lse_part_ptr + row, mask=s_mask, other=float("-inf"))
    m = tl.max(lse_s, 0)
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    w = tl.exp(lse_s - m_safe)  # empty splits (lse -inf) get weight exactly 0
    tot = tl.sum(w, 0)
    o = tl.load(o_part_ptr + row[:, None] * D + offs_d[None, :], mask=s_mask[:, None], other=0.0)
    denom = tl.where(tot > 0.0, tot, 1.0)
    out = tl.sum(w[:, None] * o, 0) / denom
    tl.store(out_ptr + h * stride_oh + offs_d * stride_od, out.to(out_ptr.dtype.element_ty))
    tl.store(lse_ptr + h, tl.where(tot > 0.0, m_safe + tl.log(denom), float("-inf")))


def _pow2(x: int) -> bool:
    return x > 0 and x & (x - 1) == 0


def _launch_config(bs: int, d: int) -> dict:
    return {"num_warps": 4, "num_stages": 2}


def choose_num_splits(n: int) -> int:
    """Splits for n table columns: ~8 columns each (enough work per program to hide the per-column
    slot-load latency, enough programs to fill the GPU at small Hkv), at most 64."""
    return max(1, min(_MAX_SPLITS, triton.cdiv(n, _COLS_PER_SPLIT)))


def sparse_decode(q, k_pool, v_pool, slots, tail_len, scale, *, num_splits: int | None = None):
    """Triton sparse decode attention. q [Hq, d], k_pool/v_pool [Hkv, S, bs, d], slots [Hkv, n]
    int32 (-1 = skip), tail_len [1] int32 -> (out [Hq, d] in q.dtype, lse [Hq] float32).
    num_splits overrides the launcher's choice (tests only)."""
    hkv, g, n, bs, d = check_sparse_decode(q, k_pool, v_pool, slots, tail_len)
    check_launch_device("sparse_decode", q, k_pool, v_pool, slots, tail_len)
    if not _pow2(d) or not 16 <= d <= 256:
        raise ValueError(f"sparse_decode: head dim must be a power of two in [16, 256], got {d}")
    if not _pow2(bs) or bs > 256:
        raise ValueError(f"sparse_decode: block size must be a power of two <= 256, got {bs}")
    hq = q.shape[0]
    out = torch.empty_like(q, memory_format=torch.contiguous_format)
    lse = torch.empty(hq, dtype=torch.float32, device=q.device)
    if n == 0:
        return out.zero_(), lse.fill_(float("-inf"))
    splits = choose_num_splits(n) if num_splits is None else max(1, min(int(num_splits), n))
    cols = triton.cdiv(n, splits)
    splits = triton.cdiv(n, cols)  # drop splits that would own no column
    o_part = torch.empty(hq, splits, d, dtype=torch.float32, device=q.device)
    lse_part = torch.empty(hq, splits, dtype=torch.float32, device=q.device)
    _split_kernel[(hkv, splits)](
        q, k_pool, v_pool, slots, tail_len, o_part, lse_part,
        n, cols, splits, float(scale) * _LOG2E,
        q.stride(0), q.stride(1),
        *k_pool.stride(), *v_pool.stride(), slots.stride(0), slots.stride(1),
        G=g, GP=max(16, triton.next_power_of_2(g)), BS=bs, BN=max(16, bs), D=d,
        UPCAST=os.environ.get("TRITON_INTERPRET") == "1", **_launch_config(bs, d),
    )
    _reduce_kernel[(hq,)](
        o_part, lse_part, out, lse, splits, out.stride(0), out.stride(1),
        SP=triton.next_power_of_2(splits), D=d,
    )
    return out, lse


__all__ = ["sparse_decode", "choose_num_splits"]
