"""Weights kept quantized (issue 18): the format every quantized matrix has on the device.

A QuantWeight is a [N, K] linear weight (out features N, in features K) in groups of `group`
consecutive input columns; each group of each row has its own scale (and, for 4 bits, its own min):

    bits 8:  w[n, k] = scales[n, g] * codes[n, k]                 codes int8 (a Q8_0 file may hold -128)
    bits 4:  w[n, k] = scales[n, g] * q[n, k] - mins[n, g]        q in [0, 15], two per byte of codes:
                                                                  k = 2j in the low nibble of codes[n, j],
                                                                  k = 2j + 1 in the high one
    g = k // group

Why these two: they hold the GGUF kinds people download exactly (Q8_0 is bits 8 in groups of 32,
Q6_K bits 8 in groups of 16, Q4_0 and Q4_K bits 4 in groups of 32 with a min), and round-to-nearest
quantization of a bf16 checkpoint (--weights int8|int4) makes the same two. Scales and mins are fp16:
a group of 32 costs 4 bytes of them (1 bit a weight at 4 bits; fp32 would double that for a
precision the bf16 reference path itself rounds away).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

SCALE_DTYPE = torch.float16


@dataclass(frozen=True, slots=True)
class QuantWeight:
    bits: int                    # 8 or 4
    codes: torch.Tensor          # int8 [N, K] (bits 8) or uint8 [N, K // 2] (bits 4)
    scales: torch.Tensor         # fp16 [N, K // group]
    mins: torch.Tensor | None    # fp16 [N, K // group] for bits 4, None for bits 8
    group: int

    def __post_init__(self):
        n, g = self.scales.shape
        k = g * self.group
        want = (n, k) if self.bits == 8 else (n, k // 2)
        dt = torch.int8 if self.bits == 8 else torch.uint8
        if self.bits not in (8, 4) or self.codes.dtype != dt or tuple(self.codes.shape) != want:
            raise ValueError(f"QuantWeight: bits {self.bits} wants codes {dt} {want}, got {self.codes.dtype} "
                             f"{tuple(self.codes.shape)}")
        if self.scales.dtype != SCALE_DTYPE or (self.bits == 4) != (self.mins is not None):
            raise ValueError("QuantWeight: scales are fp16, and mins are given exactly when bits is 4")
        if self.mins is not None and self.mins.shape != self.scales.shape:
            raise ValueError(f"QuantWeight: mins {tuple(self.mins.shape)} differ from scales {tuple(self.scales.shape)}")

    @property
    def shape(self) -> tuple[int, int]:
        return self.scales.shape[0], self.scales.shape[1] * self.group

    @property
    def device(self) -> torch.device:
        return self.codes.device

    def nbytes(self) -> int:
        return sum(t.nbytes for t in (self.codes, self.scales, self.mins) if t is not None)

    def to(self, device: torch.device) -> "QuantWeight":
        move = (lambda t: None if t is None else t.to(device))
        return QuantWeight(self.bits, move(self.codes), move(self.scales), move(self.mins), self.group)

    def rows(self, a: int, b: int) -> "QuantWeight":
        """Output rows a .. b-1 as views (no copy): rows are whole in every tensor of the format."""
        part = (lambda t: None if t is None else t[a:b])
        return QuantWeight(self.bits, part(self.codes), part(self.scales), part(self.mins), self.group)

    def take_rows(self, index: torch.Tensor) -> "QuantWeight":
        """The rows in `index` order (a copy): exact, e.g. the un-permutation of GGUF's q/k rows."""
        take = (lambda t: None if t is None else t[index].contiguous())
        return QuantWeight(self.bits, take(self.codes), take(self.scales), take(self.mins), self.group)


def dequantize(w: QuantWeight, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The [N, K] weight in `dtype` (computed in fp32, rounded once)."""
    n, k = w.shape
    if w.bits == 8:
        q = w.codes.float()
    else:
        q = torch.stack([w.codes & 0xF, w.codes >> 4], dim=-1).reshape(n, k).float()
    scales = w.scales.float().repeat_interleave(w.group, dim=1)
    out = q * scales
    if w.mins is not None:
        out -= w.mins.float().repeat_interleave(w.group, dim=1)
    return out.to(dtype)


def quantize(w: torch.Tensor, bits: int, group: int) -> QuantWeight:
    """Round-to-nearest quantization of a [N, K] weight (K a multiple of group): bits 8 symmetric
    (scale = max |w| / 127 per group), bits 4 asymmetric (the group's range in 16 steps)."""
    n, k = w.shape
    if k % group:
        raise ValueError(f"quantize: {k} input features are not a multiple of the group size {group}")
    x = w.detach().float().reshape(n, k // group, group)
    if bits == 8:
        scale = (x.abs().amax(-1) / 127).to(SCALE_DTYPE)
        s = scale.float().clamp_min(torch.finfo(SCALE_DTYPE).tiny)[..., None]
        codes = (x / s).round().clamp(-127, 127).to(torch.int8).reshape(n, k)
        return QuantWeight(8, codes, scale, None, group)
    if bits != 4:
        raise ValueError(f"quantize: bits must be 8 or 4, got {bits}")
    lo, hi = x.amin(-1), x.amax(-1)
    scale = ((hi - lo) / 15).to(SCALE_DTYPE)
    mins = (-lo).to(SCALE_DTYPE)  # w = scale * q - min: q = 0 is the group's smallest value
    s = scale.float().clamp_min(torch.finfo(SCALE_DTYPE).tiny)[..., None]
    q = ((x + mins.float()[..., None]) / s).round().clamp(0, 15).to(torch.uint8).reshape(n, k)
    codes = q[:, 0::2] | (q[:, 1::2] << 4)
    return QuantWeight(4, codes.contiguous(), scale, mins, group)


def concat_rows(parts: list[QuantWeight]) -> QuantWeight | None:
    """One QuantWeight of the parts' rows stacked (q|k|v, gate|up: one launch instead of several), or
    None when they differ in bits, group or input features (then they stay apart)."""
    first = parts[0]
    if any(p.bits != first.bits or p.group != first.group or p.shape[1] != first.shape[1] for p in parts):
        return None
    cat = (lambda ts: None if ts[0] is None else torch.cat(ts))
    return QuantWeight(first.bits, cat([p.codes for p in parts]), cat([p.scales for p in parts]),
                       cat([p.mins for p in parts]), first.group)


# What RuntimeConfig.weights int8 / int4 make of a [N, K] checkpoint matrix: (bits, group); group None
# means K (per output channel). int4's 128 costs 32 bits of scale and min per 128 weights (4.25 bits
# a weight); int8 per channel costs nothing measurable, and round-to-nearest int8 loses ~0.4% of a
# row's largest weight at most.
QUANT_MODES = {"int8": (8, None), "int4": (4, 128)}


def mode_group(mode: str, k: int) -> int | None:
    """The group a matrix with k input features gets under `mode` (int8 or int4), or None where the
    kernels cannot take it (groups are multiples of 16): int4 falls back to 64, 32 or 16 where 128
    does not divide k (small test models); a k that is not a multiple of 16 stays dense."""
    bits, group = QUANT_MODES[mode]
    for g in ([k] if group is None else [group, 64, 32, 16]):
        if g % 16 == 0 and k % g == 0 and g <= k:
            return g
    return None


def quant_nbytes(n: int, k: int, bits: int, group: int) -> int:
    """Device bytes of a [n, k] QuantWeight: codes, fp16 scales and (bits 4) fp16 mins."""
    return n * k * bits // 8 + n * (k // group) * SCALE_DTYPE.itemsize * (2 if bits == 4 else 1)
