"""What a decode step's reads cost from a KV store on disk whose file the RAM cannot cache (issue 16,
item 5), its segments advised random with the selected rows' pages asked for before the gather (as
the store does), random alone, or normal (read-around on faults).

Writes an int8 store of the Llama-3.1-8B KV shape (32 layers, 8 KV heads, d 128, blocks of 16) on
disk, --tokens long, then gathers one decode step's selection per layer as the reference fetch path
does (--blocks random blocks per KV head, every layer), timing each step. Run it under a RAM cap
below the store's size, or the page cache holds the whole file and no read reaches the disk:

    mkdir -p /sys/fs/cgroup/memory/kvcap && echo 1G > /sys/fs/cgroup/memory/kvcap/memory.limit_in_bytes
    sh -c 'echo $$ > /sys/fs/cgroup/memory/kvcap/cgroup.procs; exec python bench/probes/probe_disk_gather.py'
"""
from __future__ import annotations

import argparse
import json
import mmap
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import torch  # noqa: E402

from common import provenance  # noqa: E402

from kvretrieve.config import KVGeometry  # noqa: E402
from kvretrieve.memory import process_disk_read_bytes  # noqa: E402
from kvretrieve.store import KVStore  # noqa: E402
from kvretrieve.store.reads import gather_blocks  # noqa: E402


def fill(store: KVStore, tokens: int) -> float:
    """Write `tokens` of random keys and values, layer by layer; returns GB/s written."""
    g = torch.Generator().manual_seed(0)
    nb, t = tokens // store.bs, time.perf_counter()
    for layer in range(store.L):
        for first in range(0, nb, 256):
            n = min(256, nb - first)
            k, v = (torch.randn(store.H, n, store.bs, store.d, generator=g, dtype=torch.bfloat16) for _ in range(2))
            store.write(layer, first, k, v)
    return store.nbytes() / 1e9 / (time.perf_counter() - t)


def steps(store: KVStore, n_blocks: int, blocks: int, count: int, advice: str) -> dict:
    """`count` decode steps' gathers, every segment advised first: "normal" (read-around on a fault),
    "random", or "random+willneed" (what the store does: random, and the selected rows' pages asked
    for before the gather)."""
    for seg in (t for layer in store.segments + store.scales for t in layer if t is not None):
        store.home._advise(seg.data_ptr(), seg.nbytes, getattr(mmap, f"MADV_{advice.split('+')[0].upper()}"))
    home = type(store.home)
    # without willneed: the instance's own no-op shadows the method (the store as before the prefetch)
    store.home.willneed = home.willneed.__get__(store.home) if "willneed" in advice else (lambda pages: None)
    g = torch.Generator().manual_seed(len(advice))
    heads = torch.arange(store.H).repeat_interleave(blocks)
    out = torch.empty(2, len(heads), store.bs * store.d, dtype=torch.bfloat16)
    times, read0 = [], process_disk_read_bytes()
    for _ in range(count):
        t = time.perf_counter()
        for layer in range(store.L):
            ids = torch.stack([torch.randperm(n_blocks, generator=g)[:blocks] for _ in range(store.H)]).flatten()
            gather_blocks(store, layer, heads, ids, out)
        times.append(time.perf_counter() - t)
    read = process_disk_read_bytes() - read0 if read0 is not None else None
    return {"advice": advice, "step_ms_p50": 1e3 * statistics.median(times), "steps": count,
            "rows_per_s": count * store.L * len(heads) / sum(times),
            "disk_read_mb_per_step": read / 1e6 / count if read is not None else None}


ADVICE = ("normal", "random", "random+willneed")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", type=int, default=48 * 1024, help="store length (48K: 3.2 GB in int8)")
    ap.add_argument("--blocks", type=int, default=128, help="blocks selected per KV head and layer (2,048 tokens)")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    args = ap.parse_args()
    limit = Path("/sys/fs/cgroup/memory/kvcap/memory.limit_in_bytes")
    # the tree as it is when the run starts (a later edit elsewhere must not mark these rows dirty)
    meta = provenance("cpu", allow_dirty=True) | {"ram_cap": limit.read_text().strip() if limit.exists() else None}
    nb = args.tokens // 16
    with tempfile.TemporaryDirectory(dir=os.environ.get("KVRETRIEVE_CACHE")) as folder:
        geo = KVGeometry(32, 8, 128, 16, nb, torch.device("cpu"), torch.bfloat16)
        store = KVStore(geo, quantize=True, disk_dir=Path(folder))
        row = {"tokens": args.tokens, "store_gb": None, "write_gb_s": fill(store, args.tokens)}
        row["store_gb"] = store.nbytes() / 1e9
        rows = [row | steps(store, nb, args.blocks, args.steps, a) for a in ADVICE + ADVICE]
    out = Path(args.out) / "probe_disk_gather.json"
    out.write_text(json.dumps({**meta, "rows": rows}, indent=1))
    for r in rows:
        print(r)
    print(out)


if __name__ == "__main__":
    main()
