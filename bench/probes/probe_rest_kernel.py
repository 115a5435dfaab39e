"""What the rest (kernels.lowrank_rest, kernels.block_rest) costs a layer on the GPU, and where.

Measured first as a whole decode (kvretrieve profile, Qwen2.5-Coder-1.5B at 32K on an H100): 12.7 ms a
token with rest_rank 16 against 7.8 with the block-summary rest, ~175 us a layer. This times, at the
1.5B's and 0.5B's geometry (blocks of 4, 1/8 of the blocks attended, the rest left out), the kernel's
partials alone, the merge alone, the whole launcher (over tile sizes, warps and the fp32 dots'
precision for the 1.5B at 32K), the block-summary rest both ways (kernels.block_rest over contiguous
summary rows; what it replaced, sparse_decode over them as 1-token blocks) plus the mass-scoring
kernel at the same shape; and the block-summary rest of the 8B shape at 128K (blocks of 16), where
it is on by default. Each is 32 calls in one CUDA graph, median over replays; launchers are checked
against the torch references. Writes probe_rest_kernel.json to $OUT (or bench/results).

Measured (bench/results/probe_rest_kernel_h100.md): at 32K on the 1.5B the rest went 184 -> 89 us a
layer (partials 151 -> 57 with 2-D dots per token position; the merge 33 us in torch, 27 in one
Triton program a head), against 8.4 us for the block summaries.

    python bench/probes/probe_rest_kernel.py [--only-rest | --programs]

--only-rest times the token-level rest's configurations alone (a short call); --programs times it over
how many programs the launch aims at (132-1,056) and tile sizes. A split precision (the
fp32 side of each dot as two bf16 halves on 16-bit tensor cores) was timed this way and withdrawn: no
faster than tf32 (bench/results/probe_rest_kernel_split_h100.md).
"""
from __future__ import annotations

import itertools
import json
import math
import os
import sys
from pathlib import Path

import torch

sys.path[:0] = [str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parents[1])]
from common import RESULTS, provenance  # noqa: E402
from probe_topk import graph_us, timed_config  # noqa: E402

from kvretrieve import kernels  # noqa: E402
from kvretrieve.kernels import partials, reference, rest  # noqa: E402


def inputs(hq, hkv, d, r, rv, bs, context, gen):
    n = context // bs
    dev = dict(device="cuda")

    def rand(*shape, s=1.0):
        return (torch.randn(*shape, generator=gen, **dev) * s).bfloat16()
    t = dict(q=rand(hq, d), proj=rand(hkv, d, r, s=d ** -0.5), sketch=rand(hkv, context, r),
             block_means=rand(hkv, n, d), vproj=rand(hkv, d, rv, s=d ** -0.5), vsketch=rand(hkv, context, rv),
             vsums=rand(hkv, n, d, s=bs))
    t["left_out"] = torch.rand(hkv, n, generator=gen, **dev) > 0.125
    return t


