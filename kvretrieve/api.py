"""kvretrieve.load(): resolve device and dtype, load weights and tokenizer, pick the attention backend."""
from __future__ import annotations

from pathlib import Path

import torch

from .config import RetrievalConfig, RuntimeConfig
from .errors import ConfigError, ResourceError
from .llm import LLM
from .models.llama import Decoder, ModelConfig
from .models.loader import load_model
from .models.shapes import weight_bytes
from .runtime.dense import DenseKV
from .runtime.memory import GiB, apply_gpu_cap, check_allocation
from .runtime.retrieval import RetrievalKV

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"--device {name!r} is not a device; use auto, cpu, cuda or cuda:N") from None
    if device.type not in ("cpu", "cuda"):
        raise ConfigError(f"--device {name}: kvretrieve runs on cpu or cuda; use auto, cpu, cuda or cuda:N")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ResourceError(f"--device {name} asked for a GPU but torch sees none (torch {torch.__version__}, "
                                f"CUDA build: {torch.version.cuda is not None}); use --device cpu")
        if (device.index or 0) >= torch.cuda.device_count():
            raise ResourceError(f"--device {name}: this machine has {torch.cuda.device_count()} GPU(s)")
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


def load(model: str | Path | None = None, *, device: str = "auto", dtype: str = "auto",
         max_context: int | None = None, retrieval: RetrievalConfig | None = None,
         runtime: RuntimeConfig | None = None, log=None, **runtime_fields) -> LLM:
    """Load a model for generation.

    model: an HF checkpoint directory, a .gguf file, or None for the default (SmolLM2-135M-Instruct).
    device / dtype / max_context (and any other RuntimeConfig field, or a whole `runtime=`) say where
    and how it runs; retrieval=RetrievalConfig(...) keeps the KV cache in CPU memory.
    log: a callable that receives one-line progress messages (e.g. the one-time GGUF conversion).
    """
    if runtime is None:
        runtime = RuntimeConfig(device=device, dtype=dtype, max_context=max_context, **runtime_fields)
    dev = resolve_device(runtime.device)
    if runtime.gpu_mem_gb is not None and dev.type == "cuda":
        apply_gpu_cap(dev, runtime.gpu_mem_gb)
    dtype = resolve_dtype(runtime.dtype, dev)

    def check(cfg: ModelConfig) -> None:  # before any weight is read
        kv_tokens = 0 if retrieval is not None else runtime.max_context or cfg.max_position
        check_weights_fit(cfg, dev, dtype, runtime.gpu_mem_gb, kv_tokens)

    decoder, tokenizer, source = load_model(model, dev, dtype, log, check=check)
    backend = make_backend(decoder, runtime.max_context or decoder.cfg.max_position, retrieval)
    llm = LLM(decoder, tokenizer, backend, runtime, retrieval, source)
    llm.engine.warm_up()  # on CUDA: compiles and plans now (while the store pins), not in the first prompt
    return llm


def check_weights_fit(cfg: ModelConfig, device: torch.device, dtype: torch.dtype, gpu_mem_gb: float | None,
                      kv_tokens: int = 0, context_option: str = "--max-context") -> None:
    """Refuse before reading any weight when the weights (plus a dense KV cache of kv_tokens tokens on
    the same device) cannot fit: over the GPU memory cap, or over the free CPU RAM."""
    nbytes = torch.finfo(dtype).bits // 8
    need = weight_bytes(cfg, nbytes)
    kv = 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * kv_tokens * nbytes
    if device.type == "cuda":
        if gpu_mem_gb is None:
            return
        if need > gpu_mem_gb * GiB:
            raise ResourceError(f"the weights alone need {need / GiB:.1f} GiB, more than --gpu-mem-gb {gpu_mem_gb}; "
                                "raise the cap or use a smaller model")
        if need + kv > gpu_mem_gb * GiB:
            raise ResourceError(f"the weights ({need / GiB:.1f} GiB) and the dense KV cache of {kv_tokens:,} tokens "
                                f"({kv / GiB:.1f} GiB) need more than --gpu-mem-gb {gpu_mem_gb}; lower "
                                f"{context_option}, or use --retrieval to keep the KV cache in CPU memory")
        return
    what = f"the weights ({need / GiB:.2f} GiB)" + (f" and the KV cache of {kv_tokens:,} tokens ({kv / GiB:.2f} GiB)"
                                                     if kv else "")
    fixes = [f"lower {context_option} or use --retrieval"] if kv else []
    fixes.append("use a smaller model" + (" or --dtype bfloat16" if nbytes == 4 else ""))
    fix = ", ".join(fixes) + (", or set KVRETRIEVE_FREE_RAM_GB if this host reports less free memory than it can "
                              "hand out")
    check_allocation(need + kv, device, what, fix)


def make_backend(decoder: Decoder, capacity: int, retrieval: RetrievalConfig | None):
    """The attention backend: a dense preallocated cache, or retrieval over a CPU-resident cache."""
    cfg = decoder.cfg
    if retrieval is not None:
        return RetrievalKV(retrieval, decoder, capacity)
    return DenseKV(cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, capacity, decoder.device, decoder.dtype)
