"""Low-rank scoring kernel configurations at the 8B shape: tile size, programs, warps, stages.

At 128K the decode profile puts `_lowrank_kernel` at ~1.2 ms per step: 32 layers, each streaming a
[8, 131K, 32] bf16 sketch (64 MiB), i.e. ~1.8 TB/s of the H100's ~3.3. Each configuration is timed
as 32 calls captured in one CUDA graph (as in the decode step), median over replays, and checked
against the default's scores. Writes probe_scoring.json to $OUT (or bench/results).

    python bench/probe_scoring.py
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
from probe_topk import graph_us  # noqa: E402

from kvretrieve.kernels import scoring  # noqa: E402


def main() -> None:
    out = Path(os.environ.get("OUT", RESULTS))
    g = torch.Generator(device="cuda").manual_seed(0)
    hq, hkv, d, r, bs = 32, 8, 128, 32, 16
    rows = []
    for context in (32768, 131072):
        n_blocks = (context // bs // 512 + 1) * 512  # as the decode step scores: rounded up to 512 blocks
        q = torch.randn(hq, d, device="cuda", generator=g).bfloat16()
        proj = torch.randn(hkv, d, r, device="cuda", generator=g).bfloat16()
        mean = torch.randn(hkv, d, device="cuda", generator=g).bfloat16()
        sketch = torch.randn(hkv, context + 2048, r, device="cuda", generator=g).bfloat16()
        ref = torch.empty(hkv, n_blocks, device="cuda")
        scoring._launch_lowrank(q, proj, mean, sketch, ref, n_blocks, bs, hq // hkv, r, True)
        mib = sketch[:, :n_blocks * bs].numel() * 2 / 2**20
        for tile, programs, warps, stages in itertools.product((8192, 16384, 32768), (528, 1024, 2048),
                                                              (4, 8), (None, 2, 4)):
            launch = {"num_warps": warps} | ({"num_stages": stages} if stages else {})
            got = torch.empty_like(ref)

            def run():
                scoring._launch_lowrank(q, proj, mean, sketch, got, n_blocks, bs, hq // hkv, r, True, tile,
                                        programs, **launch)
            try:
                us = graph_us(run)
            except Exception as e:  # noqa: BLE001 - a configuration that does not compile is a result
                rows.append({"context": context, "tile_elems": tile, "programs": programs, "num_warps": warps,
                             "num_stages": stages, "error": f"{type(e).__name__}: {e}"[:120]})
                continue
            rows.append({"context": context, "tile_elems": tile, "programs": programs, "num_warps": warps,
                         "num_stages": stages, "us": us, "tb_s": mib * 2**20 / us / 1e6,
                         "equal": torch.equal(got, ref)})
            print(rows[-1], flush=True)
    best = {c: min((x for x in rows if x["context"] == c and "us" in x), key=lambda x: x["us"]) for c in (32768, 131072)}
    print("best", best, flush=True)
    (out / "probe_scoring.json").write_text(json.dumps({**provenance("cuda"), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
