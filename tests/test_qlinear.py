"""Tests for quant_linear (issue 18): the torch reference against the format's formula in float64,
the Triton kernels against the reference (under TRITON_INTERPRET=1 in a subprocess on CPU, natively
on CUDA at Llama-8B sizes), and the input checks.

Errors are `scaled`: max |a - b| in units of the output dtype's eps times max |b|. Tolerances:
  - 1 where nothing is rounded below fp32 before the output (T = 1: exact integer codes times x
    summed in fp32, then scaled; dequantize_into): kernel and reference differ only in where fp32
    roundings fall, so both round nearly the same value and are equal or adjacent (the interpreter
    truncates fp32 -> bf16 instead of rounding: still adjacent);
  - 2 where the weight is rounded to x's dtype first (2 <= T <= 16 on the tensor cores, T > 16
    through F.linear): each product moves by <= 2**-9 relative in bf16, a random walk over K that
    stays ~0.6 u * rms(out) per output, under ~0.3 eps * max|out| at 5 sigma, on top of the adjacent
    rounding; 4 through cuBLAS, which may also reduce its split-K partials in bf16;
  - for fp32 x (T >= 2 through fp32 F.linear), 2 * sqrt(K) fp32 eps: the fp32 sums run in other
    orders (a random walk of K roundings), and the weight is not rounded.
"""

import json
import math

import pytest
import torch

from helpers import run_interpreted
from test_fused_kernels import scaled
import kvretrieve.kernels as K
from kvretrieve.kernels import reference as R
from kvretrieve.models.quant import SCALE_DTYPE, QuantWeight, dequantize, quantize

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
FORMATS = [(8, 16), (8, 32), (8, 128), (8, "K"), (4, 16), (4, 32), (4, 128), (4, "K")]


