"""Everything the GPU machine has to check and time, in one call (device time is scarce).

1. the CUDA tests: Triton kernels against their torch references, retrieval async vs sync paths;
2. `kvretrieve profile` on the Llama-3.1-8B shape (random bf16 weights) at 32K and 128K under a
   24 GiB cap (an emulated 24 GB card), for each index kind;
3. writes profile_h100.json / .md (and the logs) to $OUT, to be committed under bench/results/.

    KVRETRIEVE_FREE_RAM_GB=100 python bench/gpu_suite.py [--quick]

The host's RAM reads low at start and grows as it is used, hence the free-RAM override.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import markdown_table, provenance, write_results  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
OUT = Path(os.environ.get("OUT", REPO / "bench" / "results"))


def run(cmd: list[str], log: str, timeout: int) -> subprocess.CompletedProcess:
    t0 = time.time()
    env = dict(os.environ, PYTHONPATH=str(REPO), PYTORCH_CUDA_ALLOC_CONF="expandable_segments:True")
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=REPO)
    (OUT / log).write_text(f"$ {' '.join(cmd)}\n# rc={proc.returncode} in {time.time() - t0:.0f} s\n"
                           f"{proc.stdout}\n--- stderr ---\n{proc.stderr}")
    print(f"[{time.time() - t0:5.0f} s] rc={proc.returncode} {' '.join(cmd[2:6])} ...", flush=True)
    return proc


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="small contexts only (a smoke test)")
    ap.add_argument("--kinds", default="lowrank,bounds,ivf",
                    help="index kinds, each optionally with its contexts: lowrank,ivf:128K:512K")
    ap.add_argument("--skip-tests", action="store_true")
    ap.add_argument("--timeout", type=int, default=420, help="seconds per profile command")
    ap.add_argument("--prefill-chunk", default="4096")
    args = ap.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)
    py = sys.executable
    if not args.skip_tests:
        tests = run([py, "-m", "pytest", "-q", "-x", "-m", "cuda", "tests/test_kernels.py", "tests/test_retrieval.py",
                     "-p", "no:cacheprovider"], "cuda_tests.log", 300)
        print(tests.stdout.strip().splitlines()[-1] if tests.stdout.strip() else tests.stderr[-2000:], flush=True)
    meta = provenance("cuda")
    cols = ["model", "context", "index", "budget", "prefill_s", "prefill_tok_s", "index_build_s", "build_share",
            "decode_ms_p50", "decode_ms_p90", "h2d_mb_per_token", "cache_hit", "peak_gpu_gib",
            "gpu_cap_gib", "pinned_host_gib", "rss_gib"]
    notes = ("kvretrieve profile, Llama-3.1-8B shape with random bf16 weights, prompts of random token ids, "
             "greedy decode of 32 tokens (median and p90 per token, host sync per token as in generation), "
             "under set_per_process_memory_fraction(24 GiB).")
    rows = []
    for spec in args.kinds.split(","):
        kind, _, contexts = spec.partition(":")  # e.g. "ivf:128K:512K"; default 32K,128K
        contexts = contexts.replace(":", ",") or ("4K,8K" if args.quick else "32K,128K")
        proc = run([py, "-m", "kvretrieve", "profile", "--shape", "llama3-8b", "--context", contexts,
                    "--retrieval", kind, "--gpu-mem-gb", "24", "--decode-steps", "32", "--json",
                    "--prefill-chunk", args.prefill_chunk],
                   f"profile_{kind}.log", args.timeout)
        if proc.returncode == 0:
            rows += json.loads(proc.stdout)
        else:
            print(proc.stderr[-3000:], flush=True)
        write_results("profile_h100", meta, rows, cols, notes, OUT)  # after each kind: a timeout keeps the rest
    print(markdown_table(rows, cols), flush=True)


if __name__ == "__main__":
    main()
