"""Several sessions decoding together (kvretrieve.engine.batch) against one session, in one run.

For each number of sessions: build that many sessions over one loaded model (each its own cache of
--context tokens), prefill each alone (time to first token), then decode them as one batch for
--steps steps. Reports the aggregate tokens/s, each step's time (every session's per-token latency:
p50, p99), the prefill times, peak GPU memory and the host's resident memory, and the speed-up of the
aggregate over one session of the same run. Greedy decoding; the prompts are real text (each session
from its own place in CPython's docs) where the model has a tokenizer, random ids with --shape: with
real weights the queries, and so the blocks each step selects and the cache's hits, are real ones.

    python bench/batch_decode.py --sessions 1,2,4 --context 1K            # CPU smoke: the default model
    KVRETRIEVE_FREE_RAM_GB=110 python bench/batch_decode.py --shape llama3-8b --gpu-mem-gb 24 \\
        --sessions 1,2,4,8 --context 32K --kind auto                      # the H200 rows (issue 17)
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import torch  # noqa: E402

from common import (RESULTS, add_provenance_args, config_fields, kernel_times, provenance, stamp,  # noqa: E402
                    write_results)

from kvretrieve.api import build, load_decoder  # noqa: E402
from kvretrieve.cli.options import parse_tokens  # noqa: E402
from kvretrieve.cli.profile import prompt_ids  # noqa: E402
from kvretrieve.config import RetrievalConfig, RuntimeConfig  # noqa: E402
from kvretrieve.engine.batch import Batch  # noqa: E402
from kvretrieve.memory import process_rss_bytes  # noqa: E402

WARM_STEPS = 3
COLUMNS = ["sessions", "context", "attention", "launch", "tokens_per_s", "x_one_session", "step_ms_p50", "step_ms_p99",
           "ttft_s_p50", "ttft_s_max", "h2d_mb_per_token", "cache_hit", "kernel_ms", "gpu_busy_ms", "peak_gpu_gib", "host_rss_gib",
           "steps"]
NOTES = ("tokens_per_s: sessions x 1000 / step_ms_p50, the rate of a typical step. step_ms: the time of one "
         "batched step, which is each session's time per token. ttft_s: each session's prefill alone (to its first "
         "token). x_one_session: tokens_per_s over the 1-session row of this run. h2d_mb_per_token: blocks copied "
         "from the CPU store per token of a session; cache_hit: the share of selected blocks already on the GPU. "
         "launch: the sessions' sparse attention in one launch a layer (kernels.sparse_decode_rows) or one per "
         "session (--launch). kernel_ms (--kernels): the GPU time of a step's kernels, summed (rows' streams "
         "overlap, so it may exceed step_ms); gpu_busy_ms: how long any kernel or copy ran a step (their union: "
         "kernel_ms / gpu_busy_ms is how many ran at once on average, step_ms - gpu_busy_ms the time none did). "
         "peak_gpu_gib: torch's peak allocation over the row; host_rss_gib: "
         "the process's resident memory after it.")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(decoder, tok, n: int, context: int, steps: int, chunk: int, cfg: RetrievalConfig | None,
            kernels: int = 0, one_launch: bool = True, trace: Path | None = None, ahead: bool = False) -> dict:
    dev = decoder.device
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    sessions = [build(decoder, tok, "bench", context + steps + kernels + 64, chunk, cfg) for _ in range(n)]
    batch, ttft = Batch(one_launch, ahead), []
    for i, llm in enumerate(sessions):
        ids = prompt_ids(tok, context, decoder.cfg.vocab_size, torch.device("cpu"), 100 * n + i).tolist()
        t = time.perf_counter()
        logits = llm.prefill(ids)
        sync(dev)
        ttft.append(time.perf_counter() - t)
        batch.join(llm.engine, logits, lambda x: x.argmax(), steps + kernels + 5, stop_ids=())
    for _ in range(WARM_STEPS):  # eager launches, then the capture of the step's graph (up to 2 s on the H200)
        batch.step()
    sync(dev)
    before = [llm.engine.backend.counters() for llm in sessions]
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        batch.step()  # reads each row's token on the host: one sync a step, as a server streaming them does
        times.append(time.perf_counter() - t)
    times.sort()
    hits = misses = h2d = 0
    for llm, c0 in zip(sessions, before):
        c = llm.engine.backend.counters()
        hits, misses = hits + c.get("hits", 0) - c0.get("hits", 0), misses + c.get("misses", 0) - c0.get("misses", 0)
        h2d += c.get("h2d_bytes", 0) - c0.get("h2d_bytes", 0)
    row = {"sessions": n, "context": context, "attention": sessions[0].mode_reason.split(":")[0],
           "launch": "one" if one_launch else "per row",
           "step_ms_p50": 1e3 * statistics.median(times),
           "step_ms_p99": 1e3 * times[min(len(times) - 1, int(0.99 * len(times)))],
           "ttft_s_p50": statistics.median(ttft), "ttft_s_max": max(ttft), "steps": steps,
           "h2d_mb_per_token": h2d / 1e6 / (n * steps), "cache_hit": hits / (hits + misses) if hits + misses else None,
           "peak_gpu_gib": torch.cuda.max_memory_allocated(dev) / 2**30 if dev.type == "cuda" else None,
           "host_rss_gib": process_rss_bytes() / 2**30}
    if kernels and dev.type == "cuda":  # after the counters: the profiled steps are not in the rates
        row["kernels"] = kernel_times(batch.step, kernels, trace)
        row["kernel_ms"] = row["kernels"][-1]["us_per_step"] / 1e3
        row["gpu_busy_ms"] = row["kernels"][-1]["busy_us_per_step"] / 1e3
    del sessions, batch
    gc.collect()
    if dev.type == "cuda":
        torch.cuda.empty_cache()
    return row


def add_rates(rows: list[dict]) -> None:
    """tokens_per_s from each row's median step, and x_one_session against the 1-session row."""
    for r in rows:
        if r.get("step_ms_p50"):
            r["tokens_per_s"] = r["sessions"] * 1e3 / r["step_ms_p50"]
    one = next((r["tokens_per_s"] for r in rows if r.get("sessions") == 1 and "tokens_per_s" in r), None)
    for r in rows:
        if one and "tokens_per_s" in r:
            r["x_one_session"] = r["tokens_per_s"] / one


