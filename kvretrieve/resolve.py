"""Every "auto" made concrete, once, at the edge (kvretrieve.load and the commands call these); the
data path below only ever sees concrete values: a torch device and dtype, dense attention or a
RetrievalConfig whose index, store dtype and k-means kind are named, and the KV geometry.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import torch

from .config import (AUTO_MAX_BUDGET, FINE_BLOCK, FINE_MAX_BUDGET, FINE_MAX_CAPACITY, FINE_REST_RANK, KVGeometry,
                     RetrievalConfig)
from .errors import ConfigError, ResourceError
from .index.ivf import resolve_kmeans
from .index.lowrank import LowRankIndex
from .index.summary import BlockSummary
from .files import store_dir
from .memory import GiB, check_allocation, check_disk_space, free_bytes, free_host_bytes
from .models.llama import ModelConfig
from .models.shapes import weight_bytes

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
# Share of the free memory an allocation plan may take (the rest: allocator slack, the OS, cuBLAS).
HEADROOM = 0.9
# index="auto" takes lowrank while its sketches fit in this share of the memory left on the device:
# the rest is for the block pool, the ring and prefill's activations (at 128K on a 24 GiB cap, 2 GiB
# of sketches beside 15 GiB of weights peak at 19 GiB).
AUTO_SKETCH_SHARE = 0.5


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"device={name!r} is not a device; use auto, cpu, cuda or cuda:N") from None
    if device.type not in ("cpu", "cuda"):
        raise ConfigError(f"device={name!r}: kvretrieve runs on cpu or cuda; use auto, cpu, cuda or cuda:N")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ResourceError(f"device={name!r} asked for a GPU but torch sees none (torch {torch.__version__}, "
                                f"CUDA build: {torch.version.cuda is not None}); use device='cpu'")
        if (device.index or 0) >= torch.cuda.device_count():
            raise ResourceError(f"device={name!r}: this machine has {torch.cuda.device_count()} GPU(s)")
    return device


def cpu_has_fast_bf16() -> bool:
    """True when the CPU does bf16 arithmetic natively (AVX512-BF16 or AMX); elsewhere torch emulates
    it and bf16 matmuls run several times slower than fp32."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" or cpu_has_fast_bf16() else torch.float32
    return _DTYPES[name]


def geometry(mc: ModelConfig, capacity: int, block_size: int, device: torch.device, dtype: torch.dtype) -> KVGeometry:
    return KVGeometry.for_capacity(mc.num_layers, mc.num_kv_heads, mc.head_dim, block_size, capacity, device, dtype)


def dense_kv_bytes(mc: ModelConfig, tokens: int, dtype: torch.dtype) -> int:
    return 2 * mc.num_layers * mc.num_kv_heads * mc.head_dim * tokens * dtype.itemsize


def prefill_workspace_bytes(mc: ModelConfig, tokens: int, chunk: int, dtype: torch.dtype) -> int:
    """What a prefill of `tokens` holds besides weights and KV cache: the segment's hidden rows and one
    layer's k, v of it, and one chunk's projections and MLP activations."""
    kv_dim, q_dim = mc.num_kv_heads * mc.head_dim, mc.num_heads * mc.head_dim
    per_token = mc.hidden_size + 2 * kv_dim
    per_chunk_row = 2 * mc.hidden_size + q_dim + 2 * kv_dim + 3 * mc.intermediate_size
    return dtype.itemsize * (tokens * per_token + min(chunk, tokens) * per_chunk_row)


