"""`kvretrieve profile`: prefill contexts and decode, for a real model or a named shape with random
weights, and print a llama-bench-like table (or JSON)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import click

from ..errors import InputError
from .options import parse_tokens, require_stdout, retrieval_from_options, retrieval_options, runtime_options

if TYPE_CHECKING:  # imported when the command runs, so that --help does not wait for torch
    import torch

COLUMNS = [("model", "model"), ("context", "context"), ("index", "index"), ("budget", "budget"),
           ("prefill_tok_s", "prefill tok/s"), ("ttft_s", "TTFT s"), ("build_share", "build %"),
           ("decode_ms_p50", "decode ms p50"),
           ("decode_ms_p90", "p90"), ("decode_ms_mean", "mean"), ("h2d_mb_per_token", "H2D MB/tok"),
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
    from ..config import MAX_CONTEXT

    out = [parse_tokens(part) for part in value.split(",") if part.strip()]
    if not out or any(not 16 <= n <= MAX_CONTEXT for n in out):
        raise click.BadParameter(f"give one or more contexts of 16 to {MAX_CONTEXT:,} tokens, e.g. 4K,32K")
    return out


def prompt_ids(tokenizer, n: int, vocab: int, device: torch.device, seed: int) -> torch.Tensor:
    """Real text (CPython's own docs) when a tokenizer exists, else random token ids. The seed picks
    where in the text the prompt starts (0: its beginning), so that sessions side by side read
    different text and select different blocks, as real users' sessions would."""
    import torch

    if tokenizer is not None:
        import pydoc_data.topics as topics

        ids = tokenizer.encode("\n\n".join(topics.topics.values()))
        start = seed * 7919 % len(ids)  # a prime stride: seeds 0, 1, 2... start far apart
        ids = ids[start:] + ids[:start]
        ids = (ids * (n // len(ids) + 1))[:n]
        return torch.tensor(ids, device=device)
    return torch.randint(0, vocab, (n,), generator=torch.Generator().manual_seed(seed)).to(device)


@click.command()
@click.option("--model", "model_path", metavar="PATH", help="Real checkpoint (default: the default model).")
@click.option("--shape", default=None,
              help="Named shape with random weights instead of a checkpoint: llama3-8b, llama3-1b, smollm2-135m.")
@click.option("--context", "contexts", default="4K", show_default=True, callback=lambda c, p, v: _contexts(v),
              help="Comma-separated prompt lengths, e.g. 4K,32K,128K.")
@click.option("--decode-steps", type=int, default=32, show_default=True, help="Tokens decoded per context.")
@click.option("--seed", type=click.IntRange(0, 2**64 - 1), default=0, show_default=True,
              help="Seed of the random weights and prompt ids (--shape); with --model, where in the real text "
                   "the prompt starts (0: its beginning).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON rows instead of the table.")
@runtime_options(context=False)
@retrieval_options
def profile(model_path, shape, contexts, decode_steps, seed, as_json, **opts):
    """Measure prefill and decode speed and memory at several context lengths."""
    require_stdout()
    from ..api import build, load_decoder
    from ..config import RuntimeConfig
    from ..profiling import capacity_for, profile_context, reset_memory

    if model_path and shape:
        raise InputError("pass --model or --shape, not both")
    if decode_steps < 1:
        raise InputError("--decode-steps must be at least 1")
    runtime = RuntimeConfig(device=opts["device"], dtype=opts["dtype"], prefill_chunk=opts["prefill_chunk"],
                            gpu_mem_gb=opts["gpu_mem_gb"], weights=opts["weights"])
    retrieval = retrieval_from_options(opts)
    room = (retrieval.block_size or 16) if retrieval else 16  # capacity's slack: 16 is the largest block auto picks
    decoder, tokenizer, source = load_decoder(model_path, runtime, dense_kv=retrieval is None,
                                              log=lambda m: click.echo(m, err=True), shape=shape, seed=seed,
                                              dense_tokens=capacity_for(max(contexts), decode_steps, room))
    name, dev, dt = Path(source).name, decoder.device, decoder.dtype
    rows = []
    for n in contexts:
        reset_memory(dev)
        llm = build(decoder, tokenizer, name, capacity_for(n, decode_steps, room), runtime.prefill_chunk,
                    retrieval)
        block_size = llm.retrieval.block_size if llm.retrieval else 16
        row = profile_context(llm.engine, prompt_ids(tokenizer, n, decoder.cfg.vocab_size, dev, seed), decode_steps,
                              block_size)
        chosen = llm.retrieval
        row.update(model=name, index=chosen.index if chosen else "dense",
                   budget=chosen.plan(n)[1] * block_size if chosen else None, gpu_cap_gib=runtime.gpu_mem_gb,
                   device=str(dev), dtype=str(dt).replace("torch.", ""), attention=llm.mode_reason)
        rows.append(row)
        if not as_json:
            click.echo(f"measured {n:,} tokens ({llm.mode_reason})", err=True)
        del llm
    click.echo(json.dumps(rows, indent=1) if as_json else format_table(rows))
