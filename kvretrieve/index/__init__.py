"""Block indexes: lowrank (Loki), bounds (Quest), ivf (clusters), exact (oracle)."""
from __future__ import annotations

from dataclasses import replace

import torch

from ..config import RetrievalConfig
from ..errors import ConfigError
from ..runtime.memory import free_bytes
from .base import BlockIndex, select_blocks
from .bounds import BoundsIndex
from .exact import ExactIndex
from .ivf import IVFIndex
from .lowrank import LowRankIndex


# index="auto" takes lowrank while its sketches fit in this share of the memory left on the device:
# the rest is for the block pool, the ring and prefill's activations (at 128K on a 24 GiB cap, 2 GiB
# of sketches beside 15 GiB of weights peak at 19 GiB).
AUTO_SKETCH_SHARE = 0.5


def choose_index(cfg: RetrievalConfig, num_layers: int, num_kv_heads: int, max_blocks: int,
                 device: torch.device, dtype: torch.dtype) -> RetrievalConfig:
    """cfg with index="auto" made concrete: lowrank (the most accurate kind, bench/results/accuracy.md)
    when its sketches, r/d of the keys, fit; otherwise ivf, which keeps only centroids on the device
    (an 8B model on a 24 GB card: lowrank to ~256K tokens, ivf at 512K)."""
    if cfg.index != "auto":
        return cfg
    sketch = num_layers * num_kv_heads * max_blocks * cfg.block_size * cfg.rank * torch.finfo(dtype).bits // 8
    return replace(cfg, index="lowrank" if sketch <= AUTO_SKETCH_SHARE * free_bytes(device) else "ivf")


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


__all__ = ["BlockIndex", "choose_index", "make_index", "select_blocks", "LowRankIndex", "BoundsIndex", "ExactIndex", "IVFIndex"]
