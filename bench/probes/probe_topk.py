"""Top-k of block scores on the GPU: torch.topk against the radix-select kernel (kernels/topk.py).

The decode step picks 128 blocks per KV head (8 heads) among 2K / 8K / 32K candidates (32K / 128K /
512K contexts) in every layer; the profile of bench/decode.py --kernels put torch.topk at ~44 us
per layer at 128K. Each variant is timed as 32 calls captured in one CUDA graph (as in the step),
median over replays. Writes probe_topk.json to $OUT (or bench/results).

    python bench/probe_topk.py
"""
from __future__ import annotations

import json
import os
import statistics
import sys
from pathlib import Path

import torch

sys.path[:0] = [str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parents[1])]
from common import RESULTS, provenance  # noqa: E402

from kvretrieve.kernels import topk_indices  # noqa: E402


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


def main() -> None:
    out = Path(os.environ.get("OUT", RESULTS))
    g = torch.Generator(device="cuda").manual_seed(0)
    rows = []
    for n in (2048, 8704, 32768):
        scores = torch.randn(8, n, device="cuda", generator=g)
        want = torch.topk(scores, 128, dim=1, sorted=False).indices.sort(1).values
        row = {"candidates": n, "k": 128, "heads": 8,
               "torch_topk_us": graph_us(lambda: torch.topk(scores, 128, dim=1, sorted=False))}
        got = topk_indices(scores, 128)
        row["radix_select_us"] = graph_us(lambda: topk_indices(scores, 128))
        row["radix_select_exact"] = torch.equal(got.sort(1).values, want)
        rows.append(row)
        print(row, flush=True)
    meta = provenance("cuda")
    (out / "probe_topk.json").write_text(json.dumps({**meta, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
