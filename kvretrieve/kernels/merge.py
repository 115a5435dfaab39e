"""Triton LSE merge of two partial attentions over disjoint key sets (e.g. GPU-resident window
plus retrieved blocks). One program per head; the weights are computed in fp32 relative to the
larger lse so neither side can overflow, and a side with lse = -inf gets weight exactly 0."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kvretrieve.kernels.checks import check_launch_device, check_merge


@triton.jit
def _merge_kernel(
    oa_ptr, la_ptr, ob_ptr, lb_ptr, out_ptr, lse_ptr,
    stride_ah, stride_ad, stride_bh, stride_bd, stride_oh, stride_od, stride_la, stride_lb,
    D: tl.constexpr, DP: tl.constexpr,
):
    h = tl.program_id(0)
    offs = tl.arange(0, DP)
    mask = offs < D
    la = tl.load(la_ptr + h * stride_la)
    lb = tl.load(lb_ptr + h * stride_lb)
    m = tl.maximum(la, lb)
    # Both sides empty: a finite stand-in avoids (-inf) - (-inf) = NaN; both weights become 0.
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    wa = tl.exp(la - m_safe)
    wb = tl.exp(lb - m_safe)
    tot = wa + wb
    denom = tl.where(tot > 0.0, tot, 1.0)
    oa = tl.load(oa_ptr + h * stride_ah + offs * stride_ad, mask=mask, other=0.0).to(tl.float32)
    ob = tl.load(ob_ptr + h * stride_bh + offs * stride_bd, mask=mask, other=0.0).to(tl.float32)
    out = (wa * oa + wb * ob) / denom
    tl.store(out_ptr + h * stride_oh + offs * stride_od, out.to(out_ptr.dtype.element_ty), mask=mask)
    tl.store(lse_ptr + h, tl.where(tot > 0.0, m_safe + tl.log(denom), float("-inf")))


def merge_attention(out_a, lse_a, out_b, lse_b):
    """Triton LSE merge. out_a/out_b [H, d] (same float dtype), lse_a/lse_b [H] float32
    -> (out [H, d] in out_a.dtype, lse [H] float32)."""
    check_merge(out_a, lse_a, out_b, lse_b)
    check_launch_device("merge_attention", out_a, lse_a, out_b, lse_b)
    h, d = out_a.shape
    out = torch.empty((h, d), dtype=out_a.dtype, device=out_a.device)
    lse = torch.empty(h, dtype=torch.float32, device=out_a.device)
    if h == 0:
        return out, lse
    _merge_kernel[(h,)](
        out_a, lse_a, out_b, lse_b, out, lse,
        out_a.stride(0), out_a.stride(1), out_b.stride(0), out_b.stride(1), out.stride(0), out.stride(1),
        lse_a.stride(0), lse_b.stride(0),
        D=d, DP=max(1, triton.next_power_of_2(d)),
    )
    return out, lse


__all__ = ["merge_attention"]
