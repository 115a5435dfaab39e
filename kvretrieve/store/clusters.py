"""Clustered storage for indexes that reorder (ivf): which stored segments are in cluster order.

Segments outside sinks and window are stored in cluster order: per layer and KV head a permutation
of the segment's tokens, so that a block is one cluster. The layout keeps, per layer, the first
block not yet clustered (natural_from) and the clustered segments with their permutations (on the
host), which is what gives the tokens past a truncation back in natural order.
Prefill segments are clustered on the device before their one trip to the store; blocks that leave
the window during decode are clustered from the store every 64 blocks.
"""
from __future__ import annotations

import time
from typing import Callable

import torch

from ..config import KVGeometry
from ..engine.interrupts import interrupts_deferred
from .kv_store import KVStore
from .reads import read_blocks

# replace(layer, first block, k, v [Hkv, nb, bs, d]): store and index these blocks in place of what
# blocks first.. held, and drop cached copies of the old contents.
ReplaceBlocks = Callable[[int, int, torch.Tensor, torch.Tensor], None]


class ClusterLayout:
    def __init__(self, geo: KVGeometry, store: KVStore, cluster_order: Callable[[torch.Tensor], torch.Tensor],
                 replace: ReplaceBlocks, cluster_tokens: int, sink_blocks: int, window_blocks: int):
        """cluster_order(keys [B, n, d]) -> perm [B, n]: the index's k-means order of B point sets."""
        self.geo, self.store, self.order, self.replace = geo, store, cluster_order, replace
        self.seg_blocks, self.n_sink, self.window_blocks = cluster_tokens // geo.block_size, sink_blocks, window_blocks
        self.natural_from = [sink_blocks] * geo.layers
        # Per layer: (first block, blocks, perm [Hkv, tokens] on the host, where the pass that made it began).
        self.segments: list[list[tuple[int, int, torch.Tensor, int]]] = [[] for _ in range(geo.layers)]
        self.build_s = 0.0  # seconds spent clustering (the index build time profile reports)
        self.pass_start = 0  # the cache length where the forward pass in progress began

    def state(self) -> dict[str, torch.Tensor]:
        """What a saved prefill keeps: natural_from, and per layer each clustered segment's
        (first block, blocks, pass start) and permutation."""
        out = {"natural_from": torch.tensor(self.natural_from)}
        for layer, segs in enumerate(self.segments):
            for i, (first, nb, perm, since) in enumerate(segs):
                out[f"{layer}.{i}"] = torch.tensor([first, nb, since])
                out[f"{layer}.{i}.perm"] = perm
        return out

    def load_state(self, state: dict[str, torch.Tensor]) -> None:
        self.natural_from = state["natural_from"].tolist()
        for layer in range(self.geo.layers):
            self.segments[layer] = []
            while (meta := state.get(f"{layer}.{len(self.segments[layer])}")) is not None:
                first, nb, since = meta.tolist()
                self.segments[layer].append((first, nb, state[f"{layer}.{len(self.segments[layer])}.perm"], since))

    def clear(self) -> None:
        """Nothing is clustered (an empty cache)."""
        self.natural_from = [self.n_sink] * self.geo.layers
        self.segments = [[] for _ in range(self.geo.layers)]

    def begin_pass(self, start: int) -> None:
        self.pass_start = start

    def groups(self, layer: int, n_full: int):
        """The natural-order blocks that left the window, as batches (first block, blocks per
        segment, segments) of cluster_tokens-sized segments; a remainder under 64 blocks waits (it
        stays selectable, scored as natural blocks). The caller advances natural_from once a batch
        is recorded."""
        start, end = self.natural_from[layer], n_full - self.window_blocks
        group = max(1, 8 // self.geo.kv_heads)  # segments clustered in one batch (bounds the k-means temporaries)
        while end - start >= 64:
            nb = min(self.seg_blocks, end - start)
            n_seg = max(1, min(group, (end - start) // nb))
            yield start, nb, n_seg
            start += nb * n_seg

    def cluster_pending(self, layer: int, n_full: int) -> None:
        """Cluster what left the window, reading the blocks back from the store (decode, or blocks
        stored before this prefill segment)."""
        t0 = time.perf_counter()
        groups = list(self.groups(layer, n_full))
        for first, nb, n_seg in groups:
            self._recluster(layer, first, nb, n_seg)
        if groups:
            self.store.wait_host()
            self.build_s += time.perf_counter() - t0

    def cluster_on_device(self, layer: int, k: torch.Tensor, b0: int, n_full: int) -> list:
        """Prefill: cluster the segments of k [tokens from block b0, Hkv, d] before they are stored
        once (no read-back from CPU memory). Returns [(first block, blocks, perm [Hkv, tokens] on the
        device)]; k itself is left as it is (the caller's tensor)."""
        if self.natural_from[layer] < b0:
            return []
        groups = list(self.groups(layer, n_full))
        if not groups:
            return []
        if k.is_cuda:  # so the build time below is not the attention still running
            torch.cuda.synchronize(k.device)
        t0, bs, out = time.perf_counter(), self.geo.block_size, []
        for first, nb, n_seg in groups:
            rows = slice((first - b0) * bs, (first - b0 + nb * n_seg) * bs)
            perm = self.order(k[rows].transpose(0, 1).reshape(self.geo.kv_heads * n_seg, nb * bs, -1))
            host = perm.cpu()
            for i in range(n_seg):
                self.segments[layer].append((first + i * nb, nb, host[i::n_seg], self.pass_start))
                out.append((first + i * nb, nb, perm[i::n_seg]))
            # Recorded before the store has them: a rollback restores these blocks, past the committed
            # length, from whatever the store holds, which is harmless.
            self.natural_from[layer] = first + nb * n_seg
        self.build_s += time.perf_counter() - t0  # perm.cpu() synchronised: the work is done
        return out

    def truncate(self, length: int) -> None:
        """A truncation to `length` tokens: the window and tail must be in natural order again."""
        n_full = length // self.geo.block_size
        keep = max(min(self.n_sink, n_full), n_full - self.window_blocks)
        for layer in range(self.geo.layers):
            self._end_segments_at(layer, keep, length)
            self.natural_from[layer] = min(self.natural_from[layer], max(self.n_sink, keep))

    def _read(self, layer: int, first: int, nb: int, n_seg: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        """n_seg segments of nb blocks from `first`, as k, v [Hkv x n_seg, nb * bs, d] on the device."""
        self.store.wait_host()
        ks, vs = read_blocks(self.store, layer, first, nb * n_seg)
        shape = (-1, nb * self.geo.block_size, self.geo.head_dim)
        return ks.to(self.geo.device).reshape(shape), vs.to(self.geo.device).reshape(shape)

    def _recluster(self, layer: int, first: int, nb: int, n_seg: int = 1) -> None:
        """Cluster n_seg consecutive segments of nb blocks from `first` (one batched k-means)."""
        ks, vs = self._read(layer, first, nb, n_seg)                           # [Hkv x segments, tokens, d]
        perm = self.order(ks)
        host = perm.cpu()
        with interrupts_deferred():  # the store in cluster order and its record go together
            for i in range(n_seg):
                part = slice(i, None, n_seg)  # segment i of every head
                self._rewrite(layer, first + i * nb, ks[part], vs[part], perm[part])
                self.segments[layer].append((first + i * nb, nb, host[part], self.pass_start))
            self.natural_from[layer] = first + nb * n_seg

    def _rewrite(self, layer: int, first: int, ks: torch.Tensor, vs: torch.Tensor, perm: torch.Tensor) -> None:
        """Store blocks first.. as ks, vs [Hkv, tokens, d] taken in the order perm [Hkv, tokens]."""
        idx = perm.to(ks.device)[..., None].expand(-1, -1, ks.shape[-1])
        shape = (self.geo.kv_heads, -1, self.geo.block_size, ks.shape[-1])
        self.replace(layer, first, torch.gather(ks, 1, idx).reshape(shape), torch.gather(vs, 1, idx).reshape(shape))

    def _end_segments_at(self, layer: int, block: int, length: int) -> None:
        """Clustered segments end at `block`. One that a pass undone by this truncation made goes back
        to natural order whole, so the layout is the one from before that pass (a rolled-back or
        redone pass then gives what it gave the first time). One made by a pass that the truncation
        only shortens keeps its other tokens in cluster order, in fewer blocks, and gives the tokens
        of blocks block.. back in natural order.

        Putting such a segment back whole instead made the blocks it left out of the window be
        clustered again, a k-means per layer: a chat's follow-up question truncates the cache by a
        token (the prompt's last token merges with the question's first), and where that crosses a
        block boundary the follow-up of a 7.5K-token document took 7.8 s (7.2 s of k-means) instead
        of 0.62 s (SmolLM2, 2-core CPU; lowrank: 0.35 s)."""
        segments, bs = self.segments[layer], self.geo.block_size
        while segments and segments[-1][0] + segments[-1][1] > block:
            first, nb, perm, since = segments[-1]
            kept = max(0, block - first) * bs if since < length else 0  # tokens that stay clustered
            stays = perm < kept                                  # [Hkv, tokens]: by storage slot
            slots = torch.arange(nb * bs).expand_as(perm)
            # Storage after the rewrite: the staying tokens in their cluster order, then the others
            # in natural order (where the inverse permutation finds them).
            order = torch.cat([slots[stays].view(perm.shape[0], -1), perm.argsort(1)[:, kept:]], 1)
            ks, vs = self._read(layer, first, nb)
            with interrupts_deferred():
                self._rewrite(layer, first, ks, vs, order)
                segments.pop()
                if kept:
                    segments.append((first, kept // bs, perm[stays].view(perm.shape[0], -1), since))
                self.natural_from[layer] = first + kept // bs
