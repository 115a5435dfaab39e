"""Llama-family decoder (Llama 2/3/3.1/3.2, Mistral, Qwen2/2.5, SmolLM2) that owns no cache.

Attention is whatever backend the engine passes in (backends.base.AttentionBackend): q, k, v arrive
already rotated. The dense backend writes k, v into a preallocated cache; the retrieval backend
streams them to CPU memory. Batch size is 1: activations are [T, hidden].

Projection weights may be dense tensors, QuantWeights or RowStacks (models/linear.py): every matmul
goes through linear.linear.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from ..backends.base import AttentionBackend
from ..errors import ModelLoadError
from ..kernels import apply_rope, rms_norm, silu_mul
from ..kernels.rows import StepRows
from .attend_rows import attend_rows
from .linear import RowStack, WeightBuffer, linear, row_slice
from .quant import QuantWeight
from .rope import Rope, RopeConfig

ARCHITECTURES = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "mistral", "Qwen2ForCausalLM": "qwen2"}
# What transformers' LlamaConfig, MistralConfig and Qwen2Config assume when config.json names no
# max_position_embeddings (the same in 4.x and 5.x), so such a checkpoint gets the context it gets
# there; the loader says so when it happens (models.loader.load_model).
DEFAULT_MAX_POSITION = {"llama": 2048, "mistral": 4096 * 32, "qwen2": 32768}


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
            max_pos = int(cfg.get("max_position_embeddings") or DEFAULT_MAX_POSITION[arch])
            out = cls(
                arch=arch, vocab_size=int(cfg["vocab_size"]), hidden_size=hidden,
                intermediate_size=int(cfg["intermediate_size"]), num_layers=int(cfg["num_hidden_layers"]),
                num_heads=heads, num_kv_heads=int(cfg.get("num_key_value_heads") or heads),
                head_dim=int(cfg.get("head_dim") or hidden // heads), rms_eps=float(cfg.get("rms_norm_eps", 1e-6)),
                rope=RopeConfig.from_hf(cfg, source, max_pos), max_position=max_pos,
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


# A projection weight: a dense Tensor, a QuantWeight or a RowStack of either (models/linear.py).
Weight = torch.Tensor | QuantWeight | RowStack


@dataclass(slots=True)
class LayerWeights:
    attn_norm: torch.Tensor
    qkv: Weight                  # [(Hq + 2 Hkv) d, hidden]: one GEMM for q, k and v
    o: Weight
    mlp_norm: torch.Tensor
    gate_up: Weight              # [2 ffn, hidden]: one GEMM for gate and up
    down: Weight
    qkv_bias: torch.Tensor | None = None
    o_bias: torch.Tensor | None = None


@dataclass(slots=True)
class DecoderWeights:
    embed: torch.Tensor
    layers: list[LayerWeights]
    final_norm: torch.Tensor
    lm_head: Weight              # the embedding itself when tied (the embedding is always dense)


class Decoder:
    """The math of the model. `layer()` runs one decoder layer over a whole segment in place."""

    def __init__(self, cfg: ModelConfig, weights: DecoderWeights):
        self.cfg, self.w = cfg, weights
        self.device, self.dtype = weights.embed.device, weights.embed.dtype
        self.rope = Rope(cfg.rope, cfg.head_dim, self.device)
        self.buffer = WeightBuffer.for_weights(weights.layers, weights.lm_head, self.device, self.dtype)

    def linear(self, x: torch.Tensor, w: Weight, bias: torch.Tensor | None = None) -> torch.Tensor:
        """x [T, K] through any projection weight; quantized ones dequantize into self.buffer in prefill."""
        return linear(x, w, bias, self.buffer)

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, self.w.embed)

    def rope_tables(self, start: int, n: int, seq_len: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin for positions start .. start+n-1 of a forward pass that ends at seq_len tokens."""
        pos = torch.arange(start, start + n, device=self.device)
        return self.rope.cos_sin(pos, self.dtype, seq_len=seq_len or start + n)

    def project_qkv(self, layer: int, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        """Normalised hidden rows [T, hidden] -> rotated q [T, Hq, d], k, v [T, Hkv, d]."""
        c, w = self.cfg, self.w.layers[layer]
        qkv = self.linear(h, w.qkv, w.qkv_bias)
        nqk = (c.num_heads + c.num_kv_heads) * c.head_dim
        # q and k heads are adjacent in the fused projection, so one RoPE launch rotates both.
        qk = apply_rope(qkv[:, :nqk].view(-1, c.num_heads + c.num_kv_heads, c.head_dim), cos, sin)
        v = qkv[:, nqk:].view(-1, c.num_kv_heads, c.head_dim)
        return qk[:, :c.num_heads], qk[:, c.num_heads:], v

    def _project(self, layer: int, h: torch.Tensor, rows: slice, heads: int, cos, sin, rotate: bool):
        """One part of the fused q|k|v projection: the weight rows `rows`, viewed as `heads` heads."""
        w = self.w.layers[layer]
        bias = None if w.qkv_bias is None else w.qkv_bias[rows]
        a, b, _ = rows.indices(w.qkv.shape[0])
        out = self.linear(h, row_slice(w.qkv, a, b), bias).view(h.shape[0], heads, self.cfg.head_dim)
        return apply_rope(out, cos, sin) if rotate else out

    def layer(self, layer: int, x: torch.Tensor, start: int, attn: AttentionBackend, chunk: int,
              rope: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """x [T, hidden] is updated in place.

        Decode (T = 1): one fused q|k|v projection, attn.decode(layer, q, k, v). A segment runs in two passes
        so that only k, v of the whole segment ever exist: pass 1 projects k, v chunk by chunk and
        hands them to the backend (attn.begin_layer); pass 2 projects each chunk's q, attends
        (attn.attend), and applies o-proj and MLP to that chunk. A [T, Hq, d] q or attention output
        is never held, which is what bounds prefill memory at 128K+ tokens (RoPE tables too are made
        per chunk: for 512K tokens they would take 256 MiB).
        """
        c, w = self.cfg, self.w.layers[layer]
        T = x.shape[0]
        end = start + T
        if T == 1:
            rope = rope or self.rope_tables(start, 1)
            if attn.lookahead(layer):  # layer + 1's query from this layer's input, to prefetch its blocks
                nxt = self.w.layers[layer + 1]
                q_next = self._project(layer + 1, rms_norm(x, nxt.attn_norm, c.rms_eps), slice(0, c.num_heads * c.head_dim),
                                       c.num_heads, *rope, True)
                attn.prefetch(layer + 1, q_next)
            q, k, v = self.project_qkv(layer, rms_norm(x, w.attn_norm, c.rms_eps), *rope)
            x += self.linear(attn.decode(layer, q, k, v).reshape(1, -1), w.o, w.o_bias)
            x += self.mlp(layer, rms_norm(x, w.mlp_norm, c.rms_eps))
            return x
        nq, nkv = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
        k = x.new_empty(T, c.num_kv_heads, c.head_dim)
        v = x.new_empty(T, c.num_kv_heads, c.head_dim)
        for s in range(0, T, chunk):
            e = min(T, s + chunk)
            cos, sin = self.rope_tables(start + s, e - s, end)
            h = rms_norm(x[s:e], w.attn_norm, c.rms_eps)
            k[s:e] = self._project(layer, h, slice(nq, nq + nkv), c.num_kv_heads, cos, sin, True)
            v[s:e] = self._project(layer, h, slice(nq + nkv, None), c.num_kv_heads, cos, sin, False)
        attn.begin_layer(layer, k, v)
        for s in range(0, T, chunk):
            e = min(T, s + chunk)
            cos, sin = self.rope_tables(start + s, e - s, end)
            h = rms_norm(x[s:e], w.attn_norm, c.rms_eps)
            q = self._project(layer, h, slice(0, nq), c.num_heads, cos, sin, True)
            x[s:e] += self.linear(attn.attend(layer, q, s).reshape(e - s, -1), w.o, w.o_bias)
            x[s:e] += self.mlp(layer, rms_norm(x[s:e], w.mlp_norm, c.rms_eps))
        attn.end_layer(layer)
        return x

    def decode_rows(self, ids: torch.Tensor, positions: torch.Tensor, attns: list[AttentionBackend],
                    streams: list | None = None, rows: StepRows | None = None) -> torch.Tensor:
        """One decode step of B sequences at once: ids, positions [B] (int64, on the device), attns[b]
        the backend of row b. The projections and the MLP read each weight once for all rows (decode
        is bound by those reads); attention runs per row against the row's own cache, on streams[b]
        where CUDA streams are given, except that with rows (from every backend's sparse_operands)
        what the rows allow runs as one launch for all (models/attend_rows.py). Returns the hidden
        rows [B, hidden]."""
        c = self.cfg
        x = self.embed(ids)
        if c.rope.kind == "dynamic":  # its frequencies follow each sequence's own length
            tables = [self.rope.cos_sin(p.view(1), self.dtype, seq_len=int(p) + 1) for p in positions]
            cos, sin = torch.cat([t[0] for t in tables]), torch.cat([t[1] for t in tables])
        else:
            cos, sin = self.rope.cos_sin(positions, self.dtype, seq_len=1)
        for layer in range(c.num_layers):
            w = self.w.layers[layer]
            if any(a.lookahead(layer) for a in attns):
                nxt = self.w.layers[layer + 1]
                q_next = self._project(layer + 1, rms_norm(x, nxt.attn_norm, c.rms_eps),
                                       slice(0, c.num_heads * c.head_dim), c.num_heads, cos, sin, True)
                for b in range(len(attns)):
                    if attns[b].lookahead(layer):
                        attns[b].prefetch(layer + 1, q_next[b:b + 1])
            q, k, v = self.project_qkv(layer, rms_norm(x, w.attn_norm, c.rms_eps), cos, sin)
            out = attend_rows(layer, q, k, v, attns, streams, rows)
            x += self.linear(out.reshape(len(attns), -1), w.o, w.o_bias)
            x += self.mlp(layer, rms_norm(x, w.mlp_norm, c.rms_eps))
        return x

    def mlp(self, layer: int, h: torch.Tensor) -> torch.Tensor:
        w = self.w.layers[layer]
        return self.linear(silu_mul(self.linear(h, w.gate_up)), w.down)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """Final norm + LM head for the given rows, returned in fp32."""
        return self.linear(rms_norm(x, self.w.final_norm, self.cfg.rms_eps), self.w.lm_head).float()

    def forward(self, ids: torch.Tensor, start: int, attn: AttentionBackend, chunk: int = 4096,
                on_layer: Callable[[int], None] | None = None, position: torch.Tensor | None = None) -> torch.Tensor:
        """Run a segment of token ids at positions start.. through every layer (layer-major, so only one
        layer's K,V of the segment exist at a time); returns the hidden rows. A decode step may give
        its position as a device tensor [1] (int64): a CUDA graph of the step then stays valid for
        the next position."""
        x = self.embed(ids)
        rope = None
        if ids.shape[0] == 1:  # decode: one table for all layers
            if position is None:
                position = torch.full((1,), start, dtype=torch.long, device=self.device)
            rope = self.rope.cos_sin(position, self.dtype, seq_len=start + 1)
        for layer in range(self.cfg.num_layers):
            self.layer(layer, x, start, attn, chunk, rope)
            if on_layer is not None:
                on_layer(layer)
        return x
