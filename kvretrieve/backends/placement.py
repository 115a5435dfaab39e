"""Where a retrieval backend's K,V go, and how they come back.

Every full block goes to the CPU store (async D2H) and to the index; the first blocks (sinks) and
the recent window also go to their pool slots on the device, and the partly filled tail block lives
in its ring slot until it is full. Indexes that reorder (ivf) store segments in cluster order
(store.ClusterLayout). Reading back: a layer's K,V so far (for a continuation prefill and for
measurements), and the ring after a truncation.
"""
from __future__ import annotations

import numpy as np
import torch

from .. import kernels
from ..cache import BlockPool
from ..config import KVGeometry, RetrievalConfig
from ..index import BlockIndex, BlockSummary
from ..store import ClusterLayout, KVStore
from ..store.reads import read_blocks


def pieces(full: int, b0: int, clustered: list, chunk_blocks: int):
    """Split blocks [0, full) of a segment (relative to b0) into pieces to store: the clustered
    segments (with their permutation) and natural runs of at most chunk_blocks between."""
    cursor = 0
    for first, nb, perm in clustered + [(b0 + full, 0, None)]:
        for c0 in range(cursor, first - b0, chunk_blocks):
            yield c0, min(chunk_blocks, first - b0 - c0), None
        if nb:
            yield first - b0, nb, perm
        cursor = first - b0 + nb


