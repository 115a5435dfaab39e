"""The mass block-score kernel against the max kernel at the 8B shape: tile size and warps.

lowrank's "mass" scores (kernels.lowrank_block_mass) read the sketches as the max kernel does plus
each block's mean key (+25% bytes at rank 32, head_dim 128, blocks of 16). Three forms were timed
here on the H200 at 128K (a layer, blocks of 16): a dot for all heads reduced through 3-D reshapes
128 us (decode profile), per-head fp32 multiply-adds 70 us at best (the kept form; this script at
f683687, probe_mass_kernel_h200.json), per-block sums as dots with a token-to-block matrix 110 us at
best (logs/probe_mass_kernel_h200_cad5e86.log); the max kernel 23 us. Each configuration
is 32 calls in one CUDA graph (as in the decode step), median over replays, checked against the
torch reference. The 1.5B's shape (12 query heads over 2 KV heads, blocks of 4) took 59 us a layer at
32K on an H100 (bench/results/batch_decode_15b_32k.json), against 4 MB of sketches and 4 MB of block
means (~3 us at the memory's rate): its 2 KV heads give few programs and its tiles hold as many
block-mean values as sketch values, so its rows also vary the programs in all. Writes
probe_mass_kernel_<gpu>.{json,md} to $OUT (or bench/results).

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

from kvretrieve.kernels import reference, scoring  # noqa: E402


SHAPES = [  # (what, query heads, KV heads, context, block size, tile_elems, num_warps, programs)
    ("8B shape", 32, 8, 131072, 16, (2048, 4096, 8192), (2, 4, 8), (528,)),
    ("8B shape", 32, 8, 32768, 16, (2048, 4096, 8192), (2, 4, 8), (528,)),
    ("1.5B", 12, 2, 32768, 4, (1024, 2048, 4096, 8192), (2, 4, 8), (528, 1056, 2112)),
    ("1.5B", 12, 2, 8192, 4, (1024, 2048, 4096), (2, 4, 8), (528, 2112)),
]


def main() -> None:
    out = Path(os.environ.get("OUT", RESULTS))
    meta = provenance(torch.cuda.get_device_name())
    g = torch.Generator(device="cuda").manual_seed(0)
    d, r = 128, 32
    rows = []
    for what, hq, hkv, context, bs, tiles, warps_, programs in SHAPES:
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
        for tile, warps, progs in itertools.product(tiles, warps_, programs):
            def run(t=tile, w=warps, p=progs):
                return scoring.lowrank_block_mass(q, proj, sketch, means, n_blocks, bs, d ** -0.5, t, w, p)
            rows.append(base | {"kernel": "mass", "tile_elems": tile, "num_warps": warps, "programs": progs}
                        | timed_config(run, lambda res: (res - ref).abs().max().item()))
            print(rows[-1], flush=True)
    name = "probe_mass_kernel_" + torch.cuda.get_device_name().split()[1].lower()
    print(write_results(name, meta, stamp(rows, meta),
                        ["shape", "context", "block_size", "kernel", "tile_elems", "num_warps", "programs", "us",
                         "max_err", "error"],
                        "us: one call, the median over 30 replays of a CUDA graph of 32 calls; max_err: against "
                        "reference.lowrank_block_mass (fp32 torch) on the same bf16 inputs.", out))


if __name__ == "__main__":
    main()
