"""The retrieval attention backend: full KV in CPU memory, sparse attention on the compute device.

Prefill (a segment of T tokens at position P): dense causal attention over the segment (plus, for
P > 0, the earlier tokens brought back from the store), then the segment's full blocks go to the
CPU store (D2H on a side stream) and to the index; sinks and the recent window go to pool slots.
Decode (one token): the token joins the tail block in its ring slot, the index picks budget blocks
per KV head among those outside sinks and window, the pool resolves them (misses are read straight
from the store by a kernel), and one sparse kernel attends over sinks + selected + window + tail.
All of it runs on the device; when the tail block is full it goes to store and index after the step.
"""
from __future__ import annotations

from collections import Counter

import numpy as np
import torch

from ..config import RetrievalConfig
from ..index import choose_index, make_index
from ..models.llama import Decoder
from .dense import causal_attention
from .gpu_cache import BlockPool
from .kv_store import KVStore
from .clustering import ClusteredSegments
from .sparse_step import SparseStep


class RetrievalKV(ClusteredSegments, SparseStep):
    def __init__(self, cfg: RetrievalConfig, model: Decoder, capacity: int, append_chunk_blocks: int = 512):
        mc, device, dtype = model.cfg, model.device, model.dtype
        max_blocks = -(-capacity // cfg.block_size) + 1
        cfg = choose_index(cfg, mc.num_layers, mc.num_kv_heads, max_blocks, device, dtype)  # before any allocation
        self.cfg, self.model, self.capacity, self.device = cfg, model, capacity, device
        self.bs, self.L, self.H = cfg.block_size, mc.num_layers, mc.num_kv_heads
        self.scale = mc.head_dim ** -0.5
        cuda = device.type == "cuda"
        self.store = KVStore(self.L, self.H, mc.head_dim, self.bs, max_blocks * self.bs, dtype, pin=cuda,
                             device=device, quantize=cfg.quantized_store(device))
        self.index = make_index(cfg, self.L, self.H, mc.head_dim, max_blocks, device, dtype)
        self.pool = BlockPool(cfg, self.L, self.H, mc.head_dim, max_blocks, device, dtype)
        if cuda:
            # Pinning runs at ~1 GiB/s (9 GiB for 128K tokens of the 8B shape with the int8 store) and
            # slows the thread that launches kernels: begin it now, on a thread, so it overlaps the
            # rest of loading and the wait for a prompt instead of the first prefill. A context
            # that cannot fit in RAM is refused here, before any prefill; one whose index or pool
            # cannot fit on the device was refused just above, before any pinning.
            self.store.ensure(self.store.max_blocks, background=True)
        self.d2h = torch.cuda.Stream(device) if cuda else None
        self._d2h_done: torch.cuda.Event | None = None
        # Per-step decode state on the device, written in place between steps (a captured graph
        # reads these very tensors): position, tail length, LRU time stamp, the slot tables.
        self._tables = torch.empty(self.L, self.H, self.pool.columns, dtype=torch.int32, device=device)
        self._pos = torch.zeros(1, dtype=torch.int64, device=device)
        self._tail_len = torch.zeros(1, dtype=torch.int32, device=device)
        self._stamp = torch.zeros(1, dtype=torch.int32, device=device)
        self._spec_counts = torch.zeros(2, dtype=torch.int64, device=device)   # speculated hits, total
        self._side = torch.cuda.Stream(device) if cuda and cfg.speculative else None
        self._spec_ready: dict[int, torch.cuda.Event] = {}
        self.length, self._start, self._n, self._step = 0, 0, 0, 0
        self._spec: dict[int, torch.Tensor] = {}
        # The last selection per layer (block ids, pool slots), reused for reselect_every steps.
        self._sel_ids = torch.zeros(self.L, self.H, cfg.budget_blocks, dtype=torch.int64, device=device)
        self._sel_slots = torch.full((self.L, self.H, cfg.budget_blocks), -1, dtype=torch.int32, device=device)
        self._sel_k: int | None = None   # its width; None: the next step selects afresh
        self._since, self._reselect, self._prologue_ran = 0, True, False
        self._open = False               # a forward pass has begun and not committed
        self._seg_kv = None  # (k, v of the segment, all keys and values so far) while a layer prefills
        self._window, self._budget = cfg.window_blocks, cfg.budget_blocks  # in effect this step
        # Clustering indexes (ivf) store segments outside sinks and window in cluster order. Per
        # layer: the first block not yet clustered, and the clustered segments (first block, number
        # of blocks, permutation [Hkv, tokens]) kept on the host to restore natural order.
        self._reorders = getattr(self.index, "reorders", False)
        self._natural_from = [self.pool.n_sink] * self.L
        self._segments: list[list[tuple[int, int, torch.Tensor]]] = [[] for _ in range(self.L)]
        self._rope = None
        self.stats: Counter = Counter()
        # observer(layer, q [Hq, d], selected block ids [Hkv, k], lo, hi, n_tokens, out [Hq, d]) is
        # called after each decode attention when set: bench/accuracy.py measures recall with it.
        # Attended: tokens [0, lo*bs) (sinks), the selected blocks, and [hi*bs, n_tokens) (window).
        self.observer = None
        self._append_blocks = append_chunk_blocks  # bounds the temporaries when a long segment is stored

    # ---- engine protocol -------------------------------------------------------------------------
    def begin(self, start: int, n: int) -> None:
        if self._open:  # a rollback was itself cut short: finish it first
            self.truncate(start)
        self._start, self._n, self._open = start, n, True
        # Refuses with a clear error before the RAM runs out; a long prefill pins memory in the background.
        self.store.ensure(-(-(start + n) // self.bs), background=n > 1)
        if self.decoding:
            self._begin_decode(start)

    def commit(self, length: int) -> None:
        if not self.decoding:
            self._sel_k = None
        if self.decoding and length % self.bs == 0:
            self._end_decode(length)
        self.length = length
        self._spec.clear()
        self._spec_ready.clear()
        self._open = False  # last: a commit cut short is rolled back like the pass it ends

    def truncate(self, length: int) -> None:
        """Forget tokens from `length` on; after a pass that did not commit (an exception or Ctrl-C
        between layers), also what its layers wrote past the committed length."""
        if length >= self.length and not self._open:
            return
        if self._open:
            # The pass may have claimed pool slots for blocks it had not fetched yet (lookup marks a
            # slot before the copy fills it), for blocks below `length` too: start the cache cold.
            self.pool.forget_cached()
        self.length = length = min(length, self.length)
        self._sel_k = None
        n_full = length // self.bs
        if self._reorders:  # window and tail must be in natural order again
            keep = max(min(self.pool.n_sink, n_full), n_full - self.pool.window_blocks)
            for layer in range(self.L):
                self._decluster_from(layer, keep)
                self._natural_from[layer] = min(self._natural_from[layer], max(self.pool.n_sink, keep))
        self.pool.forget_from(n_full)
        if length:
            self._repair_ring(length)
        self._open = False  # last: until here, the next begin redoes this truncation

    def drop_decode_memory(self) -> None:
        """With an empty cache and no captured graph: give back what decode steps allocate (the pool's
        LRU region), so a following prefill has it."""
        self.pool.drop_lru()

    @property
    def decoding(self) -> bool:
        return self._n == 1 and self._start > 0

    def __call__(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        if self.decoding:
            return self._decode(layer, q, k, v)
        self.begin_layer(layer, k, v)
        out = self.attend(layer, q, 0)
        self.end_layer(layer)
        return out

    def begin_layer(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """A segment's k, v for this layer. Attention needs all keys so far on the device: for a
        continuation (P > 0) the earlier ones come back from the store, once per layer."""
        P = self._start
        if P == 0:
            self.index.fit(layer, k)
            self._seg_kv = (k, v, k, v)
        else:
            pk, pv = self.layer_kv(layer, P)
            self._seg_kv = (k, v, torch.cat([pk, k]), torch.cat([pv, v]))

    def attend(self, layer: int, q: torch.Tensor, offset: int) -> torch.Tensor:
        _, _, keys, values = self._seg_kv
        e = self._start + offset + q.shape[0]
        return causal_attention(q, keys[:e], values[:e], self._start + offset, self.scale)

    def end_layer(self, layer: int) -> None:
        k, v, _, _ = self._seg_kv
        self._seg_kv = None
        P = self._start
        self._append(layer, k, v, P)
        if self._reorders:
            self._cluster_pending(layer, (P + k.shape[0]) // self.bs)

    # ---- prefill ---------------------------------------------------------------------------------
    def _ring(self, layer: int, block: int) -> tuple[torch.Tensor, torch.Tensor]:
        slot = self.pool.ring_slot(block)
        return self.pool.k[layer, :, slot], self.pool.v[layer, :, slot]     # [Hkv, bs, d]

    def layer_kv(self, layer: int, P: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The layer's K,V of tokens 0..P-1 on the compute device, as [P, Hkv, d] (all of them: for
        a continuation prefill, and for measuring what the sparse path leaves out)."""
        self._sync_d2h()
        nb, tail = divmod(P, self.bs)
        # During a decode step the block its token completes is still only in the ring (the store
        # gets it after the step).
        stored = min(nb, self._start // self.bs) if self.decoding else nb
        ks, vs = self.store.read(layer, 0, stored, self.device)
        d = ks.shape[-1]
        parts_k = [ks.reshape(self.H, stored * self.bs, d)]
        parts_v = [vs.reshape(self.H, stored * self.bs, d)]
        for b in range(stored, nb + 1):
            rk, rv = self._ring(layer, b)
            n = self.bs if b < nb else tail
            parts_k.append(rk[:, :n])
            parts_v.append(rv[:, :n])
        return torch.cat(parts_k, 1).transpose(0, 1), torch.cat(parts_v, 1).transpose(0, 1)

    def _append(self, layer: int, k: torch.Tensor, v: torch.Tensor, P: int) -> None:
        """Add tokens P.. (k, v [T, Hkv, d]) to store, index, sinks, ring and tail."""
        b0, off = divmod(P, self.bs)
        if off:  # complete the current tail block first: its first tokens live in its ring slot
            rk, rv = self._ring(layer, b0)
            k = torch.cat([rk[:, :off].transpose(0, 1), k])
            v = torch.cat([rv[:, :off].transpose(0, 1), v])
        full, rest = divmod(k.shape[0], self.bs)
        clustered = []
        if self._reorders and self._natural_from[layer] >= b0:
            clustered = self._cluster_on_device(layer, k, b0, b0 + full)
        for rel, nb, perm in self._pieces(full, b0, clustered):  # bounded temporaries for long prompts
            rows = slice(rel * self.bs, (rel + nb) * self.bs)
            if perm is None:
                kb = k[rows].view(nb, self.bs, self.H, -1).permute(2, 0, 1, 3).contiguous()  # [Hkv, nb, bs, d]
                vb = v[rows].view(nb, self.bs, self.H, -1).permute(2, 0, 1, 3).contiguous()
            else:  # a clustered segment: each head's tokens in its cluster order
                idx = perm[..., None].expand(-1, -1, k.shape[-1])
                kb = torch.gather(k[rows].transpose(0, 1), 1, idx).view(self.H, nb, self.bs, -1)
                vb = torch.gather(v[rows].transpose(0, 1), 1, idx).view(self.H, nb, self.bs, -1)
            self._place_blocks(layer, b0 + rel, kb, vb, last_full=b0 + full)
        tail = b0 + full
        self.pool.ring_block[layer, tail % self.pool.ring] = tail
        rk, rv = self._ring(layer, tail)
        rk[:, :rest] = k[full * self.bs:].transpose(0, 1)
        rv[:, :rest] = v[full * self.bs:].transpose(0, 1)

    def _place_blocks(self, layer: int, first: int, kb: torch.Tensor, vb: torch.Tensor, last_full: int) -> None:
        """Full blocks first.. (kb, vb [Hkv, nb, bs, d]) go to store and index; those among the sinks
        or the window of a context of last_full full blocks also go to their pool slots."""
        self._store_blocks(layer, first, kb, vb)
        nb = kb.shape[1]
        n_sink = min(self.pool.n_sink, first + nb) - first
        if n_sink > 0:
            self.pool.k[layer, :, first:first + n_sink] = kb[:, :n_sink]
            self.pool.v[layer, :, first:first + n_sink] = vb[:, :n_sink]
        blocks = list(range(max(first, last_full - self.pool.window_blocks), first + nb))
        if blocks:
            # Marked before the copy: an interrupted copy then reads as a stale slot (truncate repairs it).
            self.pool.ring_block[layer, np.array(blocks) % self.pool.ring] = blocks
            slots = torch.tensor([self.pool.ring_slot(b) for b in blocks], device=self.device)
            self.pool.k[layer].index_copy_(1, slots, kb[:, blocks[0] - first:])
            self.pool.v[layer].index_copy_(1, slots, vb[:, blocks[0] - first:])

    def _store_blocks(self, layer: int, first: int, kb: torch.Tensor, vb: torch.Tensor) -> None:
        """Full blocks kb, vb [Hkv, nb, bs, d] -> index (on the device) and CPU store (async D2H)."""
        self.index.add(layer, first, kb, vb)
        if self.d2h is None:
            self.store.write(layer, first, kb, vb)
            return
        self.d2h.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self.d2h):
            self.store.write(layer, first, kb, vb)
            kb.record_stream(self.d2h)  # keep the source alive until the copy has read it
            vb.record_stream(self.d2h)
            self._d2h_done = torch.cuda.Event()
            self._d2h_done.record(self.d2h)

    def _sync_d2h(self) -> None:
        """The host is about to read the store: blocks written by D2H copies must have landed."""
        if self._d2h_done is not None:
            self._d2h_done.synchronize()

    def _repair_ring(self, length: int) -> None:
        """After a truncation, reload window and tail blocks that the ring no longer holds."""
        self._sync_d2h()
        n_full = length // self.bs
        first = max(min(self.pool.n_sink, n_full), n_full - self.pool.window_blocks)
        for layer in range(self.L):
            for b in range(first, n_full + 1):
                if self.pool.ring_block[layer, b % self.pool.ring] != b:
                    ks, vs = self.store.read(layer, b, 1)
                    rk, rv = self._ring(layer, b)
                    rk.copy_(ks[:, 0])
                    rv.copy_(vs[:, 0])
                    self.pool.ring_block[layer, b % self.pool.ring] = b

    # ---- accounting ------------------------------------------------------------------------------
    def memory(self) -> dict[str, int]:
        return {"store": self.store.nbytes(), "pool": self.pool.nbytes(), "index": self.index.nbytes()}

    def counters(self) -> dict[str, float]:
        hits, misses = self.pool.counts.tolist()
        fetched = misses + self.pool.spec_counts[1].item()  # every miss is one block read from the store
        spec_hits, spec_total = self._spec_counts.tolist()
        block_bytes = self.store.bytes_per_block // (self.L * self.H)  # K and V of one head (int8: with scales)
        return {"hits": hits, "misses": misses, "h2d_bytes": fetched * block_bytes,
                "spec_hits": spec_hits, "spec_total": spec_total, **self.stats}
