"""Oracles over full keys, for measuring the other kinds, never the default: they keep every key on
the compute device, which is what retrieval exists to avoid.

exact:  a block's score is its true maximum of q.k (what the approximate kinds estimate).
oracle: a block's score is its true share of the softmax attention mass, summed over the GQA group:
        the ranking that maximises attention-mass recall, the best any block selection can do.
"""
from __future__ import annotations

import torch

from .. import kernels
from ..config import KVGeometry
from .base import BlockIndex, restore_prefix
from ..memory import check_allocation


class ExactIndex(BlockIndex):
    kind = "exact"

    def __init__(self, geo: KVGeometry, mass: bool = False):
        self.bs, self.mass = geo.block_size, mass
        self.kind = "oracle" if mass else "exact"
        shape = (geo.layers, geo.kv_heads, geo.max_tokens, geo.head_dim)
        check_allocation(geo.nbytes(*shape), geo.device, "the exact index (a full copy of the keys)",
                         "use RetrievalConfig.index 'lowrank' or 'bounds'")
        self.keys = torch.zeros(shape, device=geo.device, dtype=geo.dtype)

    def add(self, layer: int | slice, first_block: int, keys: torch.Tensor, values: torch.Tensor) -> None:
        nb, bs = keys.shape[-3:-1]
        self.keys[layer, :, first_block * bs:(first_block + nb) * bs] = keys.flatten(-3, -2)

    def scores(self, layer: int, q: torch.Tensor, n_blocks: int) -> torch.Tensor:
        if not self.mass:
            return kernels.max_dot_block_scores(q, self.keys[layer], n_blocks, self.bs)
        hkv, d = self.keys.shape[1], q.shape[-1]
        s = q.float().view(hkv, -1, d) @ self.keys[layer, :, :n_blocks * self.bs].float().transpose(1, 2)
        s = s * d ** -0.5                                                          # [Hkv, G, n*bs]
        share = s.view(*s.shape[:2], n_blocks, self.bs).logsumexp(-1) - s.logsumexp(-1, keepdim=True)
        return share.logsumexp(1)  # log of the block's mass summed over the group's query heads

    def state(self, n_blocks: int) -> dict[str, torch.Tensor]:
        return {"keys": self.keys[:, :, :n_blocks * self.bs]}

    def load_state(self, state: dict[str, torch.Tensor]) -> None:
        restore_prefix(self.keys, state["keys"], "keys")

    def nbytes(self) -> int:
        return self.keys.numel() * self.keys.element_size()
