"""Attention backends the model calls per layer: dense (the whole KV on the device) and retrieval
(the KV in CPU memory, a few blocks attended per step), behind one interface (base.AttentionBackend)."""
from __future__ import annotations

from ..config import KVGeometry, RetrievalConfig
from .base import AttentionBackend
from .dense import DenseKV
from .retrieval import RetrievalKV
from .split import SplitKV


def make_backend(retrieval: RetrievalConfig | None, geo: KVGeometry, capacity: int) -> AttentionBackend:
    """Dense (retrieval None) or retrieval over a CPU-resident cache, for `capacity` tokens; retrieval
    must be resolved (kvretrieve.resolve); with dense_layers, those first layers dense and the rest retrieval."""
    if retrieval is None:
        return DenseKV(geo, capacity)
    return SplitKV(retrieval, geo, capacity) if retrieval.dense_layers else RetrievalKV(retrieval, geo, capacity)


__all__ = ["AttentionBackend", "DenseKV", "RetrievalKV", "SplitKV", "make_backend"]
