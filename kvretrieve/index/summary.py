"""Block summaries for estimating attention over blocks whose K,V stay in CPU memory.

Per layer, KV head and block: the mean key and the value sum. A block then counts as block_size keys
equal to its mean key, each with the block's mean value, and its estimated attention merges into the
exactly attended part by log-sum-exp (RetroInfer's estimation zone). Two uses:
  estimate       the next-ranked blocks after the selection (the zone: estimate_tokens);
  estimate_rest  every candidate block the step does not attend (estimate_rest): what a selection
                 leaves out is spread thin over many blocks in broad layers (bench/ACCURACY_NOTES.md,
                 probe_outside_mass: the attention-output error of a 1/8 selection falls 0.062 -> 0.049).
The mean key underestimates a block's mass (exp is convex); on clustered blocks (ivf) it is tighter.
"""
from __future__ import annotations

import math

import torch

from ..config import KVGeometry
from ..memory import check_allocation


class BlockSummary:
    def __init__(self, geo: KVGeometry):
        shape = (geo.layers, geo.kv_heads, geo.max_blocks, geo.head_dim)
        check_allocation(2 * geo.nbytes(*shape), geo.device, "the block summaries (mean keys and value sums)",
                         "lower max_context, or leave RetrievalConfig.estimate_tokens and estimate_rest off")
        self.bs = geo.block_size
        self.means = torch.zeros(shape, device=geo.device, dtype=geo.dtype)
        self.vsums = torch.zeros(shape, device=geo.device, dtype=geo.dtype)

    def add(self, layer: int | slice, first_block: int, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Full blocks first_block.. (keys, values [..., Hkv, nb, bs, d], as BlockIndex.add)."""
        nb = keys.shape[-3]
        self.means[layer, :, first_block:first_block + nb] = keys.float().mean(-2).to(self.means.dtype)
        self.vsums[layer, :, first_block:first_block + nb] = values.float().sum(-2).to(self.vsums.dtype)

    def nbytes(self) -> int:
        return 2 * self.means.numel() * self.means.element_size()

    def estimate(self, layer: int, q: torch.Tensor, blocks: torch.Tensor, scale: float):
        """Attention of q [Hq, d] over blocks [Hkv, z] -> (out [Hq, d] fp32, lse [Hq] fp32)."""
        idx = blocks[..., None].expand(-1, -1, self.means.shape[-1])
        means = torch.gather(self.means[layer], 1, idx)                            # [Hkv, z, d]
        vsums = torch.gather(self.vsums[layer], 1, idx)
        return self._attend(q, means, vsums, None, scale)

    def estimate_rest(self, layer: int, q: torch.Tensor, left_out: torch.Tensor, scale: float):
        """Attention of q [Hq, d] over the blocks where left_out [Hkv, n] is True -> (out, lse); an
        empty set gives out 0 and lse -inf (what merge_attention treats as no contribution)."""
        n = left_out.shape[1]
        return self._attend(q, self.means[layer, :, :n], self.vsums[layer, :, :n], left_out, scale)

    def _attend(self, q, means, vsums, mask, scale: float):
        # The two matmuls read the summaries in their own dtype (fp32 accumulation inside): an fp32
        # copy of every block's summary per layer and step would triple the traffic (8B shape at
        # 128K: ~6 GB a step). Only the [Hkv, G, n] scores and weights are fp32.
        hkv, d = means.shape[0], q.shape[-1]
        s = (q.to(means.dtype).view(hkv, -1, d) @ means.transpose(1, 2)).float() * scale  # [Hkv, G, n]
        if mask is not None:
            s = s.masked_fill(~mask[:, None], float("-inf"))
        lse = torch.logsumexp(s, -1) + math.log(self.bs)                              # each block = bs keys
        w = torch.softmax(s, -1).nan_to_num()                                          # mass share per block
        out = (w.to(vsums.dtype) @ vsums).float() / self.bs                            # a block's mean value
        return out.view(-1, d), lse.view(-1)
