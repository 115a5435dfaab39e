"""The one function every projection of the decoder goes through, for dense and quantized weights.

A weight is one of:
  - a Tensor [N, K] in the model dtype: F.linear;
  - a QuantWeight [N, K] (models/quant.py): kernels.quant_linear, or on CUDA the Triton launcher
    itself so that prefill (T > 16 rows) dequantizes into the decoder's reused WeightBuffer instead
    of allocating N x K per layer and chunk;
  - a RowStack: q|k|v (or gate|up) parts that could not become one matrix (a GGUF Q4_K_M file keeps
    attn_v in Q6_K and attn_q/attn_k in Q4_K: 8 bits in groups of 16 against 4 bits in groups of 32),
    applied part by part and concatenated.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .. import kernels
from .quant import QuantWeight

# Rows of a quantized lm_head per dequantization when no layer matrix is quantized (the buffer is then
# sized for these): prefill takes the logits of one row, so this is for whole-sequence scoring only.
HEAD_CHUNK_ROWS = 1024


@dataclass(frozen=True, slots=True)
class RowStack:
    """Output rows of a projection kept as parts (each a Tensor or a QuantWeight) in row order."""
    parts: tuple

    @property
    def shape(self) -> tuple[int, int]:
        return sum(p.shape[0] for p in self.parts), self.parts[0].shape[1]

    def bounds(self) -> list[tuple[int, int]]:
        out, a = [], 0
        for p in self.parts:
            out.append((a, a + p.shape[0]))
            a += p.shape[0]
        return out

    def rows(self, a: int, b: int):
        """Rows a .. b-1: whole parts (the q, k or v of Decoder._project), or rows inside one part."""
        bounds = self.bounds()
        starts, ends = [s for s, _ in bounds], [e for _, e in bounds]
        if a in starts and b in ends and starts.index(a) <= ends.index(b):
            chosen = self.parts[starts.index(a):ends.index(b) + 1]
            return chosen[0] if len(chosen) == 1 else RowStack(chosen)
        for p, (s, e) in zip(self.parts, bounds):
            if s <= a and b <= e:
                return row_slice(p, a - s, b - s)
        raise ValueError(f"RowStack.rows: rows {a}:{b} cross the parts {bounds}")


def row_slice(w, a: int, b: int):
    """Rows a .. b-1 of any weight, without a copy."""
    return w[a:b] if isinstance(w, torch.Tensor) else w.rows(a, b)


def quant_parts(w) -> list[QuantWeight]:
    if isinstance(w, QuantWeight):
        return [w]
    return [p for p in w.parts if isinstance(p, QuantWeight)] if isinstance(w, RowStack) else []


class WeightBuffer:
    """Where prefill dequantizes one quantized matrix at a time: one flat allocation in the model dtype,
    made on first use (a decode-only process never pays for it) and viewed as [N, K] for each matrix.

    Sized for the largest quantized layer matrix (the 8B shape's gate|up: 28672 x 4096, 224 MiB in
    bf16), not the lm_head (128256 x 4096, 1 GiB): a larger lm_head is applied in row chunks that fit."""

    def __init__(self, elements: int, device: torch.device, dtype: torch.dtype):
        self.elements, self.device, self.dtype = elements, device, dtype
        self.flat: torch.Tensor | None = None

    @classmethod
    def for_weights(cls, layers, lm_head, device: torch.device, dtype: torch.dtype) -> "WeightBuffer":
        mats = [q for lw in layers for w in (lw.qkv, lw.o, lw.gate_up, lw.down) for q in quant_parts(w)]
        elements = max((q.shape[0] * q.shape[1] for q in mats), default=0)
        heads = quant_parts(lm_head)
        if heads and not elements:
            elements = min(HEAD_CHUNK_ROWS, heads[0].shape[0]) * heads[0].shape[1]
        return cls(elements, device, dtype)

    def view(self, n: int, k: int) -> torch.Tensor:
        if self.flat is None:
            self.flat = torch.empty(self.elements, device=self.device, dtype=self.dtype)
        return self.flat[:n * k].view(n, k)


def _triton(x: torch.Tensor) -> bool:
    # The Triton launchers for CUDA tensors (tests/test_quant_weights.py sets this to run them on the
    # CPU under TRITON_INTERPRET=1), the torch reference elsewhere.
    return kernels.HAS_TRITON and x.is_cuda


def _quant_linear(x: torch.Tensor, w: QuantWeight, bias, buffer: WeightBuffer | None) -> torch.Tensor:
    if not _triton(x):
        return kernels.quant_linear(x, w, bias)
    from ..kernels import qlinear

    t, (n, k) = x.shape[0], w.shape
    # the launcher dequantizes beyond DECODE_ROWS rows, and for fp32 x already from two (see qlinear)
    if buffer is None or not (t > qlinear.DECODE_ROWS or (t > 1 and x.dtype == torch.float32)):
        return qlinear.quant_linear(x, w, bias)
    if n * k <= buffer.elements:
        return qlinear.quant_linear(x, w, bias, weight_buffer=buffer.view(n, k))
    step = max(1, buffer.elements // k)  # an lm_head larger than the buffer: row chunks that fit
    return torch.cat([qlinear.quant_linear(x, w.rows(a, min(n, a + step)),
                                           None if bias is None else bias[a:a + step],
                                           weight_buffer=buffer.view(min(n, a + step) - a, k))
                      for a in range(0, n, step)], dim=1)


def linear(x: torch.Tensor, w, bias: torch.Tensor | None = None, buffer: WeightBuffer | None = None) -> torch.Tensor:
    """x [T, K] @ w^T + bias [N] -> [T, N] in x.dtype, whatever kind of weight w is (module docstring)."""
    if isinstance(w, torch.Tensor):
        return F.linear(x, w, bias)
    if isinstance(w, QuantWeight):
        return _quant_linear(x, w, bias, buffer)
    outs = [linear(x, p, None if bias is None else bias[a:b], buffer) for p, (a, b) in zip(w.parts, w.bounds())]
    return torch.cat(outs, dim=1)
