"""Hardening round 2, model loading: damaged or incomplete checkpoints, doubtful config.json values,
non-finite numbers, and the GGUF conversion's temporaries.

Every case runs the real loader on real files (a tiny random Llama with the default model's
tokenizer, saved by transformers, then edited on disk by helpers.edited_checkpoint) and expects one
kvretrieve.errors error or LoadWarning that names the problem and the fix.
"""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import warnings
from contextlib import closing
from pathlib import Path

import pytest
import torch

import kvretrieve
from helpers import edited_checkpoint, save_with_tokenizer, tiny_hf_model
from kvretrieve.errors import LoadWarning, ModelLoadError, NumericsError
from kvretrieve.models.loader import resolve_checkpoint

REPO = Path(__file__).resolve().parent.parent
WEIGHT = "model.layers.1.mlp.down_proj.weight"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, smol_dir):
    """A 2-layer random Llama (untied, trained length 32) with SmolLM2's tokenizer (so vocab 49152)."""
    out = tmp_path_factory.mktemp("tiny-edges")
    return save_with_tokenizer(tiny_hf_model(vocab=49152, max_pos=32, seed=7), out, smol_dir)


def load(path, **kw):
    kw = {"device": "cpu", "dtype": "float32", "max_context": 32, **kw}
    return kvretrieve.load(path, **kw)


def refused(path, *fragments, **kw) -> str:
    """Load path, expect a ModelLoadError with a one-line message holding every fragment."""
    with pytest.raises(ModelLoadError) as e:
        load(path, **kw)
    msg = str(e.value)
    assert "\n" not in msg and all(f in msg for f in fragments), msg
    return msg


def set_tensor(name, fn):
    def edit(tensors):
        tensors[name] = fn(tensors[name])
    return edit


def v4_rope(scaling: dict) -> dict:
    """config.json edits for a transformers 4.x RoPE setting (rope_theta + rope_scaling) in place of the
    5.x rope_parameters that save_pretrained wrote."""
    return {"rope_parameters": ..., "rope_theta": 10000.0, "rope_scaling": scaling}


# 1. Integer and bool tensors: cast to float they would run and answer garbage.
@pytest.mark.parametrize("dtype", [torch.int8, torch.bool, torch.float8_e4m3fn])
def test_non_float_tensor_is_named(tmp_path, tiny, dtype):
    bad = edited_checkpoint(tiny, tmp_path / "m", edit_tensors=set_tensor(WEIGHT, lambda t: t.to(dtype)))
    refused(bad, WEIGHT, str(dtype).removeprefix("torch."), "unquantized checkpoint")


