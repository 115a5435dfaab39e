"""Top-k selection of block scores as a Triton radix select.

torch.topk hands each row to one thread block; the decode step has 8 rows (KV heads) of 2K-32K
block scores per layer, where torch.topk took 43 us a layer at 128K against this kernel's 29 (H100,
bench/results/probe_topk_h100.md). Here each program takes a slice of CHUNK scores held in
registers, finds its k-th largest by bisecting on the scores' bit patterns (32 counting passes over
registers, no sort), and writes its k best (values and indices) compactly with a prefix sum. Slices
of one row shrink it to n_slices * k survivors; a last pass over those gives the row's top k. The
result is a set: indices come in no particular order.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from kvretrieve.kernels.checks import check_launch_device, check_topk

TOPK_SLICE = 2048  # scores per program; a slice must be at least 2 * k for the rows to shrink


# n changes with the context: specialising on it would compile new variants mid-generation.
@triton.jit(do_not_specialize=["n", "k"])
def _topk_kernel(val_ptr, idx_ptr, out_val_ptr, out_idx_ptr, n, k, stride_v, stride_i, stride_out,
                 CHUNK: tl.constexpr, HAS_IDX: tl.constexpr, STOP_AT_K: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    piece = tl.program_id(1)
    offs = piece * CHUNK + tl.arange(0, CHUNK)
    valid = offs < n
    x = tl.load(val_ptr + row * stride_v + offs, mask=valid, other=float("-inf"))
    # Floats as int32 keys with the same order: negative floats count down as their bits count up,
    # so their 31 low bits are flipped. Padding ranks below -inf, so it is never picked before a
    # real score.
    bits = x.to(tl.int32, bitcast=True)
    key = (bits ^ ((bits >> 31) & 0x7FFFFFFF)).to(tl.int64)
    key = tl.where(valid, key, -2147483649)
    # The largest t with count(key >= t) >= k is the k-th largest key: bisect over the int32 range.
    # (Counting against 16 thresholds a pass, 9 passes, was slower on an H100 in every shape:
    # bench/results/probe_topk_h100.md as committed at 64dd378, ways 16.)
    # STOP_AT_K: a threshold with exactly k keys at or above it serves as well as the k-th key itself,
    # and with distinct scores the halving meets the gap below the k-th key before its 33 passes end:
    # 28 -> 24 us at the 1.5B's 32K, 10 -> 7 at its 8K, 21 -> 17 at the 8B shape's 512K (H100,
    # bench/results/probe_topk_h100.md).
    lo = tl.full((), -2147483649, tl.int64)
    hi = tl.full((), 2147483647, tl.int64)
    more = lo < hi
    while more:
        mid = (lo + hi + 1) >> 1
        count = tl.sum((key >= mid).to(tl.int32), 0)
        lo = tl.where(count >= k, mid, lo)
        hi = tl.where(count >= k, hi, mid - 1)
        more = lo < hi
        if STOP_AT_K:
            more = more & (count != k)
    above = key > lo
    tie = key == lo
    # All keys above the k-th, then the first ties in index order up to k.
    room = k - tl.sum(above.to(tl.int32), 0)
    take = above | (tie & (tl.cumsum(tie.to(tl.int32), 0) <= room))
    pos = tl.cumsum(take.to(tl.int32), 0) - 1
    if HAS_IDX:
        src = tl.load(idx_ptr + row * stride_i + offs, mask=valid, other=0)
    else:
        src = offs.to(tl.int64)
    dst = row * stride_out + piece * k + pos
    tl.store(out_val_ptr + dst, x, mask=take)
    tl.store(out_idx_ptr + dst, src, mask=take)


def topk_indices(scores: torch.Tensor, k: int, slice_len: int | None = None, num_warps: int | None = None,
                 stop_at_k: bool = True) -> torch.Tensor:
    """Same contract as kernels.reference.topk_indices (the Triton path needs 2 * k <= slice_len).
    slice_len (a power of two; default below), num_warps (default: 8 from slices of 2,048, else 4) and
    stop_at_k (the kernel's STOP_AT_K) are tuning knobs (bench/probes/probe_topk.py)."""
    h, n = check_topk(scores, k)
    check_launch_device("topk_indices", scores)
    # Slices of at least 4k: at k = 864 of 8,217 (the 1.5B at 32K) 2,048-score slices shrank a row over 4
    # launches, 68 us; 4,096, 44 us (H100, bench/results/probe_topk_h100.md)
    slice_len = slice_len or max(TOPK_SLICE, triton.next_power_of_2(4 * k))
    if 2 * k > slice_len:
        raise ValueError(f"topk_indices: k={k} exceeds half a slice ({slice_len // 2}); use the reference")
    if k == 0 or h == 0:
        return torch.empty(h, k, dtype=torch.long, device=scores.device)
    vals, idx = scores, None
    while True:
        pieces = triton.cdiv(n, slice_len)
        width = slice_len if pieces > 1 else max(16, triton.next_power_of_2(n))
        out_v = torch.empty(h, pieces * k, dtype=torch.float32, device=scores.device)
        out_i = torch.empty(h, pieces * k, dtype=torch.long, device=scores.device)
        _topk_kernel[(h, pieces)](vals, out_i if idx is None else idx, out_v, out_i, n, k, vals.stride(0),
                                  0 if idx is None else idx.stride(0), out_v.stride(0), CHUNK=width,
                                  HAS_IDX=idx is not None, STOP_AT_K=stop_at_k,
                                  num_warps=num_warps or (8 if width >= 2048 else 4))
        if pieces == 1:
            return out_i
        vals, idx, n = out_v, out_i, pieces * k


__all__ = ["topk_indices", "TOPK_SLICE"]
