"""Decode speed on one GPU: kvretrieve against what users would run instead, in one run.

Llama-3.1-8B shape, random bf16 weights (speed does not depend on values), prompts of random token
ids, greedy decode. Rows, per context:
  kvretrieve        retrieval over the CPU-resident KV cache, under a 24 GiB cap (a 24 GB card),
                    the default index and each other kind;
  kvretrieve-dense  the whole KV on the GPU, no cap (what a big GPU gives; decode step in a graph);
  hf-dense          transformers, DynamicCache on the GPU;
  hf-offload        transformers, DynamicCache(offloading=True).
Ratios compare each row with the hf rows of the same context, measured in this same process.

    KVRETRIEVE_FREE_RAM_GB=110 python bench/decode.py [--contexts 32K,128K] [--kinds lowrank,bounds]
        [--long 512K:ivf] [--systems kvretrieve,kvretrieve-dense,hf-dense,hf-offload] [--merge]

Random weights make successive decode queries nearly unrelated, so cache hits are rarer than with
real weights (bench/results/profile_cpu_real_weights.md): the H2D traffic here is pessimistic.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time
from pathlib import Path

# Before CUDA starts: without expandable segments, fragmentation costs the 512K row its last GiB
# under the 24 GiB cap.
os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (RESULTS, add_provenance_args, config_fields, keep_runs, kernel_times, markdown_table,  # noqa: E402
                    provenance, stamp, write_results)

from kvretrieve.api import build_engine  # noqa: E402
from kvretrieve.config import RetrievalConfig  # noqa: E402
from kvretrieve.errors import KVRetrieveError  # noqa: E402
from kvretrieve.models.llama import Decoder  # noqa: E402
from kvretrieve.models.shapes import random_weights  # noqa: E402
from kvretrieve.models.shapes import shape_config  # noqa: E402
from kvretrieve.profiling import capacity_for, profile_context, reset_memory  # noqa: E402

COLUMNS = ["system", "weights", "index", "options", "default", "reselect_every", "speculative", "store_dtype", "context", "ready_s", "prefill_s", "decode_ms_p50", "decode_ms_p90", "decode_ms_mean",
           "peak_gpu_gib",
           "gpu_cap_gib", "pinned_host_gib", "h2d_mb_per_token", "cache_hit", "x_hf_dense", "x_hf_offload",
           "store", "ram_cap_gib", "rss_gib", "disk_read_mb_per_token", "commit", "derived", "error"]
CAP_GIB = 24.0


def ram_cap_gib() -> float | None:
    """The memory limit of this process's cgroup (v2), if one is set: a store on disk is shown
    decoding under a RAM cap that way (the caller makes the cgroup)."""
    try:
        rel = Path("/proc/self/cgroup").read_text().strip().split("::", 1)[1]
        limit = (Path("/sys/fs/cgroup") / rel.lstrip("/") / "memory.max").read_text().strip()
    except (OSError, IndexError):
        return None
    return None if limit == "max" else int(limit) / 2**30


def tokens(text: str) -> int:
    text = text.strip().upper()
    return int(float(text[:-1]) * 1024) if text.endswith("K") else int(text)


def prompt(n: int, vocab: int, device) -> torch.Tensor:
    return torch.randint(0, vocab, (n,), generator=torch.Generator().manual_seed(0)).to(device)


def kvretrieve_row(decoder: Decoder, context: int, kind: str | None, steps: int, chunk: int,
                   kernels: int = 0, cap_gib: float = CAP_GIB) -> dict:
    """One kvretrieve row; kind None is the dense backend (no cap), "auto" the default index (the row
    names the kind it chose and says default=True); "lowrank@4": reselect_every=4,
    "lowrank+spec": speculative prefetch, "lowrank+int8" / "lowrank+model": the int8 / model-dtype CPU
    store (default: auto, int8 on the GPU). kernels > 0: that many more steps under the profiler."""
    kind, *flags = (kind or "").split("+")
    kind, _, every = kind.partition("@")
    kind, *options = kind.split(":")  # KIND:key=N (bench/common.py CONFIG_OPTIONS)
    kind = kind or None
    dev = decoder.device
    torch.cuda.set_per_process_memory_fraction(1.0 if kind is None else
                                               cap_gib * 2**30 / torch.cuda.get_device_properties(dev).total_memory)
    reset_memory(dev)
    row = {"system": "kvretrieve" if kind else "kvretrieve-dense", "index": kind, "default": kind == "auto" or None,
           "options": ":".join(options) or None, "context": context, "gpu_cap_gib": cap_gib if kind else None}
    extra = ({"reselect_every": int(every)} if every else {}) | ({"speculative": True} if "spec" in flags else {}) \
        | ({"store_dtype": "int8"} if "int8" in flags else {}) | ({"store_dtype": "model"} if "model" in flags else {}) \
        | config_fields(options, f"--kinds {kind}")
    engine = None
    try:
        cfg = RetrievalConfig(index=kind, **extra) if kind else None
        bs = (cfg.block_size or 16) if cfg else 16  # capacity's slack: 16 is the largest block auto picks
        t = time.perf_counter()
        # as kvretrieve.load leaves it: every "auto" resolved, warmed up (compiles, cuDNN plans) while
        # the store pins
        engine, choice = build_engine(decoder, capacity_for(context, steps + kernels + 3, bs), chunk, cfg)
        chosen = choice.retrieval
        if cfg:
            row["index"] = chosen.index if chosen else "dense"  # auto: dense while the whole KV fits
            if chosen:
                engine.backend.store.join()
        row["reselect_every"] = chosen.reselect_every if chosen else None
        row["speculative"] = chosen.speculative if chosen else None
        row["store_dtype"] = chosen.store_dtype if chosen else None
        row["store"] = chosen.store if chosen else None
        row["ram_cap_gib"] = ram_cap_gib()
        row["ready_s"] = time.perf_counter() - t
        r = profile_context(engine, prompt(context, decoder.cfg.vocab_size, dev), steps,
                            chosen.block_size if chosen else 16)
        row.update({k: r.get(k) for k in COLUMNS if k in r}, index_build_s=r.get("index_build_s"),
                   graphs=len(engine._captured), step_ms=r.get("step_ms"), attention=choice.reason)
        if kernels:
            try:
                token = torch.zeros((), dtype=torch.long, device=dev)
                engine.step(token)
                row["kernels"] = kernel_times(lambda: engine.step(token), kernels)
            except Exception as e:  # noqa: BLE001 - the profile is extra; the timed row stands without it
                row["kernels_error"] = f"{type(e).__name__}: {e}"[:200]
    except (torch.OutOfMemoryError, RuntimeError, ValueError, KVRetrieveError) as e:
        row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"
    del engine
    reset_memory(dev)
    return row


def add_ratios(rows: list[dict]) -> None:
    """x_hf_*: how many times faster than that hf row of the same context and the same run (commit):
    the hf row's median over this row's mean (a selection that serves two steps makes kvretrieve's
    step times bimodal, so its median says little; transformers' steps are alike). transformers'
    eager decode is bound by the host CPU, which differs between lent machines, so a row whose run's
    hf rows were replaced by a later run's keeps the ratio measured in its own run."""
    for r in rows:
        mine = r.get("decode_ms_mean") or r.get("decode_ms_p50")
        for name in ("hf-dense", "hf-offload"):
            ref = next((h for h in rows if h["system"] == name and h["context"] == r["context"]
                        and h.get("commit") == r.get("commit") and h.get("decode_ms_p50")), None)
            if ref and mine:
                r["x_" + name.replace("-", "_")] = ref["decode_ms_p50"] / mine


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--contexts", default="32K,128K")
    ap.add_argument("--kinds", default="auto,lowrank,bounds,exact,ivf",
                    help="kvretrieve index kinds (auto = the default: dense while the whole KV fits under the cap, "
                         "else lowrank, or ivf where lowrank's sketches do not fit); kind@N sets reselect_every=N, "
                         "kind+spec speculative prefetch, kind+int8 the int8 CPU store, kind:block=8:rest=1 "
                         "RetrievalConfig fields (bench/common.py CONFIG_OPTIONS)")
    ap.add_argument("--long", default="512K:auto:lowrank:bounds:exact",
                    help="a longer context for kvretrieve rows only, with kinds (at 512K only auto's choice, ivf, fits "
                         "24 GiB; the other kinds' rows say why they do not)")
    ap.add_argument("--systems", default="kvretrieve,kvretrieve-dense,hf-dense,hf-offload")
    ap.add_argument("--cap-gib", type=float, default=CAP_GIB, help="GPU memory cap of kvretrieve rows (an emulated card)")
    ap.add_argument("--weights", default="dense", choices=["dense", "int8", "int4"],
                    help="kvretrieve rows' weight matrices: bf16, or kept quantized (issue 18)")
    ap.add_argument("--steps", type=int, default=32, help="timed decode steps (kvretrieve; hf-offload takes 6)")
    ap.add_argument("--chunk", type=int, default=4096, help="prefill chunk")
    ap.add_argument("--kernels", type=int, default=0,
                    help="profile this many more steps of each kvretrieve row: GPU time by kernel in the JSON")
    ap.add_argument("--merge", action="store_true", help="add to the rows already in the results file")
    add_provenance_args(ap)
    ap.add_argument("--rewrite", action="store_true", help="only rewrite the table of the results file")
    ap.add_argument("--out", default=os.environ.get("OUT", str(RESULTS)))
    args = ap.parse_args()
    if args.rewrite:
        data = json.loads((Path(args.out) / "decode.json").read_text())
        rows = data.pop("rows")
        add_ratios(rows)
        write_results("decode", data, rows, COLUMNS, NOTES, Path(args.out))
        return
    dev = torch.device("cuda")
    systems = args.systems.split(",")
    if args.kernels and any(s.startswith("hf") for s in systems):
        raise SystemExit("error: --kernels slows everything timed after it in the process (the profiler stays "
                         "attached): time the hf systems in a run without --kernels")
    contexts = [tokens(c) for c in args.contexts.split(",") if c]
    kinds = args.kinds.split(",")
    out = Path(args.out)
    meta = provenance("cuda", args.allow_dirty)
    old, before = [], None
    if args.merge and (out / "decode.json").exists():
        before = json.loads((out / "decode.json").read_text())
        old = before.pop("rows")
    rows: list[dict] = []

    def save():
        def key(r):
            return (r["system"], r["index"] or "", r.get("options") or "", bool(r.get("default")), r.get("reselect_every") or 0,
                    bool(r.get("speculative")),
                    r.get("store_dtype") or "model", r.get("weights") or "dense", r.get("gpu_cap_gib") or 0, r["context"])

        merged = [r for r in old if not any(key(r) == key(n) for n in rows)] + stamp(rows, meta)
        merged.sort(key=lambda r: (r["context"], *key(r)))
        add_ratios(merged)
        write_results("decode", keep_runs(before, meta, merged), merged, COLUMNS, NOTES, out)
        print(markdown_table(merged, COLUMNS), flush=True)

    t0 = time.time()
    if "kvretrieve" in systems or "kvretrieve-dense" in systems:
        cfg = shape_config("llama3-8b")
        decoder = Decoder(cfg, random_weights(cfg, dev, torch.bfloat16, 0, args.weights))
        plan = [(n, k) for n in contexts for k in kinds] if "kvretrieve" in systems else []
        if args.long and "kvretrieve" in systems:
            n, *long_kinds = args.long.split(":")
            plan += [(tokens(n), k) for k in long_kinds]
        plan += [(n, None) for n in contexts] if "kvretrieve-dense" in systems else []
        for n, kind in plan:
            rows.append(kvretrieve_row(decoder, n, kind, args.steps, args.chunk, 0, args.cap_gib)
                        | {"commit": meta["commit"], "weights": args.weights})
            print(f"[{time.time() - t0:4.0f} s] {rows[-1]}", flush=True)
            save()
        # Kernel tables only once every row is timed: the profiler leaves CUPTI attached after it ends
        # and what runs later in the process is slower (pytorch/pytorch#144455; batch_decode_15b_32k_s34*.md).
        for row, (n, kind) in zip(rows if args.kernels else [], plan):
            got = kvretrieve_row(decoder, n, kind, args.steps, args.chunk, args.kernels, args.cap_gib)
            row.update({k: got[k] for k in ("kernels", "kernels_error") if k in got})
            save()
        del decoder
        reset_memory(dev)
    torch.cuda.set_per_process_memory_fraction(1.0)
    hf = [s for s in ("hf-dense", "hf-offload") if s in systems]
    if hf:
        from decode_hf import LLAMA31_8B, build_hf_model, hf_row

        model = build_hf_model(LLAMA31_8B, dev)
        for n in contexts:
            for s in hf:
                r = hf_row(model, n, offload=s == "hf-offload", steps=6 if s == "hf-offload" else args.steps)
                r.pop("tokens", None)
                rows.append(r | {"commit": meta["commit"]})
                print(f"[{time.time() - t0:4.0f} s] {r}", flush=True)
                save()
        del model
        gc.collect()
    save()


NOTES = """Llama-3.1-8B shape, random bf16 weights, random token ids, greedy decode; decode ms per token
as median (p50), p90 and mean over the timed steps of the engine's generation loop as LLM.stream
runs it (Engine.decode: each token read back to the host, the next step launched before the read). The default selects every step (reselect_every = 1); with reselect_every = 2 or 4
only one step in 2 or 4 selects, looks up and copies while the others only attend, so those rows'
step times are bimodal: their mean is the figure to read. kvretrieve rows run under set_per_process_memory_fraction(24 GiB); kvretrieve-dense
and hf rows have the whole 80 GB card. x_hf_*: speed-up over that transformers row of the same
context and run (the hf row's p50 over this row's mean; commit names the run). h2d_mb_per_token for hf-offload is computed from the cache size (its
offloaded cache brings every layer's K,V up each step), not measured. With random weights the
queries of successive tokens are nearly unrelated, so cache hits and H2D traffic are pessimistic
next to real weights. ready_s: from making the backend to ready for a prompt, as kvretrieve.load
leaves it: the CPU store pinned (on a thread; ~1-2 GiB/s of fresh pinned memory on this host, later
rows reuse what torch's host allocator keeps) and Engine.warm_up (one-time compiles and cuDNN plans,
on a throwaway 20K-token prompt), which overlap. store_dtype: the CPU store's (the default, auto, is int8 on the GPU). default:
the row ran with the default configuration, auto (since the redesign: dense attention while the whole KV cache
fits under the cap next to the weights, else lowrank while its key sketches fit in half the device memory
left, else ivf); index names what it chose ("dense" included). At 512K only ivf fits beside 15 GiB of weights
under the cap: lowrank's sketches (8 GiB), bounds' min/max keys (4 GiB) and exact's keys (32 GiB)
leave no room for the prefill's working set (a layer's keys and values so far); their rows say so."""


if __name__ == "__main__":
    main()
