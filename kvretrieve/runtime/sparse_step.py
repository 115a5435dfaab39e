"""The decode step of the retrieval backend (a mixin of RetrievalKV), on the device alone.

Position, selection, LRU lookup, fetches and the slot table are tensors, so the host never waits and
the step can be captured as one CUDA graph (graph_key says what a captured step depends on). Host
work happens between steps: _begin_decode (plan, ring bookkeeping, whether to select afresh) and
_end_decode (a completed tail block goes to store and index).

A selection may serve reselect_every steps (as LServe and TokenSelect do: successive queries attend
to much the same blocks): the steps between only append the token and attend, with no scoring, no
lookup and no copy; a reused block that has since entered the window is dropped from the table so
no token counts twice.
"""
from __future__ import annotations

import torch

from .. import kernels
from ..index.base import top_blocks
from ..models.llama import rms_norm


class SparseStep:
    def graph_key(self):
        """What a captured decode step depends on, or None when the step must run eagerly (an
        observer watches it, the context is still too short for a full budget)."""
        if not self.decoding or self.observer is not None:
            return None
        n_done, lo, hi = self._candidates()
        if hi - lo < self._budget:
            return None
        return (self._window, self._budget, self._estimate_blocks(hi - lo), self._score_blocks(n_done),
                self._reselect)

    def _estimate_blocks(self, candidates: int) -> int:
        return max(0, min(self.cfg.estimate_tokens // self.bs, candidates - self._budget))

    def _score_blocks(self, n_done: int) -> int:
        """Blocks scored per step: past n_done, rounded up to 512 blocks (candidates beyond the
        context are masked), so one captured graph serves thousands of steps."""
        return min(self.pool.slot_of_block.shape[-1] - 1, (n_done // 512 + 1) * 512)

    def _begin_decode(self, start: int) -> None:
        self._step += 1
        self._window, self._budget = self.cfg.plan(start + 1)
        self.pool.ensure_lru()
        self.store.sync_offsets()
        b, off = divmod(start, self.bs)
        self.pool.ring_block[:, b % self.pool.ring] = b
        self._pos.fill_(start)
        self._tail_len.fill_(off + 1)  # the token's own block is the tail, even when this token completes it
        self._stamp.fill_(2 * self._step + 1)
        _, lo, hi = self._candidates()
        k = min(self._budget, hi - lo)
        self._reselect = (self._sel_k != k or self._since + 1 >= self.cfg.reselect_every
                          or self.cfg.estimate_tokens > 0)
        self._since = 0 if self._reselect else self._since + 1
        self._sel_k = k
        if self.d2h is not None and self._d2h_done is not None:
            # Blocks stored by D2H copies must have landed before a fetch reads them, and a ring slot
            # must not be overwritten while its old block is still being copied out.
            torch.cuda.current_stream(self.device).wait_event(self._d2h_done)

    def _end_decode(self, length: int) -> None:
        """The token at length - 1 completed its block: the block joins store and index, for all
        layers at once (a handful of launches, not a few per layer: this runs every block_size steps)."""
        b = length // self.bs - 1
        slot = self.pool.ring_slot(b)
        kb, vb = self.pool.k[:, :, slot, None], self.pool.v[:, :, slot, None]      # [L, Hkv, 1, bs, d]
        self.index.add(slice(None), b, kb, vb)
        kernels.store_blocks(self.store, b, slot, self.pool.k, self.pool.v)
        if self.d2h is not None:  # the writes run on this stream; host readers of the store wait for them
            self._d2h_done = torch.cuda.Event()
            self._d2h_done.record(torch.cuda.current_stream(self.device))
        if b < self.pool.n_sink:
            self.pool.k[:, :, b] = kb[:, :, 0]
            self.pool.v[:, :, b] = vb[:, :, 0]
        if self._reorders:
            for layer in range(self.L):
                self._cluster_pending(layer, b + 1)
            self._sel_k = None  # clustering may have moved blocks: select afresh

    def _step_prologue(self) -> None:
        """Once per step, on the device, before the first layer attends: the slot table columns every
        layer shares, the candidate mask, and where the new token goes in its ring slot."""
        n_done = self._pos // self.bs
        fixed = self.pool.fixed_columns(self._pos, self._window)
        self._tables.copy_(fixed.expand_as(self._tables))
        n_score = self._score_blocks(self._start // self.bs)
        blocks = torch.arange(n_score, device=self.device)
        lo = torch.clamp(n_done, max=self.pool.n_sink)
        hi = torch.maximum(lo, n_done - self._window)
        self._outside = (blocks < lo) | (blocks >= hi)
        k, n0 = self._sel_k, self.pool.n_sink
        if not self._reselect and k:
            self._tables[:, :, n0:n0 + k] = torch.where(self._sel_ids[:, :, :k] < hi, self._sel_slots[:, :, :k], -1)
        self._ring_row = (self.pool.n_sink + n_done.remainder(self.pool.ring)) * self.bs + self._pos.remainder(self.bs)
        if self.cfg.speculative:
            self._spec_rope = self.model.rope.cos_sin(self._pos, self.model.dtype, self._start + 1)

    def _decode(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        if layer == 0:  # unless prepare_layer ran it already in this forward pass
            if not self._prologue_ran:
                self._step_prologue()
            self._prologue_ran = False
        shape = (self.H, -1, self.pool.k.shape[-1])
        self.pool.k[layer].view(shape).index_copy_(1, self._ring_row, k.transpose(0, 1))
        self.pool.v[layer].view(shape).index_copy_(1, self._ring_row, v.transpose(0, 1))
        table = self._tables[layer]
        if self._reselect:
            ids, estimated = self._select(layer, q[0], table)
        else:
            ids, estimated = self._sel_ids[layer, :, :self._sel_k], None
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
        return top_blocks(scores, k, ranked)

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
        ready = self._spec_ready.pop(layer, None)
        if ready is not None:  # the speculative lookup of this layer ran on the side stream
            torch.cuda.current_stream(self.device).wait_event(ready)
        spec = self._spec.pop(layer, None)
        if spec is not None:  # how much of this selection the speculative prefetch already brought
            same = (ids[:, :, None] == spec[:, None, :]).any(-1).sum()
            self._spec_counts += torch.stack([same, torch.full_like(same, ids.numel())])
        slots, fetch = self.pool.lookup(layer, ids, self._stamp)
        kernels.fetch_blocks(self.store, layer, ids, fetch, slots, self.pool.k[layer], self.pool.v[layer])
        table[:, self.pool.n_sink:self.pool.n_sink + k] = slots
        self._sel_ids[layer, :, :k] = ids
        self._sel_slots[layer, :, :k] = slots
        return ids, estimated

    def prepare_layer(self, layer: int, x: torch.Tensor) -> None:
        """Called before each layer. Decode: the step's shared device work before layer 0; with
        speculative prefetch (InfiniGen style), layer l's input through layer l+1's norm and q
        projection approximates layer l+1's query, whose blocks are fetched before layer l+1 asks:
        on CUDA on a side stream, so the copies overlap layer l's attention and MLP."""
        if self.decoding and layer == 0:
            self._step_prologue()
            self._prologue_ran = True
        if not (self.cfg.speculative and self.decoding and self._reselect) or layer + 1 >= self.L:
            return
        _, lo, hi = self._candidates()
        k = min(self._budget, hi - lo)
        if k <= 0:
            return
        w = self.model.w.layers[layer + 1]
        q, _, _ = self.model.project_qkv(layer + 1, rms_norm(x, w.attn_norm, self.model.cfg.rms_eps), *self._spec_rope)
        if self._side is None:
            self._prefetch(layer + 1, q[0], k)
            return
        self._side.wait_stream(torch.cuda.current_stream(self.device))
        q.record_stream(self._side)  # q is freed here while the side stream may still read it
        with torch.cuda.stream(self._side):
            self._prefetch(layer + 1, q[0], k)
            ready = torch.cuda.Event()
            ready.record(self._side)
        self._spec_ready[layer + 1] = ready

    def _prefetch(self, layer: int, q: torch.Tensor, k: int) -> None:
        ids = self._pick(layer, q, k)
        self._spec[layer] = ids
        slots, fetch = self.pool.lookup(layer, ids, self._stamp - 1, speculative=True)
        kernels.fetch_blocks(self.store, layer, ids, fetch, slots, self.pool.k[layer], self.pool.v[layer])

