"""One LLM per thread is safe: two models in one process, each generating in its own thread, give the
answers they give one after the other (issue 15, 6; several threads sharing one LLM is serving's)."""
from __future__ import annotations

import threading

import kvretrieve
from kvretrieve import RetrievalConfig, SamplingParams


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
