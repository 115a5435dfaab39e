"""Clustered storage for indexes that reorder (ivf), as a mixin of the retrieval backend.

Segments outside sinks and window are stored in cluster order: per layer and KV head a permutation
of the segment's tokens, so that a block is one cluster. The backend keeps, per layer, the first
block not yet clustered (_natural_from) and the clustered segments with their permutations (on the
host), which is what puts a segment back in natural order when a truncation reaches into it.
Prefill segments are clustered on the device before their one trip to the store; blocks that leave
the window during decode are clustered from the store every 64 blocks.
"""
from __future__ import annotations

import time

import torch

from .interrupts import interrupts_deferred


class ClusteredSegments:
    def _cluster_groups(self, layer: int, n_full: int):
        """The natural-order blocks that left the window, as batches (first block, blocks per
        segment, segments) of cluster_tokens-sized segments; a remainder under 64 blocks waits (it
        stays selectable, scored as natural blocks). The caller advances natural_from once a batch
        is recorded."""
        seg, start = self.cfg.cluster_tokens // self.bs, self._natural_from[layer]
        end = n_full - self.pool.window_blocks
        group = max(1, 8 // self.H)  # segments clustered in one batch (bounds the k-means temporaries)
        while end - start >= 64:
            nb = min(seg, end - start)
            n_seg = max(1, min(group, (end - start) // nb))
            yield start, nb, n_seg
            start += nb * n_seg

    def _cluster_pending(self, layer: int, n_full: int) -> None:
        """Cluster what left the window, reading the blocks back from the store (decode, or blocks
        stored before this prefill segment)."""
        t0 = time.perf_counter()
        groups = list(self._cluster_groups(layer, n_full))
        for first, nb, n_seg in groups:
            self._recluster(layer, first, nb, n_seg)
        if groups:
            self._sync_d2h()
            self.stats["cluster_s"] += time.perf_counter() - t0  # index build time (profile reports it)

    def _pieces(self, full: int, b0: int, clustered: list):
        """Split blocks [0, full) of a segment (relative to b0) into pieces to store: the clustered
        segments (with their permutation) and natural runs of at most append_chunk_blocks between."""
        cursor = 0
        for first, nb, perm in clustered + [(b0 + full, 0, None)]:
            for c0 in range(cursor, first - b0, self._append_blocks):
                yield c0, min(self._append_blocks, first - b0 - c0), None
            if nb:
                yield first - b0, nb, perm
            cursor = first - b0 + nb

    def _cluster_on_device(self, layer: int, k: torch.Tensor, b0: int, n_full: int) -> list:
        """Prefill: cluster the segments of k [tokens from block b0, Hkv, d] before they are stored
        once (no read-back from CPU memory). Returns [(first block, blocks, perm [Hkv, tokens] on the
        device)]; k itself is left as it is (the caller's tensor)."""
        groups = list(self._cluster_groups(layer, n_full))
        if not groups:
            return []
        if self.d2h is not None:  # so the build time below is not the attention still running
            torch.cuda.synchronize(self.device)
        t0 = time.perf_counter()
        out = []
        for first, nb, n_seg in groups:
            rows = slice((first - b0) * self.bs, (first - b0 + nb * n_seg) * self.bs)
            perm = self.index.cluster_order(k[rows].transpose(0, 1).reshape(self.H * n_seg, nb * self.bs, -1))
            host = perm.cpu()
            for i in range(n_seg):
                self._segments[layer].append((first + i * nb, nb, host[i::n_seg]))
                out.append((first + i * nb, nb, perm[i::n_seg]))
            # Recorded before the store has them: a rollback restores these blocks, past the committed
            # length, from whatever the store holds, which is harmless.
            self._natural_from[layer] = first + nb * n_seg
        self.stats["cluster_s"] += time.perf_counter() - t0  # perm.cpu() synchronised: work is done
        return out

    def _recluster(self, layer: int, first: int, nb: int, n_seg: int = 1) -> None:
        """Cluster n_seg consecutive segments of nb blocks from `first` (one batched k-means)."""
        self._sync_d2h()
        ks, vs = self.store.read(layer, first, nb * n_seg)
        ks = ks.to(self.device).reshape(self.H * n_seg, nb * self.bs, -1)        # [Hkv x segments, tokens, d]
        vs = vs.to(self.device).reshape(self.H * n_seg, nb * self.bs, -1)
        perm = self.index.cluster_order(ks)
        host = perm.cpu()
        with interrupts_deferred():  # the store in cluster order and its record go together
            for i in range(n_seg):
                part = slice(i, None, n_seg)  # segment i of every head
                self._rewrite(layer, first + i * nb, ks[part], vs[part], perm[part])
                self._segments[layer].append((first + i * nb, nb, host[part]))
            self._natural_from[layer] = first + nb * n_seg

    def _rewrite(self, layer: int, first: int, ks: torch.Tensor, vs: torch.Tensor, perm: torch.Tensor) -> None:
        """Store blocks first.. as ks, vs [Hkv, tokens, d] taken in the order perm [Hkv, tokens]."""
        idx = perm.to(ks.device)[..., None].expand(-1, -1, ks.shape[-1])
        shape = (self.H, -1, self.bs, ks.shape[-1])
        kb = torch.gather(ks, 1, idx).reshape(shape)
        vb = torch.gather(vs, 1, idx).reshape(shape)
        self._store_blocks(layer, first, kb, vb)
        self.pool.forget_range(layer, first, first + kb.shape[1])

    def _decluster_from(self, layer: int, block: int) -> None:
        """Put every clustered segment reaching past `block` back in natural order."""
        segments = self._segments[layer]
        while segments and segments[-1][0] + segments[-1][1] > block:
            first, nb, perm = segments[-1]
            self._sync_d2h()
            ks, vs = self.store.read(layer, first, nb)
            ks = ks.to(self.device).reshape(self.H, nb * self.bs, -1)
            vs = vs.to(self.device).reshape(self.H, nb * self.bs, -1)
            with interrupts_deferred():
                self._rewrite(layer, first, ks, vs, perm.argsort(1))               # the inverse permutation
                segments.pop()
                self._natural_from[layer] = first
