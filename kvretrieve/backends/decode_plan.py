"""The per-step state of a retrieval decode step, planned once per step (flashinfer's plan/run split).

plan(start)  host, between steps: this context's window and budget, the step's LRU stamp, whether
             this step selects afresh; the step's device scalars are written in place.
prologue()   device, once per step before layer 0, captured in the step's CUDA graph: the slot-table
             columns every layer shares (sinks, window, tail), the candidate mask, and where the new
             token goes in its ring slot.
key()        what a captured step depends on: steps with equal keys replay one graph.
A graph reads these very tensors, so they are only ever written in place.

A selection may serve reselect_every steps (as LServe and TokenSelect do: successive queries attend
to much the same blocks): the steps between only append the token and attend, with no scoring, no
lookup and no copy; a reused block that has since entered the window is dropped from the table so
no token counts twice.
"""
from __future__ import annotations

import torch

from ..cache import BlockPool
from ..config import KVGeometry, RetrievalConfig


class DecodePlan:
    def __init__(self, cfg: RetrievalConfig, geo: KVGeometry, pool: BlockPool):
        self.cfg, self.pool, self.bs = cfg, pool, geo.block_size
        i32, i64 = dict(dtype=torch.int32, device=geo.device), dict(dtype=torch.int64, device=geo.device)
        self.tables = torch.empty(geo.layers, geo.kv_heads, pool.columns, **i32)  # per layer: slots attended
        self.pos = torch.zeros(1, **i64)         # the token's position
        self.tail_len = torch.zeros(1, **i32)    # tokens in its (tail) block, itself included
        self.stamp = torch.zeros(1, **i32)       # LRU time of this step's lookups
        # The last selection per layer (block ids, pool slots), reused for reselect_every steps.
        self.sel_ids = torch.zeros(geo.layers, geo.kv_heads, cfg.budget_blocks, **i64)
        self.sel_slots = torch.full((geo.layers, geo.kv_heads, cfg.budget_blocks), -1, **i32)
        self.sel_k: int | None = None    # its width; None: the next step selects afresh
        self.start, self.steps, self.since, self.reselect = 0, 0, 0, True
        self.window, self.budget = cfg.window_blocks, cfg.budget_blocks  # in effect this step
        self.outside = self.candidate = self.ring_row = None  # made by prologue()

    def candidates(self) -> tuple[int, int, int]:
        """(n_done, lo, hi) of this step: n_done blocks precede the tail block (the new token's, in
        the ring even when the token completes it: it reaches the store after the step); blocks
        [lo, hi) are neither sinks nor in this step's window (ring blocks beyond the window are
        candidates too: the store has them)."""
        n_done = self.start // self.bs
        lo = min(self.pool.n_sink, n_done)
        return n_done, lo, max(lo, n_done - self.window)

    @property
    def k(self) -> int:
        """Blocks retrieved per KV head this step (the budget, or every candidate while fewer)."""
        _, lo, hi = self.candidates()
        return min(self.budget, hi - lo)

    def estimate_blocks(self) -> int:
        """Next-ranked blocks counted through their centroids (ivf's estimation zone)."""
        _, lo, hi = self.candidates()
        return max(0, min(self.cfg.estimate_tokens // self.bs, hi - lo - self.budget))

    def score_blocks(self) -> int:
        """Blocks scored per step: past n_done, rounded up to 512 blocks (candidates beyond the
        context are masked), so one captured graph serves thousands of steps."""
        n_done = self.start // self.bs
        return min(self.pool.slot_of_block.shape[-1] - 1, (n_done // 512 + 1) * 512)

    def plan(self, start: int) -> None:
        """Host work before the step that appends the token at `start`."""
        self.start, self.steps = start, self.steps + 1
        self.window, self.budget = self.cfg.plan(start + 1)
        self.pos.fill_(start)
        self.tail_len.fill_(start % self.bs + 1)  # the token's own block is the tail, even when this token completes it
        self.stamp.fill_(2 * self.steps + 1)
        k = self.k
        self.reselect = (self.sel_k != k or self.since + 1 >= self.cfg.reselect_every
                         or self.cfg.estimate_tokens > 0)
        self.since = 0 if self.reselect else self.since + 1
        self.sel_k = k

    def forget_selection(self) -> None:
        """The next step selects afresh (blocks moved, or the cache was rolled back)."""
        self.sel_k = None

    def key(self):
        """What a captured step depends on, or None while the context is too short for a full budget
        (the width of the selection still changes from step to step)."""
        _, lo, hi = self.candidates()
        if hi - lo < self.budget:
            return None
        return self.window, self.budget, self.estimate_blocks(), self.score_blocks(), self.reselect

    def prologue(self) -> None:
        """Device work once per step, before the first layer attends."""
        pool, bs = self.pool, self.bs
        n_done = self.pos // bs
        self.tables.copy_(pool.fixed_columns(self.pos, self.window).expand_as(self.tables))
        blocks = torch.arange(self.score_blocks(), device=self.pos.device)
        lo = torch.clamp(n_done, max=pool.n_sink)
        hi = torch.maximum(lo, n_done - self.window)
        self.outside = (blocks < lo) | (blocks >= hi)
        # Once a step, not once a layer: the rest's left-out mask starts from it (no rest, no mask).
        self.candidate = ~self.outside if self.cfg.estimate_rest else None
        k, n0 = self.sel_k, pool.n_sink
        if not self.reselect and k:
            self.tables[:, :, n0:n0 + k] = torch.where(self.sel_ids[:, :, :k] < hi, self.sel_slots[:, :, :k], -1)
        self.ring_row = (n0 + n_done.remainder(pool.ring)) * bs + self.pos.remainder(bs)

    def record(self, layer: int, ids: torch.Tensor, slots: torch.Tensor) -> None:
        """This layer's fresh selection: block ids and pool slots [Hkv, k], into its table."""
        k = ids.shape[1]
        n0 = self.pool.n_sink
        self.tables[layer, :, n0:n0 + k] = slots
        self.sel_ids[layer, :, :k] = ids
        self.sel_slots[layer, :, :k] = slots