def rand_qweight(n, k, bits, group, seed=0, device="cpu"):
    """A QuantWeight with every code value possible (not only what quantize() makes), scales around
    1/64 and mins around a group's half range, as a 4-bit Llama weight has."""
    g = torch.Generator().manual_seed(seed)
    group = k if group == "K" else group
    if bits == 8:
        codes = torch.randint(-127, 128, (n, k), generator=g, dtype=torch.int8)
    else:
        codes = torch.randint(0, 256, (n, k // 2), generator=g, dtype=torch.int16).to(torch.uint8)
    scales = ((0.5 + torch.rand(n, k // group, generator=g)) / 64).to(SCALE_DTYPE)
    mins = (scales.float() * (7.5 + torch.randn(n, k // group, generator=g))).to(SCALE_DTYPE) if bits == 4 else None
    return QuantWeight(bits, codes, scales, mins, group).to(torch.device(device))


def linear_case(n, k, t, bits, group, dtype=torch.bfloat16, bias=True, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(t, k, generator=g).to(dtype).to(device)
    b = (torch.randn(n, generator=g) * 0.5).to(dtype).to(device) if bias else None
    return x, rand_qweight(n, k, bits, group, seed, device), b


def plain_dequant(w):
    """The [N, K] weight in float64, written out from the format's definition in models/quant.py."""
    n, k = w.shape
    codes = w.codes.cpu()
    if w.bits == 8:
        q = codes.double()
    else:
        q = torch.empty(n, k, dtype=torch.float64)
        q[:, 0::2], q[:, 1::2] = (codes & 0xF).double(), (codes >> 4).double()
    grp = torch.arange(k) // w.group
    out = q * w.scales.cpu().double()[:, grp]
    return out - w.mins.cpu().double()[:, grp] if w.bits == 4 else out


def tol(dtype, t, k, native=False):
    if dtype == torch.float32:
        return 2 * math.sqrt(k)
    return 1 if t == 1 else 4 if t > 16 and native else 2


# ---------------------------------------------------------------- reference (in-process)
@pytest.mark.parametrize("bits,group", FORMATS)
def test_reference_equals_float64_formula(bits, group):
    n, k = 48, 256
    for t in (1, 3, 16, 40):
        for dt in (torch.bfloat16, torch.float32):
            for bias in (False, True):
                x, w, b = linear_case(n, k, t, bits, group, dt, bias, seed=t)
                exact = x.double() @ plain_dequant(w).t() + (b.double() if bias else 0)
                got = R.quant_linear(x, w, b)
                assert got.shape == (t, n) and got.dtype == dt
                assert scaled(got, exact.to(dt)) <= (1 if dt != torch.float32 else tol(dt, t, k)), (t, dt, bias)


def test_reference_on_quantized_checkpoint_weight_and_dispatch_on_cpu():
    """A weight from quantize() (what --weights int8|int4 makes): the public function on CPU is the
    reference, and the result is close to the unquantized product (the format loses little)."""
    g = torch.Generator().manual_seed(5)
    W, x = torch.randn(96, 512, generator=g) / 20, torch.randn(4, 512, generator=g)
    for bits, group, rel in ((8, 32, 0.01), (4, 32, 0.15)):
        w = quantize(W, bits, group)
        got = K.quant_linear(x, w)
        assert torch.equal(got, R.quant_linear(x, w))
        assert (got - x @ W.t()).norm() / (x @ W.t()).norm() < rel


# ---------------------------------------------------------------- bad input
def _w(n=16, k=64, bits=8, group=32):
    return rand_qweight(n, k, bits, group)


BAD = [
    (lambda: K.quant_linear(torch.ones(2, 64, dtype=torch.int32), _w()), "x must be a float32"),
    (lambda: K.quant_linear(torch.ones(2, 32), _w()), r"x must be \[T, K\] with K = 64"),
    (lambda: K.quant_linear(torch.ones(64), _w()), r"x must be \[T, K\]"),
    (lambda: K.quant_linear(torch.ones(2, 64), _w().codes), "w must be a QuantWeight"),
    (lambda: K.quant_linear(torch.ones(2, 64), _w(group=8)), "multiple of 16"),
    (lambda: K.quant_linear(torch.ones(2, 64), _w(), torch.ones(15)), r"bias must be \[N\] = \[16\]"),
    (lambda: K.quant_linear(torch.ones(2, 64), _w(), torch.ones(16).half()), "bias must be .* x's dtype"),
    (lambda: K.quant_linear(torch.ones(2, 64, device="meta"), _w()), "all tensors must be on one device"),
]


@pytest.mark.parametrize("i", range(len(BAD)))
def test_bad_input_raises_value_error_naming_the_problem(i):
    call, match = BAD[i]
    with pytest.raises(ValueError, match=match) as info:
        call()
    assert str(info.value).startswith("quant_linear:")


@pytest.mark.skipif(not K.HAS_TRITON, reason="triton not installed")
def test_launchers_reject_cpu_tensors_and_bad_buffers_without_interpreter(monkeypatch):
    from kvretrieve.kernels import qlinear

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match="quant_linear: the Triton kernel needs CUDA"):
        qlinear.quant_linear(torch.ones(2, 64), _w())
    with pytest.raises(ValueError, match=r"dequantize_into: out must be a float tensor \[N, K\] = \[16, 64\]"):
        qlinear.dequantize_into(_w(), torch.empty(16, 32))


@pytest.mark.cuda
@pytest.mark.skipif(not (torch.cuda.is_available() and K.HAS_TRITON), reason="needs CUDA and triton")
def test_cpu_cuda_mix_raises():
    with pytest.raises(ValueError, match="quant_linear: all tensors must be on one device"):
        K.quant_linear(torch.ones(2, 64, device="cuda"), _w())
    with pytest.raises(ValueError, match="quant_linear: all tensors must be on one device"):
        K.quant_linear(torch.ones(2, 64, device="cuda"), _w().to(torch.device("cuda")), torch.ones(16))


# ---------------------------------------------------------------- Triton vs reference
def _check(x, w, b, native, **kw):
    from kvretrieve.kernels import qlinear

    got, ref = qlinear.quant_linear(x, w, b, **kw), R.quant_linear(x, w, b)
    return [("out", scaled(got, ref), tol(x.dtype, x.shape[0], x.shape[1], native))]


def _small_cases():
    """Formats x T at N = 64, K = 256 in bf16, then dtypes, forced K splits, row masks, strides,
    an odd group, the dequantized buffer and the argument checks of the launcher."""
    from kvretrieve.kernels import qlinear

    cases = {}
    for i, (bits, group) in enumerate(FORMATS):
        for t in (1, 3, 16, 40):
            a = linear_case(64, 256, t, bits, group, bias=(i + t) % 2 == 0, seed=i)
            cases[f"int{bits}-g{group}-T{t}"] = lambda a=a: _check(*a, False)
    for dn in ("fp32", "fp16"):
        for bits in (8, 4):
            for t in (1, 5):
                a = linear_case(64, 256, t, bits, 32, DTYPES[dn], seed=t)
                cases[f"{dn}-int{bits}-T{t}"] = lambda a=a: _check(*a, False)
    for bits in (8, 4):
        for t, split in ((1, 2), (5, 2), (16, 4), (16, 8)):  # 1024 codes: 2 blocks of 512 (T = 1), 8 or 16 else
            a = linear_case(50, 2048 // (bits // 4), t, bits, 32, seed=split)  # N = 50: rows masked
            cases[f"split{split}-int{bits}-T{t}"] = lambda a=a, s=split: _check(*a, False, split_k=s)
        for t in (1, 5):  # the launcher's own splits: 2 for both (132 SMs assumed without a device)
            a = linear_case(50, 2048 // (bits // 4), t, bits, 32, seed=t)
            cases[f"auto-split-int{bits}-T{t}"] = lambda a=a: _check(*a, False)
        for t in (1, 3):  # group 48: blocks of 16 codes (int8), 8 (int4: T = 3 falls back to F.linear)
            a = linear_case(40, 288, t, bits, 48, seed=t)
            cases[f"group48-int{bits}-T{t}"] = lambda a=a: _check(*a, False)

    def strided():
        wide = torch.randn(12, 600).bfloat16()
        res = []
        for bits in (8, 4):
            w, b = rand_qweight(64, 256, bits, 32), None
            for t in (1, 6):
                x = wide[:2 * t:2, 16:16 + 256]  # a row step of 1200, as a slice of a fused projection
                res.append((f"int{bits}-T{t}", scaled(qlinear.quant_linear(x, w, b), R.quant_linear(x, w, b)),
                            tol(x.dtype, t, 256)))
        return res

    def dequant_and_buffer():
        res = []
        for bits, group in FORMATS:
            w = rand_qweight(40, 256, bits, group)
            res.append((f"deq-fp32-int{bits}-g{group}", scaled(qlinear.dequantize_into(w, torch.empty(40, 256)),
                                                              dequantize(w)), 1))
            res.append((f"deq-bf16-int{bits}-g{group}", scaled(qlinear.dequantize_into(
                w, torch.empty(40, 256, dtype=torch.bfloat16)), dequantize(w, torch.bfloat16)), 1))
        x, w, b = linear_case(40, 256, 24, 4, 32)
        buf = torch.full((40, 256), float("nan"), dtype=torch.bfloat16)
        got = qlinear.quant_linear(x, w, b, weight_buffer=buf)
        res += [("buffer-out", scaled(got, R.quant_linear(x, w, b)), 2),
                ("buffer-holds-weight", scaled(buf, dequantize(w, torch.bfloat16)), 1),
                ("empty-T", float(qlinear.quant_linear(x[:0], w, b).shape != (0, 40)), 0)]
        return res

    def launcher_checks():
        x, w, _ = linear_case(40, 256, 24, 8, 32)
        wanted = [(lambda: qlinear.quant_linear(x, w, weight_buffer=torch.empty(40, 256)),
                   "weight_buffer must be .* in x's dtype"),
                  (lambda: qlinear.quant_linear(x, w, weight_buffer=torch.empty(40, 255).bfloat16()),
                   r"weight_buffer must be \[N, K\] = \[40, 256\]"),
                  (lambda: qlinear.quant_linear(x[:1], w, split_k=3), "split_k must divide")]
        res = []
        for i, (call, match) in enumerate(wanted):
            with pytest.raises(ValueError, match=match):
                call()
            res.append((f"check{i}", 0.0, 0))
        return res

    cases.update(strided=strided, dequant_and_buffer=dequant_and_buffer, launcher_checks=launcher_checks)
    return cases


def interp_main():
    """Entry point of the TRITON_INTERPRET=1 subprocess: prints one JSON line of results."""
    res = {}
    for name, fn in _small_cases().items():
        try:
            res[name] = fn()
        except BaseException as e:  # noqa: BLE001 - report (pytest.raises fails with an exception), the test shows it
            res[name] = [("exception: " + repr(e)[:300], float("inf"), 0.0)]
    print("RESULTS " + json.dumps(res))


@pytest.fixture(scope="module")
def interp_results():
    if not K.HAS_TRITON:
        pytest.skip("triton not installed")
    return run_interpreted("test_qlinear")


@pytest.mark.parametrize("name", list(_small_cases()) if K.HAS_TRITON else [])
def test_triton_interpreter_matches_reference(interp_results, name):
    for label, e, limit in interp_results[name]:
        assert e <= limit, f"{name}/{label}: error {e} > {limit}"


LLAMA8B = [(6144, 4096), (28672, 4096), (4096, 14336)]
_CUDA = torch.cuda.is_available() and K.HAS_TRITON


@pytest.mark.cuda
@pytest.mark.skipif(not _CUDA, reason="needs CUDA and triton")
@pytest.mark.parametrize("bits,group", [(8, "K"), (8, 32), (4, 32), (4, 128)])
@pytest.mark.parametrize("shape", LLAMA8B, ids=[f"{n}x{k}" for n, k in LLAMA8B])
def test_triton_cuda_matches_reference_llama8b_sizes(shape, bits, group):
    (n, k), dev = shape, torch.device("cuda")
    for t in (1, 8, 40):
        x, w, b = linear_case(n, k, t, bits, group, bias=t == 8, seed=t, device=dev)
        for label, e, limit in _check(x, w, b, True):
            assert e <= limit, f"T={t}/{label}: error {e} > {limit}"
        assert torch.equal(K.quant_linear(x, w, b), K.quant_linear(x, w, b))  # deterministic split-K sums
