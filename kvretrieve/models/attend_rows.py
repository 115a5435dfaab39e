"""The attention of a batched decode step's rows (Decoder.decode_rows): each row against its own cache.

Without StepRows each row attends by itself (its backend's decode). With them (every row a retrieval
backend of one configuration, engine/batch_step.py) the work each row would launch alone is, where the
rows allow it, one launch for all: the block scores, the top-k, the pool lookup, the token-level rest
and the sparse attention; what stays per row (storing the token, the fetch, the final merge) runs on the
row's own CUDA stream, so the rows' small kernels run side by side.
"""
from __future__ import annotations

from typing import Callable

import torch

from ..backends.base import AttentionBackend
from ..kernels import (lowrank_block_mass_rows, lowrank_block_scores_rows, lowrank_rest_rows, lru_lookup_rows,
                       merge_attention, sparse_decode_rows, topk_indices)
from ..kernels.rows import StepRows


def attend_rows(layer: int, q, k, v, attns: list[AttentionBackend], streams: list | None,
                rows: StepRows | None) -> torch.Tensor:
    """Each row's decode attention, q [B, Hq, d], k, v [B, Hkv, d] -> [B, Hq, d]; with streams (one per
    row and one more, for the rows' rest), row b's runs on streams[b]. A row's selection is a chain of
    small latency-bound kernels (scores, top-k, lookup, fetch, sparse attention) that fills a few SMs:
    on their own streams (and as branches of a captured graph) the rows' chains run side by side
    instead of one after another."""
    if rows is None:
        return torch.cat(per_row(streams, attns, lambda b, a: a.decode(layer, q[b:b + 1], k[b:b + 1], v[b:b + 1])))
    scores = chosen = None
    if rows.scoring is not None and rows.mass:  # the index's scale is the attention's, head_dim ** -0.5
        scores = lowrank_block_mass_rows(q, rows.scoring, layer, rows.n_blocks, rows.block_size, rows.scale)
    elif rows.scoring is not None:
        scores = lowrank_block_scores_rows(q, rows.scoring, layer, rows.n_blocks, rows.block_size)
    if rows.select_k:
        B, hkv, n = scores.shape
        masked = scores.masked_fill(rows.outside[:, None, :], float("-inf")).view(B * hkv, n)
        chosen = topk_indices(masked, rows.select_k).view(B, hkv, -1)  # a set, as Selector.pick's
    bring, rest = rows.lookup is None, rows.rest is not None and chosen is not None
    per_row(streams, attns, lambda b, a: a.decode_select(
        layer, q[b:b + 1], k[b:b + 1], v[b:b + 1], None if scores is None else scores[b],
        None if chosen is None else chosen[b], bring, not rest))
    side = streams[len(attns)] if rest and streams is not None else None
    if side is not None:  # forked here, filled after the fetches are launched: they go first
        side.wait_stream(torch.cuda.current_stream(q.device))
    if not bring:  # one lookup in every row's pool, then each row fetches its misses
        slots, fetch = lru_lookup_rows(chosen, rows.lookup, layer)
        slots += rows.lru0
        per_row(streams, attns, lambda b, a: a.decode_bring(layer, slots[b], fetch[b]))
    estimate = _rest_rows(layer, q, rows, chosen, side) if rest else None
    out, lse = sparse_decode_rows(q, rows.decode, layer, rows.scale)
    if estimate is not None:
        if side is not None:
            torch.cuda.current_stream(q.device).wait_stream(side)
        merged, _ = merge_attention(out.flatten(0, 1), lse.flatten(), estimate[0].flatten(0, 1), estimate[1].flatten())
        out = merged.view(out.shape)
    return torch.cat(per_row(streams, attns, lambda b, a: a.decode_merge(layer, q[b:b + 1], out[b], lse[b])))


def _rest_rows(layer: int, q, rows: StepRows, chosen: torch.Tensor, side) -> tuple[torch.Tensor, torch.Tensor]:
    """Every row's estimate of the candidates its chosen blocks leave out (as RestEstimate does for one
    row), in one launch: one row's rest kernel fills the GPU, so rows' rests on their own streams ran
    one after another (bench/results/batch_decode_15b_32k_s35_trace.md). On CUDA it runs on `side`,
    beside the fetches and the sparse attention; the caller waits for it before the merge."""
    def launch():
        B, hkv, _ = chosen.shape
        left = (~rows.outside)[:, None, :].expand(B, hkv, -1).scatter(2, chosen, False)
        return lowrank_rest_rows(q, rows.rest, layer, left, rows.block_size, rows.scale)

    if side is None:
        return launch()
    with torch.cuda.stream(side):
        # Made on side, read on the main stream's merge (which waits for side first), then freed there.
        return launch()


def per_row(streams: list | None, attns: list[AttentionBackend], fn: Callable) -> list:
    """[fn(b, attns[b]) for each row]; with streams, row b's on streams[b], forked from the current
    stream and joined back into it before returning, so tensors freed after this layer are free on
    all of them."""
    if streams is None:
        return [fn(b, a) for b, a in enumerate(attns)]
    main = torch.cuda.current_stream(streams[0].device)
    outs = []
    for b, (a, stream) in enumerate(zip(attns, streams)):
        stream.wait_stream(main)
        with torch.cuda.stream(stream):
            outs.append(fn(b, a))
    for stream in streams[:len(attns)]:
        main.wait_stream(stream)
    return outs
