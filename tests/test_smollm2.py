"""The real default model: tokenizer, GGUF conversion, answers, sampling and streaming."""
from __future__ import annotations

import time

import pytest
import torch

import kvretrieve
from kvretrieve.errors import ConfigError, InputError
from kvretrieve.models.loader import CheckpointTensors, default_model_path

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


def test_tokenizer_and_template_match_transformers(smol, smol_dir):
    from transformers import AutoTokenizer

    ref = AutoTokenizer.from_pretrained(str(smol_dir))
    texts = ["Hello world", "  leading spaces\nand\ttabs", "naïve café — 東京 🚀", "def f(x):\n    return x**2"]
    for t in texts:
        ids = smol.tokenizer.encode(t)
        assert ids == ref(t)["input_ids"]
        assert smol.tokenizer.decode(ids) == ref.decode(ids, skip_special_tokens=True)
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Name a colour."}]
    for m in (msgs, msgs[1:2]):
        assert smol.tokenizer.render_chat(m) == ref.apply_chat_template(m, tokenize=False, add_generation_prompt=True)
    assert smol.tokenizer.eos_ids == {ref.convert_tokens_to_ids("<|im_end|>")}


@pytest.mark.slow
def test_gguf_conversion_matches_transformers_and_cache(tmp_path, monkeypatch, smol_dir):
    """Our dequantised, un-permuted weights equal transformers' own GGUF loader; a fresh conversion
    (first load) and the cached directory (later loads) give identical logits."""
    from transformers import AutoModelForCausalLM

    gguf = default_model_path()
    ref = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    ours = CheckpointTensors(smol_dir)
    ref_sd = ref.state_dict()
    for name, tensor in ref_sd.items():
        if name == "lm_head.weight" and name not in ours:
            name = "model.embed_tokens.weight"  # tied
        assert torch.equal(ours[name], tensor), name
    monkeypatch.setenv("KVRETRIEVE_CACHE", str(tmp_path / "cache"))
    ids = torch.tensor(kvretrieve.load(device="cpu", dtype="float32").tokenizer.encode("The tide comes in"))
    t0 = time.perf_counter()
    cached = kvretrieve.load(device="cpu", dtype="float32", max_context=64)
    load_s = time.perf_counter() - t0
    fresh_dir = next((tmp_path / "cache").iterdir())
    assert fresh_dir.name.startswith(gguf.stem) and not list((tmp_path / "cache").glob(".tmp-*"))
    assert load_s < 2.0, f"cached load took {load_s:.2f} s"
    first = kvretrieve.load(smol_dir, device="cpu", dtype="float32", max_context=64)
    a = first.engine.model.logits(first.engine.forward(ids))
    b = cached.engine.model.logits(cached.engine.forward(ids))
    assert torch.equal(a, b)


def test_greedy_answer(smol):
    assert "Paris" in smol.generate(QUESTION, max_new_tokens=20)


def test_stream_equals_generate_and_details(smol):
    pieces = list(smol.stream(QUESTION, max_new_tokens=20))
    r = smol.generate(QUESTION, max_new_tokens=20, return_details=True)
    assert "".join(pieces) == r.text
    assert r.finish_reason == "eos" and r.prompt_tokens > 10
    assert r.reused_tokens == r.prompt_tokens - 1  # the second call found the prompt cached
    assert smol.tokenizer.decode(r.token_ids) == r.text
    assert len(r.token_ms) == len(r.token_ids) and r.prefill_s > 0  # the last step produced EOS


def test_prefix_reuse_gives_same_answer_as_fresh(smol):
    story = [{"role": "user", "content": "Tell me a short story about a fox."}]
    first = smol.generate(story, max_new_tokens=24)
    smol.generate(QUESTION, max_new_tokens=5)  # shares only the template's start
    smol.reset()
    assert smol.generate(story, max_new_tokens=24) == first


def test_sampling_seeded_and_limits(smol):
    kw = dict(max_new_tokens=12, temperature=1.0, top_p=0.95, seed=123)
    a, b = smol.generate(QUESTION, **kw), smol.generate(QUESTION, **kw)
    assert a == b
    greedy = smol.generate(QUESTION, max_new_tokens=12)
    assert smol.generate(QUESTION, max_new_tokens=12, temperature=0.7, top_k=1, seed=5) == greedy
    assert smol.generate(QUESTION, max_new_tokens=12, temperature=0.7, top_p=1e-6, seed=5) == greedy
    r = smol.generate("Once upon a time", max_new_tokens=7, return_details=True)
    assert r.finish_reason == "length" and len(r.token_ids) == 7


def test_stop_strings(smol):
    full = smol.generate(QUESTION, max_new_tokens=20)
    cut_at = full.index("Paris")
    r = smol.generate(QUESTION, max_new_tokens=20, stop=["Paris"], return_details=True)
    assert r.finish_reason == "stop" and r.text == full[:cut_at]
    assert "".join(smol.stream(QUESTION, max_new_tokens=20, stop=("Paris",))) == full[:cut_at]


def test_bad_prompts(smol):
    with pytest.raises(InputError, match="context holds 4,096"):
        smol.generate("word " * 5000)
    with pytest.raises(InputError, match="empty"):
        smol.generate("")
    with pytest.raises(InputError, match="message 0"):
        smol.generate([{"role": "user"}])
    with pytest.raises(ConfigError, match="top_p"):
        smol.generate("hi", top_p=0)
