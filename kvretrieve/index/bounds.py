"""Quest-style bounds: per block and channel, the min and max of the keys.

sum_c max(q_c * min_c, q_c * max_c) bounds q.k from above for every key of the block, so a block
holding one large score is never ranked below its true maximum.
"""
from __future__ import annotations

import torch

from .. import kernels
from ..runtime.memory import check_allocation


class BoundsIndex:
    kind = "bounds"

    def __init__(self, num_layers: int, num_kv_heads: int, head_dim: int, block_size: int, max_blocks: int,
                 device: torch.device, dtype: torch.dtype):
        shape = (num_layers, num_kv_heads, max_blocks, head_dim)
        check_allocation(2 * torch.Size(shape).numel() * torch.finfo(dtype).bits // 8, device,
                         "the block bounds", "lower --max-context")
        self.kmin = torch.zeros(shape, device=device, dtype=dtype)
        self.kmax = torch.zeros(shape, device=device, dtype=dtype)

    def fit(self, layer: int, keys: torch.Tensor) -> None:
        pass

    def add(self, layer: int | slice, first_block: int, keys: torch.Tensor, values: torch.Tensor) -> None:
        nb = keys.shape[-3]
        self.kmin[layer, :, first_block:first_block + nb] = keys.amin(-2)
        self.kmax[layer, :, first_block:first_block + nb] = keys.amax(-2)

    def scores(self, layer: int, q: torch.Tensor, n_blocks: int) -> torch.Tensor:
        return kernels.bounds_block_scores(q, self.kmin[layer], self.kmax[layer], n_blocks)

    def nbytes(self) -> int:
        return 2 * self.kmin.numel() * self.kmin.element_size()
