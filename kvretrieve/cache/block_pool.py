"""Slots on the compute device for the KV blocks attention reads, and their bookkeeping.

Per layer and KV head the pool holds S = sinks + ring + lru slots of one block each:
  [0, n_sink)              the first blocks of the context (attention sinks), fixed;
  [n_sink, n_sink + ring)  the recent window as a ring: block b lives in slot n_sink + b % ring, and
                           the ring is one block longer than the window so the partly filled tail
                           block has a slot of its own;
  [n_sink + ring, S)       retrieved blocks, replaced least-recently-used first.
The LRU bookkeeping (which block sits in which slot, when each slot was last used) lives on the
compute device too, as int32 tensors with one scratch column each (kernels.lru_lookup): a decode
step never needs the host, so it can be captured whole in a CUDA graph. Which block each ring slot
holds is host state (ring_block): prefill and truncation use it, between steps.
"""
from __future__ import annotations

import numpy as np
import torch

from .. import kernels
from ..config import KVGeometry, RetrievalConfig
from ..errors import SavedPrefillError
from ..index.base import restore_prefix
from ..memory import check_allocation


class BlockPool:
    def __init__(self, cfg: RetrievalConfig, geo: KVGeometry):
        num_layers, num_kv_heads, max_blocks, device = geo.layers, geo.kv_heads, geo.max_blocks, geo.device
        self.bs, self.H = geo.block_size, num_kv_heads
        # Never more LRU slots than the context has blocks (more could hold nothing), nor fewer than a
        # step retrieves: cache_blocks=10**30 means "all of them".
        self.n_sink, self.ring = cfg.sink_blocks, cfg.window_blocks + 1
        self.n_lru = min(cfg.slot_blocks, max(max_blocks, cfg.budget_blocks))
        self.window_blocks, self.budget_blocks = cfg.window_blocks, cfg.budget_blocks
        self.lru0 = self.n_sink + self.ring
        self.slots = self.lru0 + self.n_lru
        shape = (num_layers, num_kv_heads, self.slots, self.bs, geo.head_dim)
        check_allocation(2 * geo.nbytes(*shape), device, "the GPU block cache",
                         "lower RetrievalConfig.budget_tokens or RetrievalConfig.cache_blocks")
        # Only sinks and ring exist during prefill; the LRU region (most of the pool) is added at the
        # first decode step, when the prefill's activations are gone (ensure_lru).
        self.k = torch.zeros(shape[:2] + (self.lru0,) + shape[3:], device=device, dtype=geo.dtype)
        self.v = torch.zeros_like(self.k)
        i32 = dict(dtype=torch.int32, device=device)
        self.slot_of_block = torch.full((num_layers, num_kv_heads, max_blocks + 1), -1, **i32)
        self.block_of_slot = torch.full((num_layers, num_kv_heads, self.n_lru + 1), -1, **i32)
        self.last_used = torch.zeros(num_layers, num_kv_heads, self.n_lru + 1, **i32)
        self.counts = torch.zeros(2, dtype=torch.int64, device=device)       # hits, misses
        self.spec_counts = torch.zeros(2, dtype=torch.int64, device=device)  # ... of speculative lookups
        self.ring_block = np.full((num_layers, self.ring), -1, dtype=np.int64)

    def ensure_lru(self) -> None:
        if self.k.shape[2] == self.slots:
            return
        pad = list(self.k.shape)
        pad[2] = self.n_lru
        self.k = torch.cat([self.k, self.k.new_zeros(pad)], dim=2)
        self.v = torch.cat([self.v, self.v.new_zeros(pad)], dim=2)

    def drop_lru(self) -> None:
        """Give the LRU region back (forgetting what it caches) until ensure_lru adds it again. Only
        while no captured graph holds self.k / self.v: Engine.warm_up, whose steps run eagerly, so
        that 0.5 GiB (128K, 8B shape) is not held through the first prefill (at 512K it would not fit)."""
        if self.k.shape[2] == self.lru0:
            return
        self.forget_cached()
        self.k = self.k[:, :, :self.lru0].clone()
        self.v = self.v[:, :, :self.lru0].clone()

    @property
    def columns(self) -> int:
        """Width of the slot table: sinks + budget + window + tail."""
        return self.n_sink + self.budget_blocks + self.window_blocks + 1

    def ring_slot(self, block: int) -> int:
        return self.n_sink + block % self.ring

    def nbytes(self) -> int:
        return 2 * self.k.numel() * self.k.element_size()

    def state(self) -> dict[str, torch.Tensor]:
        """What a saved prefill keeps: the sink and ring slots (the window and the partly filled tail
        block exist only here, in the model's dtype) and which block each ring slot holds. Retrieved
        blocks are not kept: a reopened pool starts cold, which changes copies, never outputs."""
        return {"k": self.k[:, :, :self.lru0], "v": self.v[:, :, :self.lru0],
                "ring_block": torch.from_numpy(self.ring_block)}

    def load_state(self, state: dict[str, torch.Tensor]) -> None:
        if state["k"].shape[2] != self.lru0:
            raise SavedPrefillError(f"the saved prefill keeps {state['k'].shape[2]} sink and window slots, this "
                                    f"configuration {self.lru0}; reopen it with the options it was saved with")
        for name, dst in (("k", self.k), ("v", self.v)):
            restore_prefix(dst, state[name], "sink and window blocks")
        self.ring_block[:] = state["ring_block"].numpy()
        self.forget_cached()

    def lookup(self, layer: int, ids: torch.Tensor, stamp: torch.Tensor, speculative: bool = False):
        """Pool slots [Hkv, k] int32 of block ids [Hkv, k] (device), and which of them must be
        fetched [Hkv, k] bool (see kernels.lru_lookup). Every miss is one fetched block, so the
        counts are also the copy volume; speculative lookups are counted apart."""
        slot, fetch = kernels.lru_lookup(ids, self.slot_of_block[layer], self.block_of_slot[layer], self.last_used[layer],
                                         stamp, self.spec_counts if speculative else self.counts)
        return slot + self.lru0, fetch

    def fixed_columns(self, pos: torch.Tensor, window_blocks: int) -> torch.Tensor:
        """The part of the slot table that is the same for every layer, for the token at position
        pos ([1] int64, device): sinks | -1 for the budget | window | tail, as one [columns] int32 row.
        The tail is the token's own block; the window, the window_blocks blocks before it (from
        the ring)."""
        dev = pos.device
        n_done = pos // self.bs                                              # [1]: blocks before the tail
        sink = torch.arange(self.n_sink, device=dev)
        sink = torch.where(sink < n_done, sink, -1)
        win = torch.arange(self.window_blocks, device=dev) + n_done - window_blocks
        first = torch.clamp(n_done, max=self.n_sink)                         # the sinks end here
        ok = (win >= first) & (torch.arange(self.window_blocks, device=dev) < window_blocks)
        win = torch.where(ok, self.n_sink + win.remainder(self.ring), -1)
        tail = self.n_sink + n_done.remainder(self.ring)
        budget = torch.full((self.budget_blocks,), -1, device=dev, dtype=torch.int64)
        return torch.cat([sink, budget, win, tail]).int()

    def forget_range(self, layer: int, first: int, end: int) -> None:
        """Drop this layer's cached copies of blocks [first, end) (their contents changed)."""
        self._forget(self.block_of_slot[layer:layer + 1], self.slot_of_block[layer:layer + 1],
                     self.last_used[layer:layer + 1], first, end)

    def forget_cached(self) -> None:
        """Drop every retrieved block the pool caches (sinks and the window ring stay). Wholesale, so
        tables left half updated by a lookup cut short come back consistent too."""
        self.slot_of_block.fill_(-1)
        self.block_of_slot.fill_(-1)
        self.last_used.fill_(0)

    def forget_from(self, block: int) -> None:
        """Drop every cached block >= block (after a truncation to a length in `block`, their contents
        are stale). The ring keeps `block` itself: its first tokens are still valid, and only the
        ring has them until the block is full."""
        self._forget(self.block_of_slot, self.slot_of_block, self.last_used, block, self.slot_of_block.shape[-1])
        self.ring_block[self.ring_block > block] = -1

    @staticmethod
    def _forget(bos: torch.Tensor, sob: torch.Tensor, used: torch.Tensor, first: int, end: int) -> None:
        stale = (bos >= first) & (bos < end)
        stale[..., -1] = False
        scratch = sob.shape[-1] - 1
        sob.scatter_(-1, torch.where(stale, bos, scratch).long(), -1)
        sob[..., -1] = -1
        bos.masked_fill_(stale, -1)
        used.masked_fill_(stale, 0)