class BlockPlacement:
    def __init__(self, cfg: RetrievalConfig, geo: KVGeometry, store: KVStore, index: BlockIndex, pool: BlockPool,
                 summary: BlockSummary | None = None, chunk_blocks: int = 512):
        """summary: block summaries to keep beside the index (estimation); chunk_blocks bounds the
        temporaries when a long segment is stored."""
        self.geo, self.store, self.index, self.pool, self.chunk_blocks = geo, store, index, pool, chunk_blocks
        self.summary = summary
        self.bs, self.H = geo.block_size, geo.kv_heads
        self.clusters = ClusterLayout(geo, store, index.cluster_order, self.replace, cfg.cluster_tokens,
                                      pool.n_sink, pool.window_blocks) if index.reorders else None

    def ring(self, layer: int, block: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The ring slot of `block` in this layer: k, v [Hkv, bs, d]."""
        slot = self.pool.ring_slot(block)
        return self.pool.k[layer, :, slot], self.pool.v[layer, :, slot]

    def write(self, layer: int, first: int, kb: torch.Tensor, vb: torch.Tensor) -> None:
        """Full blocks kb, vb [Hkv, nb, bs, d] -> index (on the device) and CPU store (async D2H)."""
        self._index(layer, first, kb, vb)
        self.store.write_async(layer, first, kb, vb)

    def _index(self, layer: int | slice, first: int, kb: torch.Tensor, vb: torch.Tensor) -> None:
        self.index.add(layer, first, kb, vb)
        if self.summary is not None:
            self.summary.add(layer, first, kb, vb)

    def replace(self, layer: int, first: int, kb: torch.Tensor, vb: torch.Tensor) -> None:
        """write() over blocks whose contents change (clustering): their cached copies go stale."""
        self.write(layer, first, kb, vb)
        self.pool.forget_range(layer, first, first + kb.shape[1])

    def append(self, layer: int, k: torch.Tensor, v: torch.Tensor, P: int) -> None:
        """Add tokens P.. (k, v [T, Hkv, d]) to store, index, sinks, ring and tail."""
        bs, H = self.bs, self.H
        b0, off = divmod(P, bs)
        if off:  # complete the current tail block first: its first tokens live in its ring slot
            rk, rv = self.ring(layer, b0)
            k = torch.cat([rk[:, :off].transpose(0, 1), k])
            v = torch.cat([rv[:, :off].transpose(0, 1), v])
        full, rest = divmod(k.shape[0], bs)
        clustered = self.clusters.cluster_on_device(layer, k, b0, b0 + full) if self.clusters else []
        for rel, nb, perm in pieces(full, b0, clustered, self.chunk_blocks):  # bounded temporaries
            rows = slice(rel * bs, (rel + nb) * bs)
            if perm is None:
                kb = k[rows].view(nb, bs, H, -1).permute(2, 0, 1, 3).contiguous()  # [Hkv, nb, bs, d]
                vb = v[rows].view(nb, bs, H, -1).permute(2, 0, 1, 3).contiguous()
            else:  # a clustered segment: each head's tokens in its cluster order
                idx = perm[..., None].expand(-1, -1, k.shape[-1])
                kb = torch.gather(k[rows].transpose(0, 1), 1, idx).view(H, nb, bs, -1)
                vb = torch.gather(v[rows].transpose(0, 1), 1, idx).view(H, nb, bs, -1)
            self._place(layer, b0 + rel, kb, vb, last_full=b0 + full)
        tail = b0 + full
        self.pool.ring_block[layer, tail % self.pool.ring] = tail
        rk, rv = self.ring(layer, tail)
        rk[:, :rest] = k[full * bs:].transpose(0, 1)
        rv[:, :rest] = v[full * bs:].transpose(0, 1)

    def _place(self, layer: int, first: int, kb: torch.Tensor, vb: torch.Tensor, last_full: int) -> None:
        """Full blocks first.. (kb, vb [Hkv, nb, bs, d]) go to store and index; those among the sinks
        or the window of a context of last_full full blocks also go to their pool slots."""
        self.write(layer, first, kb, vb)
        pool, nb = self.pool, kb.shape[1]
        n_sink = min(pool.n_sink, first + nb) - first
        if n_sink > 0:
            pool.k[layer, :, first:first + n_sink] = kb[:, :n_sink]
            pool.v[layer, :, first:first + n_sink] = vb[:, :n_sink]
        blocks = list(range(max(first, last_full - pool.window_blocks), first + nb))
        if blocks:
            # Marked before the copy: an interrupted copy then reads as a stale slot (truncate repairs it).
            pool.ring_block[layer, np.array(blocks) % pool.ring] = blocks
            slots = torch.tensor([pool.ring_slot(b) for b in blocks], device=self.geo.device)
            pool.k[layer].index_copy_(1, slots, kb[:, blocks[0] - first:])
            pool.v[layer].index_copy_(1, slots, vb[:, blocks[0] - first:])

    def complete_block(self, b: int) -> None:
        """Decode: the step's token completed block b (in its ring slot): it joins store and index for
        all layers at once (a handful of launches, not a few per layer: this runs every block_size
        steps)."""
        pool = self.pool
        slot = pool.ring_slot(b)
        kb, vb = pool.k[:, :, slot, None], pool.v[:, :, slot, None]      # [L, Hkv, 1, bs, d]
        self._index(slice(None), b, kb, vb)
        self.store.fit_missing(kb)  # a conversation shorter than a block stores its first keys here
        kernels.store_blocks(self.store, b, slot, pool.k, pool.v)
        self.store.mark_written()  # the writes run on this stream; host readers of the store wait for them
        if b < pool.n_sink:
            pool.k[:, :, b] = kb[:, :, 0]
            pool.v[:, :, b] = vb[:, :, 0]
        if self.clusters:
            for layer in range(self.geo.layers):
                self.clusters.cluster_pending(layer, b + 1)

    def layer_kv(self, layer: int, P: int, stored: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The layer's K,V of tokens 0..P-1 on the compute device as [P, Hkv, d]: `stored` blocks from
        the store, the rest from the ring (during a decode step the block its token completes is
        only in the ring until after the step)."""
        self.store.wait_host()
        nb, tail = divmod(P, self.bs)
        ks, vs = read_blocks(self.store, layer, 0, stored, self.geo.device)
        d = ks.shape[-1]
        parts_k = [ks.reshape(self.H, stored * self.bs, d)]
        parts_v = [vs.reshape(self.H, stored * self.bs, d)]
        for b in range(stored, nb + 1):
            rk, rv = self.ring(layer, b)
            n = self.bs if b < nb else tail
            parts_k.append(rk[:, :n])
            parts_v.append(rv[:, :n])
        return torch.cat(parts_k, 1).transpose(0, 1), torch.cat(parts_v, 1).transpose(0, 1)

    def repair_ring(self, length: int) -> None:
        """After a truncation, reload window and tail blocks that the ring no longer holds."""
        self.store.wait_host()
        pool, n_full = self.pool, length // self.bs
        first = max(min(pool.n_sink, n_full), n_full - pool.window_blocks)
        for layer in range(self.geo.layers):
            for b in range(first, n_full + 1):
                if pool.ring_block[layer, b % pool.ring] != b:
                    ks, vs = read_blocks(self.store, layer, b, 1)
                    rk, rv = self.ring(layer, b)
                    rk.copy_(ks[:, 0])
                    rv.copy_(vs[:, 0])
                    pool.ring_block[layer, b % pool.ring] = b
