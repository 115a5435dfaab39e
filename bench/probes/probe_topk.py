"""Top-k of block scores on the GPU: torch.topk against the radix-select kernel (kernels/topk.py).

The decode step picks each KV head's blocks among the context's in every layer: 128 of 2K / 8K / 32K
candidates (8 heads) for the 8B shape at 32K / 128K / 512K, and for the 1.5B (2 heads, blocks of 4)
~370 of 2K, ~750 of 4K and 864 of 8K at 8K / 16K / 32K. There k is close to half a 2,048-score
slice, so rounds of slices shrank a row slowly (4 launches a layer, 68 us in all on an H100; slices
of 4,096: 44). This times slices of 2K-8K scores a program, with and without stopping the bisection
at a threshold with exactly k keys above it (stop_at_k), each as 32 calls captured in one CUDA graph
(as in the step), median over replays, and checks each result against torch.topk's set. Writes
bench/results/probe_topk_<gpu>.{json,md}.

    python bench/probes/probe_topk.py
"""
from __future__ import annotations

import os
import statistics
import sys
from pathlib import Path

import torch

sys.path[:0] = [str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parents[1])]
from common import RESULTS, provenance, stamp, write_results  # noqa: E402

from kvretrieve.kernels.topk import topk_indices  # noqa: E402


def graph_us(fn, calls: int = 32, replays: int = 30) -> float:
    fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    times = []
    for _ in range(replays):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(1e3 * start.elapsed_time(end) / calls)
    return statistics.median(times)


def timed_config(run, error) -> dict:
    """{"us", "max_err"} of one kernel configuration (run: the call; error: its output's max error), or
    {"error"} where it does not compile or run: a configuration that fails is a result too."""
    try:
        err = error(run())
        return {"us": graph_us(run), "max_err": err}
    except Exception as e:  # noqa: BLE001
        return {"error": f"{type(e).__name__}: {e}"[:160]}


SHAPES = [  # (what, rows = KV heads, candidates, k)
    ("8B shape at 32K", 8, 2048, 128), ("8B shape at 128K", 8, 8192, 128), ("8B shape at 512K", 8, 32768, 128),
    ("1.5B at 8K", 2, 2048, 370), ("1.5B at 16K", 2, 4096, 750), ("1.5B at 32K", 2, 8217, 864),
]


# (slice_len, num_warps, stop_at_k): at 4ec2f6b slices of 2K-16K with 8 and 16 warps (and 16 thresholds a
# pass) were timed; 16 warps and 16 thresholds were slower everywhere (probe_topk_h100.md).
CONFIGS = [(s, None, stop) for s in (2048, 4096, 8192) for stop in (True, False)]


def main() -> None:
    out = Path(os.environ.get("OUT", RESULTS))
    g = torch.Generator(device="cuda").manual_seed(0)
    meta = provenance("cuda")
    rows = []
    for what, h, n, k in SHAPES:
        scores = torch.randn(h, n, device="cuda", generator=g)
        want = torch.topk(scores, k, dim=1, sorted=False).indices.sort(1).values
        base = {"shape": what, "rows": h, "candidates": n, "k": k}
        rows.append(base | {"kernel": "torch.topk", "us": graph_us(lambda: torch.topk(scores, k, dim=1, sorted=False))})
        for slice_len, warps, stop in CONFIGS:
            if 2 * k > slice_len:
                continue
            def run(s=slice_len, w=warps, stop_at_k=stop):
                return topk_indices(scores, k, s, w, stop_at_k)
            r = timed_config(run, lambda got: float(not torch.equal(got.sort(1).values, want)))
            rows.append(base | {"kernel": "radix select", "slice": slice_len, "num_warps": warps or "default",
                                "stop_at_k": stop} | r)
            print(rows[-1], flush=True)
    name = "probe_topk_" + torch.cuda.get_device_name().split()[1].lower()
    print(write_results(name, meta, stamp(rows, meta),
                        ["shape", "rows", "candidates", "k", "kernel", "slice", "num_warps", "stop_at_k", "us", "max_err", "error"],
                        "us: one top-k (all its launches), the median over 30 replays of a CUDA graph of 32 calls; "
                        "max_err: 1 where the kernel's set differs from torch.topk's, else 0.", out))


if __name__ == "__main__":
    main()