def check_weights_fit(mc: ModelConfig, device: torch.device, dtype: torch.dtype, gpu_mem_gb: float | None,
                      kv_tokens: int = 0, weights: str = "dense", weights_bytes: int | None = None) -> None:
    """Refuse before reading any weight when the weights (plus a dense KV cache of kv_tokens tokens on
    the same device) cannot fit: over the GPU memory cap, or over the free CPU RAM.

    weights: the resolved mode (models/quant_load.py); on CUDA the weights take their quantized bytes
    (weights_bytes where the loader counted them: a GGUF file's own kinds), on the CPU the model
    dtype's (quantized weights are dequantized there). Refusals on CUDA name the int8/int4 modes that
    would fit."""
    kv = dense_kv_bytes(mc, kv_tokens, dtype)
    if device.type == "cuda":
        if gpu_mem_gb is None:
            return
        need = weights_bytes if weights_bytes is not None else weight_bytes(mc, dtype.itemsize, weights)
        cap = gpu_mem_gb * GiB
        if need > cap:
            raise ResourceError(f"the weights alone need {need / GiB:.1f} GiB, more than gpu_mem_gb={gpu_mem_gb}; "
                                f"{_smaller_weights(mc, dtype, weights, cap, 0)}raise the cap or use a smaller model")
        if need + kv > cap:
            raise ResourceError(f"the weights ({need / GiB:.1f} GiB) and the dense KV cache of {kv_tokens:,} tokens "
                                f"({kv / GiB:.1f} GiB) need more than gpu_mem_gb={gpu_mem_gb}; "
                                f"{_smaller_weights(mc, dtype, weights, cap, kv)}lower max_context, or use retrieval "
                                "to keep the KV cache in CPU memory")
        return
    need = weight_bytes(mc, dtype.itemsize)
    what = f"the weights ({need / GiB:.2f} GiB)" + (f" and the KV cache of {kv_tokens:,} tokens ({kv / GiB:.2f} GiB)"
                                                     if kv else "")
    fixes = ["lower max_context or use retrieval"] if kv else []
    fixes.append("use a smaller model" + (" or dtype='bfloat16'" if dtype.itemsize == 4 else ""))
    fix = ", ".join(fixes) + (", or set KVRETRIEVE_FREE_RAM_GB if this host reports less free memory than it can "
                              "hand out")
    check_allocation(need + kv, device, what, fix)


def _smaller_weights(mc: ModelConfig, dtype: torch.dtype, weights: str, cap: float, kv: int) -> str:
    """'load with weights='int4' (4.7 GiB), ' for each quantized mode smaller than `weights` whose
    weights and kv bytes fit in cap; '' when none does."""
    modes = {"dense": ("int8", "int4"), "file": ("int8", "int4"), "int8": ("int4",)}.get(weights, ())
    fits = [(m, weight_bytes(mc, dtype.itemsize, m)) for m in modes]
    fits = [f"weights='{m}' ({b / GiB:.1f} GiB)" for m, b in fits if b + kv <= cap]
    return f"load with {' or '.join(fits)}, " if fits else ""


@dataclass(frozen=True)
class AttentionChoice:
    """How a model attends, decided once at load: dense (retrieval None) or a resolved RetrievalConfig,
    and one line that says why (the CLI prints it, chat's /stats shows it, LLM.mode_reason holds it)."""

    retrieval: RetrievalConfig | None
    reason: str

    @property
    def mode(self) -> str:
        return "dense" if self.retrieval is None else "retrieval"


