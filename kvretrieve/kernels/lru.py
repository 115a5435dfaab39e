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

from kvretrieve.kernels.checks import check_launch_device, check_lru, fail
from kvretrieve.kernels.rows import LRU, RowTensors
from kvretrieve.kernels.sparse_decode import _row_pointer


@triton.jit
def _lru_kernel(ids_ptr, sob_ptr, bos_ptr, used_ptr, stamp_ptr, counts_ptr, slot_ptr, fetch_ptr, order_ptr,
                addr_ptr, k, n, sob_stride, lru_stride, hkv, off_sob, off_lru,
                COUNT: tl.constexpr, K: tl.constexpr, N: tl.constexpr, ROWS: tl.constexpr):
    h = tl.program_id(0).to(tl.int64)
    out = h  # ids, slots, fetch flags and scratch are [B * H, ...]: one row after another
    if ROWS:  # grid axis 0 is (row, KV head): the row's maps, stamp and counts through addr_ptr [B, 5]
        a = addr_ptr + (h // hkv) * 5
        h = h % hkv
        sob_ptr, bos_ptr = _row_pointer(a, 0, sob_ptr, off_sob), _row_pointer(a, 1, bos_ptr, off_lru)
        used_ptr, stamp_ptr = _row_pointer(a, 2, used_ptr, off_lru), _row_pointer(a, 3, stamp_ptr, 0)
        counts_ptr = _row_pointer(a, 4, counts_ptr, 0)
    j = tl.arange(0, K)
    jm = j < k
    now = tl.load(stamp_ptr)
    sob = sob_ptr + h * sob_stride
    bos = bos_ptr + h * lru_stride
    used = used_ptr + h * lru_stride
    ids = tl.load(ids_ptr + out * k + j, mask=jm, other=0)
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
    tl.store(order_ptr + out * N + tl.cumsum(take.to(tl.int32), 0) - 1, s, mask=take)
    tl.debug_barrier()
    rank = tl.cumsum(miss.to(tl.int32), 0) - 1
    victim = tl.load(order_ptr + out * N + tl.maximum(rank, 0), mask=miss, other=0)
    old = tl.load(bos + victim, mask=miss, other=-1)
    tl.store(sob + old, tl.full([K], -1, tl.int32), mask=miss & (old >= 0))
    tl.debug_barrier()
    tl.store(sob + ids, victim, mask=miss)
    tl.store(bos + victim, ids.to(tl.int32), mask=miss)
    tl.store(used + victim, tl.zeros_like(victim) + now, mask=miss)
    tl.store(slot_ptr + out * k + j, tl.where(hit, cur, victim), mask=jm)
    tl.store(fetch_ptr + out * k + j, miss.to(tl.int8), mask=jm)
    if COUNT:
        tl.atomic_add(counts_ptr, tl.sum(hit.to(tl.int64), 0))
        tl.atomic_add(counts_ptr + 1, tl.sum(miss.to(tl.int64), 0))


def lru_lookup(ids, slot_of_block, block_of_slot, last_used, stamp, counts, num_warps: int | None = None):
    """Same contract as kernels.reference.lru_lookup; num_warps is a tuning knob (bench/probes/probe_lru.py).
    Its default: 8 from 1,024 slots (the 1.5B's 1,728: 70 against 99 us a lookup with 4, launch included,
    bench/results/probe_lru_h100.md), else 4 (at the 8B shape's 128-256 slots as fast as any)."""
    h, k, n = check_lru(ids, slot_of_block, block_of_slot, last_used, stamp)
    check_launch_device("lru_lookup", ids, slot_of_block, block_of_slot, last_used, stamp)
    return _launch(ids, slot_of_block, block_of_slot, last_used, stamp, counts, h, k, n, num_warps=num_warps)


def lru_lookup_rows(ids, rows: RowTensors, layer: int):
    """lru_lookup of B rows in one launch: ids [B, H, k] int64, row b against layer `layer` of its own
    pool's maps, stamp and counts (rows: kernels.rows.lru_rows) -> (slot [B, H, k] int32, fetch [B, H, k])."""
    op = "lru_lookup_rows"
    sob, bos, used, stamp, counts = (rows[name][0] for name in LRU)
    if not isinstance(ids, torch.Tensor) or ids.dim() != 3 or ids.shape[0] != len(rows):
        fail(op, f"ids must be [B={len(rows)}, H, k], got {tuple(getattr(ids, 'shape', ()))}")
    if not 0 <= layer < sob.shape[0]:
        fail(op, f"layer must be in [0, {sob.shape[0]}), got {layer}")
    B, offsets = ids.shape[0], (layer * sob.stride(0), layer * bos.stride(0))
    # select, not [i]: the lowering test's fake CUDA tensors refuse integer indexing on a CPU-only torch
    sob, bos, used = (t.select(0, layer) for t in (sob, bos, used))
    h, k, n = check_lru(ids.select(0, 0), sob, bos, used, stamp)
    check_launch_device(op, ids, sob, rows.addresses)
    slot, fetch = _launch(ids.reshape(B * h, k), sob, bos, used, stamp, counts, h, k, n,
                          rows=(rows.addresses, *offsets), B=B)
    return slot.view(B, h, k), fetch.view(B, h, k)


def _launch(ids, sob, bos, used, stamp, counts, h, k, n, num_warps=None, rows: tuple | None = None, B: int = 1):
    """The kernel over ids [B * h, k] (rows: (addresses [B, 5], the layer's element offsets into the maps
    and into the slots' tables); sob ... counts are then row 0's layer, for strides and types)."""
    slot = torch.empty(B * h, k, dtype=torch.int32, device=ids.device)
    fetch = torch.empty(B * h, k, dtype=torch.bool, device=ids.device)
    if k == 0:
        return slot, fetch
    N = triton.next_power_of_2(n)
    order = torch.empty(B * h, N, dtype=torch.int32, device=ids.device)
    addresses, off_sob, off_lru = rows if rows else (slot, 0, 0)
    _lru_kernel[(B * h,)](ids.contiguous(), sob, bos, used, stamp, counts if counts is not None else slot, slot,
                          fetch.view(torch.int8), order, addresses, k, n, sob.stride(0), bos.stride(0), h,
                          off_sob, off_lru, COUNT=counts is not None, K=triton.next_power_of_2(k), N=N,
                          ROWS=rows is not None, num_warps=num_warps or (8 if n >= 1024 else 4))
    return slot, fetch


__all__ = ["lru_lookup", "lru_lookup_rows"]