def block_summary_rows(t, bs, scale, sweep=False) -> list[dict]:
    """What rest_rank 0 runs: each left-out block as bs keys at its mean key, by block_rest (over tile
    sizes and warps with sweep), and as it was attended before (sparse_decode over 1-token blocks, then
    the division and log(bs) outside); then the whole step of a layer both ways, from the selection's ids
    to the output merged with the attended part's (the mask, the kernels, the merge)."""
    hkv, n = t["left_out"].shape
    cols = torch.where(t["left_out"], torch.arange(n, device="cuda", dtype=torch.int32)[None], -1)
    one = torch.ones(1, device="cuda", dtype=torch.int32)
    args = (t["q"], t["block_means"], t["vsums"], t["left_out"], bs, scale)
    ref = reference.block_rest(*args)

    def error(res):
        return max((res[0].float() - ref[0].float()).abs().max().item(), (res[1] - ref[1]).abs().max().item())

    def before():
        out, lse = kernels.sparse_decode(t["q"], t["block_means"][:, :, None], t["vsums"][:, :, None], cols, one, scale)
        return out / bs, lse + math.log(bs)
    rows = [{"what": "block summaries (sparse_decode)"} | timed_config(before, error)]
    for tile, warps in itertools.product((32, 64, 128, 256), (4, 8)) if sweep else [(64, 4)]:
        rows.append({"what": "block summaries (block_rest)", "tile_blocks": tile, "num_warps": warps} | timed_config(
            lambda: rest.block_rest(*args, tile_blocks=tile, num_warps=warps), error))
    # A layer's step: 1/8 of the candidates selected; sinks and window outside.
    outside = torch.zeros(n, dtype=torch.bool, device="cuda")
    outside[:4], outside[-32:] = True, True
    cand, columns = ~outside, torch.arange(n, device="cuda", dtype=torch.int32)[None]
    ids = torch.rand(hkv, n - 36, device="cuda").argsort(1)[:, :n // 8] + 4
    attended = (t["q"].clone(), torch.zeros(t["q"].shape[0], device="cuda"))

    def step_before():
        left = (~outside).expand(hkv, -1).scatter(1, ids, False)
        out, lse = kernels.sparse_decode(t["q"], t["block_means"][:, :, None], t["vsums"][:, :, None],
                                         torch.where(left, columns, -1), one, scale)
        return kernels.merge_attention(*attended, out / bs, lse + math.log(bs))

    def step_now():
        left = cand.expand(hkv, -1).scatter(1, ids, False)
        return kernels.block_rest(t["q"], t["block_means"], t["vsums"], left, bs, scale, attended)
    rows.append({"what": "block rest step (e76f2a0)", "us": graph_us(step_before)})
    rows.append({"what": "block rest step (mask once a step, block_rest merging into the attended part)",
                 "us": graph_us(step_now),
                 "max_err": (step_now()[0].float() - step_before()[0].float()).abs().max().item()})
    return rows


def programs_rows(args, ref, ref_lse, bs, scale) -> list[dict]:
    """The token-level rest (tf32, 4 warps) over how many programs the launch aims at and tile sizes:
    fewer programs loop over more tiles each and leave fewer partials to merge."""
    def error(res):
        return max((res[0].float() - ref.float()).abs().max().item(), (res[1] - ref_lse).abs().max().item())
    rows = []
    for programs, tile in itertools.product((132, 264, 528, 1056), (1024, 2048, 4096)):
        rows.append({"what": "rest", "tile_elems": tile, "num_warps": 4, "precision": "tf32", "programs": programs}
                    | timed_config(lambda: rest.lowrank_rest(*args, bs, scale, None, tile, 4, precision="tf32",
                                                             programs=programs), error))
    return rows


def main() -> None:
    only_rest = "--only-rest" in sys.argv[1:]  # the token-level rest's configurations alone (a short call)
    by_programs = "--programs" in sys.argv[1:]  # the token-level rest over programs and tiles alone
    out = Path(os.environ.get("OUT", RESULTS))
    gen = torch.Generator(device="cuda").manual_seed(0)
    rows = []
    shapes = {"1.5b": (12, 2, 128, 32, 16, 4), "0.5b": (14, 2, 64, 32, 16, 4)}
    for (name, (hq, hkv, d, r, rv, bs)), context in itertools.product(shapes.items(), (8192, 32768)):
        t = inputs(hq, hkv, d, r, rv, bs, context, gen)
        n, scale = context // bs, d ** -0.5
        base = {"model": name, "context": context, "blocks": n}
        args = [t[k] for k in ("q", "proj", "sketch", "block_means", "vproj", "vsketch", "vsums", "left_out")]
        ref, ref_lse = reference.lowrank_rest(*args, bs, scale)
        if by_programs:
            rows += [base | row for row in programs_rows(args, ref, ref_lse, bs, scale)]
            for row in rows[-12:]:
                print(row, flush=True)
            continue
        rows += [] if only_rest else [base | row for row in block_summary_rows(t, bs, scale)]
        rows.append(base | {"what": "mass scores", "us": graph_us(
            lambda: kernels.lowrank_block_mass(t["q"], t["proj"], t["sketch"], t["block_means"], n, bs, scale))})
        pa = [t[k] for k in ("q", "proj", "sketch", "block_means", "vsketch", "vsums", "left_out")]
        parts = rest._partials(*pa, bs, scale, 2048, 4, "tf32")
        rows.append(base | {"what": "rest partials (2048, 4 warps, tf32)", "programs": parts[0].shape[1],
                            "us": graph_us(lambda: rest._partials(*pa, bs, scale, 2048, 4, "tf32"))})
        merge_us = graph_us(lambda: partials.merge_partials(*parts, t["vproj"], t["q"].dtype))
        rows.append(base | {"what": "rest merge", "us": merge_us})
        sweep = [(2048, 4, "ieee"), (2048, 4, "tf32")]
        if (name, context) == ("1.5b", 32768):  # tf32x3 was 59 us, ieee 64-100 at 2048-4096 and 4-8 warps
            sweep += [(1024, 4, "tf32"), (4096, 4, "tf32"), (2048, 8, "tf32")]
        for tile, warps, prec in sweep:
            def error(res):
                return max((res[0].float() - ref.float()).abs().max().item(), (res[1] - ref_lse).abs().max().item())
            rows.append(base | {"what": "rest", "tile_elems": tile, "num_warps": warps, "precision": prec} |
                        timed_config(lambda: rest.lowrank_rest(*args, bs, scale, None, tile, warps, precision=prec),
                                     error))
        for row in rows:
            if row.get("context") == context and row.get("model") == name:
                print(row, flush=True)
    if not (only_rest or by_programs):
        t = inputs(32, 8, 128, 16, 16, 16, 131072, gen)  # the 8B shape at 128K: the block summaries only
        rows += [{"model": "8b", "context": 131072, "blocks": 8192} | row
                 for row in block_summary_rows(t, 16, 128 ** -0.5, sweep=True)]
        for row in rows[-11:]:
            print(row, flush=True)
    (out / "probe_rest_kernel.json").write_text(json.dumps(provenance("cuda") | {"rows": rows}, indent=1))


if __name__ == "__main__":
    main()
