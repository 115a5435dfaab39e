"""Named model shapes for speed measurements with random weights (speed does not depend on values)."""
from __future__ import annotations

from ..errors import InputError
from .llama import ModelConfig
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


def weight_bytes(cfg: ModelConfig, bytes_per_param: int) -> int:
    d, D, F = cfg.head_dim, cfg.hidden_size, cfg.intermediate_size
    per_layer = D * (cfg.num_heads + 2 * cfg.num_kv_heads) * d + cfg.num_heads * d * D + 3 * D * F + 2 * D
    embed = cfg.vocab_size * D * (1 if cfg.tie_embeddings else 2)
    return (cfg.num_layers * per_layer + embed + D) * bytes_per_param
