"""Block summaries for estimating attention over blocks whose K,V stay in CPU memory.

Per layer, KV head and block: the mean key and the value sum. A block then counts as block_size keys
equal to its mean key, each with the block's mean value, and its estimated attention merges into the
exactly attended part by log-sum-exp (RetroInfer's estimation zone). Two uses:
  estimate       the next-ranked blocks after the selection (the zone: estimate_tokens);
  estimate_rest  every candidate block the step does not attend (estimate_rest): what a selection
                 leaves out is spread thin over many blocks in broad layers (bench/ACCURACY_NOTES.md,
                 probe_outside_mass: the attention-output error of a 1/8 selection falls 0.062 -> 0.049).
The mean key underestimates a block's mass (exp is convex); on clustered blocks (ivf) it is tighter.

With value sketches (rest_rank > 0, a lowrank index's key sketches at hand) the rest is estimated
token by token instead: each left-out token scores as in lowrank's mass scores (its block's mean key
plus its key sketch's spread) and carries its block's mean value plus its value sketch's spread, a
rank-r PCA of the prompt's values (kernels.lowrank_rest). On the 0.5B at 4K with 1/8 attended
(blocks of 4) the attention-output error of the rest fell 0.050 -> 0.031 with rank 16: with blocks
this small a block's true mass changes nothing (0.051), its values' spread is what the mean misses
(bench/results/probe_outside_mass_0.5b_4K.json).
"""
from __future__ import annotations

import math

import torch

from .. import kernels
from ..config import KVGeometry
from ..errors import ConfigError, SavedPrefillError
from ..memory import check_allocation
from .base import restore_prefix
from .lowrank import LowRankIndex, pca


