"""Hugging Face transformers baseline rows for bench/decode.py: a LlamaForCausalLM with random weights,
greedy decode with the KV cache on the GPU (hf-dense) or offloaded to host memory by transformers'
own DynamicCache(offloading=True) (hf-offload).

Same method as /work/shared/anchors/hf_anchor.py (the reference figures), so its numbers can be
re-measured in the same run as kvretrieve's: chunked prefill of random token ids, then one forward per
token with a device sync around each, the first decode step a warm-up.

    from decode_hf import build_hf_model, hf_row
    model = build_hf_model(LLAMA31_8B, "cuda")
    row = hf_row(model, 131072, offload=True, steps=4)
"""
from __future__ import annotations

import gc
import math
import time

import torch
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM

LLAMA31_8B = dict(layers=32, hidden=4096, heads=32, kv_heads=8, head_dim=128, ffn=14336, vocab=128256)

# Llama 3.1's rope: theta 500K with the llama3 long-context frequency scaling, as in the anchor.
# Passed the pre-v5 way (rope_scaling + rope_theta): every transformers 5.x folds these into
# config.rope_parameters (checked in build_hf_model), and older releases read them directly.
ROPE_THETA = 500000.0
ROPE_SCALING = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                "original_max_position_embeddings": 8192}


def build_hf_model(shape: dict, device, dtype=torch.bfloat16, seed: int = 0) -> LlamaForCausalLM:
    """transformers LlamaForCausalLM in `shape` (keys of LLAMA31_8B) with random weights, SDPA attention."""
    cfg = LlamaConfig(hidden_size=shape["hidden"], intermediate_size=shape["ffn"],
                      num_hidden_layers=shape["layers"], num_attention_heads=shape["heads"],
                      num_key_value_heads=shape["kv_heads"], head_dim=shape["head_dim"], vocab_size=shape["vocab"],
                      max_position_embeddings=131072, rope_theta=ROPE_THETA, rope_scaling=dict(ROPE_SCALING),
                      initializer_range=0.02, tie_word_embeddings=False)
    cfg._attn_implementation = "sdpa"
    rope = getattr(cfg, "rope_parameters", None) or {}
    assert rope.get("rope_type", "llama3") == "llama3", f"llama3 rope scaling lost: {rope}"
    torch.manual_seed(seed)
    # Build in place on the device and in the target dtype: constructing in fp32 and casting after would
    # hold 32 GB of fp32 weights for the 8B shape, and building on the CPU then moving would take minutes.
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = LlamaForCausalLM(cfg)
    finally:
        torch.set_default_dtype(old)
    return model.to(dtype).eval()  # .to: a no-op for weights; casts any buffer made in fp32, as the anchor does


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _free() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _make_cache(config, offload: bool):
    # transformers >= 4.56 takes DynamicCache(config=..., offloading=...); older ones have no config
    # argument and offload through the separate OffloadedCache class (the anchor's fallback).
    try:
        return DynamicCache(config=config, offloading=offload)
    except TypeError:
        if not offload:
            return DynamicCache()
        from transformers import OffloadedCache
        return OffloadedCache()


def _percentile(sorted_vals: list[float], p: float) -> float:
    """Nearest-rank percentile: the smallest value with at least p% of the values at or below it."""
    return sorted_vals[max(0, math.ceil(p / 100 * len(sorted_vals)) - 1)]


@torch.inference_mode()
def _measure(model, context: int, offload: bool, steps: int, chunk: int, seed: int) -> dict:
    device = model.device
    cache = _make_cache(model.config, offload)
    # Token ids drawn on the CPU from a seeded generator: the same prompt on any device, so the dense and
    # offloaded rows decode the same sequence and their tokens can be compared.
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, model.config.vocab_size, (1, context), generator=gen).to(device)
    _sync(device)
    t0 = time.perf_counter()
    for s in range(0, context, chunk):
        # logits_to_keep=1: only the last position's logits; full-vocab logits for a 16K chunk are 4 GB.
        out = model(input_ids=ids[:, s:s + chunk], past_key_values=cache, use_cache=True, logits_to_keep=1)
    _sync(device)
    prefill_s = time.perf_counter() - t0
    tok = out.logits[:, -1:].argmax(-1)
    tokens, times = [int(tok)], []
    for _ in range(steps):
        _sync(device)
        t0 = time.perf_counter()
        out = model(input_ids=tok, past_key_values=cache, use_cache=True)
        tok = out.logits[:, -1:].argmax(-1)
        _sync(device)  # the argmax is the next input, so a real generate loop waits for it too
        times.append(time.perf_counter() - t0)
        tokens.append(int(tok))
    # The first step pays one-off costs (allocator growth, kernel selection): drop it when enough remain.
    timed = sorted(times[1:] if steps > 2 else times)
    return {"prefill_s": prefill_s, "decode_ms_p50": 1e3 * _percentile(timed, 50),
            "decode_ms_p90": 1e3 * _percentile(timed, 90), "steps": len(timed), "tokens": tokens}


def hf_row(model, context: int, offload: bool, steps: int, chunk: int = 16384, seed: int = 0) -> dict:
    """One benchmark row: prefill `context` random ids in chunks of `chunk`, greedy-decode `steps` tokens.
    An OOM (or other runtime error) gives a row with `error` set and the numbers None, not an exception."""
    cfg = model.config
    device = model.device
    on_cuda = device.type == "cuda"
    row = {"system": "hf-offload" if offload else "hf-dense", "index": None, "context": context,
           "prefill_s": None, "decode_ms_p50": None, "decode_ms_p90": None, "peak_gpu_gib": None,
           "gpu_cap_gib": None, "pinned_host_gib": None, "h2d_mb_per_token": None, "cache_hit": None,
           "steps": None, "error": None, "tokens": None}
    _free()
    if on_cuda:
        torch.cuda.reset_peak_memory_stats(device)
    try:
        row.update(_measure(model, context, offload, steps, chunk, seed))
    except (torch.OutOfMemoryError, RuntimeError) as e:
        row["error"] = f"{type(e).__name__}: {str(e).strip().splitlines()[0][:200]}"
    # Freed outside the except block: by now the traceback, whose frames hold the cache, is gone.
    _free()
    if row["error"] is None:
        row["peak_gpu_gib"] = torch.cuda.max_memory_allocated(device) / 2**30 if on_cuda else None
        # The whole prompt's K and V: 2 tensors x layers x kv_heads x head_dim x context elements.
        kv_bytes = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * cfg.head_dim * context * model.dtype.itemsize
        # Offloaded, all of it lives in host memory (pinned: torch allocates the destination of a
        # non_blocking CUDA->CPU .to() in pinned memory) except the one or two layers being used.
        row["pinned_host_gib"] = kv_bytes / 2**30 if offload else 0.0
        # Computed from the cache size, not measured: each decode step transformers prefetches every layer's
        # whole K,V to the GPU once (and copies the grown K,V back to the host after the layer's update).
        row["h2d_mb_per_token"] = kv_bytes / 1e6 if offload else 0.0
        row["derived"] = "h2d_mb_per_token: computed from the cache size, not measured" if offload else None
    return row


if __name__ == "__main__":  # CPU smoke run on a tiny shape
    tiny = dict(layers=2, hidden=64, heads=4, kv_heads=2, head_dim=16, ffn=128, vocab=256)
    m = build_hf_model(tiny, "cpu", dtype=torch.float32)
    print(hf_row(m, 256, offload=False, steps=4, chunk=64))
