"""Quantized linear layers at the Llama-3.1-8B decode shapes: F.linear on bf16 weights against
kernels.quant_linear on int8 (groups of K and of 32) and int4 (groups of 32 and 128) weights.

A decode step is bound by reading the weights, so each row gives the achieved GB/s of weight bytes
(codes + scales + mins; 2 bytes a weight for bf16) against the H200's ~4.3 TB/s copy rate. Each
variant is timed as one CUDA graph (as the decode step runs) of calls that each read their own copy of
the weight, together over three times the L2, so no call finds its weight in cache; median over 50
replays after a warm-up, per call. Every quantized row is also checked against the torch reference
(max error in bf16 eps of the largest output). Writes probe_qlinear.json to --out (default $OUT, else
bench/results); results that cannot be traced to a clean commit are marked +dirty / +unverified.

    python bench/probes/probe_qlinear.py
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

# this folder, bench/ and the repository root: runs as `python bench/probes/probe_qlinear.py`, nothing installed
sys.path[:0] = [str(Path(__file__).resolve().parents[i]) for i in range(3)]
from common import RESULTS, provenance  # noqa: E402

from kvretrieve.kernels import quant_linear, reference  # noqa: E402
from kvretrieve.models.quant import SCALE_DTYPE, QuantWeight  # noqa: E402

SHAPES = {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (28672, 4096), "down": (4096, 14336),
          "lm_head": (128256, 4096)}
KINDS = {"bf16": None, "int8-gK": (8, None), "int8-g32": (8, 32), "int4-g32": (4, 32), "int4-g128": (4, 128)}


def random_weight(n: int, k: int, kind, g: torch.Generator):
    """A bf16 [N, K] tensor or a QuantWeight of every code value, made on the GPU (seconds, not minutes,
    for the 128256 x 4096 head)."""
    if kind is None:
        return (torch.randn(n, k, device="cuda", generator=g) / 64).bfloat16()
    bits, group = kind[0], kind[1] or k
    if bits == 8:
        codes = torch.randint(-127, 128, (n, k), device="cuda", generator=g, dtype=torch.int8)
    else:
        codes = torch.randint(0, 256, (n, k // 2), device="cuda", generator=g, dtype=torch.uint8)
    scales = ((0.5 + torch.rand(n, k // group, device="cuda", generator=g)) / 64).to(SCALE_DTYPE)
    mins = (scales.float() * 7.5).to(SCALE_DTYPE) if bits == 4 else None
    return QuantWeight(bits, codes, scales, mins, group)


def nbytes(w) -> int:
    return w.nbytes() if isinstance(w, QuantWeight) else w.numel() * w.element_size()


def copies_of(w, count: int) -> list:
    if isinstance(w, QuantWeight):
        return [w] + [QuantWeight(w.bits, w.codes.clone(), w.scales.clone(), None if w.mins is None else w.mins.clone(),
                                  w.group) for _ in range(count - 1)]
    return [w] + [w.clone() for _ in range(count - 1)]


def graph_us(calls: list, repeats: int = 50) -> float:
    """Median per-call microseconds of `calls` (zero-argument functions) captured in one CUDA graph."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # compile, autotune cuBLAS, fill the allocator before capture
        for _ in range(2):
            for c in calls:
                c()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for c in calls:
            c()
    graph.replay()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(1e3 * start.elapsed_time(end) / len(calls))
    return statistics.median(times)


def scaled_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    eps = torch.finfo(ref.dtype).eps
    return ((got.double() - ref.double()).abs().max() / (eps * ref.double().abs().max())).item()


def measure(name: str, n: int, k: int, kind_name: str, g: torch.Generator, l2: int) -> list[dict]:
    w = random_weight(n, k, KINDS[kind_name], g)
    size = nbytes(w)
    weights = copies_of(w, max(1, min(64, -(-3 * l2 // size))))
    rows = []
    for t in (1, 8):
        x = torch.randn(t, k, device="cuda", generator=g).bfloat16()
        if KINDS[kind_name] is None:
            calls = [lambda u=u: F.linear(x, u) for u in weights]
            err = None
        else:
            calls = [lambda u=u: quant_linear(x, u) for u in weights]
            err = scaled_err(quant_linear(x, w), reference.quant_linear(x, w))
        us = graph_us(calls)
        rows.append({"layer": name, "N": n, "K": k, "T": t, "kind": kind_name, "weight_bytes": size, "us": round(us, 2),
                     "GBps": round(size / us / 1e3, 1), "copies": len(weights), "err_bf16_eps": err})
        print(rows[-1], flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description="Time quant_linear against F.linear at the Llama-3.1-8B decode shapes.")
    ap.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", RESULTS)), help="folder for the JSON")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("probe_qlinear needs a CUDA GPU")
    t0 = time.time()
    meta = provenance("cuda", allow_dirty=True)
    l2 = torch.cuda.get_device_properties(0).L2_cache_size
    g = torch.Generator(device="cuda").manual_seed(0)
    rows = []
    for name, (n, k) in SHAPES.items():
        for kind_name in KINDS:
            rows += measure(name, n, k, kind_name, g, l2)
            torch.cuda.empty_cache()
    args.out.mkdir(parents=True, exist_ok=True)
    meta |= {"seconds": round(time.time() - t0, 1), "l2_bytes": l2}
    (args.out / "probe_qlinear.json").write_text(json.dumps(meta | {"rows": rows}, indent=1))
    print(f"wrote {args.out / 'probe_qlinear.json'} in {time.time() - t0:.0f} s")


if __name__ == "__main__":
    main()
