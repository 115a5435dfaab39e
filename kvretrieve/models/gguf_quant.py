"""GGUF quantized tensors -> QuantWeight, without a float round trip (issue 18).

GGUF stores a [N, K] matrix (ReaderTensor.shape is reversed: (K, N)) as N rows of K // block blocks,
each block `type_size` bytes (llama.cpp's ggml-quants.c layouts, mirrored by gguf.quants):

    Q8_0  34 B / 32 w:   d fp16 | 32 x int8 q                          w = d * q
    Q4_0  18 B / 32 w:   d fp16 | 16 B qs: byte j low nibble = w[j],    w = d * (q - 8)
                                          high nibble = w[j + 16]
    Q4_K 144 B / 256 w:  d fp16 | dmin fp16 | 12 B of 6-bit sc[8], m[8] | 128 B qs: four chunks of
                         32 B; chunk c low nibbles = sub-block 2c, high nibbles = sub-block 2c + 1
                                                                        w = d*sc[s] * q - dmin*m[s]
    Q6_K 210 B / 256 w:  128 B ql (low 4 bits) | 64 B qh (high 2 bits) | 16 x int8 sc | d fp16
                                                                        w = d*sc[s] * (q6 - 32)

They map onto QuantWeight (kvretrieve.models.quant) as: Q8_0 -> bits 8, group 32 (codes q, scale d);
Q4_0 -> bits 4, group 32 (scale d, min 8 d); Q4_K -> bits 4, group 32 (scale d*sc, min dmin*m);
Q6_K -> bits 8, group 16 (codes q6 - 32 in [-32, 31], scale d*sc). The nibbles are re-packed into
QuantWeight's order (element 2j low, 2j + 1 high). Rows and columns come out in the order of
`gguf.quants.dequantize(data, type).reshape(N, K)`.

Where fp16 rounds: Q8_0 and Q4_0 are exact (d is already fp16, 8 d only moves the exponent), so
dequantize(to_quant_weight(...)) equals gguf's dequantization bitwise. The K-quants store products:
Q4_K's d*sc and dmin*m (11 x 6 significant bits) and Q6_K's d*sc (11 x 8 bits) are formed exactly in
fp32 and rounded once to fp16 (nearest-even): each stored scale or min is within 2^-11 (4.9e-4)
relative of the exact product where that is at least 2^-14 (fp16's normal range), within 2^-25
absolute below. Per weight that is |dw| <= 2^-11 |w| + 32 * 2^-25 for Q6_K, and
|dw| <= 2^-11 (q |d sc| + |dmin m|) + 16 * 2^-25 for Q4_K (q in [0, 15]; relative to |w| itself it is
unbounded where d sc q and dmin m nearly cancel, so the bound is on the two terms): that is at most
2^-11 (15 |d sc| + |dmin m|), far below the 4-bit step d sc itself unless the min dwarfs the step.
A product beyond fp16's range (|d| or |dmin| >= 1040 for Q4_K, |d| >= 512 for Q6_K, |d| >= 8192 for
Q4_0) raises ValueError rather than storing inf.
"""
from __future__ import annotations

import gguf
import numpy as np
import torch
from gguf.constants import GGML_QUANT_SIZES

from .quant import QuantWeight

T = gguf.GGMLQuantizationType
SUPPORTED_QUANT = frozenset({T.Q8_0, T.Q4_0, T.Q4_K, T.Q6_K})


