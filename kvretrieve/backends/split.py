"""Dense attention in the first layers, retrieval in the rest (RetrievalConfig.dense_layers).

The first layers of a decoder attend broadly (layer 0 of SmolLM2 keeps only 0.37 of its attention
mass in the best 1/16 of the blocks, bench/ACCURACY_NOTES.md), which is why DELTA and DuoAttention
keep some layers or heads whole. Here the first n layers keep their whole K,V on the compute device
(a DenseKV of n layers: 2 * n * kv_heads * head_dim values a token, e.g. 0.5 GiB a layer at 128K of
the 8B shape) and the other layers are a RetrievalKV of L - n layers. The model's layer indices are
translated on the way in; each part runs the pass protocol as it would alone.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace

import torch

from ..config import KVGeometry, RetrievalConfig
from ..errors import ConfigError
from ..memory import check_allocation
from ..store.saved import under
from .base import AttentionBackend
from .dense import DenseKV
from .retrieval import RetrievalKV


class SplitKV(AttentionBackend):
    def __init__(self, cfg: RetrievalConfig, geo: KVGeometry, capacity: int):
        """cfg: resolved, with 0 < cfg.dense_layers < geo.layers; geo: every layer's geometry."""
        n = cfg.dense_layers
        if not 0 < n < geo.layers:
            raise ConfigError(f"RetrievalConfig.dense_layers must be between 1 and {geo.layers - 1} for this "
                              f"model ({geo.layers} layers), got {n}; for dense attention in every layer use "
                              "retrieval=None")
        pages = -(-capacity // DenseKV.PAGE) * DenseKV.PAGE
        check_allocation(2 * geo.nbytes(n, geo.kv_heads, pages, geo.head_dim), geo.device,
                         what=f"the whole K,V of the first {n} layers for {capacity:,} tokens",
                         fix="lower RetrievalConfig.dense_layers or max_context")
        self.first = n
        self.dense = DenseKV(replace(geo, layers=n), capacity)
        self.retrieval = RetrievalKV(cfg, replace(geo, layers=geo.layers - n), capacity)
        self.capacity = capacity

    @property
    def length(self) -> int:
        return self.retrieval.length

    def _part(self, layer: int) -> tuple[AttentionBackend, int]:
        return (self.dense, layer) if layer < self.first else (self.retrieval, layer - self.first)

    # ---- the pass protocol: both parts see every pass ------------------------------------------------
    def begin(self, start: int, n: int) -> None:
        self.dense.begin(start, n)
        self.retrieval.begin(start, n)

    def commit(self, length: int) -> None:
        self.dense.commit(length)
        self.retrieval.commit(length)

    def truncate(self, length: int) -> None:
        self.retrieval.truncate(length)
        self.dense.truncate(length)

    def graph_key(self):
        keys = (self.dense.graph_key(), self.retrieval.graph_key())
        return None if None in keys else keys

    def prologue(self) -> None:
        self.dense.prologue()
        self.retrieval.prologue()

    # ---- the model's calls, each to the part that holds the layer -----------------------------------
    def begin_layer(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        part, i = self._part(layer)
        part.begin_layer(i, k, v)

    def attend(self, layer: int, q: torch.Tensor, offset: int) -> torch.Tensor:
        part, i = self._part(layer)
        return part.attend(i, q, offset)

    def end_layer(self, layer: int) -> None:
        part, i = self._part(layer)
        part.end_layer(i)

    def decode(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        part, i = self._part(layer)
        return part.decode(i, q, k, v)

    def lookahead(self, layer: int) -> bool:
        return layer >= self.first and self.retrieval.lookahead(layer - self.first)

    def prefetch(self, layer: int, q: torch.Tensor) -> None:
        self.retrieval.prefetch(layer - self.first, q)

    # ---- saved prefills and accounting ----------------------------------------------------------------
    def state(self) -> dict[str, torch.Tensor]:
        return {f"{name}.{k}": t for name, part in (("dense", self.dense), ("retrieval", self.retrieval))
                for k, t in part.state().items()}

    def load_state(self, state: Mapping[str, torch.Tensor], length: int) -> None:
        self.retrieval.load_state(under(state, "retrieval"), length)
        self.dense.load_state(under(state, "dense"), length)

    def drop_decode_memory(self) -> None:
        self.retrieval.drop_decode_memory()

    def memory(self) -> dict[str, int]:
        return self.retrieval.memory() | {"dense_layers": self.dense.memory()["kv"]}

    def counters(self) -> dict[str, float]:
        return self.retrieval.counters()