# 2. NaN or inf anywhere in a tensor; and values a narrower dtype cannot hold.
@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("name", [WEIGHT, "model.norm.weight", "model.embed_tokens.weight"])
def test_nonfinite_tensor_is_named(tmp_path, tiny, name, value):
    def poison(t):
        t = t.clone()
        t.view(-1)[t.numel() // 2] = value
        return t
    bad = edited_checkpoint(tiny, tmp_path / "m", edit_tensors=set_tensor(name, poison))
    refused(bad, f"tensor {name} holds NaN or infinite", "re-download")


def test_values_beyond_float16_are_named(tmp_path, tiny):
    """A finite float32 value past float16's 65504 becomes inf only when cast: the dtype is the fix."""
    bad = edited_checkpoint(tiny, tmp_path / "m", edit_tensors=set_tensor(WEIGHT, lambda t: t * 0 + 1e6))
    refused(bad, WEIGHT, "range of float16", "dtype='bfloat16'", dtype="float16")
    load(bad, dtype="float32")  # finite in float32: it loads


def test_large_finite_sums_are_not_refused(tmp_path, tiny):
    """The sum of a tensor may overflow although each value is finite: the exact check clears it."""
    ok = edited_checkpoint(tiny, tmp_path / "m",
                           edit_tensors=set_tensor(WEIGHT, lambda t: torch.full_like(t, 3e38)))
    load(ok)


# 3. RoPE scaling factor 0 or negative: frequencies divided by 0, NaN logits and an empty answer.
@pytest.mark.parametrize("factor", [0, -2.0, float("inf"), "2"])
def test_bad_rope_factor_is_refused_at_config(tmp_path, tiny, factor):
    bad = edited_checkpoint(tiny, tmp_path / "m", config=v4_rope({"rope_type": "linear", "factor": factor}))
    refused(bad, "rope_scaling.factor must be a number greater than 0", "remove rope_scaling")


def test_bad_rope_parameters_factor_is_refused(tmp_path, tiny):
    bad = edited_checkpoint(tiny, tmp_path / "m", config={
        "rope_parameters": {"rope_type": "yarn", "factor": 0, "rope_theta": 10000.0}})
    refused(bad, "rope_parameters.factor", "greater than 0")


# 4. No max_position_embeddings: transformers' default for the architecture, said once.
@pytest.mark.parametrize("arch,default", [("LlamaForCausalLM", 2048), ("Qwen2ForCausalLM", 32768)])
def test_missing_max_position_uses_the_default_and_says_so(tmp_path, tiny, arch, default):
    cfg = {"max_position_embeddings": ..., "architectures": [arch]}
    if arch == "Qwen2ForCausalLM":
        cfg["attention_bias"] = False  # qwen2 always has q/k/v biases: the llama weights lack them
    m = edited_checkpoint(tiny, tmp_path / "m", config=cfg)
    if arch == "Qwen2ForCausalLM":
        with pytest.warns(LoadWarning, match=f"assuming {default:,} tokens, transformers' default for qwen2"):
            refused(m, "lacks tensor model.layers.0.self_attn.q_proj.bias")  # the notice came first
        return
    with pytest.warns(LoadWarning) as caught:
        llm = load(m, max_context=None)
    msgs = [str(w.message) for w in caught if issubclass(w.category, LoadWarning)]
    assert len(msgs) == 1 and f"assuming {default:,} tokens" in msgs[0] and "add max_position_embeddings" in msgs[0]
    assert llm.model.cfg.max_position == default and llm.max_context == default
    lines = []
    load(m, log=lines.append, max_context=64)  # with a log callback the notice goes there instead
    assert sum("max_position_embeddings" in ln for ln in lines) == 1, lines


# 5. No lm_head.weight: the output layer is missing unless config.json ties it to the embedding.
def test_missing_lm_head_names_tie_word_embeddings(tmp_path, tiny):
    def drop(tensors):
        del tensors["lm_head.weight"]
    bad = edited_checkpoint(tiny, tmp_path / "unset", config={"tie_word_embeddings": ...}, edit_tensors=drop)
    refused(bad, "no lm_head.weight", "does not set tie_word_embeddings", '"tie_word_embeddings": true')
    bad = edited_checkpoint(tiny, tmp_path / "false", config={"tie_word_embeddings": False}, edit_tensors=drop)
    refused(bad, "no lm_head.weight", "sets tie_word_embeddings to false", "re-download")
    tied = edited_checkpoint(tiny, tmp_path / "tied", config={"tie_word_embeddings": True}, edit_tensors=drop)
    llm = load(tied)
    assert llm.model.w.lm_head is llm.model.w.embed


# 6. max_context past the trained length: a warning naming that length and the RoPE options.
def test_context_past_the_trained_length_warns_once(tiny):
    with warnings.catch_warnings():
        warnings.simplefilter("error", LoadWarning)
        load(tiny, max_context=32)  # the trained length itself: silent
    with pytest.warns(LoadWarning) as caught:
        load(tiny, max_context=100)
    msgs = [str(w.message) for w in caught if issubclass(w.category, LoadWarning)]
    assert len(msgs) == 1, msgs
    assert all(f in msgs[0] for f in ("max_context=100", "the 32 tokens", '"rope_type": "yarn", "factor": 4.0',
                                      '"original_max_position_embeddings": 32', '"linear" or "dynamic"')), msgs


def test_context_past_a_scaled_length_names_the_factor(tmp_path, tiny):
    m = edited_checkpoint(tiny, tmp_path / "m", config=v4_rope({"rope_type": "linear", "factor": 2.0}))
    lines = []
    load(m, max_context=64, log=lines.append)  # 32 x 2: within the scaled length
    assert not lines
    load(m, max_context=200, log=lines.append)
    assert len(lines) == 1 and "the 64 tokens" in lines[0] and "linear rope_scaling factor of 7.0" in lines[0], lines


# 7. NaN or inf logits: a NumericsError, never text. Prefill checks its logits (one sync a prompt);
# decode sends -1 for the id instead (no extra sync), which decode() turns into the error.
def test_nonfinite_prefill_raises_instead_of_answering(tiny):
    llm = load(tiny, max_context=32)
    with torch.inference_mode():  # damaged after the load's check
        llm.model.w.layers[1].down.view(-1)[0] = float("inf")
    with pytest.raises(NumericsError, match="NaN or infinite logits at position .*float32.*damaged"):
        llm.generate("hi", max_new_tokens=4)
    assert llm.engine.length == 0  # the pass was rolled back


@pytest.mark.parametrize("ahead", [False, True])
def test_nonfinite_decode_step_raises_instead_of_answering(tiny, ahead):
    """The prompt runs clean; the first generated token's embedding is inf, so its step is not."""
    llm = load(tiny, max_context=32)
    llm.engine.ahead = ahead  # the CUDA order (step launched before the id is read) on the CPU too
    first = int(llm.prefill(llm.tokenize("hi")).argmax())
    llm.reset()
    with torch.inference_mode():
        llm.model.w.embed[first] = float("inf")
    got = []
    with pytest.raises(NumericsError, match="NaN or infinite logits at position 2 "):
        for piece in llm.stream("hi", max_new_tokens=6):
            got.append(piece)
    # Only the clean first token may have been shown (the tokenizer may hold it back), nothing after it.
    assert "".join(got) in ("", llm.tokenizer.decode([first]))
    assert llm.engine.length == len(llm.tokenize("hi")) == 1  # the failed step was rolled back


def test_decode_over_clean_weights_is_unchanged(tiny):
    """The finiteness check changes no id: engine.decode gives argmax of each step's logits."""
    llm = load(tiny, max_context=32)
    logits = llm.prefill(llm.tokenize("hi"))
    with closing(llm.engine.decode(logits.argmax(), torch.argmax, 5)) as tokens:
        ids = list(tokens)
    assert len(ids) == 6 and all(0 <= i < 49152 for i in ids)


def test_float16_overflow_names_the_dtype(tmp_path, tiny):
    """Weights within float16's range whose activations are not: the error names the dtype fix."""
    norm = "model.layers.0.post_attention_layernorm.weight"  # scales the MLP's inputs: gate x up overflows
    big = edited_checkpoint(tiny, tmp_path / "m", edit_tensors=set_tensor(norm, lambda t: t * 0 + 60000.0))
    llm = load(big, dtype="float16")
    got = []
    with pytest.raises(NumericsError, match="overflowed float16: use dtype='bfloat16' or dtype='float32'"):
        for piece in llm.stream("hi there", max_new_tokens=4):
            got.append(piece)
    assert got == []  # the prompt's logits are checked: not even a first token
    assert len(load(big, dtype="float32").generate("hi there", max_new_tokens=4, return_details=True).token_ids) == 4


# 8. The GGUF conversion leaves no temporary folder behind: a signal unwinds it, and what a killed
# run left is swept by the next load.
CONVERT = "from kvretrieve.models.loader import resolve_checkpoint; print(resolve_checkpoint(None), flush=True)"


def temporaries(cache: Path) -> list[str]:
    return sorted(p.name for p in cache.glob(".tmp-*"))


def convert_and_signal(cache: Path, sig: int) -> tuple[int, str]:
    """Start a conversion into `cache`, send `sig` once its temporary folder holds files; (exit code,
    stderr)."""
    env = dict(os.environ, KVRETRIEVE_CACHE=str(cache), PYTHONPATH=str(REPO))
    # The child starts with sig at its default action: under nohup (SIGHUP ignored, inherited) the
    # conversion would rightly keep the ignored signal ignored and finish.
    proc = subprocess.Popen([sys.executable, "-c", CONVERT], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, preexec_fn=lambda: signal.signal(sig, signal.SIG_DFL))
    try:
        deadline = time.monotonic() + 120
        while not any(p.iterdir() for p in cache.glob(".tmp-*")):  # mid-way: files being written
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
            time.sleep(0.02)
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    return proc.returncode, err


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT, signal.SIGHUP])
def test_signal_mid_conversion_removes_the_temporary(tmp_path, sig):
    # The last files are written fast: a signal sent once the first ones exist can land after the
    # finished folder took its name (seen once in CI). Such a try proves nothing about the middle, so
    # it is tried again; a half-written folder under the final name would fail every try.
    for attempt in range(4):
        cache = tmp_path / str(attempt)
        cache.mkdir()
        code, err = convert_and_signal(cache, sig)
        assert temporaries(cache) == [], err
        if not any(cache.glob("*/config.json")):  # nothing took the cache's name: the signal came mid-way
            break
    else:
        pytest.fail("every conversion finished before its signal landed, or left a folder under its final name")
    # The process still dies of the signal (Python re-raises SIGINT after an unhandled Ctrl-C).
    assert code == -sig, (code, err[-2000:])


