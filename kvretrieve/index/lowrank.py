"""Loki-style low-rank keys: per layer and KV head, a PCA basis of the prompt's post-RoPE keys.

Keys are mean-centred before projection: the mean is large in RoPE'd keys and would otherwise eat
the first component. A query's approximate score on token t is q.mean + (q P).((k_t - mean) P);
the q.mean term differs per query head, so it matters for the max over the GQA group. Only the
r-dimensional sketches stay on the device (r/d of the key memory).
"""
from __future__ import annotations

import torch

from .. import kernels
from ..runtime.memory import check_allocation


class LowRankIndex:
    kind = "lowrank"

    def __init__(self, num_layers: int, num_kv_heads: int, head_dim: int, block_size: int, max_blocks: int,
                 rank: int, device: torch.device, dtype: torch.dtype):
        self.bs, self.rank = block_size, rank
        shape = (num_layers, num_kv_heads, max_blocks * block_size, rank)
        check_allocation(torch.Size(shape).numel() * torch.finfo(dtype).bits // 8, device,
                         "the low-rank key sketches", "lower --max-context or --rank")
        self.sketch = torch.zeros(shape, device=device, dtype=dtype)
        self.mean = torch.zeros(num_layers, num_kv_heads, head_dim, device=device, dtype=dtype)
        self.proj = torch.zeros(num_layers, num_kv_heads, head_dim, rank, device=device, dtype=dtype)

    def fit(self, layer: int, keys: torch.Tensor, chunk: int = 8192) -> None:
        """keys [T, Hkv, d]. Mean and covariance accumulate in fp32 over chunks, so a 128K prompt
        never needs an fp32 copy of all its keys."""
        T = keys.shape[0]
        mean = sum(keys[s:s + chunk].float().sum(0) for s in range(0, T, chunk)) / T     # [Hkv, d]
        cov = 0
        for s in range(0, T, chunk):
            x = (keys[s:s + chunk].float() - mean).transpose(0, 1)                       # [Hkv, t, d]
            cov = cov + x.transpose(1, 2) @ x
        _, vecs = torch.linalg.eigh(cov / T)                                             # ascending
        self.proj[layer] = vecs.flip(-1)[:, :, :self.rank].to(self.proj.dtype)
        self.mean[layer] = mean.to(self.mean.dtype)

    def add(self, layer: int | slice, first_block: int, keys: torch.Tensor, values: torch.Tensor) -> None:
        nb, bs = keys.shape[-3:-1]
        x = (keys.flatten(-3, -2) - self.mean[layer].unsqueeze(-2)) @ self.proj[layer]
        self.sketch[layer, :, first_block * bs:(first_block + nb) * bs] = x

    def scores(self, layer: int, q: torch.Tensor, n_blocks: int) -> torch.Tensor:
        return kernels.lowrank_block_scores(q, self.proj[layer], self.mean[layer], self.sketch[layer], n_blocks,
                                            self.bs)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.sketch, self.mean, self.proj))
