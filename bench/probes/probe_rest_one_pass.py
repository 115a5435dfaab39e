"""Would the token-level rest be cheaper in one pass, given the block scores the mass kernel computes?

kernels.lowrank_rest runs two passes over each tile's key sketches: the first gets each block's
log-mass x (the log-sum-exp of its tokens' sketch scores less their mean, plus the mean key's score)
and the block's own log-sum-exp L of the sketch scores; the second recomputes the scores for each
token's share of its block, exp(s - L), and the value spread. The first pass is what the mass kernel
(kernels/mass.py) has just computed for scoring the same blocks with the same query (it keeps x per
head, then reduces it to the group's shares). Given x and L, one pass remains: the blocks' weights
from x, and per token one score, its share and the spread. At 8 sessions of the 1.5B at 32K the rests
are ~7 ms of a 13-15 ms step (bench/NOTES.md stop 35), so this probe times the one-pass kernel
(defined here, not in the library until it wins) against kernels.lowrank_rest at the 1.5B's and the
0.5B's geometry, both merged by kernels.partials.merge_partials, each checked against
reference.lowrank_rest. x and L come from torch here (what the mass kernel would store beside x).

    python bench/probes/probe_rest_one_pass.py              # GPU: timings into $OUT/probe_rest_one_pass.json
    TRITON_INTERPRET=1 python bench/probes/probe_rest_one_pass.py --check   # CPU: small shapes, errors only
"""
from __future__ import annotations

import itertools
import json
import os
import sys
from pathlib import Path

import torch
import triton
import triton.language as tl

sys.path[:0] = [str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parents[1])]
from common import RESULTS, provenance  # noqa: E402

from kvretrieve.kernels import reference, rest  # noqa: E402
from kvretrieve.kernels.partials import merge_partials, store_partials  # noqa: E402
from kvretrieve.kernels.rest import _REST_PROGRAMS, _rows  # noqa: E402
from kvretrieve.kernels.scoring import _group_queries, _split_work  # noqa: E402


