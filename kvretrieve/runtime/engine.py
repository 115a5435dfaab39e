"""The engine: runs token segments through the model against an attention backend.

A backend stores K,V and computes attention (dense.DenseKV, or the retrieval backend). The engine
tells it which positions a forward pass writes (begin), lets the model call it once per layer, and
records the new length only when every layer has run (commit), so an interrupted pass leaves the
cache as it was before.
"""
from __future__ import annotations

from typing import Callable, Protocol

import torch

from ..models.llama import Decoder


class Backend(Protocol):
    length: int
    capacity: int

    def begin(self, start: int, n: int) -> None: ...
    def commit(self, length: int) -> None: ...
    def truncate(self, length: int) -> None: ...
    def __call__(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor: ...


class Engine:
    def __init__(self, model: Decoder, backend: Backend, prefill_chunk: int):
        self.model, self.backend, self.chunk = model, backend, prefill_chunk

    @property
    def length(self) -> int:
        return self.backend.length

    @torch.inference_mode()
    def truncate(self, length: int) -> None:
        """Forget every token from position `length` on."""
        self.backend.truncate(length)

    @torch.inference_mode()
    def forward(self, ids: torch.Tensor, on_layer: Callable[[int], None] | None = None) -> torch.Tensor:
        """Append a segment of token ids; returns the hidden rows [T, hidden] after the last layer."""
        start, n = self.backend.length, ids.shape[0]
        if start + n > self.backend.capacity:
            raise ValueError(f"segment of {n} tokens at position {start} exceeds the capacity {self.backend.capacity}")
        self.backend.begin(start, n)
        x = self.model.forward(ids, start, self.backend, self.chunk, on_layer)
        self.backend.commit(start + n)
        return x

    def prefill(self, ids: list[int], on_layer: Callable[[int], None] | None = None) -> torch.Tensor:
        """Append tokens; returns the logits [V] (fp32) that follow the last one."""
        x = self.forward(torch.tensor(ids, dtype=torch.long, device=self.model.device), on_layer)
        with torch.inference_mode():
            return self.model.logits(x[-1:])[0]

    def step(self, token: torch.Tensor) -> torch.Tensor:
        """Append one token (a 0-d device tensor, so no host sync is needed); returns next logits [V]."""
        x = self.forward(token.view(1))
        with torch.inference_mode():
            return self.model.logits(x)[0]
