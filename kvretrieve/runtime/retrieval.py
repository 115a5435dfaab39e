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

from .. import kernels
from ..config import RetrievalConfig
from ..index import make_index
from ..models.llama import Decoder, rms_norm
from .dense import causal_attention
from .gpu_cache import BlockPool
from .kv_store import KVStore
from .clustering import ClusteredSegments


class RetrievalKV(ClusteredSegments):
    def __init__(self, cfg: RetrievalConfig, model: Decoder, capacity: int, append_chunk_blocks: int = 512):
        mc, device, dtype = model.cfg, model.device, model.dtype
        self.cfg, self.model, self.capacity, self.device = cfg, model, capacity, device
        self.bs, self.L, self.H = cfg.block_size, mc.num_layers, mc.num_kv_heads
        self.scale = mc.head_dim ** -0.5
        max_blocks = -(-capacity // self.bs) + 1
        cuda = device.type == "cuda"
        self.store = KVStore(self.L, self.H, mc.head_dim, self.bs, max_blocks * self.bs, dtype, pin=cuda,
                             device=device)
        self.index = make_index(cfg, self.L, self.H, mc.head_dim, max_blocks, device, dtype)
        self.pool = BlockPool(cfg, self.L, self.H, mc.head_dim, max_blocks, device, dtype)
        self.d2h = torch.cuda.Stream(device) if cuda else None
        self._d2h_done: torch.cuda.Event | None = None
        # Per-step decode state on the device, written in place between steps (a captured graph
        # reads these very tensors): position, tail length, LRU time stamp, the slot tables.
        self._tables = torch.empty(self.L, self.H, self.pool.columns, dtype=torch.int32, device=device)
        self._pos = torch.zeros(1, dtype=torch.int64, device=device)
        self._tail_len = torch.zeros(1, dtype=torch.int32, device=device)
        self._stamp = torch.zeros(1, dtype=torch.int32, device=device)
        self._spec_counts = torch.zeros(2, dtype=torch.int64, device=device)   # speculated hits, total
        self._fetched = torch.zeros(1, dtype=torch.int64, device=device)       # blocks read from the store
        self.length, self._start, self._n, self._step = 0, 0, 0, 0
        self._spec: dict[int, torch.Tensor] = {}
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
        self._start, self._n = start, n
        self.store.ensure(-(-(start + n) // self.bs))  # refuses with a clear error before the RAM runs out
        if self.decoding:
            self._begin_decode(start)

    def commit(self, length: int) -> None:
        if self.decoding and length % self.bs == 0:
            self._end_decode(length)
        self.length = length
        self._spec.clear()

    def truncate(self, length: int) -> None:
        if length >= self.length:
            return
        self.length = length
        n_full = length // self.bs
        if self._reorders:  # window and tail must be in natural order again
            keep = max(min(self.pool.n_sink, n_full), n_full - self.pool.window_blocks)
            for layer in range(self.L):
                self._decluster_from(layer, keep)
                self._natural_from[layer] = min(self._natural_from[layer], max(self.pool.n_sink, keep))
        self.pool.forget_from(n_full)
        if length:
            self._repair_ring(length)

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
        ks, vs = self.store.read(layer, 0, nb)
        ks = ks.to(self.device, non_blocking=True).reshape(self.H, nb * self.bs, -1)
        vs = vs.to(self.device, non_blocking=True).reshape(self.H, nb * self.bs, -1)
        rk, rv = self._ring(layer, nb)
        return torch.cat([ks, rk[:, :tail]], 1).transpose(0, 1), torch.cat([vs, rv[:, :tail]], 1).transpose(0, 1)

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
        rk, rv = self._ring(layer, tail)
        rk[:, :rest] = k[full * self.bs:].transpose(0, 1)
        rv[:, :rest] = v[full * self.bs:].transpose(0, 1)
        self.pool.ring_block[layer, tail % self.pool.ring] = tail

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
            slots = torch.tensor([self.pool.ring_slot(b) for b in blocks], device=self.device)
            self.pool.k[layer].index_copy_(1, slots, kb[:, blocks[0] - first:])
            self.pool.v[layer].index_copy_(1, slots, vb[:, blocks[0] - first:])
            self.pool.ring_block[layer, np.array(blocks) % self.pool.ring] = blocks

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

    # ---- decode ----------------------------------------------------------------------------------
    # A decode step runs on the device alone: position, selection, LRU lookup, fetches and the slot
    # table are tensors, so the host never waits and the step can be captured as one CUDA graph
    # (graph_key). Host work happens between steps: begin() (plan, ring bookkeeping, store growth)
    # and commit() (a completed tail block goes to store and index).
    def graph_key(self):
        """What a captured decode step depends on, or None when the step must run eagerly (an
        observer watches it, the context is still too short for a full budget)."""
        if not self.decoding or self.observer is not None:
            return None
        n_done, lo, hi = self._candidates()
        if hi - lo < self._budget:
            return None
        return self._window, self._budget, self._estimate_blocks(hi - lo), self._score_blocks(n_done)

    def _estimate_blocks(self, candidates: int) -> int:
        return max(0, min(self.cfg.estimate_tokens // self.bs, candidates - self._budget))

    def _score_blocks(self, n_done: int) -> int:
        """Blocks scored per step: n_done rounded up to a power of two (candidates beyond the
        context are masked), so one captured graph serves many steps."""
        return min(self.pool.slot_of_block.shape[-1] - 1, max(64, 1 << max(0, n_done - 1).bit_length()))

    def _begin_decode(self, start: int) -> None:
        self._step += 1
        self._window, self._budget = self.cfg.plan(start + 1)
        self.pool.ensure_lru()
        b, off = divmod(start, self.bs)
        self.pool.ring_block[:, b % self.pool.ring] = b
        self._pos.fill_(start)
        self._tail_len.fill_(off + 1)  # the token's own block is the tail, even when this token completes it
        self._stamp.fill_(2 * self._step + 1)
        if self.d2h is not None and self._d2h_done is not None:
            # Blocks stored by D2H copies must have landed before a fetch reads them, and a ring slot
            # must not be overwritten while its old block is still being copied out.
            torch.cuda.current_stream(self.device).wait_event(self._d2h_done)

    def _end_decode(self, length: int) -> None:
        """The token at length - 1 completed its block: the block joins store and index."""
        b = length // self.bs - 1
        for layer in range(self.L):
            rk, rv = self._ring(layer, b)
            self._store_blocks(layer, b, rk[:, None], rv[:, None])
            if b < self.pool.n_sink:
                self.pool.k[layer, :, b] = rk
                self.pool.v[layer, :, b] = rv
            if self._reorders:
                self._cluster_pending(layer, b + 1)

    def _step_prologue(self) -> None:
        """Once per step, on the device: the slot table columns every layer shares, the candidate
        mask, and where the new token goes in its ring slot."""
        n_done = self._pos // self.bs
        fixed = self.pool.fixed_columns(self._pos, self._window)
        self._tables.copy_(fixed.expand_as(self._tables))
        n_score = self._score_blocks(self._start // self.bs)
        blocks = torch.arange(n_score, device=self.device)
        lo = torch.clamp(n_done, max=self.pool.n_sink)
        self._outside = (blocks < lo) | (blocks >= torch.maximum(lo, n_done - self._window))
        self._ring_row = (self.pool.n_sink + (self._pos // self.bs).remainder(self.pool.ring)) * self.bs \
            + self._pos.remainder(self.bs)
        if self.cfg.speculative:
            self._spec_rope = self.model.rope.cos_sin(self._pos, self.model.dtype, self._start + 1)

    def _decode(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        shape = (self.H, -1, self.pool.k.shape[-1])
        self.pool.k[layer].view(shape).index_copy_(1, self._ring_row, k.transpose(0, 1))
        self.pool.v[layer].view(shape).index_copy_(1, self._ring_row, v.transpose(0, 1))
        table = self._tables[layer]
        ids, estimated = self._select(layer, q[0], table)
        out, lse = kernels.sparse_decode(q[0], self.pool.k[layer], self.pool.v[layer], table, self._tail_len,
                                         self.scale)
        if estimated is not None:  # RetroInfer's estimation zone: more mass, no KV moved
            out_e, lse_e = self.index.estimate(layer, q[0], estimated, self.scale)
            out, _ = kernels.merge_attention(out, lse, out_e.to(out.dtype), lse_e)
        if self.observer is not None:
            _, lo, hi = self._candidates()
            self.observer(layer, q[0], ids, lo, hi, self._start + 1, out)
        return out[None]

    def _candidates(self) -> tuple[int, int, int]:
        """(n_done, lo, hi) of a decode step: n_done blocks precede the tail block (the new token's,
        in the ring even when the token completes it: it reaches the store after the step); blocks
        [lo, hi) are neither sinks nor in this step's window (ring blocks beyond the window are
        candidates too: the store has them)."""
        n_done = self._start // self.bs
        lo = min(self.pool.n_sink, n_done)
        return n_done, lo, max(lo, n_done - self._window)

    def _pick(self, layer: int, q: torch.Tensor, k: int, ranked: bool = False) -> torch.Tensor:
        """The k best candidate blocks [Hkv, k] of this layer for query q [Hq, d] (k <= candidates)."""
        scores = self.index.scores(layer, q, self._outside.shape[0]).masked_fill(self._outside, float("-inf"))
        return torch.topk(scores, k, dim=1, sorted=ranked).indices

    def _select(self, layer: int, q: torch.Tensor, table: torch.Tensor):
        """Pick, resolve and fetch this layer's blocks; their slots go into the table. Returns (block
        ids [Hkv, k], the estimation zone's block ids or None)."""
        _, lo, hi = self._candidates()
        k = min(self._budget, hi - lo)
        if k <= 0:
            return torch.empty(self.H, 0, dtype=torch.long, device=self.device), None
        z = self._estimate_blocks(hi - lo)
        ids = self._pick(layer, q, k + z, ranked=z > 0)
        estimated = ids[:, k:] if z > 0 else None
        ids = ids[:, :k]
        spec = self._spec.pop(layer, None)
        if spec is not None:  # how much of this selection the speculative prefetch already brought
            same = (ids[:, :, None] == spec[:, None, :]).any(-1).sum()
            self._spec_counts += torch.stack([same, torch.full_like(same, ids.numel())])
        slots, fetch = self.pool.lookup(layer, ids, self._stamp)
        self._fetched += fetch.sum()
        kernels.fetch_blocks(self.store, layer, ids, fetch, slots, self.pool.k[layer], self.pool.v[layer])
        table[:, self.pool.n_sink:self.pool.n_sink + k] = slots
        return ids, estimated

    def prepare_layer(self, layer: int, x: torch.Tensor) -> None:
        """Called before each layer. Decode: the step's shared device work before layer 0; with
        speculative prefetch (InfiniGen style), layer l's input through layer l+1's norm and q
        projection approximates layer l+1's query, whose blocks are fetched before layer l+1 asks."""
        if self.decoding and layer == 0:
            self._step_prologue()
        if not (self.cfg.speculative and self.decoding) or layer + 1 >= self.L:
            return
        _, lo, hi = self._candidates()
        k = min(self._budget, hi - lo)
        if k <= 0:
            return
        w = self.model.w.layers[layer + 1]
        q, _, _ = self.model.project_qkv(layer + 1, rms_norm(x, w.attn_norm, self.model.cfg.rms_eps), *self._spec_rope)
        ids = self._pick(layer + 1, q[0], k)
        self._spec[layer + 1] = ids
        slots, fetch = self.pool.lookup(layer + 1, ids, self._stamp - 1, count=False)
        self._fetched += fetch.sum()
        kernels.fetch_blocks(self.store, layer + 1, ids, fetch, slots, self.pool.k[layer + 1], self.pool.v[layer + 1])

    # ---- accounting ------------------------------------------------------------------------------
    def memory(self) -> dict[str, int]:
        return {"store": self.store.nbytes(), "pool": self.pool.nbytes(), "index": self.index.nbytes()}

    def counters(self) -> dict[str, float]:
        hits, misses = self.pool.counts.tolist()
        spec_hits, spec_total = self._spec_counts.tolist()
        block_bytes = 2 * self.bs * self.pool.k.shape[-1] * self.pool.k.element_size()  # K and V
        return {"hits": hits, "misses": misses, "h2d_bytes": self._fetched.item() * block_bytes,
                "spec_hits": spec_hits, "spec_total": spec_total, **self.stats}
