"""Attention backends the model calls per layer: dense (the whole KV on the device) and retrieval
(the KV in CPU memory, a few blocks attended per step), behind one interface (base.AttentionBackend)."""
from __future__ import annotations

from ..config import KVGeometry, RetrievalConfig
from .base import AttentionBackend
from .dense import DenseKV
from .retrieval import RetrievalKV


def make_backend(retrieval: RetrievalConfig | None, geo: KVGeometry, capacity: int) -> AttentionBackend:
    """Dense (retrieval None) or retrieval over a CPU-resident cache, for `capacity` tokens; retrieval
    must be resolved (kvretrieve.resolve)."""
    return DenseKV(geo, capacity) if retrieval is None else RetrievalKV(retrieval, geo, capacity)


__all__ = ["AttentionBackend", "DenseKV", "RetrievalKV", "make_backend"]
