"""The retrieval attention backend: full KV in CPU memory, sparse attention on the compute device.

It is a composition along the data path:
  store      (store.KVStore)            every full block, in CPU memory (pinned on CUDA);
  index      (index.make_index)         scores blocks for a query;
  pool       (cache.BlockPool)          device slots: sinks, the window ring, an LRU of retrieved blocks;
  placement  (placement.BlockPlacement) where a segment's K,V go (store, index, sink and ring slots);
  plan       (decode_plan.DecodePlan)   one decode step's state: planned on the host, prologue on the device;
  selector   (selector.Selector)        per layer: scores -> top-k -> pool lookup -> fetch of the misses.
Prefill (a segment of T tokens at position P): dense causal attention over the segment (plus, for
P > 0, the earlier tokens brought back from the store); then the segment goes to placement.
Decode (one token): the token joins the tail block in its ring slot, the selector resolves this
layer's blocks, and one sparse kernel attends over sinks + selected + window + tail. All of it runs
on the device; when the tail block is full it goes to store and index after the step.
"""
from __future__ import annotations

from collections.abc import Mapping

import torch

from .. import kernels
from ..cache import BlockPool
from ..config import KVGeometry, RetrievalConfig
from ..errors import ConfigError
from ..files import store_dir
from ..index import BlockSummary, make_index
from ..store import KVStore
from ..store.saved import under
from .base import AttentionBackend, RowScoring
from .decode_plan import DecodePlan
from .placement import BlockPlacement
from .prefill_attention import PrefillAttention
from .rest_estimate import RestEstimate
from .selector import Selector


