"""GGUF blocks -> QuantWeight (kvretrieve.models.gguf_quant) against gguf's own dequantization.

gguf 0.19 quantizes Q8_0 and Q4_0 but not the K-quants, so Q4_K and Q6_K come from random bytes with
valid fp16 d (and dmin) planted; every 6-bit scale, min and code pattern is then valid by construction.
"""
from __future__ import annotations

import warnings

import gguf
import numpy as np
import pytest
import torch
from gguf.constants import GGML_QUANT_SIZES
from gguf.quants import dequantize as gguf_dequantize

from kvretrieve.models.gguf_quant import SUPPORTED_QUANT, to_quant_weight
from kvretrieve.models.quant import QuantWeight, dequantize

T = gguf.GGMLQuantizationType
N, K = 64, 512
MAGNITUDES = [0.0, 1e-7, 3e-6, 1e-4, 1e-2, 1.0, 8.0]  # per row: zero rows, fp16 subnormals, normals
U = 2.0 ** -11        # fp16 unit roundoff
TINY = 2.0 ** -25     # half the fp16 subnormal spacing
D_AT = {T.Q8_0: [0], T.Q4_0: [0], T.Q4_K: [0, 2], T.Q6_K: [208]}  # byte offsets of fp16 d / dmin


def random_blocks(qtype, n=N, k=K, seed=0, magnitudes=MAGNITUDES) -> np.ndarray:
    """uint8 [n, k // block * type_size] of random bytes; the fp16 fields get a per-row magnitude
    times a random signed factor, so rows of zeros and subnormal products are covered."""
    rng = np.random.default_rng(seed)
    block, size = GGML_QUANT_SIZES[qtype]
    b = rng.integers(0, 256, (n, k // block, size), dtype=np.uint8)
    mag = np.array(magnitudes, np.float32)[np.arange(n) % len(magnitudes)][:, None, None]
    for at in D_AT[qtype]:
        d = (mag * rng.uniform(-1, 1, (n, k // block, 1))).astype(np.float16)
        b[..., at:at + 2] = d.view(np.uint8)
    return b.reshape(n, -1)


def random_weights(n=N, k=K, seed=0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    mag = np.array(MAGNITUDES, np.float32)[np.arange(n) % len(MAGNITUDES)][:, None]
    return (rng.standard_normal((n, k)) * mag).astype(np.float32)


def reference(data, qtype, n=N, k=K) -> np.ndarray:
    return gguf_dequantize(data, qtype).reshape(n, k)


def codes_as_float(qw: QuantWeight) -> torch.Tensor:
    """The integer codes q of qw as fp32 [N, K], unpacked by the library's own dequantize."""
    ones = torch.ones_like(qw.scales)
    return dequantize(QuantWeight(qw.bits, qw.codes, ones, None if qw.mins is None else 0 * ones, qw.group))


def exact_products(data, qtype, n=N, k=K) -> tuple[np.ndarray, np.ndarray]:
    """The fp32 scale and min products [N, K // group] of a K-quant, unpacked with gguf's own code."""
    block, size = GGML_QUANT_SIZES[qtype]
    b = data.reshape(-1, size)
    if qtype == T.Q4_K:
        d, dmin = (b[:, at:at + 2].copy().view(np.float16).astype(np.float32) for at in (0, 2))
        sc, m = gguf.quants.Q4_K.get_scale_min(b[:, 4:16].copy())
        return (d * sc).reshape(n, -1), (dmin * m).reshape(n, -1)
    d = b[:, 208:210].copy().view(np.float16).astype(np.float32)
    sc = b[:, 192:208].copy().view(np.int8).astype(np.float32)
    return (d * sc).reshape(n, -1), np.zeros((n, k // 16), np.float32)


def test_supported_set_and_unsupported_types_raise():
    assert SUPPORTED_QUANT == {T.Q8_0, T.Q4_0, T.Q4_K, T.Q6_K}
    for qtype in (T.Q5_K, T.Q4_1, T.F16, T.IQ4_NL):
        with pytest.raises(ValueError, match=qtype.name):
            to_quant_weight(np.zeros(16, np.uint8), qtype, (1, 256))


@pytest.mark.parametrize("qtype, bits, group", [(T.Q8_0, 8, 32), (T.Q4_0, 4, 32)], ids=["Q8_0", "Q4_0"])
def test_q8_0_q4_0_from_gguf_quantize_are_bitwise(qtype, bits, group):
    w = random_weights()
    data = gguf.quants.quantize(w, qtype)
    qw = to_quant_weight(data, qtype, (N, K))
    assert (qw.bits, qw.group, qw.shape) == (bits, group, (N, K))
    ref = reference(data, qtype)
    got = dequantize(qw).numpy()
    np.testing.assert_array_equal(got, ref)
    assert not got[0].any() and np.abs(ref - w).max() > 0  # the zero row, and a real quantization


@pytest.mark.parametrize("qtype", [T.Q8_0, T.Q4_0], ids=["Q8_0", "Q4_0"])
def test_q8_0_q4_0_random_blocks_are_bitwise(qtype):
    data = random_blocks(qtype, seed=1)  # Q8_0 codes include -128; Q4_0 d of both signs
    np.testing.assert_array_equal(dequantize(to_quant_weight(data, qtype, (N, K))).numpy(), reference(data, qtype))


@pytest.mark.parametrize("qtype, bits, group", [(T.Q4_K, 4, 32), (T.Q6_K, 8, 16)], ids=["Q4_K", "Q6_K"])
def test_k_quant_layout_is_exact_before_fp16_rounding(qtype, bits, group):
    """Codes times the exact fp32 products reproduce gguf bitwise: every code is in its place and
    the only difference left is the fp16 rounding of the products."""
    data = random_blocks(qtype, seed=2)
    qw = to_quant_weight(data, qtype, (N, K))
    assert (qw.bits, qw.group, qw.shape) == (bits, group, (N, K))
    scale, mins = exact_products(data, qtype)
    q = codes_as_float(qw).numpy()
    exact = q * np.repeat(scale, group, axis=1) - np.repeat(mins, group, axis=1)
    np.testing.assert_array_equal(exact, reference(data, qtype))
    np.testing.assert_array_equal(qw.scales.numpy(), scale.astype(np.float16))
    if qw.mins is not None:
        np.testing.assert_array_equal(qw.mins.numpy(), mins.astype(np.float16))


@pytest.mark.parametrize("qtype", [T.Q4_K, T.Q6_K], ids=["Q4_K", "Q6_K"])
def test_k_quant_error_within_documented_fp16_bound(qtype):
    data = random_blocks(qtype, seed=3)
    qw = to_quant_weight(data, qtype, (N, K))
    ref = reference(data, qtype)
    err = np.abs(dequantize(qw).numpy().astype(np.float64) - ref)
    scale, mins = exact_products(data, qtype)
    for exact, stored in ((scale, qw.scales), (mins, qw.mins)):
        if stored is None:
            continue
        rounding = np.abs(stored.numpy().astype(np.float64) - exact)
        normal = np.abs(exact) >= 2.0 ** -14
        assert (rounding[normal] <= U * np.abs(exact[normal])).all()
        assert (rounding[~normal] <= TINY).all()
    if qtype == T.Q6_K:
        bound = U * np.abs(ref) + 32 * TINY
    else:
        q = codes_as_float(qw).numpy()
        bound = U * (q * np.abs(np.repeat(scale, 32, 1)) + np.abs(np.repeat(mins, 32, 1))) + 16 * TINY
    assert (err <= bound).all()
    assert err.max() > 0  # products did round: the bound is exercised, not vacuous
    assert not ref[0].any() and not dequantize(qw)[0].any()  # the zero row stays zero


def test_products_beyond_fp16_raise():
    data = random_blocks(T.Q4_K, n=2, k=256, magnitudes=[2000.0])  # d * 63 > 65504
    with pytest.raises(ValueError, match="Q4_K"):
        to_quant_weight(data, T.Q4_K, (2, 256))
    data = random_blocks(T.Q4_0, n=2, k=32, magnitudes=[60000.0])  # 8 d > 65504
    with pytest.raises(ValueError, match="Q4_0"):
        to_quant_weight(data, T.Q4_0, (2, 32))


def test_shape_checks_and_flat_input():
    data = random_blocks(T.Q8_0, n=4, k=64)
    with pytest.raises(ValueError, match="bytes"):
        to_quant_weight(data, T.Q8_0, (4, 96))
    with pytest.raises(ValueError, match="multiple"):
        to_quant_weight(data, T.Q8_0, (4, 48))
    flat = to_quant_weight(data.ravel(), T.Q8_0, (4, 64))
    np.testing.assert_array_equal(dequantize(flat).numpy(), reference(data, T.Q8_0, 4, 64))


def test_reader_path_through_a_written_gguf_file(tmp_path):
    """Q8_0 and Q4_K tensors written with GGUFWriter, read back with GGUFReader: ReaderTensor.data
    (a read-only memory map) and the reversed ReaderTensor.shape go straight into to_quant_weight."""
    q8_w = random_weights(48, 96, seed=4)
    tensors = {"q8": (T.Q8_0, gguf.quants.quantize(q8_w, T.Q8_0)),
               "q4k": (T.Q4_K, random_blocks(T.Q4_K, n=24, k=512, seed=5))}
    path = tmp_path / "tiny.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    for name, (qtype, raw) in tensors.items():
        writer.add_tensor(name, raw, raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()

    read = {t.name: t for t in gguf.GGUFReader(str(path)).tensors}
    assert [int(x) for x in read["q8"].shape] == [96, 48]  # GGUF's (K, N)
    for name, (qtype, raw) in tensors.items():
        t = read[name]
        assert t.tensor_type == qtype
        n, k = (int(x) for x in reversed(t.shape))
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # a read-only buffer must be copied, not handed to torch
            qw = to_quant_weight(t.data, t.tensor_type, (n, k))
        ref = reference(t.data, qtype, n, k)
        np.testing.assert_array_equal(ref, reference(raw, qtype, n, k))
        got = dequantize(qw).numpy()
        if qtype == T.Q8_0:
            np.testing.assert_array_equal(got, ref)
            assert np.abs(got - q8_w).max() <= np.abs(q8_w).max() / 127
        else:
            scale, mins = exact_products(raw, qtype, n, k)
            q = codes_as_float(qw).numpy()
            bound = U * (q * np.abs(np.repeat(scale, 32, 1)) + np.abs(np.repeat(mins, 32, 1))) + 16 * TINY
            assert (np.abs(got - ref) <= bound).all()
