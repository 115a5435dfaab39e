"""int8 storage of K and V rows, and the per-head copies between the GPU and pinned host memory.

Keys get a fixed scale per channel (per layer and KV head) before their per-row int8 step: key
channels differ in range by orders of magnitude (KIVI quantizes keys per channel for this reason),
and one absmax per row left the small channels a handful of levels. Measured: attending every block
through the per-row int8 store agreed with dense on 0.973 of next tokens at 16K on the 1.5B (KL
0.0050) against 0.982 (KL 0.0006) with the store in bf16 (bench/results/longctx_floor.md); with the
channel scales the 0.5B's int8 floor at 4K (CPU, fp32) went from KL 4.5e-4 to 3.5e-5
(bench/results/longctx_int8_channels_cpu.md). Values keep a scale per row alone.
"""
from __future__ import annotations

import torch

# A channel's scale is at least this share of its head's largest, so a near-silent channel does not
# turn its rounding noise into the row's range.
CHANNEL_FLOOR = 1 / 64


def channel_scales(k: torch.Tensor) -> torch.Tensor:
    """k [Hkv, ..., d] -> [Hkv, d] fp32: each channel's absmax over the rows given, floored at
    CHANNEL_FLOOR of the head's largest (1 where a head is all zeros)."""
    amax = k.float().abs().flatten(1, -2).amax(1)
    c = torch.maximum(amax, amax.amax(-1, keepdim=True) * CHANNEL_FLOOR)
    return torch.where(c > 0, c, torch.ones_like(c))


def quantize(x: torch.Tensor, channels: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """x [..., d] -> (int8 [..., d], fp32 scale [...]): symmetric per row, rounding half away from
    zero (the store kernel rounds the same way); with channels (broadcastable to x, fp32) the rows
    are divided by them first."""
    x = x.float() if channels is None else x.float() / channels
    amax = x.abs().amax(-1)
    scale = torch.where(amax > 0, amax / 127, torch.ones_like(amax))
    v = x / scale[..., None]
    return (v.sign() * (v.abs() + 0.5).floor()).clamp(-127, 127).to(torch.int8), scale


def dequantize(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype,
               channels: torch.Tensor | None = None) -> torch.Tensor:
    x = q.float() * scale[..., None]
    return (x if channels is None else x * channels).to(dtype)


def copy_per_head(dst: torch.Tensor, src: torch.Tensor) -> None:
    """dst[h] = src[h], one async copy per head (dim 0). Between the GPU and pinned host memory each
    head's run is contiguous, so each copy is a plain cudaMemcpyAsync; torch sends one strided
    CUDA <-> CPU copy through a pageable temporary instead, which blocks the host until the GPU has
    caught up and copies again on the CPU (2.4 s of a 128K prefill of the 8B shape)."""
    for h in range(dst.shape[0]):
        dst[h].copy_(src[h], non_blocking=True)
