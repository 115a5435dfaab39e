"""kvretrieve.load(): resolve every "auto" once, load weights and tokenizer, build backend and engine."""
from __future__ import annotations

import math
from pathlib import Path

from .backends import AttentionBackend, make_backend
from .config import MAX_CONTEXT, RetrievalConfig, RuntimeConfig
from .engine.engine import Engine
from .llm import LLM
from .memory import apply_gpu_cap
from .models.llama import Decoder, ModelConfig
from .models.loader import load_model, model_source, notice
from .models.quant_load import resolve_weights
from .models.shapes import random_weights, shape_config
from .models.tokenizer import Tokenizer
from .resolve import (AttentionChoice, check_weights_fit, geometry, resolve_attention, resolve_device,
                      resolve_dtype)


def load(model: str | Path | None = None, *, device: str = "auto", dtype: str = "auto",
         max_context: int | None = None, retrieval: RetrievalConfig | None = RetrievalConfig(),
         runtime: RuntimeConfig | None = None, log=None, resume: str | Path | None = None, **runtime_fields) -> LLM:
    """Load a model for generation.

    model: an HF checkpoint directory, a .gguf file, or None for the default (SmolLM2-135M-Instruct).
    device / dtype / max_context (and any other RuntimeConfig field, or a whole `runtime=`) say where
    and how it runs; weights='int8' or 'int4' keeps the weights quantized on a GPU (RuntimeConfig).
    retrieval: how attention runs. The default, RetrievalConfig() (index="auto"), is dense attention
    while the whole KV cache of max_context tokens fits in the device's memory next to the weights
    (exact, and faster), and retrieval from a CPU-resident cache otherwise; RetrievalConfig(index=...)
    with a kind forces retrieval; None forces dense. llm.mode and llm.mode_reason say what was chosen.
    log: a callable that receives one-line progress messages (e.g. the one-time GGUF conversion).
    resume: a prefill saved by llm.save(path) (or `kvretrieve prefill`) to reopen instead of prefilling
    again (LLM.resume: the same model, dtype and retrieval options it was saved with).
    """
    if runtime is None:
        runtime = RuntimeConfig(device=device, dtype=dtype, max_context=max_context, **runtime_fields)
    # Retrieval may keep the KV cache off the device; forced dense, it must fit beside the weights.
    decoder, tokenizer, source = load_decoder(model, runtime, dense_kv=retrieval is None, log=log)
    if runtime.max_context:
        check_trained_length(decoder.cfg, runtime.max_context, log)
    llm = build(decoder, tokenizer, source, runtime.max_context or default_context(decoder.cfg),
                runtime.prefill_chunk, retrieval)
    if resume is not None:
        llm.resume(resume)
    return llm


def default_context(cfg: ModelConfig) -> int:
    """The KV capacity when max_context is not given: the model's maximum, at most MAX_CONTEXT (a config
    may declare more than RoPE's float32 positions can tell apart)."""
    return min(cfg.max_position, MAX_CONTEXT)


def load_decoder(model: str | Path | None, runtime: RuntimeConfig, dense_kv: bool, log=None,
                 shape: str | None = None, seed: int = 0, dense_tokens: int | None = None):
    """Resolve device, dtype and weights (and apply the GPU cap), then read the weights (or make random
    ones of a named shape: kvretrieve profile --shape; int8/int4 quantize them as they are drawn).
    Refuses before reading any weight what cannot fit: the weights (their quantized bytes on CUDA),
    and with dense_kv a dense KV cache of dense_tokens (default: max_context or the model's maximum).
    -> (Decoder, Tokenizer or None, the checkpoint directory or the shape's name)."""
    dev = resolve_device(runtime.device)
    if runtime.gpu_mem_gb is not None and dev.type == "cuda":
        apply_gpu_cap(dev, runtime.gpu_mem_gb)
    dt = resolve_dtype(runtime.dtype, dev)
    weights = resolve_weights(runtime.weights, shape is None and model_source(model).suffix == ".gguf")

    def check(cfg: ModelConfig, weight_bytes: int | None = None) -> None:
        kv_tokens = (dense_tokens or runtime.max_context or default_context(cfg)) if dense_kv else 0
        check_weights_fit(cfg, dev, dt, runtime.gpu_mem_gb, kv_tokens, weights, weight_bytes)

    if shape is not None:
        cfg = shape_config(shape)
        check(cfg)
        return Decoder(cfg, random_weights(cfg, dev, dt, seed, weights)), None, shape
    return load_model(model, dev, dt, log, check=check, weights=weights)


def trained_length(cfg: ModelConfig) -> int | None:
    """The context the checkpoint's RoPE is meant for: max_position_embeddings, or the length its
    scaling extends it to; None for dynamic NTK, which adapts to any length."""
    rope = cfg.rope
    if rope.kind == "dynamic":
        return None
    if rope.kind in ("linear", "yarn", "llama3"):
        return max(cfg.max_position, int(rope.original_max_position * rope.factor))
    return cfg.max_position


def check_trained_length(cfg: ModelConfig, max_context: int, log=None) -> None:
    """A context past the trained length runs, but rotations the model never saw degrade its answers
    the further a token is from the start; say so once, with the config.json change that extends it."""
    trained = trained_length(cfg)
    if trained is None or max_context <= trained:
        return
    rope = cfg.rope
    if rope.kind == "default":
        extend = ('"rope_scaling": {"rope_type": "yarn", "factor": '
                  f'{float(math.ceil(max_context / trained))}, "original_max_position_embeddings": {trained}}}'
                  ' (or rope_type "linear" or "dynamic")')
    else:
        extend = (f"a {rope.kind} rope_scaling factor of {float(math.ceil(max_context / rope.original_max_position))}"
                  f" instead of {rope.factor:g}")
    notice(log, f"max_context={max_context:,} is more than the {trained:,} tokens this model was trained for; "
                f"answers degrade past them unless config.json extends the context through RoPE scaling: {extend}")


def build(decoder: Decoder, tokenizer: Tokenizer | None, source: Path | str, capacity: int, prefill_chunk: int,
          retrieval: RetrievalConfig | None) -> LLM:
    """An LLM over a loaded decoder (what load() does after reading the weights; `kvretrieve profile`
    builds one per context from the same decoder)."""
    engine, choice = build_engine(decoder, capacity, prefill_chunk, retrieval)
    return LLM(decoder, tokenizer, engine, choice, source)


def build_engine(decoder: Decoder, capacity: int, prefill_chunk: int,
                 retrieval: RetrievalConfig | None) -> tuple[Engine, AttentionChoice]:
    """Resolve how attention runs for `capacity` tokens, make the backend and the engine, and warm up
    (on CUDA: compiles and plans now, while the store pins, not in the first prompt)."""
    backend, choice = backend_for(decoder, capacity, retrieval, prefill_chunk)
    engine = Engine(decoder, backend, prefill_chunk)
    engine.warm_up()
    return engine, choice


def backend_for(decoder: Decoder, capacity: int, retrieval: RetrievalConfig | None,
                prefill_chunk: int = 4096) -> tuple[AttentionBackend, AttentionChoice]:
    """The attention backend for `capacity` tokens of this decoder, with every "auto" resolved."""
    choice = resolve_attention(retrieval, decoder.cfg, capacity, decoder.device, decoder.dtype, prefill_chunk)
    block_size = choice.retrieval.block_size if choice.retrieval else 16
    geo = geometry(decoder.cfg, capacity, block_size, decoder.device, decoder.dtype)
    return make_backend(choice.retrieval, geo, capacity), choice
