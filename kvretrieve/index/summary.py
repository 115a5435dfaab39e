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

from .. import kernels
from ..config import KVGeometry
from ..memory import check_allocation
from .base import restore_prefix


class BlockSummary:
    @staticmethod
    def nbytes_for(geo: KVGeometry, shared_means: bool = False) -> int:
        """Device bytes of the summaries for a geometry (what index auto's choice counts); with
        shared_means the index already keeps the mean keys."""
        return (1 if shared_means else 2) * geo.nbytes(geo.layers, geo.kv_heads, geo.max_blocks, geo.head_dim)

    def __init__(self, geo: KVGeometry, means: torch.Tensor | None = None):
        """means: the index's block mean keys [L, Hkv, max_blocks, d] (lowrank's mass scores), shared
        rather than kept twice; the index fills them."""
        shape = (geo.layers, geo.kv_heads, geo.max_blocks, geo.head_dim)
        check_allocation(self.nbytes_for(geo, means is not None), geo.device,
                         "the block summaries (mean keys and value sums)",
                         "lower max_context, or set estimate_rest=False (and estimate_tokens=0)")
        self.bs, self.owns_means = geo.block_size, means is None
        self.means = torch.zeros(shape, device=geo.device, dtype=geo.dtype) if means is None else means
        self.vsums = torch.zeros(shape, device=geo.device, dtype=geo.dtype)
        self.columns = torch.arange(geo.max_blocks, device=geo.device, dtype=torch.int32)[None]
        self.one = torch.ones(1, device=geo.device, dtype=torch.int32)  # every "block" is one full row

    def add(self, layer: int | slice, first_block: int, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Full blocks first_block.. (keys, values [..., Hkv, nb, bs, d], as BlockIndex.add)."""
        nb = keys.shape[-3]
        if self.owns_means:
            self.means[layer, :, first_block:first_block + nb] = keys.float().mean(-2).to(self.means.dtype)
        self.vsums[layer, :, first_block:first_block + nb] = values.float().sum(-2).to(self.vsums.dtype)

    def nbytes(self) -> int:
        return (2 if self.owns_means else 1) * self.vsums.numel() * self.vsums.element_size()

    def state(self, n_blocks: int) -> dict[str, torch.Tensor]:
        """Blocks 0..n_blocks-1 (the mean keys only when this summary owns them)."""
        out = {"vsums": self.vsums[:, :, :n_blocks]}
        return out | ({"means": self.means[:, :, :n_blocks]} if self.owns_means else {})

    def load_state(self, state: dict[str, torch.Tensor]) -> None:
        restore_prefix(self.vsums, state["vsums"], "block value sums")
        if self.owns_means:
            restore_prefix(self.means, state["means"], "block mean keys")

    def estimate(self, layer: int, q: torch.Tensor, blocks: torch.Tensor, scale: float):
        """Attention of q [Hq, d] over blocks [Hkv, z] -> (out [Hq, d] in q.dtype, lse [Hq] fp32)."""
        return self._attend(layer, q, blocks.to(torch.int32), scale)

    def estimate_rest(self, layer: int, q: torch.Tensor, left_out: torch.Tensor, scale: float):
        """Attention of q [Hq, d] over the blocks where left_out [Hkv, n] is True -> (out, lse); an
        empty set gives out 0 and lse -inf (what merge_attention treats as no contribution)."""
        return self._attend(layer, q, torch.where(left_out, self.columns[:, :left_out.shape[1]], -1), scale)

    def _attend(self, layer: int, q: torch.Tensor, blocks: torch.Tensor, scale: float):
        # The summaries are a pool of 1-token blocks: the sparse decode kernel attends the listed
        # ones (-1: skipped, never read) with the mean keys as keys and the value sums as values.
        # Measured on the H200 (8B shape, 128K): two batched matmuls over every summary took 11 ms a
        # step (cuBLAS picks a gemv for M = 4 query rows and K = 8K blocks).
        out, lse = kernels.sparse_decode(q, self.means[layer, :, :, None], self.vsums[layer, :, :, None], blocks,
                                         self.one, scale)
        return out / self.bs, lse + math.log(self.bs)  # each block = bs keys of its mean value
