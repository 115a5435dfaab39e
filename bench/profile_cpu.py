"""Cache and speculative-prefetch hit rates with REAL weights (the default model on real text, CPU).

Random-weight speed runs cannot tell how often successive tokens reuse blocks; this can. Timings
here are CPU timings of a 135M model and only indicative.

    python bench/profile_cpu.py --context 4K --budget 256 --window 128 --sink 32 --decode-steps 48
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, add_provenance_args, keep_runs, provenance, stamp, write_results  # noqa: E402

from click.testing import CliRunner  # noqa: E402

from kvretrieve.cli.profile import profile  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--context", default="4K")
    ap.add_argument("--budget", default="256")
    ap.add_argument("--window", default="128")
    ap.add_argument("--sink", default="32")
    ap.add_argument("--decode-steps", default="48")
    ap.add_argument("--kinds", default="lowrank,bounds")
    add_provenance_args(ap)
    args = ap.parse_args()
    run = provenance("cpu", args.allow_dirty)  # refused now, not after the work
    rows = []
    for kind in args.kinds.split(","):
        for spec in (False, True):
            cmd = ["--context", args.context, "--retrieval", kind, "--budget", args.budget, "--window", args.window,
                   "--sink", args.sink, "--decode-steps", args.decode_steps, "--device", "cpu", "--dtype", "float32",
                   "--json"] + (["--speculative"] if spec else [])
            result = CliRunner().invoke(profile, cmd)
            if result.exit_code != 0:
                raise SystemExit(result.output)
            for row in json.loads(result.stdout):
                row["speculative"] = spec
                rows.append(row)
                print(row, flush=True)
    cols = ["model", "context", "index", "budget", "speculative", "decode_ms_p50", "cache_hit", "spec_hit",
            "h2d_mb_per_token"]
    notes = ("SmolLM2-135M-Instruct, real weights, prompt = CPython's pydoc topics, greedy decode. cache_hit: share "
             "of selected blocks already in the GPU block pool (LRU, 2x budget); spec_hit: share of the exact "
             "selection that the speculative next-layer prediction had already picked.")
    write_results("profile_cpu_real_weights", keep_runs(None, run, stamp(rows, run)), rows, cols, notes, RESULTS)


if __name__ == "__main__":
    main()
