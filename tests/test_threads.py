"""Threads: one LLM per thread gives the answers it gives alone; one LLM shared by threads runs their
calls one after the other (each answer as if it were alone); interleaved streams in one thread are
refused at once, never mixed."""
from __future__ import annotations

import threading

import pytest

import kvretrieve
from kvretrieve import RetrievalConfig, SamplingParams
from kvretrieve.errors import BusyError


def test_two_models_in_two_threads_answer_as_they_do_sequentially(smol_dir):
    from pydoc_data.topics import topics

    dense = kvretrieve.load(smol_dir, device="cpu", dtype="float32", max_context=2048, retrieval=None)
    sparse = kvretrieve.load(smol_dir, device="cpu", dtype="float32", max_context=2048,
                             retrieval=RetrievalConfig(index="lowrank", budget_tokens=64, window_tokens=32))
    doc = topics["assignment"][:2500]
    jobs = [(dense, doc + "\n\nSummarise the text above in one sentence."),
            (sparse, doc + "\n\nWhat does the text above define?"),
            (dense, "Write a haiku about threads."),
            (sparse, doc[:1200] + "\n\nName one keyword from the text above.")]
    greedy = SamplingParams(max_new_tokens=16, temperature=0.0)
    sampled = SamplingParams(max_new_tokens=16, temperature=0.8, top_p=0.9, seed=7)
    want = [llm.generate(p, sampling=s) for llm, p in jobs[:2] for s in (greedy, sampled)]

    got: dict[int, list[str]] = {}
    errors: list[BaseException] = []

    def work(i: int, llm, prompt: str) -> None:
        try:
            got[i] = [llm.generate(prompt, sampling=s) for s in (greedy, sampled)]
            llm.generate(jobs[i + 2][1], sampling=greedy)  # a second prompt: the prefix cache is cut back
            got[i] += [llm.generate(prompt, sampling=s) for s in (greedy, sampled)]
        except BaseException as e:  # noqa: BLE001 - reported by the main thread
            errors.append(e)

    threads = [threading.Thread(target=work, args=(i, llm, p)) for i, (llm, p) in enumerate(jobs[:2])]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=600)
    assert not errors, errors
    assert not any(t.is_alive() for t in threads)
    assert got[0] == want[0:2] * 2 and got[1] == want[2:4] * 2


@pytest.fixture(scope="module")
def shared(smol_dir):
    return kvretrieve.load(smol_dir, device="cpu", dtype="float32", max_context=1024,
                           retrieval=RetrievalConfig(index="lowrank", budget_tokens=64, window_tokens=32))


PROMPTS = ["The lighthouse keeper wrote in the log that night:", "Three facts about rivers:",
           "def fibonacci(n):", "Dear committee, I am writing to"]


def test_threads_sharing_one_llm_get_their_sequential_answers(shared):
    """Four threads, each generating from its own prompt on one LLM (prefix reuse cutting the cache back
    at every turn), and streaming: every answer equals the answer given alone. Without the turn lock
    the cache mixed the prompts (two threads got one wrong answer; retrieval raised a TypeError)."""
    greedy = SamplingParams(max_new_tokens=12)
    want = [shared.generate(p, sampling=greedy) for p in PROMPTS]
    got, errors = {}, []

    def work(i: int) -> None:
        try:
            out = [shared.generate(PROMPTS[i], sampling=greedy, return_details=True).text for _ in range(2)]
            out.append("".join(shared.stream(PROMPTS[i], sampling=greedy)))
            got[i] = out
        except BaseException as e:  # noqa: BLE001 - reported by the main thread
            errors.append(e)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(PROMPTS))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=600)
    assert not errors, errors
    assert [got[i] for i in range(len(PROMPTS))] == [[w] * 3 for w in want]


def test_interleaved_streams_in_one_thread_are_refused_not_mixed(shared):
    greedy = SamplingParams(max_new_tokens=12)
    want = [shared.generate(p, sampling=greedy) for p in PROMPTS[:2]]
    first = shared.stream(PROMPTS[0], sampling=greedy)
    pieces = [next(first)]
    second = shared.stream(PROMPTS[1], sampling=greedy)
    with pytest.raises(BusyError, match="still open in this thread"):
        next(second)
    for call in (lambda: shared.generate(PROMPTS[1]), lambda: shared.prefill([1, 2, 3]), shared.reset):
        with pytest.raises(BusyError, match="close"):
            call()
    pieces += list(first)
    assert "".join(pieces) == want[0]  # the open stream went on untouched
    assert "".join(shared.stream(PROMPTS[1], sampling=greedy)) == want[1]
    abandoned = shared.stream(PROMPTS[0], sampling=greedy)
    next(abandoned)
    abandoned.close()  # closing a stream ends its turn
    assert shared.generate(PROMPTS[1], sampling=greedy) == want[1]
