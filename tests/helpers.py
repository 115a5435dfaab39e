"""Shared test helpers: tiny random HF checkpoints and the real default model."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

ROPE_VARIANTS = {
    "default": None,
    "linear": {"rope_type": "linear", "factor": 2.0},
    "dynamic": {"rope_type": "dynamic", "factor": 2.0},
    "llama3": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 16},
    "yarn": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16},
}


def tiny_hf_model(arch: str = "llama", rope: str = "default", tie: bool = False, vocab: int = 512, seed: int = 0,
                  layers: int = 2, heads: int = 4, kv_heads: int = 2, head_dim: int = 16, max_pos: int = 32):
    """A small randomly initialised transformers model (fp32). max_pos is small so that dynamic-NTK
    and the long-context RoPE variants are exercised by prompts of a few dozen tokens."""
    from transformers import (LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM, Qwen2Config,
                              Qwen2ForCausalLM)

    torch.manual_seed(seed)
    common = dict(vocab_size=vocab, hidden_size=heads * head_dim, intermediate_size=96, num_hidden_layers=layers,
                  num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=max_pos,
                  rms_norm_eps=1e-5, tie_word_embeddings=tie, rope_theta=10000.0)
    if ROPE_VARIANTS[rope] is not None:
        common["rope_scaling"] = dict(ROPE_VARIANTS[rope])
    if arch == "qwen2":
        model = Qwen2ForCausalLM(Qwen2Config(**common, use_sliding_window=False))
    elif arch == "mistral":
        model = MistralForCausalLM(MistralConfig(**common, sliding_window=None))
    else:
        model = LlamaForCausalLM(LlamaConfig(**common))
    with torch.no_grad():  # biases and norms start at 0 / 1; randomise them so they are tested
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    return model.eval()


def saved_tiny_model(tmp_path_factory, **kwargs) -> Path:
    """tiny_hf_model(**kwargs) saved in a fresh temporary directory (a checkpoint without tokenizer)."""
    path = tmp_path_factory.mktemp("tiny")
    tiny_hf_model(**kwargs).save_pretrained(path)
    return path


def save_with_tokenizer(model, out: Path, tokenizer_dir: Path | None) -> Path:
    """save_pretrained + (optionally) the tokenizer files of another checkpoint."""
    model.save_pretrained(out)
    if tokenizer_dir is not None:
        for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
            if (tokenizer_dir / name).exists():
                shutil.copy(tokenizer_dir / name, out / name)
    return out


def write_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj))


def run_interpreted(module: str) -> dict:
    """Run `module.interp_main()` (a test module beside this file) under TRITON_INTERPRET=1 in a fresh
    interpreter (the variable must be set before triton is imported) and return the JSON it prints
    after "RESULTS "; a "SKIP reason" line skips the calling test."""
    import os
    import subprocess
    import sys

    import pytest

    here = os.path.dirname(os.path.abspath(__file__))
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=os.pathsep.join([os.path.dirname(here), here]))
    code = f"import {module} as T; T.interp_main()"
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    skips = [ln[len("SKIP "):] for ln in proc.stdout.splitlines() if ln.startswith("SKIP ")]
    if proc.returncode == 0 and skips:
        pytest.skip(skips[0])
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULTS ")]
    assert proc.returncode == 0 and lines, proc.stderr[-3000:]
    return json.loads(lines[-1][len("RESULTS "):])


def tiny_decoder(model_dir, device="cpu", dtype=None):
    """A Decoder over a saved (tiny) HF checkpoint, built without a tokenizer."""
    from kvretrieve.models.llama import Decoder, ModelConfig
    from kvretrieve.models.loader import CheckpointTensors, build_weights, read_hf_config

    cfg = ModelConfig.from_hf(read_hf_config(model_dir))
    return Decoder(cfg, build_weights(cfg, CheckpointTensors(model_dir), torch.device(device), dtype or torch.float32))


def dense_backend(dec, capacity: int):
    from kvretrieve.backends import DenseKV
    from kvretrieve.resolve import geometry

    return DenseKV(geometry(dec.cfg, capacity, 16, dec.device, dec.dtype), capacity)


def retrieval_backend(dec, cfg, capacity: int, **kwargs):
    """RetrievalKV over dec for `capacity` tokens, cfg resolved as kvretrieve.load resolves it."""
    from kvretrieve.backends import RetrievalKV
    from kvretrieve.resolve import geometry, resolve_retrieval

    cfg = resolve_retrieval(cfg, dec.cfg, capacity, dec.device, dec.dtype)
    return RetrievalKV(cfg, geometry(dec.cfg, capacity, cfg.block_size, dec.device, dec.dtype), capacity, **kwargs)


def kv_geometry(layers: int, heads: int, head_dim: int, block_size: int, max_blocks: int, device="cpu",
                dtype=torch.float32):
    from kvretrieve.config import KVGeometry

    return KVGeometry(layers, heads, head_dim, block_size, max_blocks, torch.device(device), dtype)


def edited_checkpoint(src: Path, out: Path, config: dict | None = None, edit_tensors=None) -> Path:
    """A copy of the single-file HF checkpoint src in out: config maps config.json fields to new values
    (... deletes the field); edit_tensors(tensors) changes the name -> tensor dict before it is saved.
    Unchanged files are symlinks."""
    from safetensors.torch import load_file, save_file

    out.mkdir(parents=True)
    for f in src.iterdir():
        if f.name != "config.json" and not (edit_tensors and f.name == "model.safetensors"):
            (out / f.name).symlink_to(f.resolve())
    cfg = json.loads((src / "config.json").read_text())
    for key, value in (config or {}).items():
        if value is ...:
            cfg.pop(key, None)
        else:
            cfg[key] = value
    write_json(out / "config.json", cfg)
    if edit_tensors:
        tensors = load_file(str(src / "model.safetensors"))
        edit_tensors(tensors)
        save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    return out
