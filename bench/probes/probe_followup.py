"""A follow-up prompt after a long document (8B shape, random weights, H100, 24 GiB cap): how long
its prefill takes, and what reading one layer's earlier K,V back from the CPU store costs on the
host path (read to CPU tensors, dequantize there, copy up) against the device path that
RetrievalKV.layer_kv uses (per-head async copies of the stored bytes, dequantized on the GPU).

    KVRETRIEVE_FREE_RAM_GB=110 python bench/probe_followup.py [--context 128K] [--followup 256]
        -> $OUT/probe_followup.json (or bench/results)
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path[:0] = [str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parents[1])]
from common import RESULTS, provenance  # noqa: E402
from decode import CAP_GIB, prompt, tokens  # noqa: E402

from kvretrieve.config import RetrievalConfig  # noqa: E402
from kvretrieve.models.llama import Decoder  # noqa: E402
from kvretrieve.models.shapes import random_weights  # noqa: E402
from kvretrieve.models.shapes import shape_config  # noqa: E402
from kvretrieve.memory import apply_gpu_cap  # noqa: E402
from kvretrieve.api import build_engine  # noqa: E402
from kvretrieve.store.reads import read_blocks  # noqa: E402


def seconds(fn, reps: int = 3) -> float:
    """Median wall time of fn() with the device synced around it."""
    ts = []
    for _ in range(reps):
        torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        ts.append(time.perf_counter() - t)
    return sorted(ts)[len(ts) // 2]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--context", default="128K")
    ap.add_argument("--followup", type=int, default=256, help="tokens of the follow-up prompt")
    ap.add_argument("--out", default=os.environ.get("OUT", str(RESULTS)))
    args = ap.parse_args()
    dev, n = torch.device("cuda", 0), tokens(args.context)
    apply_gpu_cap(dev, CAP_GIB)
    cfg = shape_config("llama3-8b")
    decoder = Decoder(cfg, random_weights(cfg, dev, torch.bfloat16, 0))
    engine, _ = build_engine(decoder, n + args.followup + 64, 4096, RetrievalConfig(index="lowrank"))
    backend = engine.backend
    backend.store.join()
    ids = prompt(n + args.followup, cfg.vocab_size, dev)
    out = provenance("cuda") | {"context": n, "followup": args.followup, "index": backend.cfg.index,
                                "store_dtype": "int8" if backend.store.quantized else "model"}
    out["prefill_s"] = seconds(lambda: engine.forward(ids[:n], last_logits=True), reps=1)

    def followup():
        engine.truncate(n)
        engine.forward(ids[n:], last_logits=True)

    out["followup_s"] = seconds(followup)
    blocks, store = n // backend.bs, backend.store
    out["layer_read_host_s"] = seconds(lambda: [t.to(dev) for t in read_blocks(store, 0, 0, blocks)])
    out["layer_read_device_s"] = seconds(lambda: read_blocks(store, 0, 0, blocks, dev))
    out["peak_gpu_gib"] = torch.cuda.max_memory_allocated(dev) / 2**30
    path = Path(args.out) / "probe_followup.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=1))
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
