"""GGUF -> HF checkpoint directory, done once per file and cached.

Parsing and dequantising GGUF in Python takes seconds, so the first load writes an ordinary HF
directory (config.json, fp32 safetensors, tokenizer files) into the cache and every later load reads
that. The directory is built under a temporary name and renamed into place (kvretrieve.files), so
an interrupted conversion never leaves a half-written cache behind; the temporary folder (500 MB for
the default model) is removed on Ctrl-C, SIGTERM or SIGHUP, and what a SIGKILL or a crash leaves is
swept up by the next load.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import numpy as np
import torch

from ..errors import ModelLoadError
from ..files import cache_root, sweep_stale_temporaries, temporary_dir, terminations_unwind

FORMAT_VERSION = 1  # bump when the converted layout changes, so old caches are rebuilt
TYPES_FILE = "gguf_tensors.json"  # tensor_types' record
SUPPORTED = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}
_LAYER_NAMES = {
    "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_TOP_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}


def cached_dir_for(gguf_path: Path) -> Path:
    """The cache folder of a GGUF file, named by its content: the same file installed at several paths
    (each fresh clone's virtual environment has its own copy of the default model) shares one 500 MB
    conversion; keyed by path and mtime, 20 reinstalls had left 20 of them. The key reads the file's
    size, its first and last 4 MiB (header, metadata, the last tensors) and 16 slices of 64 KiB between:
    milliseconds, and different for any two model files."""
    size = gguf_path.stat().st_size
    h = hashlib.sha256(f"{size}:{FORMAT_VERSION}".encode())
    with open(gguf_path, "rb") as f:
        for at in [0, max(0, size - (4 << 20))] + [size * i // 17 for i in range(1, 17)]:
            f.seek(at)
            h.update(f.read(4 << 20 if at in (0, max(0, size - (4 << 20))) else 64 << 10))
    return cache_root() / f"{gguf_path.stem}-{h.hexdigest()[:12]}"


def ensure_converted(gguf_path: Path, log=None) -> Path:
    """Return the cached HF directory for gguf_path, converting it first if needed."""
    out = cached_dir_for(gguf_path)
    sweep_stale_temporaries(out.parent)
    if (out / "config.json").is_file():
        return out
    if log:
        log(f"converting {gguf_path.name} once into {out} (later loads read the cache)")
    with terminations_unwind(ModelLoadError("the model conversion was stopped by a signal; run again to convert it")):
        _convert_into(gguf_path, out)
    return out


def _convert_into(gguf_path: Path, out: Path) -> None:
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = temporary_dir(out.parent)
    except OSError as e:
        raise ModelLoadError(f"cannot create the conversion cache in {out.parent} ({e.strerror}); set "
                             "KVRETRIEVE_CACHE to a writable directory") from None
    try:
        try:
            convert(gguf_path, tmp)
        except OSError as e:  # a full disk while writing the converted weights
            raise ModelLoadError(f"cannot write the converted model into {out.parent} ({e.strerror or e}); free "
                                 "some disk space or set KVRETRIEVE_CACHE to another directory") from None
        try:
            os.replace(tmp, out)
        except OSError:  # another process finished first; its copy is as good as ours
            if not (out / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    # llama.cpp stores q/k rows interleaved per head for its rotary layout; undo it to get back the
    # rotate-half layout of HF checkpoints. Whole rows move: quant_load applies it to np.arange(N) to
    # reorder the rows of quantized tensors.
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def hf_name(gguf_name: str) -> str | None:
    """The HF checkpoint name of a GGUF tensor (blk.3.attn_q.weight -> model.layers.3.self_attn.q_proj.weight),
    or None for a tensor kvretrieve does not know."""
    stem, _, kind = gguf_name.rpartition(".")
    if stem.startswith("blk.") and stem.count(".") >= 2:
        _, idx, part = stem.split(".", 2)
        return f"model.layers.{idx}.{_LAYER_NAMES[part]}.{kind}" if part in _LAYER_NAMES else None
    return f"{_TOP_NAMES[stem]}.{kind}" if stem in _TOP_NAMES else None


def _types_of(reader) -> dict[str, list]:
    out = {}
    for t in reader.tensors:
        name = hf_name(t.name)
        if name is not None:  # GGUF lists dimensions innermost first: (K, N) for a [N, K] matrix
            dims = [int(n) for n in reversed(t.shape)]
            out[name] = [t.tensor_type.name, dims[0], dims[1] if len(dims) > 1 else 1]
    return out


def tensor_types(gguf_path: Path, model_dir: Path) -> dict[str, list]:
    """HF name -> [GGML type name, rows, columns] of every tensor of the GGUF file, from a record in its
    converted directory: deciding what a load keeps quantized then needs no GGUFReader, whose parsing
    of the vocabulary takes seconds (2.3 s for SmolLM2's 49K tokens here). Caches converted before the
    record existed get it on their first such load."""
    record = model_dir / TYPES_FILE
    try:
        return json.loads(record.read_text())
    except (OSError, ValueError):
        pass
    import gguf

    types = _types_of(gguf.GGUFReader(str(gguf_path)))
    tmp = record.with_name(f".{TYPES_FILE}.{os.getpid()}")
    try:  # written aside and renamed, so a reader never sees half a record
        tmp.write_text(json.dumps(types))
        os.replace(tmp, record)
    except OSError:  # a read-only cache still loads, it only pays the reader again next time
        tmp.unlink(missing_ok=True)
    return types


def _field(reader, key: str, default=None):
    f = reader.fields.get(key)
    return default if f is None else f.contents()


def convert(gguf_path: Path, out: Path) -> None:
    import gguf
    from gguf.quants import dequantize
    from safetensors.torch import save_file

    try:
        reader = gguf.GGUFReader(str(gguf_path))
    except Exception as e:  # the reader raises assorted errors on damaged files
        raise ModelLoadError(f"cannot read GGUF file {gguf_path}: {e}; the file is corrupt or truncated: "
                             "download it again") from None
    arch = _field(reader, "general.architecture")
    if arch is None:
        raise ModelLoadError(f"{gguf_path} names no architecture (general.architecture); the file is corrupt or not "
                             "a model: download it again")
    if arch not in SUPPORTED:
        raise ModelLoadError(f"unsupported GGUF architecture {arch!r} in {gguf_path}; supported: "
                             f"{', '.join(SUPPORTED)}")
    required = [f"{arch}.{key}" for key in ("attention.head_count", "embedding_length", "feed_forward_length",
                                             "block_count", "context_length", "attention.layer_norm_rms_epsilon")]
    missing = [key for key in required if _field(reader, key) is None]
    if missing:
        raise ModelLoadError(f"{gguf_path} lacks {', '.join(missing)}; the file is incomplete: download it again")
    heads = _field(reader, f"{arch}.attention.head_count")
    kv_heads = _field(reader, f"{arch}.attention.head_count_kv", heads)
    tensors = {}
    for t in reader.tensors:
        if t.name == "rope_freqs.weight":
            raise ModelLoadError(f"{gguf_path} bakes its RoPE scaling into rope_freqs; load the HF checkpoint instead")
        name, stem = hf_name(t.name), t.name.rpartition(".")[0]
        if name is None:
            raise ModelLoadError(f"unexpected tensor {t.name} in {gguf_path}; kvretrieve converts plain "
                                 f"{' and '.join(SUPPORTED)} GGUF files only")
        try:
            w = dequantize(t.data, t.tensor_type).astype(np.float32)
        except Exception as e:
            raise ModelLoadError(f"cannot decode tensor {t.name} of {gguf_path} ({e}); the file is corrupt") from None
        w = w.reshape([int(n) for n in reversed(t.shape)])
        if arch == "llama" and stem.endswith("attn_q"):
            w = unpermute(w, heads)
        elif arch == "llama" and stem.endswith("attn_k"):
            w = unpermute(w, kv_heads)
        tensors[name] = torch.from_numpy(np.ascontiguousarray(w))

    tokens = _field(reader, "tokenizer.ggml.tokens") or []
    config = {
        "architectures": [SUPPORTED[arch]],
        "model_type": arch,
        "vocab_size": int(_field(reader, f"{arch}.vocab_size", len(tokens))),
        "hidden_size": int(_field(reader, f"{arch}.embedding_length")),
        "intermediate_size": int(_field(reader, f"{arch}.feed_forward_length")),
        "num_hidden_layers": int(_field(reader, f"{arch}.block_count")),
        "num_attention_heads": int(heads),
        "num_key_value_heads": int(kv_heads),
        "max_position_embeddings": int(_field(reader, f"{arch}.context_length")),
        "rms_norm_eps": float(_field(reader, f"{arch}.attention.layer_norm_rms_epsilon")),
        "rope_theta": float(_field(reader, f"{arch}.rope.freq_base", 10000.0)),
        "tie_word_embeddings": "lm_head.weight" not in tensors,
        "bos_token_id": _field(reader, "tokenizer.ggml.bos_token_id"),
        "eos_token_id": _field(reader, "tokenizer.ggml.eos_token_id"),
        "torch_dtype": "float32",
        "converted_from": str(gguf_path.resolve()),
    }
    scaling = _field(reader, f"{arch}.rope.scaling.type")
    if scaling and scaling != "none":
        config["rope_scaling"] = {"rope_type": scaling, "factor": float(_field(reader, f"{arch}.rope.scaling.factor", 1.0)),
                                  "original_max_position_embeddings":
                                      int(_field(reader, f"{arch}.rope.scaling.original_context_length", 0)) or None}
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / TYPES_FILE).write_text(json.dumps(_types_of(reader)))
    (out / "config.json").write_text(json.dumps(config, indent=2))
    _convert_tokenizer(gguf_path, out)


def _convert_tokenizer(gguf_path: Path, out: Path) -> None:
    # transformers knows how to turn GGUF vocabularies into a fast tokenizer; we only need it once.
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    except Exception as e:
        raise ModelLoadError(f"cannot build a tokenizer from {gguf_path}: {e}") from None
    tok.save_pretrained(str(out))
