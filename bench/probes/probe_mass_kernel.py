"""The mass block-score kernel (kernels/mass.py) against the max kernel: tiles, warps, programs.

lowrank's "mass" scores (kernels.lowrank_block_mass) read the sketches as the max kernel does plus
each block's mean key. Timed here before (H200, 128K, 8B shape, blocks of 16): a dot for all heads
reduced through 3-D reshapes 128 us a layer, per-head fp32 multiply-adds 70 us at best (the form
replaced since; probe_mass_kernel_h200.json at f683687), per-block sums as dots with a token-to-block matrix
110 us; the max kernel 23 us. At the 1.5B's shape (12 query heads over 2 KV heads, blocks of 4) the
multiply-adds took 59 us a layer at 32K on an H100 (bench/results/batch_decode_15b_32k.json) for 4 MB of
sketches and 4 MB of block means (~3 us at the memory's rate). The kernel now takes every head and
token position of a tile as one tensor-core dot, its block reductions elementwise: 9.0 us there
(probe_mass_kernel_h100.md, which also times the multiply-adds beside it). Each configuration
is 32 calls in one CUDA graph (as in the decode step), median over replays, checked against the
torch reference. Writes probe_mass_kernel_<gpu>.{json,md} to $OUT (or bench/results).

    python bench/probes/probe_mass_kernel.py
"""
from __future__ import annotations

import itertools
import os
import sys
from pathlib import Path

import torch

sys.path[:0] = [str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parents[1])]
from common import RESULTS, provenance, stamp, write_results  # noqa: E402
from probe_topk import graph_us, timed_config  # noqa: E402

from kvretrieve.kernels import mass, reference, scoring  # noqa: E402


SHAPES = [  # (what, query heads, KV heads, context, block size, programs to try)
    ("8B shape", 32, 8, 131072, 16, (528,)),
    ("8B shape", 32, 8, 32768, 16, (528,)),
    ("1.5B", 12, 2, 32768, 4, (528, 2112)),
    ("1.5B", 12, 2, 8192, 4, (528, 2112)),
]
# (tile blocks, num_warps). At 4ec2f6b the probe also timed the multiply-add form this kernel replaced, with
# 8,192 sketch values a tile and 2 warps, and the 1,024/2,048 with 8 that fit its registers at blocks of 4
# (bench/results/probe_mass_kernel_h100.md).
CONFIGS = [(tb, w) for tb in (16, 32, 64, 128) for w in (4, 8)]


def main() -> None:
    out = Path(os.environ.get("OUT", RESULTS))
    meta = provenance("cuda")
    g = torch.Generator(device="cuda").manual_seed(0)
    d, r = 128, 32
    rows = []
    for what, hq, hkv, context, bs, programs in SHAPES:
        n_blocks = context // bs
        q = torch.randn(hq, d, device="cuda", generator=g).bfloat16()
        proj = (torch.randn(hkv, d, r, device="cuda", generator=g) / d ** 0.5).bfloat16()
        mean = torch.randn(hkv, d, device="cuda", generator=g).bfloat16()
        sketch = torch.randn(hkv, context, r, device="cuda", generator=g).bfloat16()
        means = torch.randn(hkv, n_blocks, d, device="cuda", generator=g).bfloat16()
        ref = reference.lowrank_block_mass(q, proj, sketch, means, n_blocks, bs, d ** -0.5)
        base = {"shape": what, "context": context, "block_size": bs}
        us = graph_us(lambda: scoring.lowrank_block_scores(q, proj, mean, sketch, n_blocks, bs))
        rows.append(base | {"kernel": "max", "us": us})
        print(rows[-1], flush=True)
        for (tile, warps), progs in itertools.product(CONFIGS, programs):
            def run(t=tile, w=warps, p=progs):
                return mass.lowrank_block_mass(q, proj, sketch, means, n_blocks, bs, d ** -0.5, t, w, p)
            rows.append(base | {"kernel": "mass", "tile": tile, "num_warps": warps, "programs": progs}
                        | timed_config(run, lambda res: (res - ref).abs().max().item()))
            print(rows[-1], flush=True)
    name = "probe_mass_kernel_" + torch.cuda.get_device_name().split()[1].lower()
    print(write_results(name, meta, stamp(rows, meta),
                        ["shape", "context", "block_size", "kernel", "tile", "num_warps", "programs", "us",
                         "max_err", "error"],
                        "us: one call (both launches), the median over 30 replays of a CUDA graph of 32 calls; tile: blocks "
                        "a tile; max_err: against "
                        "reference.lowrank_block_mass (fp32 torch) on the same bf16 inputs.", out))


if __name__ == "__main__":
    main()