@triton.jit
def _one_pass_kernel(
    q_ptr, proj_ptr, sk_ptr, vk_ptr, vs_ptr, x_ptr, ls_ptr, left_ptr, m_ptr, l_ptr, od_ptr, or_ptr,
    n_blocks, iters, scale,
    stride_qh, stride_qd, stride_ph, stride_pd, stride_pr, stride_sh, stride_st, stride_sr,
    stride_kh, stride_kt, stride_kr, stride_vh, stride_vb, stride_vd, stride_xh, stride_xg, stride_lh, stride_lb,
    G: tl.constexpr, GP: tl.constexpr, D: tl.constexpr, DP: tl.constexpr, R: tl.constexpr, RP: tl.constexpr,
    RV: tl.constexpr, RVP: tl.constexpr, BS: tl.constexpr, TB: tl.constexpr, PREC: tl.constexpr,
):
    kvh = tl.program_id(0)
    pid = tl.program_id(1)
    progs = tl.num_programs(1)
    head = kvh.to(tl.int64)
    offs_g = tl.arange(0, GP)
    offs_d = tl.arange(0, DP)
    offs_r = tl.arange(0, RP)
    offs_v = tl.arange(0, RVP)
    g_mask, d_mask, r_mask, v_mask = offs_g < G, offs_d < D, offs_r < R, offs_v < RV
    q = _group_queries(q_ptr, kvh, stride_qh, stride_qd, G, GP, D, DP) * scale                   # [GP, DP]
    proj = tl.load(proj_ptr + head * stride_ph + offs_d[:, None] * stride_pd + offs_r[None, :] * stride_pr,
                   mask=d_mask[:, None] & r_mask[None, :], other=0.0).to(tl.float32)
    qr = tl.dot(q, proj, input_precision=PREC)                                                # [GP, RP]
    run_m = tl.full([GP], float("-inf"), tl.float32)
    run_l = tl.zeros([GP], dtype=tl.float32)
    acc_d = tl.zeros([GP, DP], dtype=tl.float32)
    acc_r = tl.zeros([GP, RVP], dtype=tl.float32)
    for i in range(0, iters):
        blocks = (pid * iters + i) * TB + tl.arange(0, TB)
        left = tl.load(left_ptr + kvh * stride_lh + blocks * stride_lb, mask=blocks < n_blocks, other=0) != 0
        b64 = blocks.to(tl.int64)
        vs = tl.load(vs_ptr + head * stride_vh + b64[:, None] * stride_vb + offs_d[None, :] * stride_vd,
                     mask=left[:, None] & d_mask[None, :], other=0.0).to(tl.float32) / BS       # mean values
        tile = g_mask[:, None] & left[None, :]
        at = head * stride_xh + offs_g[:, None] * stride_xg + b64[None, :]
        x = tl.load(x_ptr + at, mask=tile, other=float("-inf"))                                     # [GP, TB]
        lse = tl.load(ls_ptr + at, mask=tile, other=0.0)
        nm = tl.maximum(run_m, tl.max(x, 1))
        sf = tl.where(nm == float("-inf"), 0.0, nm)
        alpha = tl.exp(run_m - sf)
        w = tl.exp(x - sf[:, None])                                                                  # 0 where not left
        run_l = run_l * alpha + tl.sum(w, 1)
        run_m = nm
        acc_d = acc_d * alpha[:, None] + tl.dot(w, vs, input_precision=PREC)
        # Each token's share of its block, exp(s - L), from one score: the spread in the same loop.
        spread = tl.zeros([GP, RVP], dtype=tl.float32)
        vmean = tl.zeros([TB, RVP], dtype=tl.float32)
        r_tile, v_tile = left[:, None] & r_mask[None, :], left[:, None] & v_mask[None, :]
        for j in tl.static_range(BS):
            sk = _rows(sk_ptr, head, b64 * BS + j, stride_sh, stride_st, stride_sr, offs_r, r_tile)
            vk = _rows(vk_ptr, head, b64 * BS + j, stride_kh, stride_kt, stride_kr, offs_v, v_tile)
            p = tl.exp(tl.dot(qr, tl.trans(sk), input_precision=PREC) - lse)
            spread += tl.dot(w * p, vk, input_precision=PREC)
            vmean += vk / BS
        acc_r = acc_r * alpha[:, None] + spread - tl.dot(w, vmean, input_precision=PREC)
    rows = store_partials(m_ptr, l_ptr, od_ptr, kvh, pid, progs, run_m, run_l, acc_d, G, GP, D, DP)
    tl.store(or_ptr + rows[:, None] * RV + offs_v[None, :], acc_r, mask=g_mask[:, None] & v_mask[None, :])


