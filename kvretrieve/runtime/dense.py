"""Dense attention: causal attention over a segment, and the preallocated full KV cache backend."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import kernels
from ..errors import ResourceError
from .memory import check_allocation

def attention_lse_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool,
                            scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """q [T, Hq, d], k, v [S, Hkv, d] -> (out [T, Hq, d] in q.dtype, lse [T, Hq] fp32). causal means
    the square case (T == S, query i sees keys 0..i). The math, for fp32 on CUDA and as the oracle."""
    T, Hq, d = q.shape
    G = Hq // k.shape[1]
    s = torch.einsum("thgd,shd->hgts", q.float().view(T, -1, G, d), k.float()) * scale
    if causal:
        s = s.masked_fill(torch.ones(T, k.shape[0], dtype=torch.bool, device=q.device).triu(1), float("-inf"))
    lse = torch.logsumexp(s, -1)
    out = torch.einsum("hgts,shd->thgd", torch.exp(s - lse[..., None]), v.float())
    return out.reshape(T, Hq, d).to(q.dtype), lse.reshape(Hq, T).transpose(0, 1)


_CUDNN_OK = [True]  # cleared the first time cuDNN refuses, so flash attention serves from then on


def _cudnn_attention(q, k, v, causal: bool, scale: float):
    """cuDNN's fused attention (GQA shapes, returns the LSE): ~1.9x flash attention's throughput on
    an H100 for the prefill's shapes (bench/results/probe_prefill_h100.json). None if unavailable."""
    op = getattr(torch.ops.aten, "_scaled_dot_product_cudnn_attention", None)
    try:
        out, lse = op(q, k, v, None, True, 0.0, causal, False, scale=scale)[:2]
    except (RuntimeError, TypeError, AttributeError):
        _CUDNN_OK[0] = False
        return None
    return out, lse.reshape(q.shape[:3])


def attention_lse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool,
                  scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Fused attention that also returns the log-sum-exp, so partial results over disjoint key sets
    can be merged; same contract as attention_lse_reference. On CUDA: cuDNN's kernel, else the flash
    kernel SDPA itself dispatches to (both take GQA-shaped K/V and return the LSE; the public SDPA
    drops it)."""
    if q.is_cuda and q.dtype in (torch.float16, torch.bfloat16):
        args = q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None]
        r = _cudnn_attention(*args, causal, scale) if _CUDNN_OK[0] else None
        if r is None:
            r = torch.ops.aten._scaled_dot_product_flash_attention(*args, 0.0, causal, False, scale=scale)
    elif not q.is_cuda:
        op = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
        r = op(q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None], 0.0, causal, scale=scale)
    else:
        return attention_lse_reference(q, k, v, causal, scale)
    return r[0][0].transpose(0, 1), r[1][0].transpose(0, 1)


# Keys per call against the earlier tokens of a segment. cuDNN builds an execution plan per shape
# (bench/results/probe_prefill_h100.json: a first 128K prefill 20.4 s, a second 14.5 s): with the
# prefix in pieces of one length, a prompt needs a handful of plans instead of one per chunk.
PREFIX_PIECE = 16384


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_start: int, scale: float,
                     piece: int = PREFIX_PIECE) -> torch.Tensor:
    """q [T, Hq, d] at positions q_start.. attends to k, v [q_start + T, Hkv, d] causally -> [T, Hq, d].

    Decode (T = 1) folds the G query heads of a KV head into query rows ([Hkv, G, d]): SDPA then sees
    plain attention and never repeats K,V. A longer segment splits its keys into the earlier tokens,
    which every query sees (no mask), in pieces of `piece` keys, and the segment itself, a square
    causal block; the partial results merge by their log-sum-exp (in fp32). So no mask is ever
    materialised and the fused kernels run.
    """
    T, Hq, d = q.shape
    Hkv = k.shape[1]
    if T == 1:
        qf = q.view(Hkv, Hq // Hkv, d)
        out = F.scaled_dot_product_attention(qf[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None], scale=scale)
        return out[0].reshape(1, Hq, d)
    out, lse = attention_lse(q, k[q_start:], v[q_start:], True, scale)
    if q_start == 0:
        return out
    out, lse = out.reshape(T * Hq, d).float(), lse.reshape(-1).float().contiguous()
    for a in range(0, q_start, piece):
        b = min(q_start, a + piece)
        out_p, lse_p = attention_lse(q, k[a:b], v[a:b], False, scale)
        out, lse = kernels.merge_attention(out, lse, out_p.reshape(T * Hq, d).float(),
                                           lse_p.reshape(-1).float().contiguous())
    return out.to(q.dtype).view(T, Hq, d)


class DenseKV:
    """Every layer's K,V preallocated at full capacity on the compute device ([L, Hkv, capacity, d]),
    so a decode step writes one row in place instead of growing tensors.

    On CUDA a decode step reads the cache as pages of 16 tokens through the sparse decode kernel
    with every page listed (a device-side length, no host sync), so the engine can capture the step
    as a CUDA graph: the dense reference a big GPU would give."""

    PAGE = 16

    def __init__(self, num_layers: int, num_kv_heads: int, head_dim: int, capacity: int,
                 device: torch.device, dtype: torch.dtype):
        nbytes = 2 * num_layers * num_kv_heads * capacity * head_dim * torch.finfo(dtype).bits // 8
        check_allocation(nbytes, device, what=f"the dense KV cache for {capacity:,} tokens",
                         fix="lower --max-context, or use --retrieval to keep the KV cache in CPU memory")
        pages = -(-capacity // self.PAGE)
        shape = (num_layers, num_kv_heads, pages * self.PAGE, head_dim)
        try:
            self.k = torch.empty(shape, device=device, dtype=dtype)
            self.v = torch.empty(shape, device=device, dtype=dtype)
        except torch.OutOfMemoryError:
            raise ResourceError(f"out of memory allocating the dense KV cache for {capacity:,} tokens; lower "
                                "--max-context or use --retrieval") from None
        self.capacity, self.scale = capacity, head_dim ** -0.5
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

    def __call__(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
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
        return causal_attention(q, self.k[layer, :, :e].transpose(0, 1), self.v[layer, :, :e].transpose(0, 1),
                                self._start + offset, self.scale)

    def end_layer(self, layer: int) -> None:
        pass

    def nbytes(self) -> int:
        return 2 * self.k.numel() * self.k.element_size()
