"""How reference.sparse_decode (the CPU's decode attention) gathers the selected blocks, timed on the CPU.

A torch profile of a CPU decode step (the default model at 1K, lowrank forced) put ~20% of it in
`aten::index`: the gather k_pool[heads, slots] with a (head, slot) pair of index tensors. The reference
now gathers (head, slot) rows of the flattened pool with index_select. This times both ways at a few
pool shapes (median of 200 calls, torch's threads as set) and checks that they give the same tensor.

    python bench/probes/probe_cpu_gather.py
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

SHAPES = [  # (what, KV heads, pool slots, block size, head dim, selected columns)
    ("SmolLM2-135M at 1K, lowrank forced", 3, 400, 4, 64, 300),
    ("Qwen2.5-Coder-0.5B at 32K (blocks of 4)", 2, 1200, 4, 64, 1000),
    ("Qwen2.5-Coder-1.5B at 32K (blocks of 4)", 2, 1200, 4, 128, 1000),
]


def median_us(fn, reps: int = 200) -> float:
    for _ in range(5):
        fn()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return 1e6 * statistics.median(times)


def main() -> None:
    meta = provenance("cpu")
    meta["command"] = "bench/probes/probe_cpu_gather.py"
    g = torch.Generator().manual_seed(0)
    rows = []
    for what, hkv, slots, bs, d, n in SHAPES:
        pool = torch.randn(hkv, slots, bs, d, generator=g)
        idx = torch.randint(0, slots, (hkv, n), generator=g)
        heads = torch.arange(hkv)[:, None]

        def paired():
            return pool[heads, idx].reshape(hkv, n * bs, d)

        def rows_of_flat():
            return pool.reshape(-1, bs, d).index_select(0, (heads * slots + idx).reshape(-1)).reshape(hkv, n * bs, d)

        same = torch.equal(paired(), rows_of_flat())
        q = torch.randn(hkv * 2, d, generator=g)
        tail = torch.tensor([bs], dtype=torch.int32)
        ref_us = median_us(lambda: reference.sparse_decode(q, pool, pool, idx.int(), tail, d ** -0.5))
        a, b = median_us(paired), median_us(rows_of_flat)
        rows.append({"shape": what, "blocks": hkv * n, "paired_index_us": a, "index_select_us": b,
                     "speedup": a / b, "same_tensor": same, "sparse_decode_reference_us": ref_us})
        print(rows[-1], flush=True)
    meta["threads"] = torch.get_num_threads()
    out = Path(os.environ.get("OUT", RESULTS))
    print(write_results("probe_cpu_gather", meta, stamp(rows, meta),
                        ["shape", "blocks", "paired_index_us", "index_select_us", "speedup", "same_tensor",
                         "sparse_decode_reference_us"],
                        "paired_index_us: pool[heads, slots] (what reference.sparse_decode did); index_select_us: "
                        "rows of the flattened pool (what it does now); same_tensor: the two gathers agree exactly; "
                        "sparse_decode_reference_us: the whole reference now, with the same gather.", out))


if __name__ == "__main__":
    main()
