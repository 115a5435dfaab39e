"""Dense attention: causal attention over a segment, and the preallocated full KV cache backend."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..errors import ResourceError
from .memory import check_allocation

# Upper bound on the score elements one masked SDPA call may materialise (fp32: 256 MiB).
_MASKED_SCORES = 1 << 26


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_start: int, scale: float) -> torch.Tensor:
    """q [T, Hq, d] at positions q_start.. attends to k, v [q_start + T, Hkv, d] causally -> [T, Hq, d].

    A segment that starts at position 0 is the square causal case, which SDPA runs as flash attention
    in O(T) memory with GQA handled natively. Otherwise (decode, a new chat turn) the G query heads
    of a KV head are folded into the query rows ([Hkv, G*T, d]): SDPA then sees plain multi-head
    attention and never repeats K,V (its GQA support falls back to the slow math path there). A
    segment after earlier tokens needs the bottom-right causal mask, which SDPA only takes as an
    explicit mask, so it runs in query chunks that keep mask and scores bounded.
    """
    T, Hq, d = q.shape
    S, Hkv = k.shape[0], k.shape[1]
    G = Hq // Hkv
    kh, vh = k.transpose(0, 1), v.transpose(0, 1)
    # SDPA's fused kernels (flash, memory-efficient) only take 4-D inputs: 3-D ones silently fall
    # back to the math path, which materialises [H, T, S] scores. Hence the [None] / [0] below.
    if q_start == 0 and S == T:
        out = F.scaled_dot_product_attention(q.transpose(0, 1)[None], kh[None], vh[None], is_causal=True,
                                             scale=scale, enable_gqa=True)
        return out[0].transpose(0, 1)
    out = torch.empty_like(q)
    rows = max(1, _MASKED_SCORES // (Hq * S))
    key_pos = torch.arange(S, device=q.device)
    for s in range(0, T, rows):
        e = min(T, s + rows)
        n = e - s
        qf = q[s:e].view(n, Hkv, G, d).permute(1, 2, 0, 3).reshape(Hkv, G * n, d)
        visible = q_start + e  # keys past the chunk's last query are never visible
        mask = None
        if n > 1:
            qpos = torch.arange(q_start + s, q_start + e, device=q.device)
            mask = (key_pos[None, :visible] <= qpos[:, None]).repeat(G, 1)
        o = F.scaled_dot_product_attention(qf[None], kh[None, :, :visible], vh[None, :, :visible], attn_mask=mask,
                                           scale=scale)[0]
        out[s:e] = o.view(Hkv, G, n, d).permute(2, 0, 1, 3).reshape(n, Hq, d)
    return out


class DenseKV:
    """Every layer's K,V preallocated at full capacity on the compute device ([L, Hkv, capacity, d]),
    so a decode step writes one row in place instead of growing tensors."""

    def __init__(self, num_layers: int, num_kv_heads: int, head_dim: int, capacity: int,
                 device: torch.device, dtype: torch.dtype):
        nbytes = 2 * num_layers * num_kv_heads * capacity * head_dim * torch.finfo(dtype).bits // 8
        check_allocation(nbytes, device, what=f"the dense KV cache for {capacity:,} tokens",
                         fix="lower --max-context, or use --retrieval to keep the KV cache in CPU memory")
        shape = (num_layers, num_kv_heads, capacity, head_dim)
        try:
            self.k = torch.empty(shape, device=device, dtype=dtype)
            self.v = torch.empty(shape, device=device, dtype=dtype)
        except torch.OutOfMemoryError:
            raise ResourceError(f"out of memory allocating the dense KV cache for {capacity:,} tokens; lower "
                                "--max-context or use --retrieval") from None
        self.capacity, self.scale = capacity, head_dim ** -0.5
        self.length = 0          # tokens whose K,V every layer holds
        self._start = 0          # segment being written by the current forward pass

    def begin(self, start: int, n: int) -> None:
        self._start = start

    def commit(self, length: int) -> None:
        self.length = length

    def truncate(self, length: int) -> None:
        self.length = min(self.length, length)

    def __call__(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        s, e = self._start, self._start + q.shape[0]
        self.k[layer, :, s:e] = k.transpose(0, 1)
        self.v[layer, :, s:e] = v.transpose(0, 1)
        return causal_attention(q, self.k[layer, :, :e].transpose(0, 1), self.v[layer, :, :e].transpose(0, 1),
                                s, self.scale)

    def nbytes(self) -> int:
        return 2 * self.k.numel() * self.k.element_size()
