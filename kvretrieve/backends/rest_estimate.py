"""The rest of a decode step's layer (every candidate block not attended, index.BlockSummary), begun as
soon as the selection is known so that it overlaps the fetch of the selection's misses.

The estimate reads the query, the selection's block ids and the summaries, never the fetched K,V. On
CUDA it runs on a side stream forked right after the ranking: its pass over the summaries (HBM-bound,
~14 us a layer for the 8B shape at 128K on an H100) runs beside fetch_blocks (PCIe-bound: ~4 MB a
layer with random weights at 128K) and the sparse decode, and the main stream waits for it only at the
merge. Elsewhere it is computed at the merge, merged in by the rest kernel itself (into=).
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
        self.side = torch.cuda.Stream(device) if device.type == "cuda" else None
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
