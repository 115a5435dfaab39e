"""The mass block-score kernel against the max kernel at the 8B shape: tile size and warps.

lowrank's "mass" scores (kernels.lowrank_block_mass) read the sketches as the max kernel does plus
each block's mean key (+25% bytes at rank 32, head_dim 128, blocks of 16). Three forms were timed
here on the H200 at 128K (a layer, blocks of 16): a dot for all heads reduced through 3-D reshapes
128 us (decode profile), per-head fp32 multiply-adds 70 us at best (the kept form; this script at
f683687, probe_mass_kernel_h200.json), per-block sums as dots with a token-to-block matrix 110 us at
best (logs/probe_mass_kernel_h200_cad5e86.log); the max kernel 23 us. Each configuration
is 32 calls in one CUDA graph (as in the decode step), median over replays, checked against the
torch reference. Writes probe_mass_kernel.json to $OUT (or bench/results).

    python bench/probes/probe_mass_kernel.py
"""
from __future__ import annotations

import itertools
import json
import os
import sys
from pathlib import Path

import torch

sys.path[:0] = [str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parents[1])]
from common import RESULTS, provenance  # noqa: E402
from probe_topk import graph_us, timed_config  # noqa: E402

from kvretrieve.kernels import reference, scoring  # noqa: E402


def main() -> None:
    out = Path(os.environ.get("OUT", RESULTS))
    g = torch.Generator(device="cuda").manual_seed(0)
    hq, hkv, d, r = 32, 8, 128, 32
    rows = []
    for context, bs in ((131072, 16), (131072, 8), (32768, 16)):
        n_blocks = context // bs
        q = torch.randn(hq, d, device="cuda", generator=g).bfloat16()
        proj = (torch.randn(hkv, d, r, device="cuda", generator=g) / d ** 0.5).bfloat16()
        mean = torch.randn(hkv, d, device="cuda", generator=g).bfloat16()
        sketch = torch.randn(hkv, context, r, device="cuda", generator=g).bfloat16()
        means = torch.randn(hkv, n_blocks, d, device="cuda", generator=g).bfloat16()
        ref = reference.lowrank_block_mass(q, proj, sketch, means, n_blocks, bs, d ** -0.5)
        base = {"context": context, "block_size": bs}
        us = graph_us(lambda: scoring.lowrank_block_scores(q, proj, mean, sketch, n_blocks, bs))
        rows.append(base | {"kernel": "max", "us": us})
        print(rows[-1], flush=True)
        for tile, warps in itertools.product((2048, 4096, 8192), (2, 4, 8)):
            def run():
                return scoring.lowrank_block_mass(q, proj, sketch, means, n_blocks, bs, d ** -0.5, tile, warps)
            rows.append(base | {"kernel": "mass", "tile_elems": tile, "num_warps": warps}
                        | timed_config(run, lambda res: (res - ref).abs().max().item()))
            print(rows[-1], flush=True)
    (out / "probe_mass_kernel.json").write_text(json.dumps(provenance("cuda") | {"rows": rows}, indent=1))


if __name__ == "__main__":
    main()
