"""Triton kernels that apply a QuantWeight (issue 18): out = x @ W^T + bias with W kept as codes.

Decode (T <= 16 rows) is bound by reading the weight, so a program owns BLOCK_N output features,
walks its share of K once, and serves every row of x from the same registers:
  - codes are loaded [BLOCK_N, BLOCK_C] with the code index contiguous (16-byte loads, coalesced
    along K); a block holds GPB whole groups or lies inside one, so scales (and mins) are one small
    [BLOCK_N, GPB] load per block, never a per-code gather;
  - codes become floats without the integer-to-float instruction (a sixteenth of the FMA rate on
    sm_80/sm_90): or'ed into the mantissa of 2**23 they read as 2**23 + code, one subtraction away;
  - int4 bytes are unpacked with masks: the low nibble (even k) is `b & 0xF`, the high one (odd k)
    is kept in place as `b & 0xF0` = 16 q and its scale divided by 16 (exact), which saves a shift;
    x is split into even and odd columns to meet them, so nothing is interleaved;
  - T = 1 (`_gemv_kernel`, CUDA cores): the exact integer codes times x are summed over each run of
    16 codes a thread holds, and the group's scale (and min times the run's sum of x) is applied once
    per run: w x = s q x - m x. About four issue slots a weight (byte extract, magic add, subtract,
    FMA; sm_90 SASS checked offline), half of what int8 at 4.3 TB/s allows;
  - 2 <= T <= 16 (`_gemm_kernel`, tensor cores): x padded to 16 rows (tl.dot's minimum: one compile
    serves the bucket) times the dequantized block rounded to x's dtype, codes streamed through
    shared memory (cp.async). The rounding (2**-9 relative in bf16) is far below the quantization
    error (int8: up to 1/254 of a group's largest weight); FMAs would make T = 16 compute-bound.
    fp32 x goes the prefill way (an fp32 tl.dot is FMAs, and spills).
Too few row blocks for the GPU (N = 4096 is 256 of 16): K is split into fp32 partials that a second
kernel sums in a fixed order (deterministic, unlike atomics), adds the bias to and rounds.

Prefill (T > 16) is bound by the matmul: the weight is dequantized into a [N, K] buffer in x's dtype
(`dequantize_into`, which a caller may pass to reuse memory) and F.linear (cuBLAS) does the product.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from kvretrieve.kernels.checks import check_launch_device, check_quant_linear, fail

DECODE_ROWS = 16  # the largest T served from the quantized codes; beyond it, dequantize + F.linear


@triton.jit
def _code_f32(i):
    # Exact for 0 <= i < 2**23 (int32): an OR into 2**23's mantissa and one fp32 subtraction.
    return (i | 0x4B000000).to(tl.float32, bitcast=True) - 8388608.0


@triton.jit
def _per_column(v, BN: tl.constexpr, BC: tl.constexpr, GPB: tl.constexpr):
    # [BN, GPB] per-group values -> [BN, BC], each spread over its group's BC // GPB columns.
    if GPB == 1:
        return tl.broadcast_to(v, (BN, BC))
    else:
        return tl.reshape(tl.broadcast_to(v[:, :, None], (BN, GPB, BC // GPB)), (BN, BC))


@triton.jit
def _codes(c_rows, rmask, c0, stride_ck, BITS: tl.constexpr, BC: tl.constexpr):
    """Codes c0 .. c0 + BC of BN rows as exact fp32 integers: (q, q) at 8 bits; (q of even k,
    16 q of odd k) at 4 bits."""
    c = tl.load(c_rows + (c0 + tl.arange(0, BC))[None, :] * stride_ck, mask=rmask[:, None], other=0)
    if BITS == 8:
        # int8 + 128 is in [0, 255]: added (not or'ed) into the mantissa, then both offsets removed.
        q = (c.to(tl.int32) + 0x4B000080).to(tl.float32, bitcast=True) - 8388736.0
        return q, q
    else:
        b = c.to(tl.int32)
        return _code_f32(b & 0xF), _code_f32(b & 0xF0)


@triton.jit
def _group_values(v_rows, rmask, c0, GC, stride_vg, BN: tl.constexpr, NCOL: tl.constexpr, GPB: tl.constexpr):
    # The scales (or mins) of the GPB groups a block of codes from c0 covers, as [BN, NCOL] fp32.
    g = c0 // GC + tl.arange(0, GPB)
    return _per_column(tl.load(v_rows + g[None, :] * stride_vg, mask=rmask[:, None], other=0.0).to(tl.float32),
                       BN, NCOL, GPB)


@triton.jit
def _dequant_block(c_rows, s_rows, m_rows, rmask, c0, GC, stride_ck, stride_sg, stride_mg,
                   BITS: tl.constexpr, BN: tl.constexpr, BC: tl.constexpr, GPB: tl.constexpr):
    """Codes c0 .. c0 + BC of BN rows -> fp32 weights: (w, w) at 8 bits, (even k, odd k) at 4 bits."""
    qa, qb = _codes(c_rows, rmask, c0, stride_ck, BITS, BC)
    s = _group_values(s_rows, rmask, c0, GC, stride_sg, BN, BC, GPB)
    if BITS == 8:
        return qa * s, qa * s
    else:
        m = _group_values(m_rows, rmask, c0, GC, stride_mg, BN, BC, GPB)
        return qa * s - m, qb * (s * 0.0625) - m  # 16 q times scale / 16


@triton.jit
def _chunk_sums(p, BN: tl.constexpr, NCH: tl.constexpr, CH: tl.constexpr):
    # [BN, NCH * CH] -> [BN, NCH]: sums over runs of CH codes that one thread holds (one 16-byte
    # load), so no lanes exchange data until the final reduction.
    return tl.sum(tl.reshape(p, (BN, NCH, CH)), axis=2)


# Sizes and trip counts vary per layer: not specialized on (divisibility by 16, == 1), so one compile
# per format serves every shape; strides stay specialized (unit strides vectorize the loads).
@triton.jit(do_not_specialize=["N", "GC", "iters"])
def _gemv_kernel(x_ptr, codes_ptr, s_ptr, m_ptr, b_ptr, out_ptr, N, GC, iters,
                 stride_xk, stride_cn, stride_ck, stride_sn, stride_sg, stride_mn, stride_mg, stride_os,
                 BITS: tl.constexpr, HAS_BIAS: tl.constexpr, BN: tl.constexpr, BC: tl.constexpr,
                 GPB: tl.constexpr):
    # A group's scale (and min) is applied once per run of CH codes, not per weight: the exact integer
    # codes times x are summed first, then scaled (w x = s q x - m x).
    CH: tl.constexpr = min(16, BC // GPB)
    NCH: tl.constexpr = BC // CH
    rows = tl.program_id(0) * BN + tl.arange(0, BN)
    rmask = rows < N
    r64 = rows.to(tl.int64)[:, None]  # N * K passes 2**31 for the largest vocabularies
    c_rows, s_rows, m_rows = codes_ptr + r64 * stride_cn, s_ptr + r64 * stride_sn, m_ptr + r64 * stride_mn
    acc = tl.zeros([BN, NCH], tl.float32)
    c_begin = tl.program_id(1) * iters * BC
    for c0 in range(c_begin, c_begin + iters * BC, BC):
        qa, qb = _codes(c_rows, rmask, c0, stride_ck, BITS, BC)
        s = _group_values(s_rows, rmask, c0, GC, stride_sg, BN, NCH, GPB)
        if BITS == 8:
            xv = tl.load(x_ptr + (c0 + tl.arange(0, BC)) * stride_xk).to(tl.float32)
            acc += _chunk_sums(qa * xv[None, :], BN, NCH, CH) * s
        else:
            m = _group_values(m_rows, rmask, c0, GC, stride_mg, BN, NCH, GPB)
            x2 = tl.load(x_ptr + (2 * c0 + tl.arange(0, 2 * BC)) * stride_xk).to(tl.float32)
            xe, xo = tl.split(tl.reshape(x2, (BC, 2)))
            lo = _chunk_sums(qa * xe[None, :], BN, NCH, CH)
            hi = _chunk_sums(qb * xo[None, :], BN, NCH, CH)  # 16 q: scale / 16 below
            xs = tl.sum(tl.reshape(xe + xo, (NCH, CH)), axis=1)
            acc += lo * s + hi * (s * 0.0625) - m * xs[None, :]
    y = tl.sum(acc, axis=1)
    if HAS_BIAS:
        y += tl.load(b_ptr + rows, mask=rmask, other=0.0).to(tl.float32)
    tl.store(out_ptr + tl.program_id(1) * stride_os + rows, y.to(out_ptr.dtype.element_ty), mask=rmask)


@triton.jit
def _mma_acc(a, b, acc, UPCAST: tl.constexpr):
    if UPCAST:
        # The interpreter multiplies bf16 operands as raw bits; upcasting is exact (see sparse_decode).
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    else:
        # fp16/bf16 operands (fp32 x never comes here): tensor cores, fp32 accumulator.
        return tl.dot(a, b, acc, input_precision="ieee")


@triton.jit(do_not_specialize=["T", "N", "GC", "iters"])
def _gemm_kernel(x_ptr, codes_ptr, s_ptr, m_ptr, b_ptr, out_ptr, T, N, GC, iters,
                 stride_xt, stride_xk, stride_cn, stride_ck, stride_sn, stride_sg, stride_mn, stride_mg,
                 stride_os, stride_ot,
                 BITS: tl.constexpr, HAS_BIAS: tl.constexpr, BN: tl.constexpr, BC: tl.constexpr,
                 GPB: tl.constexpr, TP: tl.constexpr, UPCAST: tl.constexpr):
    rows = tl.program_id(0) * BN + tl.arange(0, BN)
    rmask = rows < N
    r64 = rows.to(tl.int64)[:, None]
    c_rows, s_rows, m_rows = codes_ptr + r64 * stride_cn, s_ptr + r64 * stride_sn, m_ptr + r64 * stride_mn
    ts = tl.arange(0, TP)
    tmask = (ts < T)[:, None]  # rows T .. TP - 1 are zeros: tl.dot's M is at least 16
    x_rows = x_ptr + ts[:, None] * stride_xt
    dt = x_ptr.dtype.element_ty
    acc = tl.zeros([TP, BN], tl.float32)
    c_begin = tl.program_id(1) * iters * BC
    for c0 in range(c_begin, c_begin + iters * BC, BC):
        a, b = _dequant_block(c_rows, s_rows, m_rows, rmask, c0, GC, stride_ck, stride_sg, stride_mg,
                              BITS, BN, BC, GPB)
        if BITS == 8:
            xt = tl.load(x_rows + (c0 + tl.arange(0, BC))[None, :] * stride_xk, mask=tmask, other=0.0)
            acc = _mma_acc(xt, tl.trans(a.to(dt)), acc, UPCAST)
        else:
            x2 = tl.load(x_rows + (2 * c0 + tl.arange(0, 2 * BC))[None, :] * stride_xk, mask=tmask, other=0.0)
            xe, xo = tl.split(tl.reshape(x2, (TP, BC, 2)))
            acc = _mma_acc(xe, tl.trans(a.to(dt)), acc, UPCAST)
            acc = _mma_acc(xo, tl.trans(b.to(dt)), acc, UPCAST)
    if HAS_BIAS:
        acc += tl.load(b_ptr + rows, mask=rmask, other=0.0).to(tl.float32)[None, :]
    dst = out_ptr + tl.program_id(1) * stride_os + ts[:, None] * stride_ot + rows[None, :]
    tl.store(dst, acc.to(out_ptr.dtype.element_ty), mask=tmask & rmask[None, :])


@triton.jit(do_not_specialize=["N", "SPLITS"])
def _reduce_kernel(part_ptr, b_ptr, out_ptr, N, SPLITS, stride_ps, stride_pt, stride_ot,
                   HAS_BIAS: tl.constexpr, BLOCK: tl.constexpr):
    t = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < N
    acc = tl.zeros([BLOCK], tl.float32)
    for s in range(SPLITS):  # a fixed order: the same sum on every run
        acc += tl.load(part_ptr + s * stride_ps + t * stride_pt + cols, mask=mask, other=0.0)
    if HAS_BIAS:
        acc += tl.load(b_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + t * stride_ot + cols, acc.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit(do_not_specialize=["N", "GC"])
def _dequant_kernel(codes_ptr, s_ptr, m_ptr, out_ptr, N, GC,
                    stride_cn, stride_ck, stride_sn, stride_sg, stride_mn, stride_mg, stride_on,
                    BITS: tl.constexpr, BN: tl.constexpr, BC: tl.constexpr, GPB: tl.constexpr):
    rows = tl.program_id(0) * BN + tl.arange(0, BN)
    rmask = rows < N
    r64 = rows.to(tl.int64)[:, None]
    c0 = tl.program_id(1) * BC
    a, b = _dequant_block(codes_ptr + r64 * stride_cn, s_ptr + r64 * stride_sn, m_ptr + r64 * stride_mn, rmask,
                          c0, GC, stride_ck, stride_sg, stride_mg, BITS, BN, BC, GPB)
    dt = out_ptr.dtype.element_ty
    if BITS == 8:
        tl.store(out_ptr + r64 * stride_on + (c0 + tl.arange(0, BC))[None, :], a.to(dt), mask=rmask[:, None])
    else:
        # k = 2j from the low nibble, 2j + 1 from the high one: interleaved in registers, stored contiguously
        w = tl.reshape(tl.join(a, b), (BN, 2 * BC))
        tl.store(out_ptr + r64 * stride_on + (2 * c0 + tl.arange(0, 2 * BC))[None, :], w.to(dt), mask=rmask[:, None])


def _block_codes(kc: int, gc: int, cap: int) -> int:
    """Codes per row in one block: a power of two <= cap that divides the row (no K masks) and either
    holds whole groups or lies within one (scales as one small load per block)."""
    bc = min(cap, kc & -kc)
    if bc % gc and gc % bc:
        bc = min(bc, gc & -gc)
    return bc


def _num_splits(bands: int, blocks: int, kc: int, t: int, device: torch.device) -> int:
    """K splits: enough programs for about four per multiprocessor (each streams ~8 KB of codes a step;
    several programs per SM keep the loads in flight that HBM needs), while the fp32 partials
    (8 bytes per row and split, written then read) stay under 1/8 of the weight's bytes; a divisor of
    the blocks so every split does the same work."""
    # Without a device to ask (the interpreter, offline lowering of fake tensors): an H100/H200's 132.
    cuda = device.type == "cuda" and torch.cuda.is_available()
    sms = torch.cuda.get_device_properties(device).multi_processor_count if cuda else 132
    want = max(1, min(triton.cdiv(4 * sms, bands), kc // (64 * t), blocks))
    return max(d for d in range(1, want + 1) if blocks % d == 0)


def _weight_args(w):
    """(codes per row, codes per group (a byte holds two k of one group at 4 bits), tensors, strides)."""
    mins = w.mins if w.mins is not None else w.scales  # bits 8: never read
    strides = (w.codes.stride(0), w.codes.stride(1), w.scales.stride(0), w.scales.stride(1), *mins.stride())
    return w.codes.shape[1], w.group // (2 if w.bits == 4 else 1), (w.codes, w.scales, mins), strides


def dequantize_into(w, out):
    """The QuantWeight w [N, K] written into out [N, K] (float32/16, bfloat16, unit column stride, on
    w's device) and returned. Blocks of 16 rows x 256 codes: ~4K codes a program keeps enough programs
    (N * K / 4096) for any layer, and each store is a contiguous row segment."""
    n, k = w.shape
    if not isinstance(out, torch.Tensor) or out.dtype not in (torch.float32, torch.float16, torch.bfloat16) \
            or tuple(out.shape) != (n, k) or (k and out.stride(1) != 1) or out.device != w.device:
        fail("dequantize_into", f"out must be a float tensor [N, K] = [{n}, {k}] with unit column stride on "
                                f"{w.device}, got {getattr(out, 'dtype', type(out))} "
                                f"{tuple(getattr(out, 'shape', ()))}")
    check_launch_device("dequantize_into", w.codes, out)
    kc, gc, tensors, strides = _weight_args(w)
    if n == 0 or kc == 0:
        return out
    bc = _block_codes(kc, gc, 256)
    _dequant_kernel[(triton.cdiv(n, 16), kc // bc)](*tensors, out, n, gc, *strides, out.stride(0), BITS=w.bits,
                                                    BN=16, BC=bc, GPB=max(1, bc // gc), num_warps=4)
    return out


def decode_tiles(t: int, bits: int) -> tuple[int, int, int, int]:
    """(BLOCK_N rows, most codes per row a step, num_warps, num_stages) for T rows of x. T = 1: 16 rows
    x 512 int8 codes (four 16-byte loads a thread) or 256 int4 bytes (two); at ~93 registers (sm_90,
    compiled offline) five programs fit an SM, ~20-40 KB of loads in flight, what HBM3e's latency
    times bandwidth asks (512 int4 bytes: 163 registers, three programs). These loads feed no dot and
    are not pipelined: occupancy is the pipeline. T <= 16: 64 rows x 128 codes (int4: 64 bytes =
    128 k), a 16 x 64 tensor-core tile, 3 cp.async stages (25 KB shared, 108 registers)."""
    if t == 1:
        return (16, 512, 4, 1) if bits == 8 else (16, 256, 4, 1)
    return (64, 128 if bits == 8 else 64, 4, 3)


def quant_linear(x, w, bias=None, *, weight_buffer=None, split_k=None, tiles=None):
    """Triton x [T, K] @ w^T (+ bias [N]) for a QuantWeight w [N, K] -> [T, N] in x.dtype.
    T <= 16 reads the codes once for all rows; T > 16 dequantizes into weight_buffer ([N, K] in x's
    dtype, allocated when None) and calls F.linear. split_k and tiles (decode_tiles' tuple) override
    the launcher's choices (tests, probes)."""
    t, n, k = check_quant_linear(x, w, bias)
    check_launch_device("quant_linear", x, w.codes, w.scales, *(u for u in (w.mins, bias) if u is not None))
    kc, gc, tensors, strides = _weight_args(w)
    bn, cap, warps, stages = tiles or decode_tiles(t, w.bits)
    bc = _block_codes(kc, gc, cap)
    # tl.dot needs K >= 16 (only odd groups such as 48 at 4 bits miss it); fp32 x is exact through cuBLAS
    if t > DECODE_ROWS or (t > 1 and (bc < 16 or x.dtype == torch.float32)):
        buf = torch.empty(n, k, dtype=x.dtype, device=x.device) if weight_buffer is None else weight_buffer
        if not isinstance(buf, torch.Tensor) or buf.dtype != x.dtype or tuple(buf.shape) != (n, k):
            fail("quant_linear", f"weight_buffer must be [N, K] = [{n}, {k}] in x's dtype {x.dtype}, got "
                                 f"{getattr(buf, 'dtype', type(buf))} {tuple(getattr(buf, 'shape', ()))}")
        return F.linear(x, dequantize_into(w, buf), bias)
    out = torch.empty(t, n, dtype=x.dtype, device=x.device)
    if t == 0 or n == 0:
        return out
    bands, blocks = triton.cdiv(n, bn), kc // bc
    splits = _num_splits(bands, blocks, kc, t, x.device) if split_k is None else int(split_k)
    if splits < 1 or blocks % splits:
        fail("quant_linear", f"split_k must divide the {blocks} blocks of {bc} codes, got {split_k}")
    dst = out if splits == 1 else torch.empty(splits, t, n, dtype=torch.float32, device=x.device)
    b_arg = bias if bias is not None else x
    common = dict(BITS=w.bits, HAS_BIAS=bias is not None and splits == 1, BN=bn, BC=bc, GPB=max(1, bc // gc),
                  num_warps=warps, num_stages=stages)
    stride_os = dst.stride(0) if splits > 1 else 0
    if t == 1:
        _gemv_kernel[(bands, splits)](x, *tensors, b_arg, dst, n, gc, blocks // splits, x.stride(1), *strides,
                                      stride_os, **common)
    else:
        _gemm_kernel[(bands, splits)](x, *tensors, b_arg, dst, t, n, gc, blocks // splits, x.stride(0), x.stride(1),
                                      *strides, stride_os, dst.stride(-2), TP=DECODE_ROWS,
                                      UPCAST=os.environ.get("TRITON_INTERPRET") == "1", **common)
    if splits > 1:
        _reduce_kernel[(t, triton.cdiv(n, 1024))](dst, b_arg, out, n, splits, dst.stride(0), dst.stride(1),
                                                  out.stride(0), HAS_BIAS=bias is not None, BLOCK=1024, num_warps=4)
    return out


__all__ = ["quant_linear", "dequantize_into", "decode_tiles", "DECODE_ROWS"]
