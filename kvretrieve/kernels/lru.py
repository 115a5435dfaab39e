"""The per-head LRU lookup of the block pool as one Triton kernel (see reference.lru_lookup).

In torch the lookup is ~15 small kernels per layer and step; here one program per KV head does it
all: gather the cached slots of the selection, stamp the hits, sort the slots by last use (a
bitonic tl.sort of (last_used, slot) packed into one int64), hand the r-th miss the r-th stalest
slot and update the maps. Stores that later loads of the same program depend on are separated by
barriers (threads of a program see each other's global stores only after one).
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
    last = tl.load(used + s, mask=s < n, other=2147483647).to(tl.int64)
    order = (tl.sort(last * N + s) % N).to(tl.int32)                  # stalest slot first
    tl.store(order_ptr + h * N + s, order)
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


def lru_lookup(ids, slot_of_block, block_of_slot, last_used, stamp, counts, num_warps: int = 4):
    """Same contract as kernels.reference.lru_lookup; num_warps is a tuning knob (bench/probes/probe_lru.py:
    one program per KV head sorts all n slots, which at the 1.5B's 1,728 slots took ~78 us a layer)."""
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
                      COUNT=counts is not None, K=triton.next_power_of_2(k), N=N, num_warps=num_warps)
    return slot, fetch
