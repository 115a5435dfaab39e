"""Slots on the compute device for the KV blocks attention reads, and their bookkeeping.

Per layer and KV head the pool holds S = sinks + ring + lru slots of one block each:
  [0, n_sink)              the first blocks of the context (attention sinks), fixed;
  [n_sink, n_sink + ring)  the recent window as a ring: block b lives in slot n_sink + b % ring, and
                           the ring is one block longer than the window so the partly filled tail
                           block has a slot of its own;
  [n_sink + ring, S)       retrieved blocks, replaced least-recently-used first.
The bookkeeping (which block sits in which LRU slot) is host-side numpy: it is a few vector ops
per layer and step, and the host needs the miss list anyway to gather blocks from CPU memory.
"""
from __future__ import annotations

import numpy as np
import torch

from ..config import RetrievalConfig
from .memory import check_allocation


class BlockPool:
    def __init__(self, cfg: RetrievalConfig, num_layers: int, num_kv_heads: int, head_dim: int, max_blocks: int,
                 device: torch.device, dtype: torch.dtype):
        self.bs, self.H = cfg.block_size, num_kv_heads
        self.n_sink, self.ring, self.n_lru = cfg.sink_blocks, cfg.window_blocks + 1, cfg.slot_blocks
        self.window_blocks, self.budget_blocks = cfg.window_blocks, cfg.budget_blocks
        self.lru0 = self.n_sink + self.ring
        self.slots = self.lru0 + self.n_lru
        shape = (num_layers, num_kv_heads, self.slots, self.bs, head_dim)
        check_allocation(2 * torch.Size(shape).numel() * torch.finfo(dtype).bits // 8, device,
                         "the GPU block cache", "lower --budget or the cache size")
        # Only sinks and ring exist during prefill; the LRU region (most of the pool) is added at the
        # first decode step, when the prefill's activations are gone (ensure_lru).
        self.k = torch.zeros(shape[:2] + (self.lru0,) + shape[3:], device=device, dtype=dtype)
        self.v = torch.zeros_like(self.k)
        self.slot_of_block = np.full((num_layers, num_kv_heads, max_blocks), -1, dtype=np.int64)
        self.block_of_slot = np.full((num_layers, num_kv_heads, self.n_lru), -1, dtype=np.int64)
        self.last_used = np.zeros((num_layers, num_kv_heads, self.n_lru), dtype=np.int64)
        self.ring_block = np.full((num_layers, self.ring), -1, dtype=np.int64)
        self.hits = self.misses = 0
        self._heads = np.arange(num_kv_heads)[:, None]

    def ensure_lru(self) -> None:
        if self.k.shape[2] == self.slots:
            return
        pad = list(self.k.shape)
        pad[2] = self.n_lru
        self.k = torch.cat([self.k, self.k.new_zeros(pad)], dim=2)
        self.v = torch.cat([self.v, self.v.new_zeros(pad)], dim=2)

    @property
    def columns(self) -> int:
        """Width of the slot table: sinks + budget + window + tail."""
        return self.n_sink + self.budget_blocks + self.window_blocks + 1

    def ring_slot(self, block: int) -> int:
        return self.n_sink + block % self.ring

    def nbytes(self) -> int:
        return 2 * self.k.numel() * self.k.element_size()

    def lookup(self, layer: int, ids: np.ndarray, stamp: int, count: bool = True):
        """Find blocks ids [Hkv, k] in the LRU region, assigning victim slots to the missing ones.

        Returns (slots [Hkv, k] pool slot of every id, miss_heads, miss_blocks, miss_slots). The
        caller must fill the miss slots before attention reads them. Hits are stamped first, so a
        victim is never a block of this same selection (the LRU region holds at least k slots).
        """
        sob, bos, used = self.slot_of_block[layer], self.block_of_slot[layer], self.last_used[layer]
        heads = np.broadcast_to(self._heads, ids.shape)
        lru = sob[heads, ids]
        hit = lru >= 0
        used[heads[hit], lru[hit]] = stamp
        miss = ~hit
        n_miss = int(miss.sum())
        if count:  # speculative lookups are measured separately
            self.hits += int(hit.sum())
            self.misses += n_miss
        if n_miss:
            # The r-th miss of a head takes that head's r-th stalest slot.
            order = np.argsort(used, axis=1, kind="stable")
            rank = np.cumsum(miss, axis=1) - 1
            mh, mb = heads[miss], ids[miss]
            victims = order[mh, rank[miss]]
            old = bos[mh, victims]
            evicted = old >= 0
            sob[mh[evicted], old[evicted]] = -1
            sob[mh, mb] = victims
            bos[mh, victims] = mb
            used[mh, victims] = stamp
            lru[miss] = victims
        else:
            mh = mb = victims = np.empty(0, dtype=np.int64)
        return lru + self.lru0, mh, mb, victims + self.lru0

    def table(self, selected: np.ndarray, n_full: int, window_blocks: int) -> np.ndarray:
        """Slot table [Hkv, columns] int32 for a context of n_full full blocks plus the tail block:
        sinks | selected (padded with -1) | window (the last window_blocks full blocks, from the
        ring) | tail (always last). Columns are sized for the largest budget and window."""
        t = np.full((self.H, self.columns), -1, dtype=np.int32)
        sink = min(self.n_sink, n_full)
        t[:, :sink] = np.arange(sink)
        k = selected.shape[1]
        t[:, self.n_sink:self.n_sink + k] = selected
        first_win = max(sink, n_full - window_blocks)
        win = [self.ring_slot(b) for b in range(first_win, n_full)]
        start = self.n_sink + self.budget_blocks
        t[:, start:start + len(win)] = win
        t[:, -1] = self.ring_slot(n_full)
        return t

    def forget_range(self, layer: int, first: int, end: int) -> None:
        """Drop this layer's cached copies of blocks [first, end) (their contents changed)."""
        bos = self.block_of_slot[layer]
        stale = (bos >= first) & (bos < end)
        heads, slots = np.nonzero(stale)
        self.slot_of_block[layer, heads, bos[heads, slots]] = -1
        bos[stale] = -1
        self.last_used[layer][stale] = 0

    def forget_from(self, block: int) -> None:
        """Drop every cached block >= block (after a truncation, their contents are stale)."""
        stale = self.block_of_slot >= block
        layers, heads, slots = np.nonzero(stale)
        self.slot_of_block[layers, heads, self.block_of_slot[layers, heads, slots]] = -1
        self.block_of_slot[stale] = -1
        self.last_used[stale] = 0
        self.ring_block[self.ring_block >= block] = -1
