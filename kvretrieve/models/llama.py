"""Llama-family decoder (Llama 2/3/3.1/3.2, Mistral, Qwen2/2.5, SmolLM2) that owns no cache.

Attention is whatever callable the engine passes in: attn(layer, q, k, v) -> out, with q [T, Hq, d]
and k, v [T, Hkv, d] already rotated. The dense backend writes k, v into a preallocated cache; the
retrieval backend streams them to CPU memory. Batch size is 1: activations are [T, hidden].
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Protocol

import torch
import torch.nn.functional as F

from ..errors import ModelLoadError
from .rope import Rope, RopeConfig, apply_rope

ARCHITECTURES = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "mistral", "Qwen2ForCausalLM": "qwen2"}


@dataclass(slots=True, frozen=True)
class ModelConfig:
    arch: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_eps: float
    rope: RopeConfig
    max_position: int
    tie_embeddings: bool = False
    qkv_bias: bool = False
    o_bias: bool = False

    @classmethod
    def from_hf(cls, cfg: dict, source: str = "config.json") -> "ModelConfig":
        archs = cfg.get("architectures") or []
        arch = next((ARCHITECTURES[a] for a in archs if a in ARCHITECTURES), None)
        if arch is None:
            raise ModelLoadError(
                f"unsupported architecture {', '.join(archs) or '(none given)'} in {source}; kvretrieve runs "
                f"{', '.join(ARCHITECTURES)}: pick a checkpoint of one of those")
        try:
            hidden, heads = int(cfg["hidden_size"]), int(cfg["num_attention_heads"])
            out = cls(
                arch=arch, vocab_size=int(cfg["vocab_size"]), hidden_size=hidden,
                intermediate_size=int(cfg["intermediate_size"]), num_layers=int(cfg["num_hidden_layers"]),
                num_heads=heads, num_kv_heads=int(cfg.get("num_key_value_heads") or heads),
                head_dim=int(cfg.get("head_dim") or hidden // heads), rms_eps=float(cfg.get("rms_norm_eps", 1e-6)),
                rope=RopeConfig.from_hf(cfg), max_position=int(cfg.get("max_position_embeddings", 2048)),
                tie_embeddings=bool(cfg.get("tie_word_embeddings", False)),
                qkv_bias=arch == "qwen2" or bool(cfg.get("attention_bias", False)),
                o_bias=arch != "qwen2" and bool(cfg.get("attention_bias", False)))
        except KeyError as e:
            raise ModelLoadError(f"{source} lacks the field {e.args[0]!r}; the file is incomplete: "
                                 "re-download the checkpoint's config.json") from None
        if cfg.get("mlp_bias"):
            raise ModelLoadError(f"{source} sets mlp_bias, which kvretrieve does not support")
        if out.num_heads % out.num_kv_heads:
            raise ModelLoadError(f"{source}: num_attention_heads ({heads}) is not a multiple of "
                                 f"num_key_value_heads ({out.num_kv_heads})")
        return out


@dataclass(slots=True)
class LayerWeights:
    attn_norm: torch.Tensor
    qkv: torch.Tensor            # [(Hq + 2 Hkv) d, hidden]: one GEMM for q, k and v
    o: torch.Tensor
    mlp_norm: torch.Tensor
    gate_up: torch.Tensor        # [2 ffn, hidden]: one GEMM for gate and up
    down: torch.Tensor
    qkv_bias: torch.Tensor | None = None
    o_bias: torch.Tensor | None = None


@dataclass(slots=True)
class DecoderWeights:
    embed: torch.Tensor
    layers: list[LayerWeights]
    final_norm: torch.Tensor
    lm_head: torch.Tensor        # the embedding itself when tied


class Attention(Protocol):
    def __call__(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor: ...


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    # Normalise in fp32, then scale in the model dtype: the reference order, which fp16/bf16 need.
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


class Decoder:
    """The math of the model. `layer()` runs one decoder layer over a whole segment in place."""

    def __init__(self, cfg: ModelConfig, weights: DecoderWeights):
        self.cfg, self.w = cfg, weights
        self.device, self.dtype = weights.embed.device, weights.embed.dtype
        self.rope = Rope(cfg.rope, cfg.head_dim, self.device)

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, self.w.embed)

    def rope_tables(self, start: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin for positions start .. start+n-1, shared by all layers of the step."""
        pos = torch.arange(start, start + n, device=self.device)
        return self.rope.cos_sin(pos, self.dtype, seq_len=start + n)

    def project_qkv(self, layer: int, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        """Normalised hidden rows [T, hidden] -> rotated q [T, Hq, d], k, v [T, Hkv, d]."""
        c, w = self.cfg, self.w.layers[layer]
        qkv = F.linear(h, w.qkv, w.qkv_bias)
        nq, nkv = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
        q = qkv[:, :nq].view(-1, c.num_heads, c.head_dim)
        k = qkv[:, nq:nq + nkv].view(-1, c.num_kv_heads, c.head_dim)
        v = qkv[:, nq + nkv:].view(-1, c.num_kv_heads, c.head_dim)
        return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v

    def layer(self, layer: int, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, attn: Attention,
              chunk: int) -> torch.Tensor:
        """x [T, hidden] is updated in place. Projections and the MLP run `chunk` rows at a time so a
        long prompt never materialises a [T, ffn] activation; attention sees the whole segment."""
        c, w = self.cfg, self.w.layers[layer]
        T = x.shape[0]
        prepare = getattr(attn, "prepare_layer", None)  # lets a backend look ahead (speculative prefetch)
        if prepare is not None:
            prepare(layer, x)
        q = x.new_empty(T, c.num_heads, c.head_dim)
        k = x.new_empty(T, c.num_kv_heads, c.head_dim)
        v = x.new_empty(T, c.num_kv_heads, c.head_dim)
        for s in range(0, T, chunk):
            e = min(T, s + chunk)
            q[s:e], k[s:e], v[s:e] = self.project_qkv(layer, rms_norm(x[s:e], w.attn_norm, c.rms_eps),
                                                      cos[s:e], sin[s:e])
        o = attn(layer, q, k, v)  # [T, Hq, d], possibly a transposed view: reshaped per chunk, never whole
        del q, k, v
        for s in range(0, T, chunk):
            e = min(T, s + chunk)
            x[s:e] += F.linear(o[s:e].reshape(e - s, -1), w.o, w.o_bias)
            x[s:e] += self.mlp(layer, rms_norm(x[s:e], w.mlp_norm, c.rms_eps))
        return x

    def mlp(self, layer: int, h: torch.Tensor) -> torch.Tensor:
        w = self.w.layers[layer]
        gate, up = F.linear(h, w.gate_up).chunk(2, dim=-1)
        return F.linear(F.silu(gate) * up, w.down)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """Final norm + LM head for the given rows, returned in fp32."""
        return F.linear(rms_norm(x, self.w.final_norm, self.cfg.rms_eps), self.w.lm_head).float()

    def forward(self, ids: torch.Tensor, start: int, attn: Attention, chunk: int = 4096,
                on_layer: Callable[[int], None] | None = None) -> torch.Tensor:
        """Run a segment of token ids at positions start.. through every layer (layer-major, so only one
        layer's K,V of the segment exist at a time); returns the last position's hidden row."""
        x = self.embed(ids)
        cos, sin = self.rope_tables(start, ids.shape[0])
        for layer in range(self.cfg.num_layers):
            self.layer(layer, x, cos, sin, attn, chunk)
            if on_layer is not None:
                on_layer(layer)
        return x
