"""Triton kernels for the decoder's small elementwise ops: RMSNorm, RoPE and SiLU-gated product.

Each replaces several torch kernels (about seven for RMSNorm, six for RoPE, two for the MLP gate),
which in a decode step cost more in launches than in arithmetic. One kernel per op serves every
float dtype: math runs in fp32 and the result is rounded to the output dtype at the points where the
torch reference (kvretrieve.kernels.reference) rounds, so bf16/fp16 outputs match it bit for bit
except where a fp32 sum or exp differs in its last bit and that flips a rounding (one ulp).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kvretrieve.kernels.checks import check_launch_device, check_rms_norm, check_rope, check_silu_mul


@triton.jit
def _rms_norm_kernel(x_ptr, w_ptr, out_ptr, stride_xt, stride_xn, stride_w, stride_ot, eps,
                     N: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)  # int64: T * n passes 2**31 at 512K-token prefills
    offs = tl.arange(0, BLOCK)
    mask = offs < N
    x = tl.load(x_ptr + row * stride_xt + offs * stride_xn, mask=mask, other=0.0).to(tl.float32)
    rstd = tl.rsqrt(tl.sum(x * x, axis=0) / N + eps)
    dt = out_ptr.dtype.element_ty
    # Round the normalised row to the model dtype before the weight, as the reference does.
    xn = (x * rstd).to(dt).to(tl.float32)
    w = tl.load(w_ptr + offs * stride_w, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * stride_ot + offs, (w * xn).to(dt), mask=mask)


@triton.jit
def _rope_kernel(x_ptr, cos_ptr, sin_ptr, out_ptr, H, stride_xt, stride_xh, stride_xd,
                 stride_ct, stride_cd, stride_st, stride_sd,
                 HALF: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    heads = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    cols = tl.arange(0, BLOCK_D)
    cmask = cols < HALF
    mask = (heads < H)[:, None] & cmask[None, :]
    c1 = tl.load(cos_ptr + t * stride_ct + cols * stride_cd, mask=cmask, other=0.0).to(tl.float32)[None, :]
    c2 = tl.load(cos_ptr + t * stride_ct + (cols + HALF) * stride_cd, mask=cmask, other=0.0).to(tl.float32)[None, :]
    s1 = tl.load(sin_ptr + t * stride_st + cols * stride_sd, mask=cmask, other=0.0).to(tl.float32)[None, :]
    s2 = tl.load(sin_ptr + t * stride_st + (cols + HALF) * stride_sd, mask=cmask, other=0.0).to(tl.float32)[None, :]
    src = x_ptr + t * stride_xt + heads[:, None].to(tl.int64) * stride_xh + cols[None, :] * stride_xd
    x1 = tl.load(src, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(src + HALF * stride_xd, mask=mask, other=0.0).to(tl.float32)
    dt = out_ptr.dtype.element_ty
    # torch rounds each product to the dtype before the sum; so must we, to match it exactly.
    o1 = (x1 * c1).to(dt).to(tl.float32) + (-x2 * s1).to(dt).to(tl.float32)
    o2 = (x2 * c2).to(dt).to(tl.float32) + (x1 * s2).to(dt).to(tl.float32)
    dst = out_ptr + (t * H + heads[:, None]) * (2 * HALF) + cols[None, :]
    tl.store(dst, o1.to(dt), mask=mask)
    tl.store(dst + HALF, o2.to(dt), mask=mask)


@triton.jit
def _silu_mul_kernel(x_ptr, out_ptr, stride_xt, stride_xc, stride_ot, M: tl.constexpr, BLOCK: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < M
    src = x_ptr + t * stride_xt + cols * stride_xc
    g = tl.load(src, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(src + M * stride_xc, mask=mask, other=0.0).to(tl.float32)
    dt = out_ptr.dtype.element_ty
    # div_rn: Triton's default fp32 division is approximate, torch's silu divides exactly.
    s = tl.math.div_rn(g, 1.0 + tl.exp(-g)).to(dt).to(tl.float32)
    tl.store(out_ptr + t * stride_ot + cols, (s * u).to(dt), mask=mask)


def rms_norm(x, weight, eps):
    """Triton RMSNorm: x [T, n], weight [n] (x's dtype) -> [T, n] in x.dtype, one program per row."""
    check_rms_norm(x, weight, eps)
    check_launch_device("rms_norm", x, weight)
    t, n = x.shape
    out = torch.empty((t, n), dtype=x.dtype, device=x.device)
    if t == 0:
        return out
    block = triton.next_power_of_2(n)
    _rms_norm_kernel[(t,)](x, weight, out, x.stride(0), x.stride(1), weight.stride(0), out.stride(0), float(eps),
                           N=n, BLOCK=block, num_warps=min(16, max(1, block // 256)))
    return out


def apply_rope(x, cos, sin):
    """Triton RoPE: x [T, H, d] (any strides), cos/sin [T, d] -> new contiguous [T, H, d], rotating
    the pairs (i, i + d/2)."""
    check_rope(x, cos, sin)
    check_launch_device("apply_rope", x, cos, sin)
    t, h, d = x.shape
    out = torch.empty((t, h, d), dtype=x.dtype, device=x.device)
    if t == 0 or h == 0:
        return out
    block_h = min(triton.next_power_of_2(h), 8)
    # No FMA contraction: fp32 results then equal torch's separate mul and add kernels exactly.
    _rope_kernel[(t, triton.cdiv(h, block_h))](
        x, cos, sin, out, h, x.stride(0), x.stride(1), x.stride(2), cos.stride(0), cos.stride(1),
        sin.stride(0), sin.stride(1), HALF=d // 2, BLOCK_H=block_h, BLOCK_D=triton.next_power_of_2(d // 2),
        enable_fp_fusion=False)
    return out


def silu_mul(gate_up):
    """Triton SwiGLU gate: gate_up [T, 2m] (gate | up) -> silu(gate) * up [T, m] in its dtype."""
    check_silu_mul(gate_up)
    check_launch_device("silu_mul", gate_up)
    t, m = gate_up.shape[0], gate_up.shape[1] // 2
    out = torch.empty((t, m), dtype=gate_up.dtype, device=gate_up.device)
    if t == 0 or m == 0:
        return out
    block = min(triton.next_power_of_2(m), 1024)
    _silu_mul_kernel[(t, triton.cdiv(m, block))](gate_up, out, gate_up.stride(0), gate_up.stride(1), out.stride(0),
                                                 M=m, BLOCK=block, num_warps=4)
    return out


__all__ = ["rms_norm", "apply_rope", "silu_mul"]
