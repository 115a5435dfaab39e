"""The rest of a decode step's layer (every candidate block not attended, index.BlockSummary), begun as
soon as the selection is known.

The estimate reads the query, the selection's block ids and the summaries, never the fetched K,V. The
token-level rest (value sketches, rest_rank > 0) runs on CUDA on a side stream forked right after the
ranking, beside fetch_blocks (PCIe-bound) and the sparse decode; the main stream waits for it only at
the merge. Measured on H100s (llama3-1b shape at 32K, bench/results/profile_rest_rank_1b_h100.md): it
cost +0.87 ms a token in line, +0.12 and +0.72 on the side stream (three machines: suggestive, not
settled). The per-block rest (rest_rank 0) stays in line: on the side stream the 8B shape at 128K went
12.4 -> 13.3 ms a token in one call (its one HBM-bound pass does not hide, and each layer pays the fork
and the join; bench/results/decode_rest_overlap_h100.md). In line the rest kernel merges the attended
part in itself (into=).
"""
from __future__ import annotations

import torch

from .. import kernels
from ..index import BlockSummary
from .decode_plan import DecodePlan


class RestEstimate:
    def __init__(self, summary: BlockSummary, plan: DecodePlan, kv_heads: int, scale: float,
                 device: torch.device):
        self.summary, self.plan, self.H, self.scale = summary, plan, kv_heads, scale
        self.side = torch.cuda.Stream(device) if device.type == "cuda" and summary.values is not None else None
        self._pending = None  # (layer, q, ids) or ((out, lse), event) between begin and merge

    def begin(self, layer: int, q: torch.Tensor, ids: torch.Tensor) -> None:
        """Start the estimate of layer's rest for query q [Hq, d], given the selected block ids [Hkv, k]."""
        if self.side is None:
            self._pending = (layer, q, ids)
            return
        main = torch.cuda.current_stream(q.device)
        self.side.wait_stream(main)
        for t in (q, ids):
            t.record_stream(self.side)  # freed by their makers while the side stream may still read them
        with torch.cuda.stream(self.side):
            est = self.summary.estimate_rest(layer, q, self._left_out(ids), self.scale)
            done = torch.cuda.Event()
            done.record(self.side)
        for t in est:
            t.record_stream(main)  # made on the side stream, read on the main one
        self._pending = (est, done)

    def merge(self, out: torch.Tensor, lse: torch.Tensor) -> torch.Tensor:
        """The attended part (out [Hq, d], lse [Hq]) with the begun estimate merged in -> out [Hq, d]."""
        pending, self._pending = self._pending, None
        if self.side is None:
            layer, q, ids = pending
            return self.summary.estimate_rest(layer, q, self._left_out(ids), self.scale, into=(out, lse))[0]
        est, done = pending
        torch.cuda.current_stream(out.device).wait_event(done)
        return kernels.merge_attention(out, lse, *est)[0]

    def _left_out(self, ids: torch.Tensor) -> torch.Tensor:
        return self.plan.candidate.expand(self.H, -1).scatter(1, ids, False)  # candidates not attended