def test_stale_temporaries_are_swept_by_the_next_load(tmp_path, monkeypatch):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    host = socket.gethostname()
    stale = tmp_path / f".tmp-{dead.pid}@{host}-x"
    alive = tmp_path / f".tmp-{os.getpid()}@{host}-y"   # a conversion still running: kept
    other = tmp_path / f".tmp-{dead.pid}@another-host-z"  # cannot be checked, and recent: kept
    for d in (stale, alive, other):
        d.mkdir()
        (d / "model.safetensors").write_bytes(b"0" * 1024)
    monkeypatch.setenv("KVRETRIEVE_CACHE", str(tmp_path))
    out = resolve_checkpoint(None)
    assert (out / "config.json").is_file() and out.parent == tmp_path
    assert temporaries(tmp_path) == sorted([alive.name, other.name])
    old = time.time() - 7 * 3600  # an unverifiable one is swept once it is hours old
    os.utime(other, (old, old))
    resolve_checkpoint(None)
    assert temporaries(tmp_path) == [alive.name]


def test_the_conversion_cache_is_keyed_by_the_files_content_not_its_path(tmp_path):
    """Each fresh install has its own copy of the default GGUF: copies share one conversion; a file
    that differs (one byte of its header) gets its own."""
    from kvretrieve.models.gguf import cached_dir_for
    from kvretrieve.models.loader import default_model_path

    src = default_model_path()
    a, b = tmp_path / "a" / src.name, tmp_path / "b" / src.name
    for p in (a, b):
        p.parent.mkdir()
        shutil.copyfile(src, p)
    assert cached_dir_for(a) == cached_dir_for(b) == cached_dir_for(src)
    data = bytearray(b.read_bytes()[:1 << 20])
    data[100] ^= 0xFF
    with open(b, "r+b") as f:
        f.write(data)
    assert cached_dir_for(b) != cached_dir_for(a)


def test_the_default_context_stops_where_float32_positions_do():
    """A config may declare any max_position_embeddings; the capacity load() gives it by default (and
    sizes the store's tables by) stops at MAX_CONTEXT, 2**24, where RoPE's float32 positions stop
    being exact. A smaller maximum is kept as it is."""
    from dataclasses import replace

    from kvretrieve.api import default_context
    from kvretrieve.config import MAX_CONTEXT
    from kvretrieve.models.shapes import shape_config

    cfg = shape_config("smollm2-135m")
    assert default_context(cfg) == cfg.max_position == 8192
    assert default_context(replace(cfg, max_position=2**40)) == MAX_CONTEXT == 2**24
    assert torch.tensor(MAX_CONTEXT + 1).float() == torch.tensor(MAX_CONTEXT).float()  # past it, positions merge
    assert torch.tensor(MAX_CONTEXT - 1).float() != torch.tensor(MAX_CONTEXT).float()
