"""What the weights' finiteness check costs at load (models/loader.py, _TensorReader).

The check sums every tensor as it is read and brings the sums to the host once. This times
kvretrieve.load with the check and without it (_TensorReader.watch and check_finite turned into
no-ops), alternating, best of --repeats each; the share is the difference over the load without.

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
from kvretrieve.models import loader  # noqa: E402

COLUMNS = ["model", "dtype", "threads", "load_s", "load_unchecked_s", "check_ms", "check_share",
           "first_token_s", "first_token_unchecked_s", "first_token_share", "repeats"]


def timed_loads(path, dtype: str, repeats: int) -> dict[str, float]:
    """Best times with the check and without it, alternating so that both see the same machine: the
    load, and the load plus a 16-token prompt's logits (the first pass reads every weight; a float32
    load maps most of them without reading them)."""
    real = (loader._TensorReader.watch, loader._TensorReader.check_finite)
    times: dict[str, list[float]] = {}
    for _ in range(repeats):
        for off in (False, True):
            if off:
                loader._TensorReader.watch = lambda self, name, t: None
                loader._TensorReader.check_finite = lambda self: None
            t = time.perf_counter()
            llm = kvretrieve.load(path, device="cpu", dtype=dtype, max_context=64, retrieval=None)
            loaded = time.perf_counter()
            llm.prefill(list(range(100, 116)))
            done = time.perf_counter()
            loader._TensorReader.watch, loader._TensorReader.check_finite = real
            times.setdefault(f"load{off}", []).append(loaded - t)
            times.setdefault(f"first{off}", []).append(done - t)
    return {k: min(v) for k, v in times.items()}


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
    path = loader.resolve_checkpoint(args.model)
    rows = []
    for dtype in args.dtypes.split(","):
        t = timed_loads(path, dtype, args.repeats)
        rows.append({"model": path.name, "dtype": dtype, "threads": args.threads, "load_s": round(t["loadFalse"], 3),
                     "load_unchecked_s": round(t["loadTrue"], 3), "check_ms": round(1e3 * (t["loadFalse"] - t["loadTrue"]), 1),
                     "check_share": round((t["loadFalse"] - t["loadTrue"]) / t["loadTrue"], 4),
                     "first_token_s": round(t["firstFalse"], 3), "first_token_unchecked_s": round(t["firstTrue"], 3),
                     "first_token_share": round((t["firstFalse"] - t["firstTrue"]) / t["firstTrue"], 4),
                     "repeats": args.repeats})
        print(rows[-1], flush=True)
    write_results("load_check_cpu", meta, stamp(rows, meta), COLUMNS,
                  "check_share: (load_s - load_unchecked_s) / load_unchecked_s; first_token_share the same for the "
                  "load plus a 16-token prompt (which reads every weight once); each time the best of `repeats`, "
                  "with and without the check alternating.",
                  Path(args.out))


if __name__ == "__main__":
    main()
