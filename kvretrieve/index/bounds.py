"""Quest-style bounds: per block and channel, the min and max of the keys.

sum_c max(q_c * min_c, q_c * max_c) bounds q.k from above for every key of the block, so a block
holding one large score is never ranked below its true maximum.
"""
from __future__ import annotations

import torch

from .. import kernels
from ..config import KVGeometry
from .base import BlockIndex, restore_prefix
from ..memory import check_allocation


class BoundsIndex(BlockIndex):
    kind = "bounds"

    def __init__(self, geo: KVGeometry):
        shape = (geo.layers, geo.kv_heads, geo.max_blocks, geo.head_dim)
        check_allocation(2 * geo.nbytes(*shape), geo.device, "the block bounds", "lower max_context")
        self.kmin = torch.zeros(shape, device=geo.device, dtype=geo.dtype)
        self.kmax = torch.zeros(shape, device=geo.device, dtype=geo.dtype)

    def add(self, layer: int | slice, first_block: int, keys: torch.Tensor, values: torch.Tensor) -> None:
        nb = keys.shape[-3]
        self.kmin[layer, :, first_block:first_block + nb] = keys.amin(-2)
        self.kmax[layer, :, first_block:first_block + nb] = keys.amax(-2)

    def scores(self, layer: int, q: torch.Tensor, n_blocks: int) -> torch.Tensor:
        return kernels.bounds_block_scores(q, self.kmin[layer], self.kmax[layer], n_blocks)

    def state(self, n_blocks: int) -> dict[str, torch.Tensor]:
        return {"kmin": self.kmin[:, :, :n_blocks], "kmax": self.kmax[:, :, :n_blocks]}

    def load_state(self, state: dict[str, torch.Tensor]) -> None:
        restore_prefix(self.kmin, state["kmin"], "block bounds")
        restore_prefix(self.kmax, state["kmax"], "block bounds")

    def nbytes(self) -> int:
        return 2 * self.kmin.numel() * self.kmin.element_size()