def resolve_attention(retrieval: RetrievalConfig | None, mc: ModelConfig, capacity: int, device: torch.device,
                      dtype: torch.dtype, prefill_chunk: int) -> AttentionChoice:
    """retrieval None forces dense; index "auto" means dense while the whole KV of `capacity` tokens
    (and a prefill's working set) fits in the memory left on the device next to the weights, else
    retrieval with auto's index (measured on the H200, Qwen2.5-Coder-1.5B at 30K: dense 2.1 ms/token,
    retrieval 3.1 ms; the 8B shape at 128K under 24 GiB needs retrieval)."""
    if retrieval is None:
        return AttentionChoice(None, f"dense over {capacity:,} tokens (retrieval off)")
    free = free_bytes(device)
    kv = dense_kv_bytes(mc, capacity, dtype)
    need = kv + prefill_workspace_bytes(mc, capacity, prefill_chunk, dtype)
    where = f"{free / GiB:.1f} GiB free on {device.type}"
    if retrieval.index == "auto" and need <= HEADROOM * free:
        return AttentionChoice(None, f"dense: the KV cache of {capacity:,} tokens ({kv / GiB:.2f} GiB) fits ({where})")
    cfg = resolve_retrieval(retrieval, mc, capacity, device, dtype, free)
    window, budget = cfg.plan(capacity)
    why = (f"the KV cache of {capacity:,} tokens ({kv / GiB:.1f} GiB) does not fit ({where})"
           if retrieval.index == "auto" else f"RetrievalConfig(index={retrieval.index!r})")
    attended = cfg.sink_tokens + (window + budget) * cfg.block_size
    rest = ", the rest estimated" if cfg.estimate_rest else ""
    rest += f" token by token (value sketches of rank {cfg.rest_rank})" if cfg.rest_rank else ""
    scores = " with mass scores" if cfg.index == "lowrank" and cfg.block_scores == "mass" else ""
    where_kept = " on disk" if cfg.store == "disk" else ""
    first = f", the first {cfg.dense_layers} layers dense" if cfg.dense_layers else ""
    return AttentionChoice(cfg, f"retrieval ({cfg.index} index{scores}, {cfg.store_dtype} CPU store{where_kept}, "
                                f"{attended:,} tokens attended per step at {capacity:,}{rest}{first}): {why}")


def resolve_retrieval(cfg: RetrievalConfig, mc: ModelConfig, capacity: int, device: torch.device,
                      dtype: torch.dtype, free: int | None = None) -> RetrievalConfig:
    """cfg with every retrieval "auto" concrete, for a context of `capacity` tokens:
    index: lowrank (the most accurate kind, bench/results/accuracy.md) when its sketches, r/d of the
      keys, fit in AUTO_SKETCH_SHARE of the free device memory; otherwise ivf, which keeps only
      centroids on the device (an 8B model on a 24 GB card: lowrank to ~256K tokens, ivf at 512K);
    store_dtype: int8 on CUDA, where every missed block crosses PCIe and int8 halves those bytes
      (128K, 8B shape: 15.1 -> 12.7 ms/token); the model's dtype on the CPU, where the store is read
      in place and dequantizing would only cost time;
    estimate_rest: on for every kind but ivf (Qwen2.5-Coder-1.5B at 32K, lowrank: KL 0.032 -> 0.018,
      top-1 0.927 -> 0.951, bench/results/longctx_levers.md; ivf gained nothing on the 0.5B at 8K,
      its centroids already rank mixed clusters) and unless estimate_tokens is set; its summaries
      (2 x head_dim values per block and KV head) count in index auto's choice;
    rest_rank: kept for lowrank (auto: see fine_layout, at most head_dim), 0 for other kinds (no key
      sketches to score tokens with) and where the rest is off;
    kmeans: see index.ivf.resolve_kmeans;
    block_size, block_scores, max_budget_tokens: see fine_layout."""
    index = cfg.index
    if index == "auto":
        lowrank = fine_layout(cfg, "lowrank", capacity)
        geo = geometry(mc, capacity, lowrank.block_size, device, dtype)
        mass = lowrank.block_scores == "mass"
        sketch = LowRankIndex.nbytes_for(geo, cfg.rank, mass)
        if cfg.estimate_rest is not False and not cfg.estimate_tokens:
            sketch += BlockSummary.nbytes_for(geo, shared_means=mass, rank=rest_rank(cfg, lowrank, mc))
        free = free_bytes(device) if free is None else free
        index = "lowrank" if sketch <= AUTO_SKETCH_SHARE * free else "ivf"
    store = cfg.store_dtype if cfg.store_dtype != "auto" else "int8" if device.type == "cuda" else "model"
    rest = cfg.estimate_rest if cfg.estimate_rest is not None else index != "ivf" and not cfg.estimate_tokens
    layout = fine_layout(cfg, index, capacity)
    cfg = replace(layout, index=index, store_dtype=store, estimate_rest=rest, kmeans=resolve_kmeans(cfg.kmeans, device),
                  rest_rank=rest_rank(cfg, layout, mc) if index == "lowrank" and rest else 0)
    return replace(cfg, store=resolve_store(cfg, mc, capacity, dtype))


