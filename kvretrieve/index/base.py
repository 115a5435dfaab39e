"""The BlockIndex interface: how the blocks worth attending to are found.

An index sees every full block of keys once (add), may learn from the prompt's keys first (fit),
and scores blocks for a decode query (scores). Scores are per KV head, already aggregated over the
query heads of its GQA group, so selection happens once per KV head. Indexes live on the compute
device and are preallocated for the whole context (no growth, no copies during decode).
"""
from __future__ import annotations

from typing import Protocol

import torch


class BlockIndex(Protocol):
    kind: str

    def fit(self, layer: int, keys: torch.Tensor) -> None:
        """keys [T, Hkv, d] (post-RoPE) of the first prefill: a chance to learn a projection."""

    def add(self, layer: int | slice, first_block: int, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Index full blocks first_block.. ; keys, values [Hkv, nb, block_size, d] (a block may be
        indexed again: its contents changed, e.g. after clustering). layer=slice(None) with keys,
        values [L, Hkv, nb, block_size, d] indexes the blocks of every layer at once."""

    def scores(self, layer: int, q: torch.Tensor, n_blocks: int) -> torch.Tensor:
        """q [Hq, d] -> scores [Hkv, n_blocks] float32 of blocks 0..n_blocks-1 (higher = more relevant)."""

    def nbytes(self) -> int: ...


TOPK_CHUNK = 2048  # blocks per first-stage slice of top_blocks (bench/results/probe_topk_h100.json)


def top_blocks(scores: torch.Tensor, k: int, ranked: bool = False, chunk: int = TOPK_CHUNK) -> torch.Tensor:
    """Indices [H, k] of the k highest scores per row of scores [H, n], best first when ranked.
    For wide rows, in two stages: torch.topk gives each row to one thread block, which leaves a GPU
    with 8 rows nearly idle; split into slices of `chunk`, the first stage runs H * n / chunk blocks
    and the second picks among H * k * n / chunk survivors. Exact: a row's top k is within the union
    of its slices' top k (a row is padded with -inf to whole slices; the caller's k never exceeds its
    finite scores, so padding is never picked)."""
    h, n = scores.shape
    if n < 4 * chunk or 2 * k > chunk:
        return torch.topk(scores, k, dim=1, sorted=ranked).indices
    if n % chunk:
        scores = torch.nn.functional.pad(scores, (0, chunk - n % chunk), value=float("-inf"))
        n = scores.shape[1]
    vals, idx = torch.topk(scores.view(h, n // chunk, chunk), k, dim=2, sorted=False)   # [H, slices, k]
    idx = idx + torch.arange(0, n, chunk, device=scores.device)[:, None]
    pick = torch.topk(vals.view(h, -1), k, dim=1, sorted=ranked).indices
    return idx.view(h, -1).gather(1, pick)


def select_blocks(scores: torch.Tensor, lo: int, hi: int, k: int, ranked: bool = False) -> torch.Tensor:
    """Top-k block ids per KV head among candidate blocks [lo, hi) -> [Hkv, min(k, hi - lo)] int64,
    best first when ranked."""
    k = min(k, hi - lo)
    if k <= 0:
        return torch.empty(scores.shape[0], 0, dtype=torch.long, device=scores.device)
    if k == hi - lo and not ranked:  # everything fits the budget: no ranking needed
        return torch.arange(lo, hi, device=scores.device).expand(scores.shape[0], -1)
    return top_blocks(scores[:, lo:hi], k, ranked) + lo
