"""Engine.decode, the generation loop: launching each step before the host reads the token it appends
(Engine.ahead, the CUDA default) must give the same tokens and leave the same cache as reading first,
wherever the consumer stops, for the dense backend and the retrieval indexes (block completion and
ivf clustering included: the prompt ends a few tokens before a block boundary)."""
from __future__ import annotations

from contextlib import closing

import pytest
import torch

from helpers import save_with_tokenizer, tiny_hf_model
import kvretrieve
from kvretrieve.config import RetrievalConfig

CONFIGS = {
    "off": None,
    "lowrank": RetrievalConfig(index="lowrank", block_size=8, rank=8, budget_tokens=32, window_tokens=32),
    "ivf": RetrievalConfig(index="ivf", block_size=8, budget_tokens=32, window_tokens=32, cluster_tokens=512),
}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, smol_dir):
    out = tmp_path_factory.mktemp("tiny-decode")
    return save_with_tokenizer(tiny_hf_model(vocab=49152, max_pos=65536, seed=5), out, smol_dir)


def _engine(tiny, kind: str, ahead: bool):
    llm = kvretrieve.load(tiny, device="cpu", dtype="float32", max_context=4096, retrieval=CONFIGS[kind])
    llm.engine.ahead = ahead
    prompt = torch.randint(0, 49152, (8 * 80 - 3,), generator=torch.Generator().manual_seed(1)).tolist()
    return llm.engine, llm.engine.prefill(prompt)


def _run(engine, logits, steps: int, stop: int) -> list[int]:
    """Decode greedily, stopping after the id at index `stop` (the generator is closed there)."""
    with closing(engine.decode(logits.argmax(), torch.argmax, steps)) as tokens:
        ids = []
        for token_id in tokens:
            ids.append(token_id)
            if len(ids) == stop + 1:
                break
    return ids


@pytest.mark.parametrize("kind", list(CONFIGS))
def test_decoding_ahead_gives_the_same_tokens_and_cache_wherever_it_stops(tiny, kind):
    # The reference: plain steps, each token read before the next step.
    ref, logits = _engine(tiny, kind, ahead=False)
    start, ids, after = ref.length, [int(logits.argmax())], []
    for _ in range(10):
        after.append(ref.step(torch.tensor(ids[-1])))  # the logits that follow ids[-1]
        ids.append(int(after[-1].argmax()))
    for ahead in (False, True):
        engine, logits = _engine(tiny, kind, ahead)
        assert _run(engine, logits, steps=10, stop=10) == ids
        assert engine.length == start + 10, "the last id is never appended"
        engine.truncate(start)
        for stop in (0, 1, 4, 9):
            assert _run(engine, logits, steps=10, stop=stop) == ids[:stop + 1]
            assert engine.length == start + stop, "the id a consumer stops at stays out of the cache"
            # what follows the stop equals the reference: the cache holds exactly ids[:stop]
            assert torch.equal(engine.step(torch.tensor(ids[stop])), after[stop])
            engine.truncate(start)


def test_stream_ahead_equals_stream_reading_first(tiny):
    """LLM.stream over the loop: same text, token ids and finish reasons with and without going ahead,
    for eos-free runs cut by max_new_tokens, by a stop string, and answers that continue a conversation."""
    results = []
    for ahead in (False, True):
        llm = kvretrieve.load(tiny, device="cpu", dtype="float32", max_context=4096, retrieval=CONFIGS["lowrank"])
        llm.engine.ahead = ahead
        runs = []
        for prompt, kw in (("Tell me about lamps.", {"max_new_tokens": 12}),
                           ("Tell me about lamps. And ships?", {"max_new_tokens": 9}),
                           ("Tell me about lamps.", {"max_new_tokens": 0})):
            text = "".join(llm.stream(prompt, **kw))
            runs.append((text, llm.last.token_ids, llm.last.finish_reason, llm.cached_tokens, llm.engine.length))
        first = runs[0][0]
        stop = first[len(first) // 2:len(first) // 2 + 2]
        text = "".join(llm.stream("Tell me about lamps.", max_new_tokens=12, stop=[stop] if stop.strip() else []))
        runs.append((text, llm.last.token_ids, llm.last.finish_reason, llm.cached_tokens, llm.engine.length))
        results.append(runs)
    assert results[0] == results[1]
    assert [r[2] for r in results[0][:3]] == ["length", "length", "length"]
    for text, ids, finish, cached, length in results[1]:
        assert cached == length, "the token list and the cache agree after every answer"
