"""The per-head LRU lookup of the block pool as one Triton kernel (see reference.lru_lookup).

In torch the lookup is ~15 small kernels per layer and step; here one program per KV head does it
all: gather the cached slots of the selection, stamp the hits, find the m stalest slots for the m
misses, hand them out in slot order and update the maps. The stalest slots are found by bisecting on
the stamp (the smallest t with count(last_used <= t) >= m: one counting pass over the slots in
registers per halving, as many as the stamps' spread has bits), not by sorting: a bitonic tl.sort of
the 1.5B's 2,048 slots took ~78 us a layer on an H100 (bench/results/batch_decode_15b_32k.md), the
largest kernel of its decode step. Stores that later loads of the same program depend on are
separated by barriers (threads of a program see each other's global stores only after one).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from kvretrieve.kernels.checks import check_launch_device, check_lru


@triton.jit
def _lru_kernel(ids_ptr, sob_ptr, bos_ptr, used_ptr, stamp_ptr, counts_ptr, slot_ptr, fetch_ptr, order_ptr,
                k, n, sob_stride, lru_stride, COUNT: tl.constexpr, K: tl.constexpr, N: tl.constexpr):
    h = tl.program_id(0).to(tl.int64)
    j = tl.arange(0, K)
    jm = j < k
    now = tl.load(stamp_ptr)
    sob = sob_ptr + h * sob_stride
    bos = bos_ptr + h * lru_stride
    used = used_ptr + h * lru_stride
    ids = tl.load(ids_ptr + h * k + j, mask=jm, other=0)
    cur = tl.load(sob + ids, mask=jm, other=-1)
    hit = jm & (cur >= 0)
    miss = jm & (cur < 0)
    tl.store(used + cur, tl.zeros_like(cur) + now, mask=hit)
    tl.debug_barrier()
    s = tl.arange(0, N)
    sm = s < n
    last = tl.load(used + s, mask=sm, other=0)
    m = tl.sum(miss.to(tl.int32), 0)
    # The m-th smallest stamp t: count(last <= t) >= m holds at hi and fails below lo.
    lo = tl.min(tl.where(sm, last, 2147483647), 0).to(tl.int64)
    hi = tl.max(tl.where(sm, last, -2147483648), 0).to(tl.int64)
    while lo < hi:
        mid = (lo + hi) >> 1
        enough = tl.sum((sm & (last <= mid)).to(tl.int32), 0) >= m
        hi = tl.where(enough, mid, hi)
        lo = tl.where(enough, lo, mid + 1)
    # Victims: every slot staler than t, then ties at t in slot order, m in all (none when m = 0),
    # written compactly in slot order.
    below = sm & (last < hi)
    tie = sm & (last == hi)
    take = below | (tie & (tl.cumsum(tie.to(tl.int32), 0) <= m - tl.sum(below.to(tl.int32), 0)))
    tl.store(order_ptr + h * N + tl.cumsum(take.to(tl.int32), 0) - 1, s, mask=take)
    tl.debug_barrier()
    rank = tl.cumsum(miss.to(tl.int32), 0) - 1
    victim = tl.load(order_ptr + h * N + tl.maximum(rank, 0), mask=miss, other=0)
    old = tl.load(bos + victim, mask=miss, other=-1)
    tl.store(sob + old, tl.full([K], -1, tl.int32), mask=miss & (old >= 0))
    tl.debug_barrier()
    tl.store(sob + ids, victim, mask=miss)
    tl.store(bos + victim, ids.to(tl.int32), mask=miss)
    tl.store(used + victim, tl.zeros_like(victim) + now, mask=miss)
    tl.store(slot_ptr + h * k + j, tl.where(hit, cur, victim), mask=jm)
    tl.store(fetch_ptr + h * k + j, miss.to(tl.int8), mask=jm)
    if COUNT:
        tl.atomic_add(counts_ptr, tl.sum(hit.to(tl.int64), 0))
        tl.atomic_add(counts_ptr + 1, tl.sum(miss.to(tl.int64), 0))


def lru_lookup(ids, slot_of_block, block_of_slot, last_used, stamp, counts, num_warps: int | None = None):
    """Same contract as kernels.reference.lru_lookup; num_warps is a tuning knob (bench/probes/probe_lru.py).
    Its default: 8 from 1,024 slots (the 1.5B's 1,728: 70 against 99 us a lookup with 4, launch included,
    bench/results/probe_lru_h100.md), else 4 (at the 8B shape's 128-256 slots as fast as any)."""
    h, k, n = check_lru(ids, slot_of_block, block_of_slot, last_used, stamp)
    check_launch_device("lru_lookup", ids, slot_of_block, block_of_slot, last_used, stamp)
    slot = torch.empty(h, k, dtype=torch.int32, device=ids.device)
    fetch = torch.empty(h, k, dtype=torch.bool, device=ids.device)
    if k == 0:
        return slot, fetch
    N = triton.next_power_of_2(n)
    order = torch.empty(h, N, dtype=torch.int32, device=ids.device)
    _lru_kernel[(h,)](ids.contiguous(), slot_of_block, block_of_slot, last_used, stamp,
                      counts if counts is not None else slot, slot, fetch.view(torch.int8), order,
                      k, n, slot_of_block.stride(0), block_of_slot.stride(0),
                      COUNT=counts is not None, K=triton.next_power_of_2(k), N=N,
                      num_warps=num_warps or (8 if n >= 1024 else 4))
    return slot, fetch
