"""`kvretrieve profile`: prefill contexts and decode, for a real model or a named shape with random
weights, and print a llama-bench-like table (or JSON)."""
from __future__ import annotations

import json

import click
import torch

from .cli_options import RETRIEVAL_CHOICES, parse_tokens, set_debug
from .config import RetrievalConfig, RuntimeConfig
from .errors import InputError

COLUMNS = [("model", "model"), ("context", "context"), ("index", "index"), ("budget", "budget"),
           ("prefill_tok_s", "prefill tok/s"), ("ttft_s", "TTFT s"), ("build_share", "build %"), ("decode_ms_p50", "decode ms p50"),
           ("decode_ms_p90", "p90"), ("h2d_mb_per_token", "H2D MB/tok"),
           ("cache_hit", "hit %"), ("spec_hit", "spec hit %"), ("peak_gpu_gib", "peak GPU GiB"),
           ("gpu_cap_gib", "cap GiB"), ("pinned_host_gib", "pinned GiB"), ("rss_gib", "RSS GiB")]


def _fmt(key: str, value) -> str:
    if value is None:
        return "-"
    if key in ("cache_hit", "spec_hit", "build_share"):
        return f"{100 * value:.1f}"
    if isinstance(value, float):
        return f"{value:,.0f}" if value >= 1000 else f"{value:.3g}" if value < 10 else f"{value:.1f}"
    return str(value)


def format_table(rows: list[dict]) -> str:
    cells = [[h for _, h in COLUMNS]] + [[_fmt(k, r.get(k)) for k, _ in COLUMNS] for r in rows]
    widths = [max(len(c[i]) for c in cells) for i in range(len(COLUMNS))]
    lines = ["| " + " | ".join(c.rjust(w) for c, w in zip(row, widths)) + " |" for row in cells]
    lines.insert(1, "|" + "|".join("-" * (w + 1) + ":" for w in widths) + "|")
    return "\n".join(lines)


def _contexts(value: str) -> list[int]:
    out = [parse_tokens(part) for part in value.split(",") if part.strip()]
    if not out or any(n < 16 for n in out):
        raise click.BadParameter("give one or more contexts of at least 16 tokens, e.g. 4K,32K")
    return out


