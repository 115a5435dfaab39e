"""Loki-style low-rank keys: per layer and KV head, a PCA basis of the prompt's post-RoPE keys.

Keys are mean-centred before projection: the mean is large in RoPE'd keys and would otherwise eat
the first component. A query's approximate score on token t is q.mean + (q P).((k_t - mean) P);
the q.mean term differs per query head, so it matters for the max over the GQA group. Only the
r-dimensional sketches stay on the device (r/d of the key memory).

Block scores: "max" (the default) is Loki's, the largest approximate score over a block's tokens and
the group's query heads. "mass" estimates each block's share of the attention: a token scores
q.mean_b + (q P).(sketch_t - the block's mean sketch), the block's exact mean key plus the sketches'
spread around it, so the r dimensions only carry what varies inside a block. On the 1.5B at 32K
(bench/results/longctx_mass.md) it cut KL against dense by 18% at the default budget and 28% at 1/8
attended with blocks of 8, reaching the oracle's top-1; but its kernel takes 70 us a layer at 128K
against max's 23 (8B shape: 14.8 against 11.0 ms a token), so it is not the default yet. The block
mean keys cost head_dim values per block and KV head; the rest's summaries share them.
"""
from __future__ import annotations

import torch

from .. import kernels
from ..config import KVGeometry
from .base import BlockIndex, restore_prefix
from ..errors import ConfigError
from ..memory import check_allocation


def pca(x: torch.Tensor, rank: int, chunk: int = 8192) -> tuple[torch.Tensor, torch.Tensor]:
    """x [T, Hkv, d] -> (mean [Hkv, d], the top `rank` principal directions [Hkv, d, rank]), fp32. Mean
    and covariance accumulate in fp32 over chunks, so a 128K prompt never needs an fp32 copy of x."""
    T = x.shape[0]
    mean = sum(x[s:s + chunk].float().sum(0) for s in range(0, T, chunk)) / T             # [Hkv, d]
    cov = 0
    for s in range(0, T, chunk):
        c = (x[s:s + chunk].float() - mean).transpose(0, 1)                               # [Hkv, t, d]
        cov = cov + c.transpose(1, 2) @ c
    _, vecs = torch.linalg.eigh(cov / T)                                                  # ascending
    return mean, vecs.flip(-1)[:, :, :rank]


class LowRankIndex(BlockIndex):
    kind = "lowrank"

    @staticmethod
    def nbytes_for(geo: KVGeometry, rank: int, mass: bool) -> int:
        """Device bytes of the sketches (and the block mean keys when scoring by mass)."""
        means = geo.nbytes(geo.layers, geo.kv_heads, geo.max_blocks, geo.head_dim) if mass else 0
        return geo.nbytes(geo.layers, geo.kv_heads, geo.max_tokens, rank) + means

    def __init__(self, geo: KVGeometry, rank: int, mass: bool = False):
        if rank > geo.head_dim:
            raise ConfigError(f"RetrievalConfig.rank {rank} is above the model's head_dim {geo.head_dim}; "
                              f"use a rank <= {geo.head_dim}")
        self.bs, self.rank, self.scale = geo.block_size, rank, geo.head_dim ** -0.5
        shape = (geo.layers, geo.kv_heads, geo.max_tokens, rank)
        check_allocation(self.nbytes_for(geo, rank, mass), geo.device, "the low-rank key sketches",
                         "lower max_context or RetrievalConfig.rank")
        like = dict(device=geo.device, dtype=geo.dtype)
        self.sketch = torch.zeros(shape, **like)
        self.mean = torch.zeros(geo.layers, geo.kv_heads, geo.head_dim, **like)
        self.proj = torch.zeros(geo.layers, geo.kv_heads, geo.head_dim, rank, **like)
        self.block_means = torch.zeros(geo.layers, geo.kv_heads, geo.max_blocks, geo.head_dim, **like) if mass else None

    def fit(self, layer: int, keys: torch.Tensor) -> None:
        """keys [T, Hkv, d] of the first prefill: the sketches' basis."""
        mean, proj = pca(keys, self.rank)
        self.proj[layer], self.mean[layer] = proj.to(self.proj.dtype), mean.to(self.mean.dtype)

    def add(self, layer: int | slice, first_block: int, keys: torch.Tensor, values: torch.Tensor) -> None:
        nb, bs = keys.shape[-3:-1]
        x = (keys.flatten(-3, -2) - self.mean[layer].unsqueeze(-2)) @ self.proj[layer]
        self.sketch[layer, :, first_block * bs:(first_block + nb) * bs] = x
        if self.block_means is not None:
            self.block_means[layer, :, first_block:first_block + nb] = keys.float().mean(-2).to(self.block_means.dtype)

    def scores(self, layer: int, q: torch.Tensor, n_blocks: int) -> torch.Tensor:
        if self.block_means is not None:
            return kernels.lowrank_block_mass(q, self.proj[layer], self.sketch[layer], self.block_means[layer],
                                              n_blocks, self.bs, self.scale)
        return kernels.lowrank_block_scores(q, self.proj[layer], self.mean[layer], self.sketch[layer], n_blocks,
                                            self.bs)

    def row_operands(self) -> tuple[str, tuple[torch.Tensor, ...]] | None:
        if self.block_means is not None:
            return "mass", (self.proj, self.sketch, self.block_means)
        return "max", (self.proj, self.mean, self.sketch)

    def state(self, n_blocks: int) -> dict[str, torch.Tensor]:
        out = {"sketch": self.sketch[:, :, :n_blocks * self.bs], "mean": self.mean, "proj": self.proj}
        return out | ({"block_means": self.block_means[:, :, :n_blocks]} if self.block_means is not None else {})

    def load_state(self, state: dict[str, torch.Tensor]) -> None:
        restore_prefix(self.sketch, state["sketch"], "key sketches")
        self.mean.copy_(state["mean"])
        self.proj.copy_(state["proj"])
        if self.block_means is not None:
            restore_prefix(self.block_means, state["block_means"], "block mean keys")

    def nbytes(self) -> int:
        tensors = (self.sketch, self.mean, self.proj) + ((self.block_means,) if self.block_means is not None else ())
        return sum(t.numel() * t.element_size() for t in tensors)