def rewrite(path: Path) -> None:
    """Re-render a results file of an earlier version of this script, its rates taken from the
    median step (that version summed every timed step, and a 1-session row's first timed step
    could be the graph's capture)."""
    data = json.loads(path.read_text())
    rows = data.pop("rows")
    add_rates(rows)
    data["derived"] = ("tokens_per_s and x_one_session recomputed from step_ms_p50 by `bench/batch_decode.py "
                       "--rewrite` (the run's own figures summed every timed step)")
    print(write_results(path.stem, data, rows, COLUMNS + ["error"], NOTES + " " + data["derived"] + ".", path.parent))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", help="checkpoint (default: the default model)")
    ap.add_argument("--shape", help="random weights of a named shape instead (e.g. llama3-8b)")
    ap.add_argument("--sessions", default="1,2,4,8")
    ap.add_argument("--context", default="1K", help="prompt tokens of every session")
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--kind", default="auto", help="auto, off (dense), or an index kind[:key=value...]")
    ap.add_argument("--kernels", type=int, default=0,
                    help="CUDA: that many more steps under the profiler, GPU time by kernel into the JSON")
    ap.add_argument("--ahead", action=argparse.BooleanOptionalAction, default=None,
                    help="launch each step before reading the ids the one before sampled (Batch(ahead=True)); "
                         "default: on CUDA, as serve does")
    ap.add_argument("--trace", action="store_true",
                    help="with --kernels: also write each row's profiled steps as a Chrome trace under --out")
    ap.add_argument("--launch", default="one", choices=["one", "per-row", "both"],
                    help="the sessions' sparse attention in one launch a layer, one per session, or both in turn")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--gpu-mem-gb", type=float, default=None, help="cap the GPU memory (emulate a smaller card)")
    ap.add_argument("--chunk", type=int, default=4096)
    ap.add_argument("--out", default=os.environ.get("OUT", str(RESULTS)))
    ap.add_argument("--name", help="results file stem (default batch_decode_<device type>)")
    ap.add_argument("--rewrite", type=Path, help="only re-render this results JSON (rates from the median step)")
    add_provenance_args(ap)
    args = ap.parse_args()
    if args.rewrite:
        rewrite(args.rewrite)
        return
    context = parse_tokens(args.context)
    name, *opts = args.kind.split(":")
    cfg = None if name == "off" else RetrievalConfig(index=name, **config_fields(opts, f"--kind {args.kind}"))
    runtime = RuntimeConfig(device=args.device, gpu_mem_gb=args.gpu_mem_gb, max_context=context + args.steps + 64)
    decoder, tok, source = load_decoder(args.model, runtime, dense_kv=False, shape=args.shape)
    meta = provenance(str(decoder.device), args.allow_dirty)
    ahead = decoder.device.type == "cuda" if args.ahead is None else args.ahead
    rows = []
    launches = {"one": [True], "per-row": [False], "both": [True, False]}[args.launch]
    plan = [(int(s), one) for s in args.sessions.split(",") for one in launches]
    for n, one in plan:
        try:
            rows.append(measure(decoder, tok, n, context, args.steps, args.chunk, cfg, 0, one, ahead=ahead))
        except Exception as e:  # noqa: BLE001 - a row that cannot run says why and the others go on
            rows.append({"sessions": n, "context": context, "error": f"{type(e).__name__}: {e}"[:300]})
        print(rows[-1], flush=True)
    # Kernel tables only once every row is timed, each row run again: the profiler leaves CUPTI attached
    # after it ends, and rows timed after a profiled one ran 17.4-17.9 ms a step at 8 sessions against
    # 14.3-14.9 timed first (pytorch/pytorch#144455; batch_decode_15b_32k_s34*.md).
    for row, (n, one) in zip(rows if args.kernels and decoder.device.type == "cuda" else [], plan):
        if "error" not in row:
            trace = Path(args.out) / f"{args.name or 'batch_decode'}_trace_{n}.json" if args.trace else None
            got = measure(decoder, tok, n, context, args.steps, args.chunk, cfg, args.kernels, one, trace, ahead)
            row.update({k: got[k] for k in ("kernels", "kernel_ms", "gpu_busy_ms")})
            for k in got["kernels"][:8] + got["kernels"][-1:]:
                print(f"  {n} sessions {k['us_per_step']:9.1f} us {k['calls_per_step']:7.1f} calls  {k['kernel']}",
                      flush=True)
    add_rates(rows)
    meta |= {"model": str(source), "dtype": str(decoder.dtype), "kind": args.kind, "launch": args.launch,
             "ahead": ahead,
             "run_by": "bench/batch_decode.py"}
    print(write_results(args.name or f"batch_decode_{decoder.device.type}", meta, stamp(rows, meta),
                        COLUMNS + ["error"], NOTES, Path(args.out)))


if __name__ == "__main__":
    main()
