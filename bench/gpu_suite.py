"""Everything a GPU call has to check and time, in one command (device time is scarce).

1. the CUDA tests (every test marked cuda): Triton kernels against their torch references, the
   retrieval backend's async paths, the decode loop, models against transformers;
2. bench/decode.py with the given arguments (this tree), results under $OUT/new;
3. with --longctx ARGS, bench/longctx.py with them (the evaluation model uploaded first:
   bench/gpu_upload.py), results under $OUT/longctx;
4. each --extra "SCRIPT ARGS" (e.g. bench/reopen.py, bench/batch_decode.py), logged under $OUT;
5. with --baseline DIR (a copy of an earlier commit's kvretrieve/ and bench/, e.g. made with
   `git archive REV kvretrieve bench pyproject.toml | tar -x -C .base`), the same decode rows for
   that code in the same call, under $OUT/old, so a refactor's speed is compared within one run.

    KVRETRIEVE_FREE_RAM_GB=110 python bench/gpu_suite.py [--skip-tests] \
        [--decode "--systems kvretrieve --contexts 32K,128K --kinds auto,lowrank --long ''"] \
        [--baseline .base --baseline-decode "--systems kvretrieve --contexts 32K,128K --kinds auto --long ''"]

KVRETRIEVE_COMMIT and KVRETRIEVE_TREE (`python bench/common.py tree` at that clean commit) name and prove
the commit of this tree, KVRETRIEVE_BASELINE_COMMIT / _TREE the baseline's (the GPU copy has no git). The
host's RAM reads low at start and grows as it is used, hence the free-RAM override.
"""
from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
OUT = Path(os.environ.get("OUT", REPO / "bench" / "results"))


def run(cmd: list[str], log: Path, timeout: int, root: Path = REPO, env: dict | None = None) -> int:
    """Run cmd with `root` first on the import path; its output goes to log (and its tail to stdout)."""
    t0 = time.time()
    # root first; what PYTHONPATH held stays after it (the gguf wheel installed to /tmp/site on the GPU machine)
    path = os.pathsep.join(p for p in (str(root), os.environ.get("PYTHONPATH", "")) if p)
    env = dict(os.environ, PYTHONPATH=path, PYTHONUNBUFFERED="1",
               PYTORCH_CUDA_ALLOC_CONF="expandable_segments:True", **(env or {}))
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as f:
        f.write(f"$ {shlex.join(cmd)}\n")
        f.flush()
        try:
            rc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, timeout=timeout, env=env, cwd=root).returncode
        except subprocess.TimeoutExpired:
            rc = 124
    lines = log.read_text().splitlines()
    print(f"[{time.time() - t0:5.0f} s] rc={rc} {shlex.join(cmd[1:4])} ...\n  " + "\n  ".join(lines[-12:]), flush=True)
    return rc


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--skip-tests", action="store_true")
    ap.add_argument("--tests", default="tests/", help="what pytest collects (its cuda-marked tests run)")
    ap.add_argument("--decode", default="", help="arguments of bench/decode.py for this tree ('' = no run)")
    ap.add_argument("--longctx", default="", help="arguments of bench/longctx.py ('' = no run)")
    ap.add_argument("--baseline", default="", help="a copy of an earlier tree to time with --baseline-decode")
    ap.add_argument("--baseline-decode", default="")
    ap.add_argument("--extra", action="append", default=[],
                    help="another bench script and its arguments (repeatable), e.g. \"bench/reopen.py --shape "
                         "llama3-8b --context 128K\"; its output goes to $OUT/extra_N.log, its --out is the caller's")
    ap.add_argument("--timeout", type=int, default=540, help="seconds per step")
    args = ap.parse_args()
    py = sys.executable
    if not args.skip_tests:
        run([py, "-m", "pytest", "-q", "-m", "cuda", *shlex.split(args.tests), "-p", "no:cacheprovider"],
            OUT / "cuda_tests.log", args.timeout)
    if args.decode:
        run([py, "bench/decode.py", *shlex.split(args.decode), "--out", str(OUT / "new")], OUT / "new" / "decode.log",
            args.timeout)
    if args.longctx:
        run([py, "bench/longctx.py", *shlex.split(args.longctx), "--out", str(OUT / "longctx")],
            OUT / "longctx" / "longctx.log", args.timeout)
    for i, extra in enumerate(args.extra):
        run([py, *shlex.split(extra)], OUT / f"extra_{i}.log", args.timeout)
    if args.baseline and args.baseline_decode:
        base = (REPO / args.baseline).resolve()
        # The baseline copy proves its commit as this tree does (bench/common.py): its own hash.
        env = {"KVRETRIEVE_COMMIT": os.environ.get("KVRETRIEVE_BASELINE_COMMIT", "baseline"),
               "KVRETRIEVE_TREE": os.environ.get("KVRETRIEVE_BASELINE_TREE", "")}
        run([py, "bench/decode.py", *shlex.split(args.baseline_decode), "--out", str(OUT / "old")],
            OUT / "old" / "decode.log", args.timeout, root=base, env=env)


if __name__ == "__main__":
    main()