def to_quant_weight(data: np.ndarray, tensor_type: gguf.GGMLQuantizationType, shape: tuple[int, int]) -> QuantWeight:
    """The QuantWeight of a [N, K] GGUF tensor (shape = (N, K): ReaderTensor.shape reversed).

    data: the tensor's raw bytes as GGUFReader gives them (ReaderTensor.data, uint8 [N, K // block *
    type_size], or any array of the same bytes). Raises ValueError for types outside SUPPORTED_QUANT
    (the caller dequantizes those) and for sizes that do not match."""
    tensor_type = T(tensor_type)
    if tensor_type not in SUPPORTED_QUANT:
        raise ValueError(f"to_quant_weight: GGUF type {tensor_type.name} is not kept quantized (supported: "
                         f"{', '.join(sorted(t.name for t in SUPPORTED_QUANT))}); dequantize it instead")
    n, k = (int(x) for x in shape)
    block, type_size = GGML_QUANT_SIZES[tensor_type]
    if k % block:
        raise ValueError(f"to_quant_weight: {tensor_type.name} rows of {k} are not a multiple of its block {block}")
    raw = np.ascontiguousarray(data).view(np.uint8)
    if raw.size != n * (k // block) * type_size:
        raise ValueError(f"to_quant_weight: {raw.size} bytes do not hold a {tensor_type.name} tensor of shape "
                         f"({n}, {k}) ({n * (k // block) * type_size} bytes)")
    blocks = raw.reshape(n, k // block, type_size)
    if tensor_type == T.Q8_0:
        return _q8_0(blocks)
    if tensor_type == T.Q4_0:
        return _q4_0(blocks)
    if tensor_type == T.Q4_K:
        return _q4_k(blocks)
    return _q6_k(blocks)


def _torch(a: np.ndarray) -> torch.Tensor:
    # torch.from_numpy shares memory and warns on read-only arrays (a memory-mapped file): copy those.
    return torch.from_numpy(np.require(a, requirements=["C", "W"]))


def _fp16_field(blocks: np.ndarray, at: int) -> np.ndarray:
    """The fp16 stored at byte `at` of every block: [N, B] float16."""
    return np.ascontiguousarray(blocks[..., at:at + 2]).view(np.float16)[..., 0]


def _round_fp16(x: np.ndarray, what: str) -> np.ndarray:
    """x (exact fp32 products) rounded once to fp16; overflow is an error, not an inf weight."""
    with np.errstate(over="ignore"):
        y = x.astype(np.float16)
    if not np.isfinite(y[np.isfinite(x)]).all():
        raise ValueError(f"to_quant_weight: {what} exceeds fp16's range ({np.abs(x).max():.4g}); dequantize it instead")
    return y


def _interleave_nibbles(qs: np.ndarray) -> np.ndarray:
    """[..., L] bytes whose low nibbles hold elements 0..L-1 and high nibbles L..2L-1 (GGUF's order)
    -> [..., L] bytes in QuantWeight's order (element 2j low, 2j + 1 high).

    Elements 2j, 2j + 1 sit in the same nibble of adjacent bytes a, b, so each output byte comes from
    one byte pair: the first L/2 from the low nibbles, the last L/2 from the high ones."""
    a, b = qs[..., 0::2], qs[..., 1::2]
    return np.concatenate([(a & 0x0F) | (b << 4), (a >> 4) | (b & 0xF0)], axis=-1)


def _q8_0(blocks: np.ndarray) -> QuantWeight:
    n = blocks.shape[0]
    codes = np.ascontiguousarray(blocks[..., 2:]).view(np.int8).reshape(n, -1)
    return QuantWeight(8, _torch(codes), _torch(_fp16_field(blocks, 0)), None, 32)


def _q4_0(blocks: np.ndarray) -> QuantWeight:
    n = blocks.shape[0]
    d = _fp16_field(blocks, 0)
    codes = _interleave_nibbles(blocks[..., 2:18]).reshape(n, -1)
    mins = _round_fp16(d.astype(np.float32) * 8, "Q4_0 min 8 d")  # a power of two: exact unless it overflows
    return QuantWeight(4, _torch(codes), _torch(d), _torch(mins), 32)


def _q4_k_scale_min(packed: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """[..., 12] packed bytes -> sc, m, each uint8 [..., 8] in 0..63.

    Bytes 0-3 hold sc[0:4] (low 6 bits) and the top 2 bits of sc[4:8]; bytes 4-7 the same for m;
    bytes 8-11 the low 4 bits of sc[4:8] (low nibble) and of m[4:8] (high nibble)."""
    a, b, c = packed[..., 0:4], packed[..., 4:8], packed[..., 8:12]
    sc = np.concatenate([a & 0x3F, (c & 0x0F) | ((a >> 2) & 0x30)], axis=-1)
    m = np.concatenate([b & 0x3F, (c >> 4) | ((b >> 2) & 0x30)], axis=-1)
    return sc, m


def _q4_k(blocks: np.ndarray) -> QuantWeight:
    n, nb = blocks.shape[:2]
    d = _fp16_field(blocks, 0).astype(np.float32)[..., None]
    dmin = _fp16_field(blocks, 2).astype(np.float32)[..., None]
    sc, m = _q4_k_scale_min(blocks[..., 4:16])
    scales = _round_fp16(d * sc, "Q4_K scale d*sc").reshape(n, nb * 8)
    mins = _round_fp16(dmin * m, "Q4_K min dmin*m").reshape(n, nb * 8)
    codes = _interleave_nibbles(blocks[..., 16:].reshape(n, nb, 4, 32)).reshape(n, -1)
    return QuantWeight(4, _torch(codes), _torch(scales), _torch(mins), 32)


def _q6_k(blocks: np.ndarray) -> QuantWeight:
    """Each 256-weight block is two halves of 128; in half h, weight 32 t + i (t in 0..3, i in 0..31)
    takes its low 4 bits from ql[64 h + 32 (t % 2) + i] (low nibble for t < 2, high for t >= 2) and
    its high 2 bits from bits 2t..2t+1 of qh[32 h + i]."""
    n, nb = blocks.shape[:2]
    ql = blocks[..., 0:128].reshape(n, nb, 2, 1, 64)
    qh = blocks[..., 128:192].reshape(n, nb, 2, 1, 32)
    low = (ql >> np.array([0, 4], np.uint8)[:, None]) & 0x0F             # [n, nb, 2, 2, 64]
    high = (qh >> np.array([0, 2, 4, 6], np.uint8)[:, None]) & 0x03      # [n, nb, 2, 4, 32]
    q = low.reshape(n, nb, 256) | (high.reshape(n, nb, 256) << 4)
    codes = (q.view(np.int8) - np.int8(32)).reshape(n, -1)               # q < 64: the int8 view is q itself
    sc = np.ascontiguousarray(blocks[..., 192:208]).view(np.int8).astype(np.float32)
    d = _fp16_field(blocks, 208).astype(np.float32)[..., None]
    scales = _round_fp16(d * sc, "Q6_K scale d*sc").reshape(n, nb * 16)
    return QuantWeight(8, _torch(codes), _torch(scales), None, 16)
