"""kvretrieve.load(): resolve device and dtype, load weights and tokenizer, pick the attention backend."""
from __future__ import annotations

from pathlib import Path

import torch

from .config import RetrievalConfig, RuntimeConfig
from .errors import ResourceError
from .llm import LLM
from .models.llama import Decoder, ModelConfig
from .models.loader import load_model
from .models.shapes import weight_bytes
from .runtime.dense import DenseKV
from .runtime.memory import GiB, apply_gpu_cap
from .runtime.retrieval import RetrievalKV

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
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
    decoder, tokenizer, source = load_model(model, dev, dtype, log,
                                            check=lambda cfg: check_weights_fit(cfg, dev, dtype, runtime.gpu_mem_gb))
    backend = make_backend(decoder, runtime.max_context or decoder.cfg.max_position, retrieval)
    return LLM(decoder, tokenizer, backend, runtime, retrieval, source)


def check_weights_fit(cfg: ModelConfig, device: torch.device, dtype: torch.dtype, gpu_mem_gb: float | None) -> None:
    """Refuse before reading any weight when the weights alone exceed the GPU memory cap."""
    if device.type != "cuda" or gpu_mem_gb is None:
        return
    need = weight_bytes(cfg, torch.finfo(dtype).bits // 8)
    if need > gpu_mem_gb * GiB:
        raise ResourceError(f"the weights alone need {need / GiB:.1f} GiB, more than --gpu-mem-gb {gpu_mem_gb}; "
                            "raise the cap or use a smaller model")


def make_backend(decoder: Decoder, capacity: int, retrieval: RetrievalConfig | None):
    """The attention backend: a dense preallocated cache, or retrieval over a CPU-resident cache."""
    cfg = decoder.cfg
    if retrieval is not None:
        return RetrievalKV(retrieval, decoder, capacity)
    return DenseKV(cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, capacity, decoder.device, decoder.dtype)
