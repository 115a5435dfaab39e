"""Saved prefills: an LLM's KV cache written to disk after a prefill and reopened later, so that a long
document is prefilled once, not at every run.

What is saved is the attention backend's state between two passes (backends.base.AttentionBackend
.state: for retrieval the CPU store, the index, the summaries, the sink and window slots and ivf's
cluster layout; for dense the KV rows) and the token ids it holds. Reopened into an LLM of the same
model, tokenizer, dtype and KV layout, decoding goes on exactly as it would have without the round
trip. The manifest records what the state was made with; reopening checks each against the LLM and
names the one that differs. The folder format is store/saved.py's.
"""
from __future__ import annotations

import datetime
import hashlib
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch

from . import __version__
from .errors import SavedPrefillError
from .models.linear import RowStack
from .models.quant import QuantWeight
from .store.saved import SavedPrefill, write_saved

# The RetrievalConfig fields that shape the saved state (the rest, like the budget, only steer decoding).
_LAYOUT_FIELDS = ("index", "block_size", "rank", "block_scores", "sink_tokens", "window_tokens", "store_dtype",
                  "cluster_tokens")


def model_fingerprint(model) -> str:
    """sha256 of the model's configuration, dtype and 4,096 values spread over every weight tensor:
    cheap (no file is read: it works for GGUF, HF folders and random shapes alike) and different for
    any two checkpoints that differ anywhere but in a few values."""
    h = hashlib.sha256(repr(model.cfg).encode() + str(model.dtype).encode())
    w = model.w
    # fields(), not asdict(): asdict deep-copies every weight (the whole model, once more, on its device)
    tensors = [t for weight in [w.embed, w.final_norm, w.lm_head] + [getattr(layer, f.name) for layer in w.layers
                                                                      for f in fields(layer)]
               for t in _tensors_of(weight)]
    h.update(repr([(str(t.dtype), tuple(t.shape)) for t in tensors]).encode())  # int8 and int4 differ here
    samples = []
    for t in tensors:
        flat = t.reshape(-1)
        n = min(4096, flat.numel())
        idx = torch.arange(n, device=flat.device) * (flat.numel() - 1) // max(1, n - 1)  # integers: exact ends
        samples.append(flat[idx].float())
    h.update(torch.cat(samples).cpu().numpy().tobytes())  # one device-to-host copy, not one per tensor
    return h.hexdigest()


def _tensors_of(weight) -> list[torch.Tensor]:
    """The tensors a weight is made of: itself, a QuantWeight's codes, scales and mins, a RowStack's parts'."""
    if isinstance(weight, torch.Tensor):
        return [weight]
    if isinstance(weight, QuantWeight):
        return [t for t in (weight.codes, weight.scales, weight.mins) if t is not None]
    if isinstance(weight, RowStack):
        return [t for part in weight.parts for t in _tensors_of(part)]
    return []  # None (an absent bias)


def ids_sha256(ids: list[int]) -> str:
    return hashlib.sha256(torch.tensor(ids, dtype=torch.int64).numpy().tobytes()).hexdigest()


def layout(llm) -> dict:
    """What the KV state's shape depends on, besides the model: attention mode, dtype and the layout
    fields of the resolved retrieval configuration."""
    cfg = llm.retrieval
    out = {"mode": llm.mode, "dtype": str(llm.model.dtype).removeprefix("torch.")}
    if cfg is not None:
        out |= {f: getattr(cfg, f) for f in _LAYOUT_FIELDS
                if (f not in ("rank", "block_scores") or cfg.index == "lowrank") and (f != "cluster_tokens" or cfg.index == "ivf")}
        out["summaries"] = bool(cfg.estimate_rest or cfg.estimate_tokens)
        # named only when set: saves made before these fields existed still match
        out |= {f: getattr(cfg, f) for f in ("dense_layers", "rest_rank") if getattr(cfg, f)}
    return out


def identity(llm) -> dict:
    """The manifest's record of what made a state: model, tokenizer and layout."""
    return {"model": model_fingerprint(llm.model), "tokenizer": tokenizer_fingerprint(llm), "layout": layout(llm)}


