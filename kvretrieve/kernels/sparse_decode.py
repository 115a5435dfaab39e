"""Triton split-K (flash-decoding) sparse attention for one decode step over a paged KV pool.

Grid (Hkv, num_splits): a program owns one KV head and a contiguous run of slot-table columns,
and computes all G query heads of that KV head at once, so each K/V block is read from memory once
per KV head rather than once per query head. Partial results (normalised out, lse) go to an fp32
workspace; a second kernel merges the splits. sparse_decode_rows does the same for the rows of a
batched step in one launch, grid (B * Hkv, num_splits), each row read through its own tensors'
addresses (kernels/rows.py).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from kvretrieve.kernels.checks import check_decode_rows, check_launch_device, check_sparse_decode
from kvretrieve.kernels.rows import RowTensors

_LOG2E = 1.4426950408889634
_MAX_SPLITS = 64


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
def _row_pointer(row_addr_ptr, i: tl.constexpr, like_ptr, offset):
    """Tensor i of a row, from the row's entry of a RowTensors address table (kernels/rows.py), typed
    like like_ptr (row 0's tensor), plus an element offset (a layer's, into an [L, ...] tensor)."""
    return tl.load(row_addr_ptr + i).to(like_ptr.dtype, bitcast=True) + offset


@triton.jit
def _row_operands(addr_ptr, program, hkv, p0, off0, p1, off1, p2, off2):
    """Program `program` (grid axis 0: row, KV head) of a launch over rows whose table entry holds three
    tensors: (its row, its KV head, the row's three tensors typed like p0..p2, each at its offset)."""
    row = program // hkv
    a = addr_ptr + row * 3
    return (row, program % hkv, _row_pointer(a, 0, p0, off0), _row_pointer(a, 1, p1, off1),
            _row_pointer(a, 2, p2, off2))


@triton.jit
def _attend_split(
    q, k_head, v_head, slot_row, tail, n_cols, col0, iters, qk_scale,
    stride_ks, stride_kt, stride_kd, stride_vs, stride_vt, stride_vd, stride_sc,
    GP: tl.constexpr, BS: tl.constexpr, BN: tl.constexpr, D: tl.constexpr, UPCAST: tl.constexpr,
):
    """One program's share: q [GP, D] over table columns col0.. (iters steps of BN // BS columns) of
    one KV head -> (o [GP, D] normalised, lse [GP] natural log; -inf where nothing was valid)."""
    offs_t = tl.arange(0, BN)
    offs_d = tl.arange(0, D)
    tail = tl.minimum(tl.maximum(tail, 0), BS)
    # One step covers BN // BS table columns: each token row gathers from its own column's slot,
    # so small blocks still give each step ~16 KB of K/V in flight.
    t_col = offs_t // BS
    t_in = offs_t % BS
    k_tok = t_in[:, None] * stride_kt + offs_d[None, :] * stride_kd
    v_tok = t_in[:, None] * stride_vt + offs_d[None, :] * stride_vd

    # Scores live in the log2 domain (exp2 is the native instruction); lse is converted back at the end.
    m_i = tl.full([GP], float("-inf"), tl.float32)
    l_i = tl.zeros([GP], tl.float32)
    acc = tl.zeros([GP, D], tl.float32)
    # Slots are fetched one step ahead so the chain slot -> K/V address -> data costs one memory
    # latency per step. A fixed trip count with columns past n masked (not tensor-valued range
    # bounds) keeps the loop portable across Triton versions and the interpreter.
    cols = col0 + t_col
    slot = tl.load(slot_row + cols * stride_sc, mask=cols < n_cols, other=-1)
    for i in range(0, iters):
        n_valid = tl.where(cols == n_cols - 1, tail, BS)
        # Masked-off tokens (tail, -1 entries, columns past n) are never read from memory.
        t_mask = (slot >= 0) & (t_in < n_valid)
        base = tl.maximum(slot, 0).to(tl.int64)[:, None]
        k = tl.load(k_head + base * stride_ks + k_tok, mask=t_mask[:, None], other=0.0)
        v = tl.load(v_head + base * stride_vs + v_tok, mask=t_mask[:, None], other=0.0)
        cols += BN // BS
        slot = tl.load(slot_row + cols * stride_sc, mask=cols < n_cols, other=-1)  # last one unused
        s = _mma(q, tl.trans(k), UPCAST) * qk_scale
        s = tl.where(t_mask[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        # While a row has seen no valid key m_new is -inf; a finite stand-in avoids (-inf) - (-inf).
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_safe)
        p = tl.exp2(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        # p is rounded to the V dtype so the dot runs on tensor cores; the sum stays in fp32.
        acc = acc * alpha[:, None] + _mma(p.to(v.dtype), v, UPCAST)
        m_i = m_new

    has = l_i > 0.0
    o = acc / tl.where(has, l_i, 1.0)[:, None]
    lse = tl.where(has, (m_i + tl.log2(tl.where(has, l_i, 1.0))) * 0.6931471805599453, float("-inf"))
    return o, lse


@triton.jit
def _split_kernel(
    q_ptr, k_ptr, v_ptr, slots_ptr, tail_ptr, o_part_ptr, lse_part_ptr,
    n_cols, iters, num_splits, qk_scale,
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
    offs_d = tl.arange(0, D)
    g_mask = offs_g < G
    heads = kvh * G + offs_g
    # Rows beyond G are zero padding so tl.dot gets its minimum M of 16; they are never stored.
    q = tl.load(q_ptr + heads[:, None] * stride_qh + offs_d[None, :] * stride_qd, mask=g_mask[:, None], other=0.0)
    # int64 head/slot offsets: a pool of a few thousand 64x128 blocks per head overflows int32.
    o, lse = _attend_split(
        q, k_ptr + kvh.to(tl.int64) * stride_kh, v_ptr + kvh.to(tl.int64) * stride_vh, slots_ptr + kvh * stride_sh,
        tl.load(tail_ptr).to(tl.int32), n_cols, split * iters * (BN // BS), iters, qk_scale,
        stride_ks, stride_kt, stride_kd, stride_vs, stride_vt, stride_vd, stride_sc, GP, BS, BN, D, UPCAST)
    row = heads * num_splits + split
    tl.store(o_part_ptr + row[:, None] * D + offs_d[None, :], o, mask=g_mask[:, None])
    tl.store(lse_part_ptr + row, lse, mask=g_mask)


@triton.jit
def _split_rows_kernel(
    q_ptr, addr_ptr, k0_ptr, v0_ptr, s0_ptr, t0_ptr, o_part_ptr, lse_part_ptr,
    off_k, off_v, off_s, hkv, n_cols, iters, num_splits, qk_scale,
    stride_qb, stride_qh, stride_qd,
    stride_kh, stride_ks, stride_kt, stride_kd,
    stride_vh, stride_vs, stride_vt, stride_vd,
    stride_sh, stride_sc,
    G: tl.constexpr, GP: tl.constexpr, BS: tl.constexpr, BN: tl.constexpr, D: tl.constexpr,
    UPCAST: tl.constexpr,
):
    """_split_kernel for B rows at once, grid (B * Hkv, num_splits): a program's row finds its pool,
    table and tail through addr_ptr [B, 4] (row 0's tensors, k0_ptr.., only give the element types);
    off_* are the layer's offsets (elements) into each row's [L, ...] tensors."""
    pid = tl.program_id(0)
    split = tl.program_id(1)
    row = pid // hkv
    kvh = pid % hkv
    addr = addr_ptr + row * 4
    k_ptr, v_ptr = _row_pointer(addr, 0, k0_ptr, off_k), _row_pointer(addr, 1, v0_ptr, off_v)
    slots_ptr, tail_ptr = _row_pointer(addr, 2, s0_ptr, off_s), _row_pointer(addr, 3, t0_ptr, 0)
    offs_g = tl.arange(0, GP)
    offs_d = tl.arange(0, D)
    g_mask = offs_g < G
    heads = kvh * G + offs_g
    q = tl.load(q_ptr + row.to(tl.int64) * stride_qb + heads[:, None] * stride_qh + offs_d[None, :] * stride_qd,
                mask=g_mask[:, None], other=0.0)
    o, lse = _attend_split(
        q, k_ptr + kvh.to(tl.int64) * stride_kh, v_ptr + kvh.to(tl.int64) * stride_vh, slots_ptr + kvh * stride_sh,
        tl.load(tail_ptr).to(tl.int32), n_cols, split * iters * (BN // BS), iters, qk_scale,
        stride_ks, stride_kt, stride_kd, stride_vs, stride_vt, stride_vd, stride_sc, GP, BS, BN, D, UPCAST)
    out_row = (pid * G + offs_g) * num_splits + split  # the batch's query heads, row-major
    tl.store(o_part_ptr + out_row[:, None] * D + offs_d[None, :], o, mask=g_mask[:, None])
    tl.store(lse_part_ptr + out_row, lse, mask=g_mask)


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


def _tile_tokens(n: int, bs: int, d: int) -> int:
    # ~8K elements (16 KB in bf16) of K per step, never less than one block, no more than n needs.
    return max(bs, min(8192 // d, triton.next_power_of_2(n) * bs))


def choose_num_splits(n: int, bs: int = 16, d: int = 128) -> int:
    """Splits for n table columns: as many as there are steps of _tile_tokens (each program's
    serial chain of dependent loads is the latency floor at decode sizes), capped at 64."""
    steps = triton.cdiv(n, _tile_tokens(n, bs, d) // bs)
    return max(1, min(_MAX_SPLITS, steps))


def _schedule(n: int, bs: int, d: int, num_splits, tile_tokens) -> tuple[int, int, int]:
    """(tile tokens, splits, steps per split) for n table columns of bs-token blocks, head dim d."""
    if not _pow2(d) or not 16 <= d <= 256:
        raise ValueError(f"sparse_decode: head dim must be a power of two in [16, 256], got {d}")
    if not _pow2(bs) or bs > 256:
        raise ValueError(f"sparse_decode: block size must be a power of two <= 256, got {bs}")
    bn = max(16, tile_tokens or _tile_tokens(n, bs, d))
    if not _pow2(bn) or bn < bs:
        raise ValueError(f"sparse_decode: tile_tokens must be a power of two >= block size, got {bn}")
    steps = triton.cdiv(n, bn // bs)
    splits = choose_num_splits(n, bs, d) if num_splits is None else int(num_splits)
    iters = triton.cdiv(steps, max(1, min(splits, steps)))
    return bn, triton.cdiv(steps, iters), iters  # splits that would own no column are dropped


def _reduce(o_part, lse_part, out, lse, splits: int, d: int) -> None:
    """Merge each query head's splits: o_part [H, splits, d], lse_part [H, splits] -> out [H, d], lse [H]."""
    _reduce_kernel[(out.shape[0],)](
        o_part, lse_part, out, lse, splits, out.stride(0), out.stride(1),
        SP=triton.next_power_of_2(splits), D=d,
    )


def sparse_decode(q, k_pool, v_pool, slots, tail_len, scale, *, num_splits=None, tile_tokens=None):
    """Triton sparse decode attention. q [Hq, d], k_pool/v_pool [Hkv, S, bs, d], slots [Hkv, n]
    int32 (-1 = skip), tail_len [1] int32 -> (out [Hq, d] in q.dtype, lse [Hq] float32).
    num_splits / tile_tokens (a power-of-two multiple of bs, >= 16) override the launcher's
    choices; for tests and benchmarks."""
    hkv, g, n, bs, d = check_sparse_decode(q, k_pool, v_pool, slots, tail_len)
    check_launch_device("sparse_decode", q, k_pool, v_pool, slots, tail_len)
    hq = q.shape[0]
    out = torch.empty_like(q, memory_format=torch.contiguous_format)
    lse = torch.empty(hq, dtype=torch.float32, device=q.device)
    bn, splits, iters = _schedule(max(n, 1), bs, d, num_splits, tile_tokens)
    if n == 0:
        return out.zero_(), lse.fill_(float("-inf"))
    o_part = torch.empty(hq, splits, d, dtype=torch.float32, device=q.device)
    lse_part = torch.empty(hq, splits, dtype=torch.float32, device=q.device)
    _split_kernel[(hkv, splits)](
        q, k_pool, v_pool, slots, tail_len, o_part, lse_part,
        n, iters, splits, float(scale) * _LOG2E,
        q.stride(0), q.stride(1),
        *k_pool.stride(), *v_pool.stride(), slots.stride(0), slots.stride(1),
        G=g, GP=max(16, triton.next_power_of_2(g)), BS=bs, BN=bn, D=d,
        UPCAST=os.environ.get("TRITON_INTERPRET") == "1", num_warps=8 if bn * d > 8192 else 4,
    )
    _reduce(o_part, lse_part, out, lse, splits, d)
    return out, lse


def sparse_decode_rows(q, rows: RowTensors, layer: int, scale: float, *, num_splits=None, tile_tokens=None):
    """sparse_decode of B rows in one launch: q [B, Hq, d], row b attending layer `layer` of its own
    pool and table (rows: kernels.rows.decode_rows) -> (out [B, Hq, d] in q.dtype, lse [B, Hq] float32).
    Each row's result equals sparse_decode over its own tensors (the same program, reading them by
    address)."""
    hkv, g = check_decode_rows(q, rows, layer)
    k0, v0, s0, t0 = (rows[name][0] for name in ("k_pool", "v_pool", "tables", "tail_len"))
    check_launch_device("sparse_decode_rows", q, k0, rows.addresses)
    B, hq, d = q.shape
    bs, n = k0.shape[3], s0.shape[2]
    out = torch.empty(B, hq, d, dtype=q.dtype, device=q.device)
    lse = torch.empty(B, hq, dtype=torch.float32, device=q.device)
    bn, splits, iters = _schedule(max(n, 1), bs, d, num_splits, tile_tokens)
    if n == 0:
        return out.zero_(), lse.fill_(float("-inf"))
    o_part = torch.empty(B * hq, splits, d, dtype=torch.float32, device=q.device)
    lse_part = torch.empty(B * hq, splits, dtype=torch.float32, device=q.device)
    _split_rows_kernel[(B * hkv, splits)](
        q, rows.addresses, k0, v0, s0, t0, o_part, lse_part,
        layer * k0.stride(0), layer * v0.stride(0), layer * s0.stride(0), hkv, n, iters, splits,
        float(scale) * _LOG2E, *q.stride(), *k0.stride()[1:], *v0.stride()[1:], s0.stride(1), s0.stride(2),
        G=g, GP=max(16, triton.next_power_of_2(g)), BS=bs, BN=bn, D=d,
        UPCAST=os.environ.get("TRITON_INTERPRET") == "1", num_warps=8 if bn * d > 8192 else 4,
    )
    _reduce(o_part, lse_part, out.view(B * hq, d), lse.view(B * hq), splits, d)
    return out, lse


__all__ = ["sparse_decode", "sparse_decode_rows", "choose_num_splits"]
