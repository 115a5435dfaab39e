"""Named model shapes for speed measurements with random weights (speed does not depend on values)."""
from __future__ import annotations

import torch

from ..errors import InputError
from .llama import DecoderWeights, LayerWeights, ModelConfig
from .quant import QUANT_MODES, mode_group, quant_nbytes
from .quant_load import place, quantized
from .rope import RopeConfig

_LLAMA3_ROPE = dict(theta=500000.0, kind="llama3", low_freq_factor=1.0, high_freq_factor=4.0,
                    original_max_position=8192)

SHAPES = {
    "llama3-8b": ModelConfig(arch="llama", vocab_size=128256, hidden_size=4096, intermediate_size=14336,
                             num_layers=32, num_heads=32, num_kv_heads=8, head_dim=128, rms_eps=1e-5,
                             rope=RopeConfig(factor=8.0, **_LLAMA3_ROPE), max_position=131072),
    "llama3-1b": ModelConfig(arch="llama", vocab_size=128256, hidden_size=2048, intermediate_size=8192,
                             num_layers=16, num_heads=32, num_kv_heads=8, head_dim=64, rms_eps=1e-5,
                             rope=RopeConfig(factor=32.0, **_LLAMA3_ROPE), max_position=131072,
                             tie_embeddings=True),
    "smollm2-135m": ModelConfig(arch="llama", vocab_size=49152, hidden_size=576, intermediate_size=1536,
                                num_layers=30, num_heads=9, num_kv_heads=3, head_dim=64, rms_eps=1e-5,
                                rope=RopeConfig(theta=100000.0), max_position=8192, tie_embeddings=True),
}


def shape_config(name: str) -> ModelConfig:
    if name not in SHAPES:
        raise InputError(f"unknown shape {name!r}; choose one of {', '.join(SHAPES)}")
    return SHAPES[name]


def weight_bytes(cfg: ModelConfig, bytes_per_param: int, weights: str = "dense") -> int:
    """Device bytes of the weights: the projections (and an untied lm_head) under `weights` (dense, int8
    or int4: codes, fp16 scales and mins, as quant.quant_nbytes), the embedding and norms dense. The
    8B shape in bf16: 15.0 GiB dense, 8.0 GiB int8, 4.7 GiB int4 (of which 1 GiB is the embedding)."""
    d, D, F = cfg.head_dim, cfg.hidden_size, cfg.intermediate_size

    def proj(n: int, k: int) -> int:
        group = mode_group(weights, k) if weights in QUANT_MODES else None
        return n * k * bytes_per_param if group is None else quant_nbytes(n, k, QUANT_MODES[weights][0], group)

    per_layer = (proj((cfg.num_heads + 2 * cfg.num_kv_heads) * d, D) + proj(D, cfg.num_heads * d)
                 + proj(2 * F, D) + proj(D, F) + 2 * D * bytes_per_param)
    head = 0 if cfg.tie_embeddings else proj(cfg.vocab_size, D)
    return cfg.num_layers * per_layer + (cfg.vocab_size * D + D) * bytes_per_param + head


def random_weights(cfg: ModelConfig, device: torch.device, dtype: torch.dtype, seed: int = 0,
                   weights: str = "dense", keep_quantized: bool | None = None) -> DecoderWeights:
    """Weights of the right shapes drawn on the device (speed does not depend on their values); under
    int8/int4 each projection is quantized as it is drawn, so an 8B shape never holds its bf16 weights
    at once (nor a whole bf16 matrix beside its codes)."""
    gen = torch.Generator(device=device).manual_seed(seed)
    D, d, F = cfg.hidden_size, cfg.head_dim, cfg.intermediate_size
    rows = (cfg.num_heads + 2 * cfg.num_kv_heads) * d
    keep = device.type == "cuda" if keep_quantized is None else keep_quantized

    def w(*shape):
        if len(shape) == 2 and weights in ("int8", "int4"):
            return place(quantized(lambda a, b: dense(b - a, shape[1]), *shape, weights), device, dtype, keep)
        return dense(*shape)

    def dense(*shape):
        return (torch.randn(*shape, generator=gen, device=device, dtype=torch.float32) * 0.02).to(dtype)

    def ones(n):
        return torch.ones(n, device=device, dtype=dtype)

    layers = [LayerWeights(attn_norm=ones(D), qkv=w(rows, D), o=w(D, cfg.num_heads * d), mlp_norm=ones(D),
                           gate_up=w(2 * F, D), down=w(D, F),
                           qkv_bias=w(rows) if cfg.qkv_bias else None, o_bias=w(D) if cfg.o_bias else None)
              for _ in range(cfg.num_layers)]
    embed = dense(cfg.vocab_size, D)
    return DecoderWeights(embed=embed, layers=layers, final_norm=ones(D),
                          lm_head=embed if cfg.tie_embeddings else w(cfg.vocab_size, D))
