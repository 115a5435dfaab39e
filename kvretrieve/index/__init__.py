"""Block indexes: lowrank (Loki), bounds (Quest), ivf (clusters), exact (oracle)."""
from __future__ import annotations

import torch

from ..config import RetrievalConfig
from ..errors import ConfigError
from .base import BlockIndex, select_blocks
from .bounds import BoundsIndex
from .exact import ExactIndex
from .ivf import IVFIndex
from .lowrank import LowRankIndex


def make_index(cfg: RetrievalConfig, num_layers: int, num_kv_heads: int, head_dim: int, max_blocks: int,
               device: torch.device, dtype: torch.dtype) -> BlockIndex:
    shape = (num_layers, num_kv_heads, head_dim, cfg.block_size, max_blocks)
    if cfg.index == "lowrank":
        if cfg.rank > head_dim:
            raise ConfigError(f"rank {cfg.rank} is above the model's head_dim {head_dim}; use --rank <= {head_dim}")
        return LowRankIndex(*shape, cfg.rank, device, dtype)
    if cfg.index == "bounds":
        return BoundsIndex(*shape, device, dtype)
    if cfg.index in ("exact", "oracle"):
        return ExactIndex(*shape, device, dtype, mass=cfg.index == "oracle")
    if cfg.index == "ivf":
        return IVFIndex(*shape, device, dtype, kmeans=cfg.kmeans, estimate=cfg.estimate_tokens > 0)
    raise ConfigError(f"unknown index kind {cfg.index!r}")


__all__ = ["BlockIndex", "make_index", "select_blocks", "LowRankIndex", "BoundsIndex", "ExactIndex", "IVFIndex"]
