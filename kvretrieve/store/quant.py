"""int8 storage of K and V rows, and the per-head copies between the GPU and pinned host memory."""
from __future__ import annotations

import torch


def quantize(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [..., d] -> (int8 [..., d], fp32 scale [...]): symmetric per row, rounding half away from
    zero (the store kernel rounds the same way)."""
    amax = x.float().abs().amax(-1)
    scale = torch.where(amax > 0, amax / 127, torch.ones_like(amax))
    v = x.float() / scale[..., None]
    return (v.sign() * (v.abs() + 0.5).floor()).clamp(-127, 127).to(torch.int8), scale


def dequantize(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return (q.float() * scale[..., None]).to(dtype)


def copy_per_head(dst: torch.Tensor, src: torch.Tensor) -> None:
    """dst[h] = src[h], one async copy per head (dim 0). Between the GPU and pinned host memory each
    head's run is contiguous, so each copy is a plain cudaMemcpyAsync; torch sends one strided
    CUDA <-> CPU copy through a pageable temporary instead, which blocks the host until the GPU has
    caught up and copies again on the CPU (2.4 s of a 128K prefill of the 8B shape)."""
    for h in range(dst.shape[0]):
        dst[h].copy_(src[h], non_blocking=True)
