"""Block indexes: how the blocks worth attending to are found. lowrank (Loki), bounds (Quest), ivf
(clusters), and for measurement exact and oracle."""
from __future__ import annotations

from ..config import KVGeometry, RetrievalConfig
from ..errors import ConfigError
from .base import BlockIndex, top_blocks
from .bounds import BoundsIndex
from .exact import ExactIndex
from .ivf import IVFIndex
from .lowrank import LowRankIndex
from .summary import BlockSummary


def make_index(cfg: RetrievalConfig, geo: KVGeometry) -> BlockIndex:
    """The index a resolved config names (kvretrieve.resolve makes index='auto' concrete)."""
    if cfg.index == "lowrank":
        return LowRankIndex(geo, cfg.rank, mass=cfg.block_scores == "mass")
    if cfg.index == "bounds":
        return BoundsIndex(geo)
    if cfg.index in ("exact", "oracle"):
        return ExactIndex(geo, mass=cfg.index == "oracle")
    if cfg.index == "ivf":
        return IVFIndex(geo, cfg.kmeans)
    raise ConfigError(f"RetrievalConfig.index {cfg.index!r} is not an index kind (resolve 'auto' first)")


__all__ = ["BlockIndex", "BlockSummary", "make_index", "top_blocks", "LowRankIndex", "BoundsIndex", "ExactIndex", "IVFIndex"]
