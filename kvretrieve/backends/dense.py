"""The dense backend: every layer's K,V preallocated at full capacity on the compute device."""
from __future__ import annotations

import torch

from .. import kernels
from ..config import KVGeometry
from ..errors import ResourceError
from ..index.base import restore_prefix
from ..memory import check_allocation
from .base import AttentionBackend
from .prefill_attention import PrefillAttention


class DenseKV(AttentionBackend):
    """Every layer's K,V preallocated at full capacity on the compute device ([L, Hkv, capacity, d]),
    so a decode step writes one row in place instead of growing tensors.

    On CUDA a decode step reads the cache as pages of 16 tokens through the sparse decode kernel
    with every page listed (a device-side length, no host sync), so the engine can capture the step
    as a CUDA graph: the dense reference a big GPU would give."""

    PAGE = 16

    def __init__(self, geo: KVGeometry, capacity: int):
        """geo: layers, heads and head_dim, device and dtype (its block size is ignored: pages are
        PAGE tokens); capacity: tokens."""
        device = geo.device
        pages = -(-capacity // self.PAGE)
        shape = (geo.layers, geo.kv_heads, pages * self.PAGE, geo.head_dim)
        check_allocation(2 * geo.nbytes(*shape), device, what=f"the dense KV cache for {capacity:,} tokens",
                         fix="lower max_context, or use retrieval to keep the KV cache in CPU memory")
        try:
            self.k = torch.empty(shape, device=device, dtype=geo.dtype)
            self.v = torch.empty(shape, device=device, dtype=geo.dtype)
        except torch.OutOfMemoryError:
            raise ResourceError(f"out of memory allocating the dense KV cache for {capacity:,} tokens; lower "
                                "max_context or use retrieval") from None
        self.capacity, self.scale = capacity, geo.head_dim ** -0.5
        self.prefill = PrefillAttention(self.scale)
        self.length = 0          # tokens whose K,V every layer holds
        self._start = 0          # segment being written by the current forward pass
        self._n = 0
        self._graphed = self.k.is_cuda
        if self._graphed:  # decode step state, written in place between steps
            self._pos = torch.zeros(1, dtype=torch.long, device=device)
            self._tail_len = torch.zeros(1, dtype=torch.int32, device=device)
            self._pages = torch.arange(pages + 1, dtype=torch.int32, device=device)

    def graph_key(self):
        return "dense" if self._graphed and self._n == 1 else None

    def begin(self, start: int, n: int) -> None:
        self._start, self._n = start, n
        if self._graphed and n == 1:
            self._pos.fill_(start)
            self._tail_len.fill_(start % self.PAGE + 1)

    def commit(self, length: int) -> None:
        self.length = length

    def truncate(self, length: int) -> None:
        self.length = min(self.length, length)

    def decode(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        if not (self._graphed and q.shape[0] == 1):
            self.begin_layer(layer, k, v)
            return self.attend(layer, q, 0)
        self.k[layer].index_copy_(1, self._pos, k.transpose(0, 1))
        self.v[layer].index_copy_(1, self._pos, v.transpose(0, 1))
        if layer == 0:  # one table for every layer: pages before the token's page, then its page last
            done = self._pos // self.PAGE
            table = torch.where(self._pages < done, self._pages, -1)
            table[-1] = done[0]
            self._table = table.expand(self.k.shape[1], -1)
        H, P = self.k.shape[1], self.k.shape[2] // self.PAGE
        out, _ = kernels.sparse_decode(q[0], self.k[layer].view(H, P, self.PAGE, -1),
                                       self.v[layer].view(H, P, self.PAGE, -1), self._table, self._tail_len,
                                       self.scale)
        return out[None]

    def begin_layer(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        s, e = self._start, self._start + k.shape[0]
        self.k[layer, :, s:e] = k.transpose(0, 1)
        self.v[layer, :, s:e] = v.transpose(0, 1)

    def attend(self, layer: int, q: torch.Tensor, offset: int) -> torch.Tensor:
        e = self._start + offset + q.shape[0]
        return self.prefill(q, self.k[layer, :, :e].transpose(0, 1), self.v[layer, :, :e].transpose(0, 1),
                            self._start + offset)

    def state(self) -> dict[str, torch.Tensor]:
        return {"k": self.k[:, :, :self.length], "v": self.v[:, :, :self.length]}

    def load_state(self, state: dict[str, torch.Tensor], length: int) -> None:
        for name, dst in (("k", self.k), ("v", self.v)):
            restore_prefix(dst, state[name], "dense KV cache")
        self.length = length

    def memory(self) -> dict[str, int]:
        return {"kv": 2 * self.k.numel() * self.k.element_size()}
