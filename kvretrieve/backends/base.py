"""The attention backend interface, declared once: what the engine and the model call.

A backend stores K,V and computes attention; the model owns no cache (it gets its backend from the
engine for each forward pass). The engine brackets every forward pass: begin(start, n), the model's
layer calls, commit(start + n); a pass that fails is rolled back with truncate(start). Within a
pass the model calls, per layer,
  - a segment (prefill, n > 1, or any pass on the CPU dense path): begin_layer, attend (per chunk
    of queries), end_layer;
  - a decode step (n = 1): decode, after the engine has run prologue() once for the step.
Members with a body are defaults that a backend overrides only when it has something to do.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Hashable, Protocol

import torch


@dataclass(frozen=True, eq=False)
class RowScoring:
    """One row's part in a batched step's one-launch block scoring (and top-k): see score_operands."""
    kind: str                         # "max" or "mass": the index's block scores (kernels.rows.lowrank_rows, mass_rows)
    tensors: tuple[torch.Tensor, ...]  # the index's operands (BlockIndex.row_operands)
    n_blocks: int                     # blocks it scores this step
    block_size: int
    select_k: int                     # blocks per KV head it selects afresh this step from its scores alone
                                      # (0: it reuses a selection, or ranks an estimation zone itself)


class AttentionBackend(Protocol):
    length: int      # tokens whose K,V every layer holds (the committed length)
    capacity: int    # the most tokens it can hold

    # ---- the engine's pass protocol ---------------------------------------------------------------
    def begin(self, start: int, n: int) -> None:
        """A forward pass of n tokens at positions start.. begins (host work between steps)."""

    def commit(self, length: int) -> None:
        """Every layer has run: the cache now holds `length` tokens."""

    def truncate(self, length: int) -> None:
        """Forget tokens from `length` on, and whatever an uncommitted pass wrote."""

    def graph_key(self) -> Hashable | None:
        """What a captured decode step depends on (equal keys may replay one CUDA graph), or None
        when this step must run eagerly."""
        return None

    def prologue(self) -> None:
        """A decode step's device work shared by all layers, before layer 0 (captured in the step's
        graph): slot tables, masks, where the token goes."""

    # ---- the model's calls ------------------------------------------------------------------------
    def begin_layer(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Segment: its k, v [T, Hkv, d] for this layer (positions start..start+T-1)."""

    def attend(self, layer: int, q: torch.Tensor, offset: int) -> torch.Tensor:
        """Segment rows offset..offset+n-1: causal attention of q [n, Hq, d] -> [n, Hq, d]."""

    def end_layer(self, layer: int) -> None:
        """The segment's attention for this layer is done (the backend may now move or reorder k, v)."""

    def decode(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Decode: store the token's k, v [1, Hkv, d]; attention of q [1, Hq, d] -> [1, Hq, d]."""

    def sparse_operands(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, float] | None:
        """Decode, after begin: when this step's attention is one sparse decode over a block pool,
        (pool K, pool V [L, Hkv, S, bs, d], slot tables [L, Hkv, n] int32, tail_len [1] int32, scale);
        the model may then attend several backends' rows in one launch (kernels.sparse_decode_rows),
        calling decode_select before it and decode_merge after it instead of decode. None otherwise."""
        return None

    def score_operands(self) -> RowScoring | None:
        """Decode, after begin, with sparse_operands: when this step scores blocks with an index that a
        batched launch can score beside others (BlockIndex.row_operands), what that launch needs of this
        row; decode_select then takes this row's scores, or its chosen blocks. None otherwise."""
        return None

    def outside_blocks(self) -> torch.Tensor | None:
        """Decode, after prologue, with score_operands: [n_blocks] bool, the blocks that are no
        candidates this step (sinks, the window, beyond the context), for a top-k of the batch's scores."""
        return None

    def lookup_operands(self) -> tuple[tuple[torch.Tensor, ...], int] | None:
        """Decode, after begin, with score_operands: when this step's chosen blocks can be looked up in
        the block pool by one launch beside other rows' (kernels.lru_lookup_rows), (the pool's lookup
        state, kernels.rows.LRU; its first LRU slot); decode_select(bring=False) and decode_bring then
        split the selection around that launch. None otherwise."""
        return None

    def decode_select(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                      scores: torch.Tensor | None = None, chosen: torch.Tensor | None = None,
                      bring: bool = True) -> None:
        """Decode with sparse_operands: decode's work up to its attention (store the token's k, v; fill
        this layer's slot table), with this layer's block scores [Hkv, >= n] when score_operands gave
        the batch's launch its tensors, or the blocks [Hkv, select_k] a top-k of the batch chose.
        bring=False stops before the pool lookup: decode_bring then takes its result."""
        raise NotImplementedError(f"{type(self).__name__} has no sparse_operands")

    def decode_bring(self, layer: int, slots: torch.Tensor, fetch: torch.Tensor) -> None:
        """Decode, after decode_select(bring=False): the chosen blocks' pool slots [Hkv, k] and which
        must be fetched (a batched lookup's): fetch them and fill the slot table."""
        raise NotImplementedError(f"{type(self).__name__} has no sparse_operands")

    def decode_merge(self, layer: int, q: torch.Tensor, out: torch.Tensor, lse: torch.Tensor) -> torch.Tensor:
        """Decode with sparse_operands: the rest of decode, given the attention over this layer's table
        (out [Hq, d], lse [Hq] float32) -> [1, Hq, d]."""
        raise NotImplementedError(f"{type(self).__name__} has no sparse_operands")

    def lookahead(self, layer: int) -> bool:
        """Decode: whether the backend wants layer + 1's query, approximated from layer's input, to
        prefetch its blocks while layer runs (then the model calls prefetch)."""
        return False

    def prefetch(self, layer: int, q: torch.Tensor) -> None:
        """Decode: an approximate query q [1, Hq, d] of `layer`, ahead of its decode call."""

    # ---- saved prefills (between passes) -----------------------------------------------------------
    def state(self) -> dict[str, torch.Tensor]:
        """Everything the cached tokens left behind, by name: what a saved prefill keeps (views; the
        saver copies them)."""
        ...

    def load_state(self, state: dict[str, torch.Tensor], length: int) -> None:
        """Become the backend whose state() this was, holding `length` tokens (a backend of the same
        kind, configuration and geometry; its capacity may differ)."""
        ...

    # ---- accounting -------------------------------------------------------------------------------
    def drop_decode_memory(self) -> None:
        """With an empty cache and no captured graph: give back what decode steps allocated."""

    def memory(self) -> dict[str, int]:
        """Bytes held, by part."""
        return {}

    def counters(self) -> dict[str, float]:
        """Running counts (cache hits, copies, build times) since the backend was made."""
        return {}
