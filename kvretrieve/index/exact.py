"""The oracle: true block maxima of q.k over full keys. For measuring the other kinds, never the
default: it keeps every key on the compute device, which is what retrieval exists to avoid."""
from __future__ import annotations

import torch

from .. import kernels
from ..runtime.memory import check_allocation


class ExactIndex:
    kind = "exact"

    def __init__(self, num_layers: int, num_kv_heads: int, head_dim: int, block_size: int, max_blocks: int,
                 device: torch.device, dtype: torch.dtype):
        self.bs = block_size
        shape = (num_layers, num_kv_heads, max_blocks * block_size, head_dim)
        check_allocation(torch.Size(shape).numel() * torch.finfo(dtype).bits // 8, device,
                         "the exact index (a full copy of the keys)", "use --retrieval lowrank or bounds")
        self.keys = torch.zeros(shape, device=device, dtype=dtype)

    def fit(self, layer: int, keys: torch.Tensor) -> None:
        pass

    def add(self, layer: int | slice, first_block: int, keys: torch.Tensor, values: torch.Tensor) -> None:
        nb, bs = keys.shape[-3:-1]
        self.keys[layer, :, first_block * bs:(first_block + nb) * bs] = keys.flatten(-3, -2)

    def scores(self, layer: int, q: torch.Tensor, n_blocks: int) -> torch.Tensor:
        return kernels.max_dot_block_scores(q, self.keys[layer], n_blocks, self.bs)

    def nbytes(self) -> int:
        return self.keys.numel() * self.keys.element_size()
