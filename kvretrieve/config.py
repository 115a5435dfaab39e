"""Configuration as data: one frozen dataclass per concern, validated once on construction."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .errors import ConfigError

INDEX_KINDS = ("auto", "lowrank", "bounds", "exact", "ivf", "oracle")
DTYPES = ("auto", "float32", "float16", "bfloat16")
WEIGHTS = ("auto", "dense", "int8", "int4")


def _check(ok: bool, msg: str) -> None:
    if not ok:
        raise ConfigError(msg)


_TYPES = {"int": (int,), "float": (int, float), "bool": (bool,), "str": (str,)}


def _check_types(obj, prefix: str = "") -> None:
    """Every field of a config dataclass holds its annotated type (None where the annotation allows
    it; an int where a float is asked; never a bool for a number): a string where a number belongs
    would otherwise fail later inside a comparison, far from the value that caused it."""
    for name in obj.__dataclass_fields__:
        kinds = [k.strip() for k in obj.__dataclass_fields__[name].type.split("|")]
        value = getattr(obj, name)
        if value is None and "None" in kinds:
            continue
        allowed = tuple(t for k in kinds if k != "None" for t in _TYPES.get(k, (object,)))
        _check(isinstance(value, allowed) and (bool in allowed or not isinstance(value, bool)),
               f"{prefix}{name} must be {' or '.join(kinds)}, got {value!r}")


def _power_of_two(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


# Below this temperature sampling is greedy (argmax, as at 0), as in vLLM (its _SAMPLING_EPS): the
# limit of softmax(logits / T) as T -> 0 is the argmax, while dividing by such a T in float32
# overflows (1e-300 is 0 in float32) and turns every probability into NaN.
GREEDY_BELOW = 1e-5
SEED_MAX = 2**64 - 1  # torch.Generator.manual_seed takes 64-bit seeds


@dataclass(slots=True, frozen=True)
class SamplingParams:
    """How tokens are drawn. temperature 0 (or below GREEDY_BELOW) means greedy; top_k 0 and
    top_p 1.0 mean no cut. repeat_penalty (1.0 = off) divides the positive logits and multiplies
    the negative ones of every token among the last repeat_last_n of the context (prompt included),
    as llama.cpp's repeat_penalty and transformers' repetition_penalty do."""

    max_new_tokens: int = 256
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    repeat_penalty: float = 1.0
    repeat_last_n: int = 64

    def __post_init__(self) -> None:
        _check_types(self)
        _check(self.max_new_tokens >= 0, f"max_new_tokens must be >= 0, got {self.max_new_tokens}")
        _check(0 <= self.temperature < float("inf"),
               f"temperature must be >= 0 (0 = greedy) and finite, got {self.temperature}")
        _check(self.top_k >= 0, f"top_k must be >= 0 (0 = off), got {self.top_k}")
        _check(0 < self.top_p <= 1, f"top_p must be in (0, 1], got {self.top_p}")
        _check(self.seed is None or (isinstance(self.seed, int) and 0 <= self.seed <= SEED_MAX),
               f"seed must be an integer from 0 to 2**64 - 1 ({SEED_MAX}), got {self.seed}")
        _check(0 < self.repeat_penalty < float("inf"),
               f"repeat_penalty must be > 0 and finite (1.0 = off, 1.1 is usual), got {self.repeat_penalty}")
        _check(self.repeat_last_n >= 0, f"repeat_last_n must be >= 0 tokens (0 = off), got {self.repeat_last_n}")
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        _check(all(isinstance(s, str) and s for s in self.stop), "stop strings must be non-empty strings")

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_BELOW

    @property
    def penalized(self) -> bool:
        return self.repeat_penalty != 1.0 and self.repeat_last_n > 0


# The longest context: RoPE turns positions into float32 (models/rope.py), exact up to 2**24; past it
# neighbouring tokens would share a rotation. It also bounds the tables the store sizes by its capacity.
MAX_CONTEXT = 2**24


@dataclass(slots=True, frozen=True)
class RuntimeConfig:
    """Where and how the model runs.

    max_context: KV capacity in tokens, at most MAX_CONTEXT (None = the model's own maximum, capped by
      what fits and by MAX_CONTEXT).
    prefill_chunk: tokens per projection/MLP chunk during prefill; bounds activation memory.
    gpu_mem_gb: cap on the GPU memory this process may use (emulates a smaller card).
    weights: how the projection weights are kept (models/quant_load.py): dense (the model dtype); int8
      (per output channel, round-to-nearest: about half of bf16's bytes); int4 (groups of 128 with a
      min, round-to-nearest: about a quarter); auto: a GGUF file's own Q8_0, Q4_0, Q4_K and Q6_K
      tensors as they are (other kinds dense), and dense for HF checkpoints and random shapes. On CUDA
      quantized weights stay quantized (decode reads a quarter to a half of the bytes); on the CPU they
      are dequantized to the model dtype at load, so the CPU path runs as before with the same
      rounding the GPU sees.
    """

    device: str = "auto"
    dtype: str = "auto"
    max_context: int | None = None
    prefill_chunk: int = 4096
    gpu_mem_gb: float | None = None
    weights: str = "auto"

    def __post_init__(self) -> None:
        _check_types(self)
        _check(self.dtype in DTYPES, f"dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        _check(self.weights in WEIGHTS, f"weights must be one of {', '.join(WEIGHTS)}, got {self.weights!r}")
        kind, colon, index = str(self.device).partition(":")
        _check(self.device == "auto" or (kind in ("cpu", "cuda") and (not colon or index.isdigit())),
               f"device must be auto, cpu, cuda or cuda:N, got {self.device!r}")
        _check(self.max_context is None or 16 <= self.max_context <= MAX_CONTEXT,
               f"max_context must be >= 16 and <= {MAX_CONTEXT:,} tokens (RoPE's float32 positions are exact "
               f"up to 2**24), got {self.max_context}")
        _check(self.prefill_chunk >= 16, f"prefill_chunk must be >= 16, got {self.prefill_chunk}")
        _check(self.gpu_mem_gb is None or self.gpu_mem_gb > 0, f"gpu_mem_gb must be > 0, got {self.gpu_mem_gb}")


# The automatic budget (bench/results/accuracy.md, README "How it works"): attend to a quarter of
# the context but at least 1,024 tokens, the smallest density that met every accuracy target at
# 2K-8K; a quarter of those tokens is the recent window; retrieval is capped at 2,048 tokens per KV
# head (and the window at 512), which keeps long-context decode fast. Beyond 8K tokens the cap is a
# speed choice that the default model (trained for 8K) cannot test.
AUTO_DENSITY, AUTO_MIN_ATTENDED, AUTO_MAX_BUDGET, AUTO_MAX_WINDOW = 0.25, 1024, 2048, 512
# Below the caps the automatic plan follows the context in steps of AUTO_PLAN_STEP tokens (rounded up,
# so no position attends fewer tokens than when it followed every token): each new
# (window, budget) is a new CUDA graph to capture (~100 ms on an H100), and following every token
# changed the budget a block every 16 tokens with blocks of 4 (the 1.5B at 8K: decode p50 6.8 ms, mean
# 12.5, a 104 ms step every 16; bench/results/profile_15b_h100.md).
AUTO_PLAN_STEP = 1024
# The layout auto gives lowrank up to FINE_MAX_CAPACITY tokens (kvretrieve.resolve): blocks of 4 scored
# by mass, retrieving up to FINE_MAX_BUDGET (1/8 of 32K attended with the window and sinks).
FINE_MAX_CAPACITY, FINE_BLOCK, FINE_MAX_BUDGET, FINE_REST_RANK = 40_960, 4, 3456, 16


@dataclass(slots=True, frozen=True)
class RetrievalConfig:
    """Sparse decode over a CPU-resident KV cache.

    Each decode step attends, per KV head, to sink_tokens + window_tokens + budget_tokens tokens:
    the first tokens, the most recent ones, and the blocks of block_size tokens the index picks.
    budget_tokens / window_tokens None (the default) follow the context: see plan(); an automatic
    budget retrieves at most max_budget_tokens.
    block_size, block_scores and max_budget_tokens left to auto (None, "auto", None) are set by
    kvretrieve.resolve from the capacity: lowrank up to FINE_MAX_CAPACITY (40K) tokens takes blocks of
    4, mass scores and up to 3,456 retrieved (Qwen2.5-Coder-1.5B at 32K: top-1 0.981, KL 0.0033 against
    0.951 / 0.0175, bench/results/longctx_levers2.md); longer contexts keep blocks of 16, Loki's max
    scores and 2,048, which hold 128K of the 8B shape at 10.8 ms/token (blocks of 4: 21.9 ms).
    rest_rank left to auto (None) is 16 in that fine layout: the rest is estimated token by token
    through value sketches (the 0.5B at 8K, 1/8 attended: KL 0.0018 -> 0.00075, the oracle 0.0013;
    bench/results/token_rest_05b_8k_cpu.md), else 0.
    cache_blocks: GPU slots per layer and KV head for retrieved blocks (None = 2x the budget; the pool
      takes at most the context's blocks, which more could not fill).
    index: auto (the default) is dense attention while the whole KV of the context fits on the
    device next to the weights (exact, and faster), else lowrank, the most accurate kind, unless
    its key sketches would take more than half of the memory left on the device (an 8B model on a
    24 GB card beyond ~256K tokens), else ivf, whose index on the device is only its centroids.
    kvretrieve.load() resolves every "auto" here once (kvretrieve.resolve); the backends only ever
    see concrete values.
    """

    index: str = "auto"
    block_size: int | None = None
    budget_tokens: int | None = None
    sink_tokens: int = 16
    window_tokens: int | None = None
    rank: int = 32
    block_scores: str = "auto"    # lowrank: max (Loki's), mass (each block's estimated attention share:
                                  # better, 2x the scoring time at 128K; index/lowrank.py) or auto
    max_budget_tokens: int | None = None  # the most an automatic budget retrieves (None: by the layout)
    cache_blocks: int | None = None
    speculative: bool = False
    reselect_every: int = 1       # decode steps one selection serves (LServe-style reuse, a speed knob)
    kmeans: str = "auto"          # ivf: auto, torch, faiss, faiss-gpu
    estimate_tokens: int = 0      # next-ranked tokens that count through block summaries (RetroInfer's zone)
    estimate_rest: bool | None = None  # every candidate block not attended counts through its summary;
                                       # None: on, except for ivf and beside estimate_tokens (kvretrieve.resolve)
    rest_rank: int | None = None  # lowrank: value sketches of this rank estimate the rest token by token
                                  # (index/summary.py); 0: each left-out block counts at its mean key and
                                  # value; None: by the layout (kvretrieve.resolve.fine_layout)
    cluster_tokens: int = 8192    # ivf: tokens per clustered prefill segment
    store_dtype: str = "auto"     # the CPU store: model (its dtype), int8 (a scale per token and head), auto
    store: str = "auto"           # where the CPU store lives: ram, disk (memory-mapped files), auto (ram
                                  # while the KV cache fits in the free RAM, else disk)
    dense_layers: int = 0         # the first N layers attend densely, their K,V whole on the device
                                  # (DELTA / DuoAttention; backends/split.py)

    def __post_init__(self) -> None:
        _check_types(self, "RetrievalConfig.")
        _check(self.index in INDEX_KINDS,
               f"unknown RetrievalConfig.index {self.index!r}; choose one of {', '.join(INDEX_KINDS)}")
        bs = self.block_size
        _check(bs is None or (_power_of_two(bs) and 4 <= bs <= 256),
               f"block_size must be a power of two in [4, 256] (or None: by the capacity), got {bs}")
        for name in ("budget_tokens", "max_budget_tokens"):
            value = getattr(self, name)
            _check(value is None or value >= (bs or 4),
                   f"{name} ({value}) must be at least one block ({bs or 4} tokens)")
        _check(self.sink_tokens >= 0, f"sink_tokens must be >= 0, got {self.sink_tokens}")
        _check(self.window_tokens is None or self.window_tokens >= 0,
               f"window_tokens must be >= 0, got {self.window_tokens}")
        _check(self.rank >= 1, f"RetrievalConfig.rank must be >= 1, got {self.rank}")
        _check(self.block_scores in ("auto", "mass", "max"),
               f"RetrievalConfig.block_scores must be 'auto', 'mass' or 'max', got {self.block_scores!r}")
        _check(self.reselect_every >= 1, f"reselect_every must be >= 1 (1 = select every step), got {self.reselect_every}")
        _check(self.estimate_tokens >= 0, f"estimate_tokens must be >= 0, got {self.estimate_tokens}")
        _check(self.rest_rank is None or self.rest_rank >= 0,
               f"rest_rank must be >= 0 (0: the rest by block summaries), got {self.rest_rank}")
        _check(not self.rest_rank or (self.estimate_rest is not False and not self.estimate_tokens
                                      and self.index in ("auto", "lowrank")),
               f"rest_rank ({self.rest_rank}) estimates the rest from a lowrank index's key sketches: it needs "
               f"index 'lowrank' (or 'auto'), estimate_rest left on and estimate_tokens 0, got index={self.index!r}, "
               f"estimate_rest={self.estimate_rest}, estimate_tokens={self.estimate_tokens}")
        _check(not (self.estimate_tokens and self.estimate_rest),
               "estimate_tokens and estimate_rest both estimate left-out blocks; choose one")
        _check(bs is None or self.cluster_tokens >= 64 * bs,
               f"cluster_tokens must be at least 64 blocks ({64 * (bs or 0)} tokens), got {self.cluster_tokens}")
        _check(self.store_dtype in ("auto", "model", "int8"),
               f"store_dtype must be 'auto', 'model' or 'int8', got {self.store_dtype!r}")
        _check(self.store in ("auto", "ram", "disk"), f"store must be 'auto', 'ram' or 'disk', got {self.store!r}")
        _check(self.dense_layers >= 0, f"dense_layers must be >= 0 (0: every layer retrieves), got {self.dense_layers}")
        if self.cache_blocks is not None and bs is not None:
            _check(self.cache_blocks >= self.budget_blocks,
                   f"cache_blocks ({self.cache_blocks}) must hold at least the budget ({self.budget_blocks} blocks)")

    @property
    def budget_blocks(self) -> int:
        """The most blocks a step retrieves per KV head (what the GPU pool is sized for)."""
        return (self.budget_tokens if self.budget_tokens is not None else self.auto_budget_cap) // self.block_size

    @property
    def auto_budget_cap(self) -> int:
        return self.max_budget_tokens if self.max_budget_tokens is not None else AUTO_MAX_BUDGET

    @property
    def sink_blocks(self) -> int:
        return -(-self.sink_tokens // self.block_size)

    @property
    def window_blocks(self) -> int:
        """The longest window in blocks (what the ring of recent blocks is sized for)."""
        return -(-(self.window_tokens if self.window_tokens is not None else AUTO_MAX_WINDOW) // self.block_size)

    @property
    def resolved(self) -> bool:
        """True once kvretrieve.resolve has made every "auto" concrete (what backends accept)."""
        return (self.index != "auto" and self.store_dtype != "auto" and self.kmeans != "auto" and self.store != "auto"
                and self.block_size is not None and self.block_scores != "auto" and self.rest_rank is not None)

    def plan(self, context: int) -> tuple[int, int]:
        """(window blocks, budget blocks) for a context of this many tokens. Set values are used as
        they are; None follows the context (rounded up to a multiple of AUTO_PLAN_STEP): attended =
        max(context / 4, 1024) tokens, of which a quarter is window, one block the partly filled tail,
        the sinks, and the rest retrieved (up to max_budget_tokens)."""
        bs = self.block_size
        attended = max(int(-(-context // AUTO_PLAN_STEP) * AUTO_PLAN_STEP * AUTO_DENSITY), AUTO_MIN_ATTENDED)
        window = self.window_tokens
        if window is None:
            window = min(AUTO_MAX_WINDOW, max(bs, attended // 4 // bs * bs))
        budget = self.budget_tokens
        if budget is None:
            budget = min(self.auto_budget_cap, max(bs, attended - self.sink_blocks * bs - window - bs))
        return -(-window // bs), max(1, budget // bs)

    @property
    def slot_blocks(self) -> int:
        return self.cache_blocks if self.cache_blocks is not None else 2 * self.budget_blocks


@dataclass(slots=True, frozen=True)
class KVGeometry:
    """The shape of one sequence's KV cache as every part of the data path sees it: the store, the
    indexes, the block pool and the backends are all sized from this one value.

    max_blocks: blocks of block_size tokens the context can reach (its capacity rounded up, plus
    the partly filled tail block).
    """

    layers: int
    kv_heads: int
    head_dim: int
    block_size: int
    max_blocks: int
    device: torch.device
    dtype: torch.dtype

    @classmethod
    def for_capacity(cls, layers: int, kv_heads: int, head_dim: int, block_size: int, capacity: int,
                     device: torch.device, dtype: torch.dtype) -> "KVGeometry":
        return cls(layers, kv_heads, head_dim, block_size, -(-capacity // block_size) + 1, torch.device(device), dtype)

    @property
    def max_tokens(self) -> int:
        return self.max_blocks * self.block_size

    def nbytes(self, *shape: int, dtype: torch.dtype | None = None) -> int:
        """Bytes of a tensor of this shape in dtype (default: the model's)."""
        return torch.Size(shape).numel() * (dtype or self.dtype).itemsize
