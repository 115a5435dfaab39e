"""The pool's LRU lookup kernel (kernels/lru.py) at the shapes the defaults give, timed on a GPU.

In the 1.5B's batch profile at 32K (bench/results/batch_decode_15b_32k.md, H100) the lookup is the
largest kernel of a one-session step: ~78 us a layer, one program per KV head (2 here) sorting all
1,728 slots of its LRU region (blocks of 4, 864 selected); it now bisects on the stamps instead of
sorting (kernels/lru.py). This times it with 4, 8 and 16 warps a
program over a sequence of selections that keep ~87% of the last one (the 1.5B's measured cache
hits), checks every variant's slots, fetch flags and final maps against the torch reference run on the
same sequence, and writes bench/results/probe_lru_<gpu>.{json,md}.

    python bench/probes/probe_lru.py
"""
from __future__ import annotations

import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path[:0] = [str(Path(__file__).resolve().parents[1])]
from common import RESULTS, provenance, stamp, write_results  # noqa: E402

from kvretrieve.kernels import reference  # noqa: E402
from kvretrieve.kernels.lru import lru_lookup  # noqa: E402

SHAPES = [  # (what, KV heads, selected blocks, LRU slots, blocks in the context)
    ("Qwen2.5-Coder-1.5B / 0.5B at 32K (blocks of 4, 3,456 retrieved)", 2, 864, 1728, 8192),
    ("Llama-3.1-8B shape at 128K (blocks of 16, 2,048 retrieved)", 8, 128, 256, 8192),
    ("Llama-3.1-8B shape at 32K, batch layout (cache=128)", 8, 128, 128, 2048),
]
KEEP, STEPS = 0.87, 64


def selections(h: int, k: int, blocks: int, g: torch.Generator) -> list[torch.Tensor]:
    """STEPS selections [h, k] of distinct block ids, each keeping ~KEEP of the one before."""
    out, cur = [], torch.stack([torch.randperm(blocks, generator=g)[:k] for _ in range(h)])
    for _ in range(STEPS):
        out.append(cur.clone())
        nxt = []
        for row in cur:
            keep = row[torch.randperm(k, generator=g)[:int(KEEP * k)]]
            fresh = torch.randperm(blocks, generator=g)
            fresh = fresh[~torch.isin(fresh, keep)][:k - keep.numel()]
            nxt.append(torch.cat([keep, fresh]))
        cur = torch.stack(nxt)
    return out


def run(fn, sels, h: int, n: int, blocks: int, dev) -> tuple[list, list[float], tuple]:
    """Every selection through fn from an empty cache: (slots and flags per step, us per call, final maps
    without their scratch column, where the reference's masked scatters land)."""
    sob = torch.full((h, blocks + 1), -1, dtype=torch.int32, device=dev)
    bos = torch.full((h, n + 1), -1, dtype=torch.int32, device=dev)
    used = torch.zeros(h, n + 1, dtype=torch.int32, device=dev)
    stamp_t = torch.zeros(1, dtype=torch.int32, device=dev)
    outs, times = [], []
    cuda = dev.type == "cuda"
    for i, ids in enumerate(sels):
        stamp_t.fill_(2 * i + 3)
        if cuda:
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
        t = time.perf_counter()
        slot, fetch = fn(ids, sob, bos, used, stamp_t, None)
        if cuda:
            b.record()
            torch.cuda.synchronize()
        times.append(1e3 * a.elapsed_time(b) if cuda else 1e6 * (time.perf_counter() - t))
        outs.append((slot.cpu(), fetch.cpu()))
    return outs, times, tuple(t[:, :-1].cpu() for t in (sob, bos, used))  # the last column is scratch


def main() -> None:
    dev = torch.device("cuda")
    meta = provenance("cuda")
    meta["command"] = "bench/probes/probe_lru.py"
    g, rows = torch.Generator().manual_seed(0), []
    for what, h, k, n, blocks in SHAPES:
        sels = [s.to(dev) for s in selections(h, k, blocks, g)]
        want, _, want_maps = run(reference.lru_lookup, sels, h, n, blocks, dev)
        for warps in (4, 8, 16):
            got, times, maps = run(lambda *a, w=warps: lru_lookup(*a, num_warps=w), sels, h, n, blocks, dev)
            same = all(torch.equal(x[0], y[0]) and torch.equal(x[1], y[1]) for x, y in zip(got, want)) and \
                all(torch.equal(x, y) for x, y in zip(maps, want_maps))
            hits = 1 - sum(int(f.sum()) for _, f in want[1:]) / (h * k * (len(want) - 1))
            rows.append({"shape": what, "kv_heads": h, "selected": k, "slots": n, "num_warps": warps,
                         "us_p50": statistics.median(times[4:]), "hit_rate": hits, "same_as_reference": same})
            print(rows[-1], flush=True)
    out = Path(os.environ.get("OUT", RESULTS))
    name = "probe_lru_" + torch.cuda.get_device_name(dev).split()[1].lower()
    print(write_results(name, meta, stamp(rows, meta),
                        ["shape", "kv_heads", "selected", "slots", "num_warps", "us_p50", "hit_rate",
                         "same_as_reference"],
                        "us_p50: the median of one lookup (CUDA events around the launch, after 4 warm-up steps) "
                        "over 60 selections, each keeping ~87% of the one before; same_as_reference: every step's "
                        "slots and fetch flags, and the final maps, equal the torch reference's on the same sequence.",
                        out))


if __name__ == "__main__":
    main()