def tokenizer_fingerprint(llm) -> str | None:
    return llm.tokenizer.fingerprint() if llm.tokenizer is not None else None  # None: random weights, ids only


def document_key(llm, ids: list[int]) -> str:
    """The document cache's key for the state of `ids` in this LLM."""
    ident = identity(llm)
    return hashlib.sha256(repr((ident, ids_sha256(ids))).encode()).hexdigest()[:32]


@dataclass(frozen=True)
class SaveInfo:
    path: Path
    tokens: int
    bytes: int
    seconds: float


def save(llm, path: str | Path, extra: dict[str, bytes] | None = None, ident: dict | None = None) -> SaveInfo:
    """Write llm's KV cache and token ids to the folder `path` (see the module docstring)."""
    t0 = time.perf_counter()
    ids = llm.cached_ids
    if not ids:
        raise SavedPrefillError("the KV cache is empty: prefill a prompt first (llm.prefill or generate), then save")
    if llm.engine.length > len(ids):  # a Ctrl-C left K,V past the token list: the next prefill would drop them
        llm.engine.truncate(len(ids))
    ident = ident or identity(llm)
    manifest = {"kvretrieve_version": __version__,
                "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                "source": str(llm.source), "tokens": len(ids), "ids_sha256": ids_sha256(ids), **ident,
                "retrieval": asdict(llm.retrieval) if llm.retrieval else None, "saved_on": str(llm.device)}
    with torch.inference_mode():
        tensors = {"ids": torch.tensor(ids, dtype=torch.int64)}
        tensors |= {f"kv.{k}": t for k, t in llm.engine.backend.state().items()}
        size = write_saved(Path(path), tensors, manifest, extra)
    return SaveInfo(Path(path), len(ids), size, time.perf_counter() - t0)


def check_compatible(llm, saved: SavedPrefill) -> list[int]:
    """The saved token ids, once every record of the manifest matches llm; else SavedPrefillError
    naming the first that differs and how to match it."""
    m, path = saved.manifest, saved.path
    mine = layout(llm)
    theirs = m.get("layout", {})
    if theirs.get("dtype") != mine["dtype"]:
        raise SavedPrefillError(f"{path} was saved with dtype {theirs.get('dtype')}, this model runs {mine['dtype']}; "
                                f"load it with dtype='{theirs.get('dtype')}'")
    if m.get("model") != model_fingerprint(llm.model):
        raise SavedPrefillError(f"{path} was saved with another model ({m.get('source')}); load that model to reopen it")
    if m.get("tokenizer") != tokenizer_fingerprint(llm):
        raise SavedPrefillError(f"{path} was saved with another tokenizer; load the model it was saved with "
                                f"({m.get('source')})")
    if theirs.get("mode") != mine["mode"]:
        fix = "dense attention (retrieval off)" if theirs.get("mode") == "dense" else f"retrieval (index '{theirs.get('index')}')"
        raise SavedPrefillError(f"{path} was saved with {theirs.get('mode')} attention, this model runs {mine['mode']}; "
                                f"load it with {fix}")
    if theirs != mine:
        diff = ", ".join(f"{k}={theirs.get(k)!r} (here {mine.get(k)!r})" for k in sorted(set(theirs) | set(mine))
                         if theirs.get(k) != mine.get(k))
        raise SavedPrefillError(f"{path} was saved with another KV layout: {diff}; load with the retrieval options "
                                "it was saved with")
    n = m.get("tokens", 0)
    if n > llm.max_context:
        raise SavedPrefillError(f"{path} holds {n:,} tokens but this context holds {llm.max_context:,}; load with "
                                f"max_context >= {n:,}")
    ids = saved.tensor("ids").tolist()
    if len(ids) != n or ids_sha256(ids) != m.get("ids_sha256"):
        raise SavedPrefillError(f"{path} is damaged: its token ids do not match the manifest; delete it and "
                                "prefill the document again")
    return ids


def open_checked(llm, path: str | Path, verify: bool = True) -> tuple[SavedPrefill, list[int]]:
    """The save at `path`, opened and checked against llm, and its token ids (LLM.resume loads them)."""
    saved = SavedPrefill(Path(path), verify=verify)
    return saved, check_compatible(llm, saved)
