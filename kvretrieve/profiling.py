"""Measuring a run: timings, cache counters and memory accounting."""
from __future__ import annotations

import gc
import statistics
import time
from contextlib import closing

import torch

from .memory import GiB, process_disk_read_bytes, process_rss_bytes


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_gpu_gib(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / GiB if device.type == "cuda" else None


def capacity_for(context: int, decode_steps: int, block_size: int) -> int:
    """Tokens a backend must hold for profile_context: the prompt, the warm-up and the timed steps."""
    return context + decode_steps + 2 * block_size + 16


def profile_context(engine, ids: torch.Tensor, decode_steps: int, block_size: int = 16) -> dict:
    """Prefill ids, then decode greedily: 2 + block_size warm-up steps, then decode_steps timed ones."""
    device, backend = engine.model.device, engine.backend
    engine.truncate(0)
    sync(device)
    build0 = backend.counters().get("cluster_s", 0.0)
    t0 = time.perf_counter()
    logits = engine.prefill(ids.tolist())
    # The engine's generation loop, as LLM.stream runs it (on CUDA one step ahead of the host).
    # Warm-up steps (kernel compilation, allocator growth) are not measured; they include a step
    # that completes a block (its kernels compile on first use).
    warm = 2 + block_size
    with closing(engine.decode(logits.argmax(), torch.argmax, warm + 1 + decode_steps)) as tokens:
        next(tokens)
        ttft = time.perf_counter() - t0
        build_s = backend.counters().get("cluster_s", 0.0) - build0
        for _ in range(warm):
            next(tokens)
        counters0 = backend.counters()
        next(tokens)  # reading the counters waited for the step launched ahead: that step is not timed
        step_ms, read0 = [], process_disk_read_bytes()
        for _ in range(decode_steps):
            t = time.perf_counter()
            next(tokens)
            step_ms.append(1e3 * (time.perf_counter() - t))
        read1 = process_disk_read_bytes()
    counters = backend.counters()
    delta = {k: counters.get(k, 0) - counters0.get(k, 0) for k in counters}
    lookups = delta.get("hits", 0) + delta.get("misses", 0)
    memory = backend.memory()
    q = statistics.quantiles(step_ms, n=10) if len(step_ms) > 1 else step_ms * 9
    row = {
        "context": len(ids), "prefill_s": ttft, "prefill_tok_s": len(ids) / ttft, "ttft_s": ttft,
        "index_build_s": build_s, "build_share": build_s / ttft,
        "decode_ms_p50": statistics.median(step_ms), "decode_ms_p90": q[8],
        "decode_ms_mean": statistics.fmean(step_ms), "step_ms": [round(t, 3) for t in step_ms],
        "h2d_mb_per_token": delta.get("h2d_bytes", 0) / 1e6 / max(1, decode_steps) if lookups else None,
        "disk_read_mb_per_token": (read1 - read0) / 1e6 / max(1, decode_steps) if read0 is not None else None,
        "cache_hit": delta["hits"] / lookups if lookups else None,
        "spec_hit": delta["spec_hits"] / delta["spec_total"] if delta.get("spec_total") else None,
        "peak_gpu_gib": peak_gpu_gib(device),
        "pinned_host_gib": memory.get("store", 0) / GiB if device.type == "cuda" else 0.0,
        "rss_gib": process_rss_bytes() / GiB,
    }
    return row
