"""Rotary position embeddings: default, linear, dynamic-NTK, llama3 and yarn, as read from config.json.

Frequencies are computed in float32 and cos/sin are cast to the model dtype only at the end, the
same order of operations as the reference implementation, so fp32 runs match it to rounding.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..errors import ModelLoadError

__all__ = ["ROPE_TYPES", "RopeConfig", "Rope"]

ROPE_TYPES = ("default", "linear", "dynamic", "llama3", "yarn")


@dataclass(slots=True, frozen=True)
class RopeConfig:
    theta: float = 10000.0
    kind: str = "default"
    factor: float = 1.0
    original_max_position: int = 2048
    low_freq_factor: float = 1.0   # llama3
    high_freq_factor: float = 4.0  # llama3
    beta_fast: float = 32.0        # yarn
    beta_slow: float = 1.0         # yarn
    attention_factor: float | None = None  # yarn: cos/sin multiplier (None = derived from factor)
    mscale: float | None = None
    mscale_all_dim: float | None = None
    truncate: bool = True

    @classmethod
    def from_hf(cls, cfg: dict, source: str = "config.json", max_position: int | None = None) -> "RopeConfig":
        """Read rope_theta + rope_scaling (transformers 4.x) or rope_parameters (5.x). max_position: the
        context config.json gives, or assumes where it names none."""
        where = "rope_parameters" if cfg.get("rope_parameters") else "rope_scaling"
        params = dict(cfg.get("rope_parameters") or cfg.get("rope_scaling") or {})
        kind = params.get("rope_type", params.get("type", "default")) or "default"
        if kind not in ROPE_TYPES:
            raise ModelLoadError(f"unsupported RoPE type {kind!r} in {source}; supported: {', '.join(ROPE_TYPES)}")

        def number(key: str, default, above: float | None = 0.0, table: dict = params, name: str = where,
                   fix: str = "restore the value the checkpoint was published with (re-download its config.json)"):
            return _number(table.get(key), default, above, f"{source}: {name + '.' if name else ''}{key}", fix)

        theta = number("rope_theta", None) or number("rope_theta", 10000.0, table=cfg, name="")
        max_pos = int(max_position or cfg.get("max_position_embeddings") or 2048)
        if kind == "dynamic":  # dynamic NTK scales relative to the configured maximum
            original = max_pos
        else:
            original = int(number("original_max_position_embeddings", None, table=cfg, name="")
                           or number("original_max_position_embeddings", None) or max_pos)
        # A factor of 0 divides the frequencies by zero: NaN logits and an empty answer, not an error.
        factor = number("factor", None, fix="it is the ratio of the extended to the trained context (1 = none): "
                        f"set the checkpoint's published value, or remove {where} to run at the trained length"
                        ) if kind != "default" else 1.0
        if factor is None:
            factor = max_pos / original if kind == "yarn" else 1.0
        low, high = number("low_freq_factor", 1.0), number("high_freq_factor", 4.0)
        if kind == "llama3" and high <= low:  # the smoothing divides by high - low
            raise ModelLoadError(f"{source}: {where}.high_freq_factor ({high}) must exceed low_freq_factor ({low}); "
                                 "restore the values the checkpoint was published with")
        attention = number("attention_factor", None)
        return cls(theta=theta, kind=kind, factor=factor, original_max_position=original, low_freq_factor=low,
                   high_freq_factor=high, beta_fast=number("beta_fast", 32.0), beta_slow=number("beta_slow", 1.0),
                   attention_factor=attention, mscale=number("mscale", None, None),
                   mscale_all_dim=number("mscale_all_dim", None, None), truncate=bool(params.get("truncate", True)))


def _number(value, default, above: float | None, what: str, fix: str):
    """value as a float (default when absent), refused with a message naming the field when it is not a
    finite number greater than `above` (None: any finite number)."""
    if value is None:
        return default
    if (isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value)
            or (above is not None and value <= above)):
        bound = "a number" if above is None else f"a number greater than {above:g}"
        raise ModelLoadError(f"{what} must be {bound}, got {value!r}; {fix}")
    return float(value)


def _base_inv_freq(theta: float, dim: int) -> torch.Tensor:
    return 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))


def _yarn(cfg: RopeConfig, dim: int) -> tuple[torch.Tensor, float]:
    def mscale(scale: float, m: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    att = cfg.attention_factor
    if att is None:
        att = (mscale(cfg.factor, cfg.mscale) / mscale(cfg.factor, cfg.mscale_all_dim)
               if cfg.mscale and cfg.mscale_all_dim else mscale(cfg.factor))

    def correction_dim(rotations: float) -> float:
        return dim * math.log(cfg.original_max_position / (rotations * 2 * math.pi)) / (2 * math.log(cfg.theta))

    low, high = correction_dim(cfg.beta_fast), correction_dim(cfg.beta_slow)
    if cfg.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # avoid a zero-width ramp
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    extrapolation = 1 - ramp  # share of each frequency kept unscaled (the high frequencies)
    pos_freqs = cfg.theta ** (torch.arange(0, dim, 2).float() / dim)
    inv = (1.0 / (cfg.factor * pos_freqs)) * (1 - extrapolation) + (1.0 / pos_freqs) * extrapolation
    return inv, float(att)


def _llama3(cfg: RopeConfig, dim: int) -> torch.Tensor:
    inv = _base_inv_freq(cfg.theta, dim)
    low_wavelen = cfg.original_max_position / cfg.low_freq_factor
    high_wavelen = cfg.original_max_position / cfg.high_freq_factor
    wavelen = 2 * math.pi / inv
    scaled = torch.where(wavelen > low_wavelen, inv / cfg.factor, inv)
    smooth = (cfg.original_max_position / wavelen - cfg.low_freq_factor) / (cfg.high_freq_factor - cfg.low_freq_factor)
    smoothed = (1 - smooth) * scaled / cfg.factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return torch.where(medium, smoothed, scaled)


class Rope:
    """cos/sin for given positions. Stateless except for a cache of the static frequencies."""

    def __init__(self, cfg: RopeConfig, head_dim: int, device: torch.device):
        self.cfg, self.dim, self.device = cfg, head_dim, device
        self.scaling = 1.0
        if cfg.kind == "yarn":
            inv, self.scaling = _yarn(cfg, head_dim)
        elif cfg.kind == "llama3":
            inv = _llama3(cfg, head_dim)
        elif cfg.kind == "linear":
            inv = _base_inv_freq(cfg.theta, head_dim) / cfg.factor
        else:
            inv = _base_inv_freq(cfg.theta, head_dim)
        self.inv_freq = inv.to(device)

    def _inv_freq_for(self, seq_len: int) -> torch.Tensor:
        # Dynamic NTK grows the base once the sequence outgrows the trained length; keys already in
        # the cache keep the rotation they were stored with (same as the reference implementation).
        cfg = self.cfg
        if cfg.kind != "dynamic" or seq_len <= cfg.original_max_position:
            return self.inv_freq
        base = cfg.theta * ((cfg.factor * seq_len / cfg.original_max_position) - (cfg.factor - 1)) ** (
            self.dim / (self.dim - 2))
        return _base_inv_freq(base, self.dim).to(self.device)

    def cos_sin(self, positions: torch.Tensor, dtype: torch.dtype, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        """positions [T] int64 -> cos, sin [T, head_dim] in dtype. seq_len: tokens in the sequence after this step."""
        freqs = positions.float()[:, None] * self._inv_freq_for(seq_len)[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        return (emb.cos() * self.scaling).to(dtype), (emb.sin() * self.scaling).to(dtype)