def rest_rank(asked: RetrievalConfig, layout: RetrievalConfig, mc: ModelConfig) -> int:
    """The layout's rest_rank; an automatic one (asked.rest_rank None) at most the model's head_dim,
    while one asked for is kept as it is (a rank above head_dim is then refused by name)."""
    return layout.rest_rank if asked.rest_rank is not None else min(layout.rest_rank, mc.head_dim)


def resolve_store(cfg: RetrievalConfig, mc: ModelConfig, capacity: int, dtype: torch.dtype) -> str:
    """store auto: RAM while the whole store of `capacity` tokens fits in the free RAM, else disk
    (memory-mapped files under KVRETRIEVE_CACHE: what fits stays in RAM, the rest is read as decode
    selects it), where the disk has the room; else RAM, which the store then refuses by name."""
    if cfg.store != "auto":
        return cfg.store
    per_token = mc.head_dim + 4 if cfg.store_dtype == "int8" else mc.head_dim * dtype.itemsize
    need = 2 * mc.num_layers * mc.num_kv_heads * per_token * capacity
    if need <= HEADROOM * free_host_bytes():
        return "ram"
    try:
        check_disk_space(need, store_dir(), "", "")
    except ResourceError:
        return "ram"
    return "disk"



def fine_layout(cfg: RetrievalConfig, index: str, capacity: int) -> RetrievalConfig:
    """cfg with block_size, block_scores and max_budget_tokens concrete. Left to auto, a lowrank index
    over at most FINE_MAX_CAPACITY tokens takes blocks of 4, mass scores and up to 3,456 retrieved: at
    32K (1/8 attended) Qwen2.5-Coder-1.5B's top-1 / KL against dense go from 0.951 / 0.0175 (blocks of
    16, max, 2,048) to 0.981 / 0.0033, above the oracle's 0.979 at the same tokens
    (bench/results/longctx_levers2.md; the 0.5B 0.979 / 0.0020). Beyond, blocks of 16, Loki's max and
    2,048: the 8B shape decodes 128K at 10.8 ms/token that way and at 21.9 ms with the fine layout,
    whose block summaries also take 4x the memory (bench/results/decode_b4mass_h200.md).
    rest_rank left to auto (None) is FINE_REST_RANK in that fine layout where the rest is estimated:
    the rest then counts token by token through value sketches of rank 16 (the 0.5B at 4K, 1/8
    attended: top-1 0.979 -> 0.992, KL 0.0029 -> 0.0009, past the oracle's 0.984 / 0.0020;
    bench/results/token_rest_05b_cpu.md); elsewhere 0."""
    fine = index == "lowrank" and capacity <= FINE_MAX_CAPACITY
    block = cfg.block_size if cfg.block_size is not None else FINE_BLOCK if fine else 16
    scores = cfg.block_scores if cfg.block_scores != "auto" else "mass" if fine else "max"
    cap = (cfg.max_budget_tokens if cfg.max_budget_tokens is not None
           else FINE_MAX_BUDGET if fine and cfg.block_size is None else AUTO_MAX_BUDGET)
    rest_on = cfg.estimate_rest is not False and not cfg.estimate_tokens
    rank = cfg.rest_rank if cfg.rest_rank is not None else FINE_REST_RANK if fine and rest_on else 0
    return replace(cfg, block_size=block, block_scores=scores, max_budget_tokens=cap, rest_rank=rank)