class RetrievalKV(AttentionBackend):
    def __init__(self, cfg: RetrievalConfig, geo: KVGeometry, capacity: int, append_chunk_blocks: int = 512):
        """cfg: resolved (kvretrieve.resolve.resolve_retrieval); geo: sized for `capacity` tokens;
        append_chunk_blocks bounds the temporaries when a long segment is stored."""
        if not cfg.resolved:
            raise ConfigError(f"RetrievalKV needs a resolved RetrievalConfig (no 'auto' left), got {cfg}")
        self.cfg, self.geo, self.capacity, self.length = cfg, geo, capacity, 0
        self.bs, self.L, self.H, self.scale = geo.block_size, geo.layers, geo.kv_heads, geo.head_dim ** -0.5
        self.store = KVStore(geo, quantize=cfg.store_dtype == "int8",
                             disk_dir=store_dir() if cfg.store == "disk" else None)
        self.index = make_index(cfg, geo)
        self.pool = BlockPool(cfg, geo)
        if geo.device.type == "cuda":
            # Pinning runs at ~1 GiB/s (9 GiB for 128K tokens of the 8B shape with the int8 store) and
            # slows the thread that launches kernels: begin it now, on a thread, so it overlaps the
            # rest of loading and the wait for a prompt instead of the first prefill. A context
            # that cannot fit in RAM is refused here, before any prefill; one whose index or pool
            # cannot fit on the device was refused just above, before any pinning.
            self.store.ensure(self.store.max_blocks, background=True)
        self.summary = (BlockSummary(geo, means=self.index.block_means, keys=self.index if cfg.rest_rank else None,
                                     rank=cfg.rest_rank) if cfg.estimate_tokens or cfg.estimate_rest else None)
        self.placement = BlockPlacement(cfg, geo, self.store, self.index, self.pool, self.summary, append_chunk_blocks)
        self.plan = DecodePlan(cfg, geo, self.pool)
        self.selector = Selector(cfg, self.index, self.pool, self.store, self.plan)
        self.rest = (RestEstimate(self.summary, self.plan, self.H, self.scale, geo.device)
                     if cfg.estimate_rest else None)
        self.prefill = PrefillAttention(self.scale)
        self._start, self._n, self._open = 0, 0, False   # the pass in progress; _open until it commits
        self._seg_kv = None  # (k, v of the segment, all keys and values so far) while a layer prefills
        self._chosen = None  # (block ids, estimate zone) of the layer between decode_select and decode_merge
        # observer(layer, q [Hq, d], selected block ids [Hkv, k], lo, hi, n_tokens, out [Hq, d]) is
        # called after each decode attention when set: bench/accuracy.py measures recall with it.
        # Attended: tokens [0, lo*bs) (sinks), the selected blocks, and [hi*bs, n_tokens) (window).
        self.observer = None

    @property
    def decoding(self) -> bool:
        return self._n == 1 and self._start > 0

    # ---- the pass protocol -----------------------------------------------------------------------
    def begin(self, start: int, n: int) -> None:
        if self._open:  # a rollback was itself cut short: finish it first
            self.truncate(start)
        self._start, self._n, self._open = start, n, True
        if self.placement.clusters:
            self.placement.clusters.begin_pass(start)
        # Refuses with a clear error before the RAM runs out; a long prefill pins memory in the background.
        self.store.ensure(-(-(start + n) // self.bs), background=n > 1)
        if self.decoding:
            self.pool.ensure_lru()
            self.store.sync_offsets()
            b = start // self.bs
            self.pool.ring_block[:, b % self.pool.ring] = b
            self.plan.plan(start)
            # Blocks stored by D2H copies must have landed before a fetch reads them, and a ring slot
            # must not be overwritten while its old block is still being copied out.
            self.store.wait_device()

    def commit(self, length: int) -> None:
        if not self.decoding:
            self.plan.forget_selection()
        elif length % self.bs == 0:
            self.placement.complete_block(length // self.bs - 1)
            if self.placement.clusters:
                self.plan.forget_selection()  # clustering may have moved blocks: select afresh
        self.length = length
        self.selector.end_step()
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
        self.plan.forget_selection()
        if self.placement.clusters:
            self.placement.clusters.truncate(length)
        self.pool.forget_from(length // self.bs)
        self.store.forget_from(length // self.bs)
        if length:
            self.placement.repair_ring(length)
        self._open = False  # last: until here, the next begin redoes this truncation

    def graph_key(self):
        """None while an observer watches the step (it runs host code), the step is no decode, or the
        store is not pinned (on disk: its fetches read the selection on the host)."""
        return self.plan.key() if self.decoding and self.observer is None and self.store.pin else None

    def prologue(self) -> None:
        if self.decoding:
            self.plan.prologue()

    def drop_decode_memory(self) -> None:
        """Give back the pool's LRU region (what decode steps add), so a following prefill has it."""
        self.pool.drop_lru()

    # ---- prefill ---------------------------------------------------------------------------------
    def begin_layer(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """A segment's k, v for this layer. Attention needs all keys so far on the device: for a
        continuation (P > 0) the earlier ones come back from the store, once per layer."""
        P = self._start
        if P == 0:
            self.index.fit(layer, k)
            if self.summary is not None:
                self.summary.fit(layer, v)
            self._seg_kv = (k, v, k, v)
        else:
            pk, pv = self.layer_kv(layer, P)
            self._seg_kv = (k, v, torch.cat([pk, k]), torch.cat([pv, v]))

    def attend(self, layer: int, q: torch.Tensor, offset: int) -> torch.Tensor:
        _, _, keys, values = self._seg_kv
        e = self._start + offset + q.shape[0]
        return self.prefill(q, keys[:e], values[:e], self._start + offset)

    def end_layer(self, layer: int) -> None:
        k, v, _, _ = self._seg_kv
        self._seg_kv = None
        self.placement.append(layer, k, v, self._start)
        if self.placement.clusters:
            self.placement.clusters.cluster_pending(layer, (self._start + k.shape[0]) // self.bs)

    def layer_kv(self, layer: int, P: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The layer's K,V of tokens 0..P-1 on the compute device, as [P, Hkv, d] (all of them: for
        a continuation prefill, and for measuring what the sparse path leaves out)."""
        nb = P // self.bs
        # During a decode step the block its token completes is still only in the ring.
        return self.placement.layer_kv(layer, P, min(nb, self._start // self.bs) if self.decoding else nb)

    # ---- decode ----------------------------------------------------------------------------------
    def decode(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        if not self.decoding:  # one token at position 0 is a segment
            self.begin_layer(layer, k, v)
            out = self.attend(layer, q, 0)
            self.end_layer(layer)
            return out
        self.decode_select(layer, q, k, v)
        pool, plan = self.pool, self.plan
        out, lse = kernels.sparse_decode(q[0], pool.k[layer], pool.v[layer], plan.tables[layer], plan.tail_len,
                                         self.scale)
        return self.decode_merge(layer, q, out, lse)

    def sparse_operands(self):
        if not self.decoding:
            return None
        return self.pool.k, self.pool.v, self.plan.tables, self.plan.tail_len, self.scale

    def score_operands(self) -> RowScoring | None:
        # A row that selects nothing this step (reused selection, too short a context) still takes
        # part: its scores go unread, and the others keep their one launch.
        got = self.index.row_operands() if self.decoding else None
        if got is None:
            return None
        plan = self.plan
        select_k = plan.k if plan.reselect and plan.estimate_blocks() == 0 else 0
        return RowScoring(got[0], got[1], plan.score_blocks(), self.bs, select_k)

    def outside_blocks(self) -> torch.Tensor | None:
        return self.plan.outside if self.decoding else None

    def lookup_operands(self):
        return self.selector.lookup_operands() if self.decoding and self.plan.reselect else None

    def decode_select(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                      scores: torch.Tensor | None = None, chosen: torch.Tensor | None = None,
                      bring: bool = True) -> None:
        plan, pool = self.plan, self.pool
        shape = (self.H, -1, pool.k.shape[-1])
        pool.k[layer].view(shape).index_copy_(1, plan.ring_row, k.transpose(0, 1))
        pool.v[layer].view(shape).index_copy_(1, plan.ring_row, v.transpose(0, 1))
        if plan.reselect and chosen is not None:
            ids, zone = chosen, None
        elif plan.reselect:
            ids, zone = self.selector.choose(layer, q[0], scores)
        else:
            ids, zone = plan.sel_ids[layer, :, :plan.sel_k], None
        if self.rest is not None:  # begun before the fetch (the token-level rest overlaps it on CUDA)
            self.rest.begin(layer, q[0], ids)
        if plan.reselect and bring:
            self.selector.bring(layer, ids)
        self._chosen = ids, zone  # until decode_merge, for the estimate and the observer

    def decode_bring(self, layer: int, slots: torch.Tensor, fetch: torch.Tensor) -> None:
        self.selector.place(layer, self._chosen[0], slots, fetch)

    def decode_merge(self, layer: int, q: torch.Tensor, out: torch.Tensor, lse: torch.Tensor) -> torch.Tensor:
        (ids, zone), self._chosen = self._chosen, None
        # Attention over blocks left out, from their summaries: more mass, no KV moved.
        if zone is not None:
            out, _ = kernels.merge_attention(out, lse, *self.summary.estimate(layer, q[0], zone, self.scale))
        elif self.rest is not None:
            out = self.rest.merge(out, lse)
        if self.observer is not None:
            _, lo, hi = self.plan.candidates()
            self.observer(layer, q[0], ids, lo, hi, self._start + 1, out)
        return out[None]

    def lookahead(self, layer: int) -> bool:
        return self.decoding and self.selector.wants_prefetch(layer)

    def prefetch(self, layer: int, q: torch.Tensor) -> None:
        self.selector.prefetch(layer, q[0])

    # ---- saved prefills -----------------------------------------------------------------------------
    def state(self) -> dict[str, torch.Tensor]:
        n = self.length // self.bs  # full blocks: in store and index; the tail block is in its ring slot
        parts = {"store": self.store.state(n), "index": self.index.state(n), "pool": self.pool.state()}
        if self.summary is not None:
            parts["summary"] = self.summary.state(n)
        if self.placement.clusters:
            parts["clusters"] = self.placement.clusters.state()
        return {f"{part}.{name}": t for part, tensors in parts.items() for name, t in tensors.items()}

    def load_state(self, state: Mapping[str, torch.Tensor], length: int) -> None:
        self.truncate(0)
        try:
            self.store.load_state(under(state, "store"))
            self.index.load_state(under(state, "index"))
            self.pool.load_state(under(state, "pool"))
            if self.summary is not None:
                self.summary.load_state(under(state, "summary"))
            if self.placement.clusters:
                self.placement.clusters.load_state(under(state, "clusters"))
        except BaseException:  # half loaded (Ctrl-C, a damaged part): hold nothing, as before
            self.pool.ring_block[:] = -1
            self.pool.forget_cached()
            self.store.forget_from(0)
            if self.placement.clusters:
                self.placement.clusters.clear()
            raise
        self.length = length
        self.plan.forget_selection()

    # ---- accounting ------------------------------------------------------------------------------
    def memory(self) -> dict[str, int]:
        summary = self.summary.nbytes() if self.summary else 0
        return {"store": self.store.nbytes(), "pool": self.pool.nbytes(), "index": self.index.nbytes() + summary}

    def counters(self) -> dict[str, float]:
        hits, misses = self.pool.counts.tolist()
        fetched = misses + self.pool.spec_counts[1].item()  # every miss is one block read from the store
        spec_hits, spec_total = self.selector.spec_counts.tolist()
        block_bytes = self.store.bytes_per_block // (self.L * self.H)  # K and V of one head (int8: with scales)
        build_s = self.placement.clusters.build_s if self.placement.clusters else 0.0
        return {"hits": hits, "misses": misses, "h2d_bytes": fetched * block_bytes,
                "spec_hits": spec_hits, "spec_total": spec_total, "cluster_s": build_s}
