"""Block selection for a decode step, on the device alone: index scores over the plan's candidates
-> top-k blocks per KV head -> the pool resolves them (hits, and slots claimed for misses) -> a
kernel reads the misses straight from the pinned CPU store into their slots -> the slots go into
the plan's table. No host sync anywhere, so the step can be captured as a CUDA graph.

Speculative prefetch (InfiniGen style, off by default): layer l's input through layer l+1's norm
and q projection approximates layer l+1's query; its blocks are fetched before layer l+1 asks, on
CUDA on a side stream so the copies overlap layer l's attention and MLP.
"""
from __future__ import annotations

import torch

from .. import kernels
from ..cache import BlockPool
from ..config import RetrievalConfig
from ..index import BlockIndex, top_blocks
from ..store import KVStore
from .decode_plan import DecodePlan


class Selector:
    def __init__(self, cfg: RetrievalConfig, index: BlockIndex, pool: BlockPool, store: KVStore, plan: DecodePlan):
        self.cfg, self.index, self.pool, self.store, self.plan = cfg, index, pool, store, plan
        self.device, self.layers = plan.pos.device, plan.tables.shape[0]
        cuda = self.device.type == "cuda"
        self.side = torch.cuda.Stream(self.device) if cuda and cfg.speculative else None
        self.spec_counts = torch.zeros(2, dtype=torch.int64, device=self.device)   # speculated hits, total
        self._spec: dict[int, torch.Tensor] = {}             # layer -> block ids the prefetch brought
        self._spec_ready: dict[int, torch.cuda.Event] = {}   # layer -> its side-stream work is done

    def pick(self, layer: int, q: torch.Tensor, k: int, ranked: bool = False,
             scores: torch.Tensor | None = None) -> torch.Tensor:
        """The k best candidate blocks [Hkv, k] of this layer for query q [Hq, d] (k <= candidates);
        scores [Hkv, >= n]: the index's, already made (by a batched step's one launch)."""
        n = self.plan.outside.shape[0]
        scores = self.index.scores(layer, q, n) if scores is None else scores[:, :n]
        return top_blocks(scores.masked_fill(self.plan.outside, float("-inf")), k, ranked)

    def choose(self, layer: int, q: torch.Tensor,
               scores: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """This layer's blocks for query q [Hq, d] (scores: as pick takes them): (block ids [Hkv, k],
        the estimation zone's block ids or None); bring() then resolves and fetches them."""
        k = self.plan.k
        if k <= 0:
            return torch.empty(self.pool.H, 0, dtype=torch.long, device=self.device), None
        z = self.plan.estimate_blocks()
        ids = self.pick(layer, q, k + z, ranked=z > 0, scores=scores)
        return ids[:, :k], (ids[:, k:] if z > 0 else None)

    def bring(self, layer: int, ids: torch.Tensor) -> None:
        """Resolve block ids [Hkv, k] against the pool and fetch the misses; their slots go into the
        plan's table."""
        if ids.shape[1] == 0:
            return
        ready = self._spec_ready.pop(layer, None)
        if ready is not None:  # the speculative lookup of this layer ran on the side stream
            torch.cuda.current_stream(self.device).wait_event(ready)
        spec = self._spec.pop(layer, None)
        if spec is not None:  # how much of this selection the speculative prefetch already brought
            same = (ids[:, :, None] == spec[:, None, :]).any(-1).sum()
            self.spec_counts += torch.stack([same, torch.full_like(same, ids.numel())])
        self.place(layer, ids, *self.pool.lookup(layer, ids, self.plan.stamp))

    def place(self, layer: int, ids: torch.Tensor, slots: torch.Tensor, fetch: torch.Tensor) -> None:
        """Blocks ids [Hkv, k], resolved to pool slots [Hkv, k] (fetch: the misses, claimed now): copy
        the misses up and enter the slots in the plan's table."""
        kernels.fetch_blocks(self.store, layer, ids, fetch, slots, self.pool.k[layer], self.pool.v[layer])
        self.plan.record(layer, ids, slots)

    def lookup_operands(self) -> tuple[tuple[torch.Tensor, ...], int] | None:
        """The pool's lookup state for a batched step's one lookup (kernels.rows.lru_rows) and its first
        LRU slot; None with speculative prefetch (its lookups run on a side stream of their own)."""
        if self.cfg.speculative:
            return None
        pool = self.pool
        return (pool.slot_of_block, pool.block_of_slot, pool.last_used, self.plan.stamp, pool.counts), pool.lru0

    def wants_prefetch(self, layer: int) -> bool:
        return self.cfg.speculative and self.plan.reselect and layer + 1 < self.layers and self.plan.k > 0

    def prefetch(self, layer: int, q: torch.Tensor) -> None:
        """Fetch the blocks an approximate query q [Hq, d] of `layer` would select."""
        if self.side is None:
            self._prefetch(layer, q)
            return
        self.side.wait_stream(torch.cuda.current_stream(self.device))
        q.record_stream(self.side)  # q is freed by its maker while the side stream may still read it
        with torch.cuda.stream(self.side):
            self._prefetch(layer, q)
            ready = torch.cuda.Event()
            ready.record(self.side)
        self._spec_ready[layer] = ready

    def _prefetch(self, layer: int, q: torch.Tensor) -> None:
        ids = self.pick(layer, q, self.plan.k)
        self._spec[layer] = ids
        slots, fetch = self.pool.lookup(layer, ids, self.plan.stamp - 1, speculative=True)
        kernels.fetch_blocks(self.store, layer, ids, fetch, slots, self.pool.k[layer], self.pool.v[layer])

    def end_step(self) -> None:
        self._spec.clear()
        self._spec_ready.clear()
