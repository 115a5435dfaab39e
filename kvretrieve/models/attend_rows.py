"""The attention of a batched decode step's rows (Decoder.decode_rows): each row against its own cache.

Without StepRows each row attends by itself (its backend's decode). With them (every row a retrieval
backend of one configuration, engine/batch_step.py) the work each row would launch alone is, where the
rows allow it, one launch for all: the block scores, the top-k, the pool lookup and the sparse
attention; what stays per row (storing the token, the token-level rest, the fetch, the merges) runs on
the row's own CUDA stream, so the rows' small kernels run side by side. The rows' rests in one launch
were tried and withdrawn: one row's rest kernel already fills the GPU, so the one launch took what
the rows' launches took in turn (271 us a layer at 8 rows of the 1.5B at 32K), and beside it the
fetches slowed (bench/results/batch_decode_15b_32k_s35_rest_overlap.md).
"""
from __future__ import annotations

from typing import Callable

import torch

from ..backends.base import AttentionBackend
from ..kernels import (lowrank_block_mass_rows, lowrank_block_scores_rows, lru_lookup_rows, sparse_decode_rows,
                       topk_indices)
from ..kernels.rows import StepRows


def attend_rows(layer: int, q, k, v, attns: list[AttentionBackend], streams: list | None,
                rows: StepRows | None) -> torch.Tensor:
    """Each row's decode attention, q [B, Hq, d], k, v [B, Hkv, d] -> [B, Hq, d]; with streams (one per
    row), row b's runs on streams[b]. A row's selection is a chain of small latency-bound kernels
    (scores, top-k, lookup, fetch, sparse attention) that fills a few SMs: on their own streams (and
    as branches of a captured graph) the rows' chains run side by side instead of one after another."""
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
    bring = rows.lookup is None
    per_row(streams, attns, lambda b, a: a.decode_select(
        layer, q[b:b + 1], k[b:b + 1], v[b:b + 1], None if scores is None else scores[b],
        None if chosen is None else chosen[b], bring))
    if not bring:  # one lookup in every row's pool, then each row fetches its misses
        slots, fetch = lru_lookup_rows(chosen, rows.lookup, layer)
        slots += rows.lru0
        per_row(streams, attns, lambda b, a: a.decode_bring(layer, slots[b], fetch[b]))
    out, lse = sparse_decode_rows(q, rows.decode, layer, rows.scale)
    return torch.cat(per_row(streams, attns, lambda b, a: a.decode_merge(layer, q[b:b + 1], out[b], lse[b])))


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