class BlockSummary:
    @staticmethod
    def nbytes_for(geo: KVGeometry, shared_means: bool = False, rank: int = 0) -> int:
        """Device bytes of the summaries for a geometry (what index auto's choice counts); with
        shared_means the index already keeps the mean keys; rank: value sketches of that rank."""
        blocks = (1 if shared_means else 2) * geo.nbytes(geo.layers, geo.kv_heads, geo.max_blocks, geo.head_dim)
        return blocks + (ValueSketch.nbytes_for(geo, rank) if rank else 0)

    def __init__(self, geo: KVGeometry, means: torch.Tensor | None = None, keys: "LowRankIndex | None" = None,
                 rank: int = 0):
        """means: the index's block mean keys [L, Hkv, max_blocks, d] (lowrank's mass scores), shared
        rather than kept twice; the index fills them. keys, rank: a lowrank index whose key sketches
        score the rest token by token, and the rank of the value sketches kept here for it."""
        shape = (geo.layers, geo.kv_heads, geo.max_blocks, geo.head_dim)
        check_allocation(self.nbytes_for(geo, means is not None, rank), geo.device,
                         "the block summaries (mean keys and value sums)",
                         "lower max_context, or set estimate_rest=False (and estimate_tokens=0, rest_rank=0)")
        self.bs, self.owns_means = geo.block_size, means is None
        self.means = torch.zeros(shape, device=geo.device, dtype=geo.dtype) if means is None else means
        self.vsums = torch.zeros(shape, device=geo.device, dtype=geo.dtype)
        self.one = torch.ones(1, device=geo.device, dtype=torch.int32)  # every "block" is one full row
        self.keys, self.values = keys, ValueSketch(geo, rank) if rank else None
        if rank and keys is None:
            raise ValueError("BlockSummary: value sketches (rank > 0) need the lowrank index's key sketches")

    def fit(self, layer: int, values: torch.Tensor) -> None:
        """values [T, Hkv, d] of the first prefill: the value sketches' basis (nothing without them)."""
        if self.values is not None:
            self.values.fit(layer, values)

    def add(self, layer: int | slice, first_block: int, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Full blocks first_block.. (keys, values [..., Hkv, nb, bs, d], as BlockIndex.add)."""
        nb = keys.shape[-3]
        if self.owns_means:
            self.means[layer, :, first_block:first_block + nb] = keys.float().mean(-2).to(self.means.dtype)
        self.vsums[layer, :, first_block:first_block + nb] = values.float().sum(-2).to(self.vsums.dtype)
        if self.values is not None:
            self.values.add(layer, first_block, values)

    def nbytes(self) -> int:
        own = (2 if self.owns_means else 1) * self.vsums.numel() * self.vsums.element_size()
        return own + (self.values.nbytes() if self.values is not None else 0)

    def state(self, n_blocks: int) -> dict[str, torch.Tensor]:
        """Blocks 0..n_blocks-1 (the mean keys only when this summary owns them)."""
        out = {"vsums": self.vsums[:, :, :n_blocks]}
        if self.values is not None:
            out |= self.values.state(n_blocks)
        return out | ({"means": self.means[:, :, :n_blocks]} if self.owns_means else {})

    def load_state(self, state: dict[str, torch.Tensor]) -> None:
        restore_prefix(self.vsums, state["vsums"], "block value sums")
        if self.owns_means:
            restore_prefix(self.means, state["means"], "block mean keys")
        if self.values is not None:
            self.values.load_state(state)

    def estimate(self, layer: int, q: torch.Tensor, blocks: torch.Tensor, scale: float):
        """Attention of q [Hq, d] over blocks [Hkv, z] -> (out [Hq, d] in q.dtype, lse [Hq] fp32)."""
        return self._attend(layer, q, blocks.to(torch.int32), scale)

    def estimate_rest(self, layer: int, q: torch.Tensor, left_out: torch.Tensor, scale: float, into=None):
        """Attention of q [Hq, d] over the blocks where left_out [Hkv, n] is True -> (out, lse); an
        empty set gives out 0 and lse -inf (what merge_attention treats as no contribution). into:
        (out, lse) of the attended blocks, merged in (in the same kernel on CUDA)."""
        if self.values is not None:
            k, v = self.keys, self.values
            return kernels.lowrank_rest(q, k.proj[layer], k.sketch[layer], self.means[layer], v.proj[layer],
                                        v.sketch[layer], self.vsums[layer], left_out, self.bs, scale, into)
        # Nearly every candidate is left out: one pass over the contiguous summary rows, merging the
        # attended part in (a layer's rest at 128K on the 8B shape: 32.6 us through the sparse decode
        # below and merge_attention, 22.2 this way; H100).
        return kernels.block_rest(q, self.means[layer], self.vsums[layer], left_out, self.bs, scale, into)

    def _attend(self, layer: int, q: torch.Tensor, blocks: torch.Tensor, scale: float):
        # The zone's few listed blocks are a pool of 1-token blocks: the sparse decode kernel attends
        # them (-1: skipped, never read) with the mean keys as keys and the value sums as values.
        # Measured on the H200 (8B shape, 128K): two batched matmuls over every summary took 11 ms a
        # step (cuBLAS picks a gemv for M = 4 query rows and K = 8K blocks).
        out, lse = kernels.sparse_decode(q, self.means[layer, :, :, None], self.vsums[layer, :, :, None], blocks,
                                         self.one, scale)
        return out / self.bs, lse + math.log(self.bs)  # each block = bs keys of its mean value


class ValueSketch:
    """Per layer and KV head, a rank-r PCA basis of the first prefill's values and every token's
    coordinates in it (as LowRankIndex keeps for keys): what the token-level rest reads."""

    @staticmethod
    def nbytes_for(geo: KVGeometry, rank: int) -> int:
        """Device bytes: rank values per token, and a basis and a mean per layer and KV head."""
        return (geo.nbytes(geo.layers, geo.kv_heads, geo.max_tokens, rank)
                + geo.nbytes(geo.layers, geo.kv_heads, geo.head_dim, rank + 1))

    def __init__(self, geo: KVGeometry, rank: int):
        if rank > geo.head_dim:
            raise ConfigError(f"RetrievalConfig.rest_rank {rank} is above the model's head_dim {geo.head_dim}; "
                              f"use a rank <= {geo.head_dim}")
        like = dict(device=geo.device, dtype=geo.dtype)
        self.rank, self.bs = rank, geo.block_size
        self.sketch = torch.zeros(geo.layers, geo.kv_heads, geo.max_tokens, rank, **like)
        self.mean = torch.zeros(geo.layers, geo.kv_heads, geo.head_dim, **like)
        self.proj = torch.zeros(geo.layers, geo.kv_heads, geo.head_dim, rank, **like)

    def fit(self, layer: int, values: torch.Tensor) -> None:
        """values [T, Hkv, d]: the same chunked PCA as the key sketches' (index.lowrank.pca)."""
        mean, proj = pca(values, self.rank)
        self.mean[layer], self.proj[layer] = mean.to(self.mean.dtype), proj.to(self.proj.dtype)

    def add(self, layer: int | slice, first_block: int, values: torch.Tensor) -> None:
        """values [..., Hkv, nb, bs, d] of full blocks first_block.. (layer a slice: every layer)."""
        nb, bs = values.shape[-3:-1]
        x = (values.flatten(-3, -2) - self.mean[layer].unsqueeze(-2)) @ self.proj[layer]
        self.sketch[layer, :, first_block * bs:(first_block + nb) * bs] = x

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.sketch, self.mean, self.proj))

    def state(self, n_blocks: int) -> dict[str, torch.Tensor]:
        return {"vsketch": self.sketch[:, :, :n_blocks * self.bs], "vmean": self.mean, "vproj": self.proj}

    def load_state(self, state: dict[str, torch.Tensor]) -> None:
        restore_prefix(self.sketch, state["vsketch"], "value sketches")
        for name, dst in (("vmean", self.mean), ("vproj", self.proj)):
            if state[name].shape != dst.shape:
                raise SavedPrefillError(f"the saved {name} has the shape {tuple(state[name].shape)}, not this "
                                        f"model's {tuple(dst.shape)}; reopen it with the options it was saved with")
            dst.copy_(state[name])