def prompt_ids(tokenizer, n: int, vocab: int, device: torch.device, seed: int) -> torch.Tensor:
    """Real text (CPython's own docs) when a tokenizer exists, else random token ids."""
    if tokenizer is not None:
        import pydoc_data.topics as topics

        ids = tokenizer.encode("\n\n".join(topics.topics.values()))
        ids = (ids * (n // len(ids) + 1))[:n]
        return torch.tensor(ids, device=device)
    return torch.randint(0, vocab, (n,), generator=torch.Generator().manual_seed(seed)).to(device)


@click.command()
@click.option("--model", "model_path", metavar="PATH", help="Real checkpoint (default: the default model).")
@click.option("--shape", default=None, help="Named shape with random weights: llama3-8b, llama3-1b, smollm2-135m.")
@click.option("--context", "contexts", default="4K", show_default=True, callback=lambda c, p, v: _contexts(v),
              help="Comma-separated prompt lengths, e.g. 4K,32K,128K.")
@click.option("--decode-steps", type=int, default=32, show_default=True, help="Tokens decoded per context.")
@click.option("--retrieval", default="auto", show_default=True, type=click.Choice(RETRIEVAL_CHOICES),
              help="Index kind, or off for dense; auto: lowrank, or ivf where lowrank's sketches would not fit.")
@click.option("--budget", default=None, callback=lambda c, p, v: parse_tokens(v),
              help="Retrieved tokens per KV head (default: follows the context, at most 2K).")
@click.option("--block-size", type=int, default=16, show_default=True)
@click.option("--sink", default="16", show_default=True, callback=lambda c, p, v: parse_tokens(v))
@click.option("--window", default=None, callback=lambda c, p, v: parse_tokens(v),
              help="Recent tokens always attended (default: follows the context, at most 512).")
@click.option("--rank", type=int, default=32, show_default=True)
@click.option("--speculative", is_flag=True, help="Speculative next-layer prefetch.")
@click.option("--reselect-every", type=int, default=1, show_default=True, metavar="STEPS",
              help="Decode steps one block selection serves.")
@click.option("--store-dtype", default="auto", show_default=True, type=click.Choice(["auto", "model", "int8"]),
              help="CPU KV store: the model's dtype, or int8 with a scale per token; auto: int8 on a GPU.")
@click.option("--device", default="auto", show_default=True)
@click.option("--dtype", default="auto", show_default=True, type=click.Choice(["auto", "float32", "float16", "bfloat16"]))
@click.option("--gpu-mem-gb", type=float, default=None, help="Cap the GPU memory this process may use (GiB).")
@click.option("--prefill-chunk", type=int, default=4096, show_default=True,
              help="Rows per projection/MLP/attention chunk in prefill (smaller = less memory).")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print JSON rows instead of the table.")
@click.option("--debug", is_flag=True, expose_value=False, is_eager=True, callback=set_debug, help="Show tracebacks.")
def profile(model_path, shape, contexts, decode_steps, retrieval, budget, block_size, sink, window, rank,
            speculative, reselect_every, store_dtype, device, dtype, gpu_mem_gb, prefill_chunk, seed, as_json):
    """Measure prefill and decode speed and memory at several context lengths."""
    from .api import check_weights_fit, make_backend, resolve_device, resolve_dtype
    from .models.loader import load_model, random_weights
    from .models.llama import Decoder
    from .models.shapes import shape_config
    from .runtime.engine import Engine
    from .runtime.memory import apply_gpu_cap
    from .runtime.profile import capacity_for, profile_context, reset_memory

    if model_path and shape:
        raise InputError("pass --model or --shape, not both")
    if decode_steps < 1:
        raise InputError("--decode-steps must be at least 1")
    RuntimeConfig(device=device, dtype=dtype, prefill_chunk=prefill_chunk, gpu_mem_gb=gpu_mem_gb)  # validates them
    kv_tokens = 0 if retrieval != "off" else max(contexts) + decode_steps + 16  # the largest dense cache
    cfg_r = None if retrieval == "off" else RetrievalConfig(
        index=retrieval, budget_tokens=budget, block_size=block_size, sink_tokens=sink, window_tokens=window,
        rank=rank, speculative=speculative, reselect_every=reselect_every, store_dtype=store_dtype)
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    if gpu_mem_gb is not None and dev.type == "cuda":
        apply_gpu_cap(dev, gpu_mem_gb)
    if shape:
        cfg = shape_config(shape)
        check_weights_fit(cfg, dev, dt, gpu_mem_gb, kv_tokens, "--context")
        decoder, tokenizer, name = Decoder(cfg, random_weights(cfg, dev, dt, seed)), None, shape
    else:
        decoder, tokenizer, source = load_model(model_path, dev, dt, log=lambda m: click.echo(m, err=True),
                                                check=lambda c: check_weights_fit(c, dev, dt, gpu_mem_gb, kv_tokens,
                                                                                  "--context"))
        name = source.name
    rows = []
    for n in contexts:
        reset_memory(dev)
        engine = Engine(decoder, make_backend(decoder, capacity_for(n, decode_steps, block_size), cfg_r), prefill_chunk)
        engine.warm_up()  # as kvretrieve.load does: one-time compiles are not part of the prefill
        row = profile_context(engine, prompt_ids(tokenizer, n, decoder.cfg.vocab_size, dev, seed), decode_steps)
        row.update(model=name, index=engine.backend.cfg.index if cfg_r else retrieval, budget=cfg_r.plan(n)[1] * block_size if cfg_r else None,
                   gpu_cap_gib=gpu_mem_gb,
                   device=str(dev), dtype=str(dt).replace("torch.", ""))
        rows.append(row)
        if not as_json:
            click.echo(f"measured {n:,} tokens", err=True)
        del engine
    click.echo(json.dumps(rows, indent=1) if as_json else format_table(rows))
