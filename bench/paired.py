"""Paired comparison of the task answers a bench/longctx.py results file stores, each configuration
against dense on the same samples: how many only dense gets right, how many only the configuration
does, and McNemar's exact two-sided p for the difference (the binomial test on the discordant pairs).

The targets count samples ("within one of dense"); with 20 samples a gap of a few is within the noise
of which samples a configuration happens to flip, and this says how much. No model is needed.

    python bench/paired.py bench/results/token_rest_15b_32k_tasks.json bench/results/fwe_15b_32k.json \
        --name paired_15b_32k
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, add_provenance_args, provenance, write_results  # noqa: E402
from longctx_tasks import found  # noqa: E402


def mcnemar_p(b: int, c: int) -> float:
    """Exact two-sided p of b against c discordant pairs (each 1/2 under no difference)."""
    n = b + c
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(min(b, c) + 1)) / 2 ** n
    return min(1.0, 2 * tail)


def paired_rows(path: Path) -> list[dict]:
    """One row per task, length and configuration of a results file (QA is scored by its fact, which the
    stored answers do not carry: skipped)."""
    rows = []
    for key, samples in json.loads(path.read_text())["answers"].items():
        task, length = key.split("@")
        if task == "qa" or not samples or "dense" not in samples[0]:
            continue
        right = {name: [all(found(s[name], s["expected"])) for s in samples]
                 for name in samples[0] if name not in ("expected", "doc", "depth")}
        for name, ok in right.items():
            if name == "dense":
                continue
            b = sum(d and not x for d, x in zip(right["dense"], ok))
            c = sum(x and not d for d, x in zip(right["dense"], ok))
            rows.append({"file": path.name, "task": task, "length": int(length), "config": name,
                         "samples": len(samples), "dense": sum(right["dense"]), "correct": sum(ok),
                         "only_dense": b, "only_config": c, "mcnemar_p": round(mcnemar_p(b, c), 4)})
    return rows


def main(argv=None) -> Path:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("results", nargs="+", type=Path, help="bench/longctx.py results JSON files")
    ap.add_argument("--name", default="paired", help="output name under bench/results (or --out)")
    ap.add_argument("--out", type=Path, default=RESULTS)
    add_provenance_args(ap)
    args = ap.parse_args(argv)
    meta = provenance("cpu", args.allow_dirty) | {"inputs": [str(p) for p in args.results]}
    rows = [r for p in args.results for r in paired_rows(p)]
    notes = ("only_dense / only_config: samples right for one of the two alone (the same prompt, greedy answers "
             "stored in the file). mcnemar_p: exact two-sided binomial p of those discordant pairs; small p means "
             "the gap is more than which samples happened to flip.")
    return write_results(args.name, meta, rows, ["file", "task", "length", "config", "samples", "dense", "correct",
                                                 "only_dense", "only_config", "mcnemar_p"], notes, args.out)


if __name__ == "__main__":
    print(main())