def one_pass_rest(q, proj, sketch, vproj, vsketch, vsums, x, lse, left_out, bs, scale, precision,
                  tile_elems=2048, num_warps=4):
    """The rest of lowrank_rest given x, lse [Hkv, G, n] float32 (the blocks' log-masses and the log-sum-exps
    of their sketch scores) -> (out [Hq, d], lse [Hq]), through the library's merge."""
    hkv, n = left_out.shape
    hq, d = q.shape
    g, r, rv = hq // hkv, proj.shape[-1], vsketch.shape[-1]
    rp = max(16, triton.next_power_of_2(r))
    tb = max(16, min(tile_elems // rp // bs, triton.next_power_of_2(n)))
    progs, iters = _split_work(triton.cdiv(n, tb), hkv, _REST_PROGRAMS)
    f32 = dict(dtype=torch.float32, device=q.device)
    m, l_ = torch.empty(hq, progs, **f32), torch.empty(hq, progs, **f32)
    od, orv = torch.empty(hq, progs, d, **f32), torch.empty(hq, progs, rv, **f32)
    left = left_out.view(torch.uint8)
    _one_pass_kernel[(hkv, progs)](
        q, proj, sketch, vsketch, vsums, x, lse, left, m, l_, od, orv, n, iters, float(scale),
        q.stride(0), q.stride(1), *proj.stride(), *sketch.stride(), *vsketch.stride(), *vsums.stride(),
        x.stride(0), x.stride(1), left.stride(0), left.stride(1),
        G=g, GP=max(16, triton.next_power_of_2(g)), D=d, DP=max(16, triton.next_power_of_2(d)), R=r, RP=rp,
        RV=rv, RVP=max(16, triton.next_power_of_2(rv)), BS=bs, TB=tb, PREC=precision, num_warps=num_warps)
    return merge_partials(m, l_, od, orv, vproj, q.dtype)


def block_scores(q, proj, sketch, block_means, n, bs, scale):
    """x and L [Hkv, G, n] float32 as the mass kernel computes them (reference.lowrank_block_mass's x before
    its normaliser; L the log-sum-exp of each block's sketch scores)."""
    hkv, hq = proj.shape[0], q.shape[0]
    qg = q.float().view(hkv, hq // hkv, -1) * scale
    s = torch.einsum("hgr,hbtr->hgbt", torch.einsum("hgd,hdr->hgr", qg, proj.float()),
                     sketch[:, :n * bs].float().view(hkv, n, bs, -1))
    lse = s.logsumexp(-1)
    return lse - s.mean(-1) + torch.einsum("hgd,hbd->hgb", qg, block_means[:, :n].float()), lse


def inputs(hq, hkv, d, r, rv, bs, context, gen, device, dtype):
    n = context // bs

    def rand(*shape, s=1.0):
        return (torch.randn(*shape, generator=gen) * s).to(dtype).to(device)
    t = dict(q=rand(hq, d), proj=rand(hkv, d, r, s=d ** -0.5), sketch=rand(hkv, context, r),
             block_means=rand(hkv, n, d), vproj=rand(hkv, d, rv, s=d ** -0.5), vsketch=rand(hkv, context, rv),
             vsums=rand(hkv, n, d, s=bs))
    t["left_out"] = (torch.rand(hkv, n, generator=gen) > 0.125).to(device)
    return t


def main() -> None:
    check = "--check" in sys.argv[1:]
    device = "cpu" if check else "cuda"
    shapes = {"1.5b": (12, 2, 128, 32, 16, 4), "0.5b": (14, 2, 64, 32, 16, 4)}
    contexts = (256,) if check else (8192, 32768)
    gen, rows = torch.Generator().manual_seed(0), []
    for (name, (hq, hkv, d, r, rv, bs)), context in itertools.product(shapes.items(), contexts):
        # fp32 in the interpreter's check (errors then show the kernels, not bf16's rounding of the output)
        t = inputs(hq, hkv, d, r, rv, bs, context, gen, device, torch.float32 if check else torch.bfloat16)
        n, scale = context // bs, d ** -0.5
        args = [t[k] for k in ("q", "proj", "sketch", "block_means", "vproj", "vsketch", "vsums", "left_out")]
        ref, ref_lse = reference.lowrank_rest(*args, bs, scale)
        x, lse = block_scores(t["q"], t["proj"], t["sketch"], t["block_means"], n, bs, scale)
        one = [t[k] for k in ("q", "proj", "sketch", "vproj", "vsketch", "vsums")] + [x, lse, t["left_out"], bs, scale]
        for prec in ("ieee", "tf32"):
            runs = {"two passes (kernels.lowrank_rest)": lambda: rest.lowrank_rest(*args, bs, scale, precision=prec),
                    "one pass, given x and L": lambda: one_pass_rest(*one, prec)}
            for what, run in runs.items():
                out, out_lse = run()
                err = max((out.float() - ref.float()).abs().max().item(), (out_lse - ref_lse).abs().max().item())
                row = {"model": name, "context": context, "what": what, "precision": prec, "max_err": err}
                if not check:
                    from probe_topk import graph_us
                    row["us"] = graph_us(run)
                rows.append(row)
                print(row, flush=True)
    if check:
        worst = max(r["max_err"] for r in rows if r["precision"] == "ieee")
        print(f"worst ieee error {worst:.3g}: {'ok' if worst < 1e-4 else 'WRONG'}")
        return
    out = Path(os.environ.get("OUT", RESULTS))
    (out / "probe_rest_one_pass.json").write_text(json.dumps(provenance("cuda") | {"rows": rows}, indent=1))


if __name__ == "__main__":
    main()
