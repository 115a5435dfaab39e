"""What the weights' finiteness check costs at load (models/loader.py, _TensorReader).

The check sums every tensor as it is read and brings the sums to the host once. This times
kvretrieve.load (best of --repeats), then the check's own work over the same weights: one sum per
checkpoint tensor read, the stack, isfinite and the one transfer (best of --repeats). The share is
the second over the first.

    python bench/load_check.py                  # the default model on the CPU, float32 and bfloat16
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import torch  # noqa: E402

from common import RESULTS, add_provenance_args, provenance, stamp, write_results  # noqa: E402

import kvretrieve  # noqa: E402
from kvretrieve.models.loader import CheckpointTensors, resolve_checkpoint  # noqa: E402

COLUMNS = ["model", "dtype", "threads", "tensors", "values_m", "load_s", "check_ms", "check_share", "repeats"]


def best(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", help="checkpoint (default: the default model)")
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (1: no noise from the other core)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", default=os.environ.get("OUT", str(RESULTS)))
    add_provenance_args(ap)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    meta = provenance("cpu", args.allow_dirty)
    path = resolve_checkpoint(args.model)
    rows = []
    for dtype in args.dtypes.split(","):
        load_s = best(lambda: kvretrieve.load(path, device="cpu", dtype=dtype, max_context=64, retrieval=None),
                      args.repeats)
        dt = getattr(torch, dtype)
        tensors = CheckpointTensors(path)
        weights = [tensors[name].to(dtype=dt) for name in tensors.keys()]  # as the reader holds them

        def check():
            sums = [w.sum() for w in weights]
            torch.isfinite(torch.stack(sums).float()).tolist()
        check_s = best(check, args.repeats)
        rows.append({"model": path.name, "dtype": dtype, "threads": args.threads, "tensors": len(weights),
                     "values_m": round(sum(w.numel() for w in weights) / 1e6, 1), "load_s": round(load_s, 3),
                     "check_ms": round(1e3 * check_s, 1), "check_share": round(check_s / load_s, 4),
                     "repeats": args.repeats})
        print(rows[-1], flush=True)
    write_results("load_check_cpu", meta, stamp(rows, meta), COLUMNS,
                  "check_share: the sums, stack, isfinite and transfer over load_s; both best of `repeats`.",
                  Path(args.out))


if __name__ == "__main__":
    main()
