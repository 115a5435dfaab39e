"""The BlockIndex interface: how the blocks worth attending to are found.

An index sees every full block of keys once (add), may learn from the prompt's keys first (fit),
and scores blocks for a decode query (scores). Scores are per KV head, already aggregated over the
query heads of its GQA group, so selection happens once per KV head. Indexes live on the compute
device and are preallocated for the whole context (no growth, no copies during decode).
"""
from __future__ import annotations

from typing import Protocol

import torch

from .. import kernels
from ..errors import SavedPrefillError


class BlockIndex(Protocol):
    kind: str
    reorders: bool = False  # True: the backend stores segments in the order cluster_order() returns (ivf)
    block_means: torch.Tensor | None = None  # [L, Hkv, max_blocks, d] mean keys, when the index keeps them

    def fit(self, layer: int, keys: torch.Tensor) -> None:
        """keys [T, Hkv, d] (post-RoPE) of the first prefill: a chance to learn a projection."""

    def add(self, layer: int | slice, first_block: int, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Index full blocks first_block.. ; keys, values [Hkv, nb, block_size, d] (a block may be
        indexed again: its contents changed, e.g. after clustering). layer=slice(None) with keys,
        values [L, Hkv, nb, block_size, d] indexes the blocks of every layer at once."""

    def scores(self, layer: int, q: torch.Tensor, n_blocks: int) -> torch.Tensor:
        """q [Hq, d] -> scores [Hkv, n_blocks] float32 of blocks 0..n_blocks-1 (higher = more relevant)."""

    def row_operands(self) -> tuple[str, tuple[torch.Tensor, ...]] | None:
        """(its scores' kind, the tensors) a batched step's one launch scores this index with, beside other
        rows' indexes of the same kind and geometry ("max": kernels.rows.lowrank_rows, "mass": mass_rows),
        or None where there is no such launch."""
        return None

    def nbytes(self) -> int: ...

    def state(self, n_blocks: int) -> dict[str, torch.Tensor]:
        """What a saved prefill keeps of the index for blocks 0..n_blocks-1 (views; store/saved.py copies)."""

    def load_state(self, state: dict[str, torch.Tensor]) -> None:
        """Take back what state() gave (an index of the same kind and geometry, holding nothing yet)."""


def restore_prefix(dst: torch.Tensor, src: torch.Tensor, what: str) -> None:
    """dst[:, :, :n] = src (n = src.shape[2]: tokens or blocks), the layout axis of every index, summary
    and pool tensor; a src of another shape elsewhere is a saved prefill made for another layout."""
    if src.shape[:2] != dst.shape[:2] or src.shape[3:] != dst.shape[3:] or src.shape[2] > dst.shape[2]:
        raise SavedPrefillError(f"the saved {what} has the shape {tuple(src.shape)}, which does not fit this "
                                f"model's {tuple(dst.shape)}; reopen it with the model and options it was saved with")
    dst[:, :, :src.shape[2]].copy_(src)


def top_blocks(scores: torch.Tensor, k: int, ranked: bool = False) -> torch.Tensor:
    """Indices [H, k] of the k highest scores per row of scores [H, n], best first when ranked (the
    estimation zone needs an order), else in no particular order: on CUDA a radix-select kernel
    (kernels/topk.py; torch.topk leaves a GPU with 8 rows nearly idle)."""
    if ranked:
        return torch.topk(scores, k, dim=1, sorted=True).indices
    return kernels.topk_indices(scores, k)
