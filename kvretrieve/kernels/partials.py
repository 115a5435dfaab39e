"""The second launch of the rest kernels (kernels.rest): per-program partial softmaxes merged into one
attention output and its log-sum-exp, optionally with a rank-space part mapped back through a basis
(lowrank_rest's value sketches) and with the attended part merged in (into=).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def store_partials(m_ptr, l_ptr, od_ptr, kvh, pid, progs, run_m, run_l, acc, G: tl.constexpr, GP: tl.constexpr,
                   D: tl.constexpr, DP: tl.constexpr):
    # Program pid of KV head kvh writes its G heads' (max, sum, d-wide accumulator) at rows
    # head * progs + pid of [Hq, P] (and [Hq, P, D]): the layout merge_partials reads. Returns the rows.
    offs_g = tl.arange(0, GP)
    offs_d = tl.arange(0, DP)
    g_mask = offs_g < G
    rows = (kvh * G + offs_g) * progs + pid
    tl.store(m_ptr + rows, run_m, mask=g_mask)
    tl.store(l_ptr + rows, run_l, mask=g_mask)
    tl.store(od_ptr + rows[:, None] * D + offs_d[None, :], acc, mask=g_mask[:, None] & (offs_d < D)[None, :])
    return rows


def check_into(op, into, q):
    """into, when given, must be (out like q, lse [Hq] float32): the attended part a rest merges into."""
    if into is not None and (into[0].shape != q.shape or into[0].dtype != q.dtype or into[1].shape != q.shape[:1]
                             or into[1].dtype != torch.float32):
        raise ValueError(f"{op}: into must be (out {tuple(q.shape)} {q.dtype}, lse [{q.shape[0]}] float32), got "
                         f"{tuple(into[0].shape)} {into[0].dtype} and {tuple(into[1].shape)} {into[1].dtype}")


def merge_partials(m, l_, od, orv, vproj, dtype, chunk: int = 64, into=None):
    """The programs' partial softmaxes -> (out [Hq, d] in dtype, lse [Hq] float32). Grid (Hq, d / 32):
    in torch this was ~12 small kernels (33 us a layer on an H100), one program a head 27 us at 512
    partials (bench/results/probe_rest_kernel_h100.md). orv, vproj None: no rank-space part (block_rest).
    into (out [Hq, d], lse [Hq] float32): merged in as well (saves merge_attention's launch a layer)."""
    hq, progs, d = od.shape
    if orv is None:  # no rank-space part: RV 0 masks every load of it, so od's pointer stands in
        orv, vproj, g, rv, vstrides = od, od, 1, 0, (0, 0, 0)
    else:
        g, rv, vstrides = hq // vproj.shape[0], orv.shape[-1], vproj.stride()
    out = torch.empty(hq, d, dtype=dtype, device=od.device)
    lse = torch.empty(hq, dtype=torch.float32, device=od.device)
    pp, dc = triton.next_power_of_2(progs), min(32, max(16, triton.next_power_of_2(d)))
    io, il = into if into is not None else (out, lse)  # stand-ins, never read without INTO
    _merge_kernel[(hq, triton.cdiv(d, dc))](
        m, l_, od, orv, vproj, out, lse, io, il, progs, *vstrides, io.stride(0), io.stride(1), G=g, D=d, DC=dc,
        RV=rv, RVP=max(2, triton.next_power_of_2(rv)), PP=pp, CHUNK=min(pp, chunk), INTO=into is not None)
    return out, lse


@triton.jit
def _merge_kernel(m_ptr, l_ptr, od_ptr, or_ptr, vproj_ptr, out_ptr, lse_ptr, io_ptr, il_ptr, progs,
                  stride_vh, stride_vd, stride_vr, stride_ih, stride_id,
                  G: tl.constexpr, D: tl.constexpr, DC: tl.constexpr, RV: tl.constexpr, RVP: tl.constexpr,
                  PP: tl.constexpr, CHUNK: tl.constexpr, INTO: tl.constexpr):
    # The partials merge at the largest max; the program holding it contributes at least exp(0) = 1,
    # so a head with anything left out has total >= 1 and one with nothing total 0 (out 0, lse -inf).
    # Each program takes DC of the d outputs and redoes the (small) weights and rank-space sum.
    # INTO: the attended part (io, il: out normalised, lse) is one more partial, of sum 1 at its lse.
    h = tl.program_id(0)
    offs_p = tl.arange(0, PP)
    offs_d = tl.program_id(1) * DC + tl.arange(0, DC)
    offs_v = tl.arange(0, RVP)
    d_mask, v_mask = offs_d < D, offs_v < RV
    row = h.to(tl.int64) * progs
    top = tl.maximum(tl.max(tl.load(m_ptr + row + offs_p, mask=offs_p < progs, other=float("-inf")), 0), -1e30)
    acc_d = tl.zeros([DC], dtype=tl.float32)
    acc_r = tl.zeros([RVP], dtype=tl.float32)
    total = 0.0
    if INTO:
        il = tl.load(il_ptr + h)
        top = tl.maximum(top, il)
        wi = tl.exp(il - top)                                                     # 0 where il is -inf
        total += wi
        acc_d += wi * tl.load(io_ptr + h * stride_ih + offs_d * stride_id, mask=d_mask, other=0.0).to(tl.float32)
    for c in range(0, progs, CHUNK):
        p = c + tl.arange(0, CHUNK)
        p_in = p < progs
        lc = tl.load(l_ptr + row + p, mask=p_in, other=0.0)
        w = tl.where(lc > 0, tl.exp(tl.load(m_ptr + row + p, mask=p_in, other=float("-inf")) - top), 0.0)
        total += tl.sum(w * lc, 0)
        od = tl.load(od_ptr + (row + p)[:, None] * D + offs_d[None, :], mask=p_in[:, None] & d_mask[None, :], other=0.0)
        acc_d += tl.sum(w[:, None] * od, 0)
        orv = tl.load(or_ptr + (row + p)[:, None] * RV + offs_v[None, :], mask=p_in[:, None] & v_mask[None, :],
                      other=0.0)
        acc_r += tl.sum(w[:, None] * orv, 0)
    basis = vproj_ptr + (h // G).to(tl.int64) * stride_vh
    vp = tl.load(basis + offs_d[:, None] * stride_vd + offs_v[None, :] * stride_vr,
                 mask=d_mask[:, None] & v_mask[None, :], other=0.0).to(tl.float32)              # [DC, RVP]
    out = (acc_d + tl.sum(vp * acc_r[None, :], 1)) / tl.maximum(total, 1.0)
    tl.store(out_ptr + h * D + offs_d, out.to(out_ptr.dtype.element_ty), mask=d_mask)
    tl.store(lse_ptr + h, top + tl.log(total), mask=tl.program_id(1) == 0)
