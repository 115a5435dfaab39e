"""Continuous batching's first step (kvretrieve.engine.batch): several sequences decode in one step
over one Decoder, each against its own cache; a sequence's greedy tokens equal its tokens alone."""
from __future__ import annotations

import pytest
import torch

from kvretrieve import RetrievalConfig
from kvretrieve.api import build
from kvretrieve.engine.batch import Batch
from kvretrieve.engine.batch_step import decode_step

PROMPTS = ["The lighthouse keeper wrote in his log that the storm", "def fibonacci(n):\n    \"\"\"Return",
           "List three colours of the rainbow:" * 12]
# lowrank at these lengths scores blocks by mass (the fine layout); "max" is Loki's (the layout beyond 32K).
# A batched step scores either in one launch (kernels.lowrank_block_mass_rows, lowrank_block_scores_rows)
# and, where every row selects afresh as many blocks, picks them with one top-k.
CONFIGS = {"dense": None,
           "lowrank": RetrievalConfig(index="lowrank", budget_tokens=32, window_tokens=16, sink_tokens=4, rank=8),
           "lowrank-max": RetrievalConfig(index="lowrank", budget_tokens=32, window_tokens=16, sink_tokens=4, rank=8,
                                          block_scores="max")}


def greedy(logits: torch.Tensor) -> torch.Tensor:
    return logits.argmax()


@pytest.mark.parametrize("kind", list(CONFIGS))
def test_batched_sequences_decode_as_each_alone(smol, kind):
    """Three prompts of different lengths; the third joins after four steps, the first leaves early
    (a smaller token budget): each row's greedy tokens equal what LLM.generate gives for it alone."""
    batched_equals_alone(smol, kind)


@pytest.mark.parametrize("kind", ["dense", "lowrank"])
def test_steps_launched_ahead_give_the_ids_and_caches_of_steps_in_turn(smol, kind):
    """Batch(ahead=True) launches each step before reading the ids the one before sampled: the same
    ids, finishes and cache lengths as steps taken in turn, whether a row ends on a stop id mid-run,
    leaves by leave() once its ids say so (they arrive a step later), ends on its budget, or fills its
    cache."""
    ahead_equals_in_turn(smol, kind)


@pytest.mark.cuda
@pytest.mark.parametrize("kind", ["dense", "lowrank"])
def test_steps_launched_ahead_on_cuda_give_the_ids_and_caches_of_steps_in_turn(smol_dir, kind):
    """As above on CUDA, where the ids come back through pinned slots and events while the next step
    (a graph replay, rows on their streams) runs."""
    import kvretrieve

    ahead_equals_in_turn(kvretrieve.load(smol_dir, device="cuda", dtype="float32", max_context=4096), kind)


def ahead_equals_in_turn(smol, kind: str) -> None:
    decoder, tok = smol.model, smol.tokenizer
    prompts = [PROMPTS[0], PROMPTS[1], PROMPTS[2], PROMPTS[1]]
    sizes, budgets = (1024, 1024, 128, 1024), (60, 60, 60, 9)
    stop = smol.generate(prompts[0], max_new_tokens=8, temperature=0, return_details=True).token_ids[5]
    smol.reset()
    runs = []
    for ahead in (False, True):
        llms = [build(decoder, tok, "smol", n, 256, CONFIGS[kind]) for n in sizes]
        batch = Batch(ahead=ahead)
        rows = [batch.join(llm.engine, llm.prefill(llm.tokenize(p)), greedy, n, {stop} if i == 0 else tok.eos_ids)
                for i, (llm, p, n) in enumerate(zip(llms, prompts, budgets))]
        for _ in range(80):
            batch.step()
            if len(rows[1].ids) >= 5 and rows[1].finish is None:  # as serve's batcher on a stop string
                batch.leave(rows[1])
            if not batch.rows:
                break
        runs.append([(r.ids, r.finish, llm.engine.length - r.base) for r, llm in zip(rows, llms)])
    assert runs[1] == runs[0], kind
    assert [f for _, f, _ in runs[0]] == ["eos", "left", "length", "length"] and len(runs[0][0][0]) >= 1
    # each cache: the prompt and every id, but the last unless a stop id followed it (as after generate())
    assert all(cached == len(ids) - (finish != "eos") for ids, finish, cached in runs[0])


@pytest.mark.cuda
@pytest.mark.parametrize("kind", list(CONFIGS))
def test_batched_sequences_decode_as_each_alone_on_cuda(smol_dir, kind):
    import kvretrieve

    # fp32: in bf16 a matmul over 3 rows and over 1 may round differently and flip a near-tied token
    batched_equals_alone(kvretrieve.load(smol_dir, device="cuda", dtype="float32", max_context=4096), kind)


def batched_equals_alone(smol, kind: str) -> None:
    decoder, tok = smol.model, smol.tokenizer
    llms = [build(decoder, tok, "smol", 1024, 256, CONFIGS[kind]) for _ in PROMPTS]
    budgets = [6, 14, 10]
    alone = [llm.generate(p, max_new_tokens=n, temperature=0, return_details=True).token_ids
             for llm, p, n in zip(llms, PROMPTS, budgets)]
    for llm in llms:
        llm.reset()
    batch, rows = Batch(), []
    for llm, p, n in zip(llms[:2], PROMPTS, budgets):
        rows.append(batch.join(llm.engine, llm.prefill(llm.tokenize(p)), greedy, n, tok.eos_ids))
    left = []
    for i in range(40):
        if i == 4:
            rows.append(batch.join(llms[2].engine, llms[2].prefill(llms[2].tokenize(PROMPTS[2])), greedy,
                                   budgets[2], tok.eos_ids))
        left += batch.step()
        if not batch.rows and i > 4:
            break
    assert [r.ids for r in rows] == alone, kind
    assert {id(r) for r in left} == {id(r) for r in rows} and all(r.finish for r in rows)
    # each cache holds its prompt and every generated token but the last, as after generate()
    for llm, p, r in zip(llms, PROMPTS, rows):
        assert llm.engine.length == len(llm.tokenize(p)) + len(r.ids) - (r.finish == "length")


def test_a_failed_batched_step_leaves_every_cache_as_it_was(smol):
    """A step is a transaction for every row: a token the model cannot embed fails it, and both rows'
    caches keep their length; the next good step goes on as if the failed one never ran."""
    decoder, tok = smol.model, smol.tokenizer
    a, b = (build(decoder, tok, "smol", 512, 256, None) for _ in range(2))
    la, lb = a.prefill(a.tokenize(PROMPTS[0])), b.prefill(b.tokenize(PROMPTS[1]))
    before = (a.engine.length, b.engine.length)
    bad = torch.tensor([int(la.argmax()), decoder.cfg.vocab_size + 5])
    with pytest.raises(IndexError):
        decode_step([a.engine, b.engine], bad)
    assert (a.engine.length, b.engine.length) == before
    good = torch.stack([la.argmax(), lb.argmax()])
    got = decode_step([a.engine, b.engine], good)
    ref_a = build(decoder, tok, "smol", 512, 256, None)
    ref_a.prefill(ref_a.tokenize(PROMPTS[0]))
    assert torch.allclose(got[0], ref_a.engine.step(la.argmax()), atol=1e-4)
    with pytest.raises(ValueError, match="twice"):
        decode_step([a.engine, a.engine], good)


def test_a_long_prompt_prefills_in_slices_while_the_running_request_goes_on(smol):
    """serve's batcher: a long prompt that arrives while another request decodes goes in 64 tokens at
    a time between that request's steps (it keeps streaming meanwhile), and both answers equal their
    answers alone."""
    import threading
    import time

    from kvretrieve.config import SamplingParams
    from kvretrieve.serve.batcher import Batcher

    decoder, tok = smol.model, smol.tokenizer

    def make():
        return build(decoder, tok, "smol", 2048, 256, None)

    short, long = PROMPTS[1], " ".join(PROMPTS * 8)
    params = [SamplingParams(max_new_tokens=40, temperature=0), SamplingParams(max_new_tokens=4, temperature=0)]
    alone = [make().generate(p, sampling=s, return_details=True).token_ids for p, s in zip((short, long), params)]
    batcher, events = Batcher(make(), 2, make, prefill_slice=64), []
    try:
        fa = batcher.submit(smol.tokenize(short), params[0], lambda piece: events.append("a"), threading.Event())
        deadline = time.monotonic() + 60
        while "a" not in events and time.monotonic() < deadline:
            time.sleep(0.01)
        long_ids = smol.tokenize(long)
        assert len(long_ids) > 10 * 64
        at = len(events)
        fb = batcher.submit(long_ids, params[1], lambda piece: events.append("b"), threading.Event())
        ra, rb = fa.result(timeout=120), fb.result(timeout=120)
    finally:
        batcher.close()
    assert [ra.token_ids, rb.token_ids] == alone
    assert events[at:events.index("b")].count("a") >= 5  # a kept decoding during b's slices


@pytest.mark.parametrize("ahead", [False, True])
def test_the_batcher_answers_as_alone_with_steps_launched_ahead_or_in_turn(smol, ahead):
    """serve's batcher with each step launched before the ids of the one before are read (its default on
    CUDA: ids reach it a step late) and in turn: requests that end on their token budget, on a stop
    string and on a stop token answer as each alone (text, ids, finish), and a session that answered
    serves the next request as a fresh one would."""
    import threading

    from kvretrieve.config import SamplingParams
    from kvretrieve.serve.batcher import Batcher

    decoder, tok = smol.model, smol.tokenizer

    def make():
        return build(decoder, tok, "smol", 1024, 256, None)

    first = make().generate(PROMPTS[0], sampling=SamplingParams(max_new_tokens=12, temperature=0),
                            return_details=True)
    chat = tok.render_chat([{"role": "user", "content": "Name one colour of the rainbow. One word."}])
    cases = [(PROMPTS[0], SamplingParams(max_new_tokens=12, temperature=0, stop=(first.text[6:12],))),
             (PROMPTS[1], SamplingParams(max_new_tokens=9, temperature=0)),
             (chat, SamplingParams(max_new_tokens=60, temperature=0))]
    alone = [make().generate(p, sampling=s, return_details=True) for p, s in cases]
    assert [a.finish_reason for a in alone] == ["stop", "length", "eos"]
    batcher = Batcher(make(), 3, make, ahead=ahead)
    try:
        futures = [batcher.submit(smol.tokenize(p), s, lambda piece: None, threading.Event()) for p, s in cases]
        got = [f.result(timeout=120) for f in futures]
        again = batcher.submit(smol.tokenize(cases[1][0]), cases[1][1], lambda piece: None,
                               threading.Event()).result(timeout=120)
    finally:
        batcher.close()
    assert [(g.text, g.token_ids, g.finish_reason) for g in got] == [(a.text, a.token_ids, a.finish_reason)
                                                                    for a in alone]
    assert (again.text, again.token_ids) == (alone[1].text, alone[1].token_ids)


def test_the_batcher_answers_every_request_when_a_reader_fails_or_after_it_stops(smol):
    """A reader whose callback raises gets that error (the thread goes on serving the next request,
    which answers as alone); after close(), a request is answered None at once instead of waiting."""
    import threading

    from kvretrieve.config import SamplingParams
    from kvretrieve.serve.batcher import Batcher

    def failing(piece: str) -> None:
        raise RuntimeError("the reader went away")

    params = SamplingParams(max_new_tokens=6, temperature=0)
    llm = build(smol.model, smol.tokenizer, "smol", 1024, 256, None)
    want = build(smol.model, smol.tokenizer, "smol", 1024, 256, None).generate(PROMPTS[0], sampling=params,
                                                                               return_details=True)
    batcher = Batcher(llm, 1, None)
    try:
        with pytest.raises(RuntimeError, match="went away"):
            batcher.submit(smol.tokenize(PROMPTS[0]), params, failing, threading.Event()).result(timeout=60)
        got = batcher.submit(smol.tokenize(PROMPTS[0]), params, lambda p: None, threading.Event()).result(timeout=60)
        assert got.token_ids == want.token_ids
    finally:
        batcher.close()
    assert batcher.submit(smol.tokenize(PROMPTS[0]), params, lambda p: None, threading.Event()).result(timeout=5) is None


@pytest.mark.parametrize("kind", ["lowrank", "lowrank-max"])
def test_batched_steps_give_each_rows_logits_alone(tmp_path_factory, kind):
    """Three rows of a tiny random model, prompts long enough that each row's budget picks among many
    blocks: every logit of each row, step after step, equals its logit alone, with the rows' scoring
    (by mass or max), top-k and sparse attention in one launch each; and with one launch a row
    (one_launch=False)."""
    batched_logits_equal_alone(tmp_path_factory, kind, "cpu")
    batched_logits_equal_alone(tmp_path_factory, kind, "cpu", one_launch=False)


def test_rows_that_select_different_numbers_of_blocks_batch_as_each_alone(tmp_path_factory):
    """A short prompt among long ones: its row has fewer candidate blocks than the budget (a k of its
    own, growing step by step), so the rows score in one launch but pick and look up their blocks
    apart; each row's logits stay its logits alone."""
    batched_logits_equal_alone(tmp_path_factory, "lowrank", "cpu", lengths=(300, 40, 367))


@pytest.mark.parametrize("kinds", [("lowrank-max", "lowrank", "lowrank-max"), ("lowrank-max", "dense", "lowrank")])
def test_rows_of_other_configurations_batch_as_each_alone(tmp_path_factory, kinds):
    """Rows that cannot share every launch: max and mass scores side by side share the attention's
    launch but score apart; with a dense row among them every row attends by itself. Each row's
    logits stay its logits alone."""
    batched_logits_equal_alone(tmp_path_factory, kinds, "cpu")


@pytest.mark.cuda
@pytest.mark.parametrize("kind", list(CONFIGS))
def test_graphed_batched_steps_decode_as_each_alone(tmp_path_factory, kind):
    """On CUDA a Batch runs each row's attention on its own stream and, once its rows' step shapes
    repeat, replays a CUDA graph of the step: three rows (a tiny model, prompts long enough for a
    full retrieval budget) give every logit of each row alone, step after step, through the graph;
    when a row leaves, the graphs it was in go, and the two left decode on as alone."""
    batched_logits_equal_alone(tmp_path_factory, kind, "cuda")


def batched_logits_equal_alone(tmp_path_factory, kind: str | tuple, device: str, one_launch: bool = True,
                               lengths: tuple[int, ...] = (300, 411, 367)) -> None:
    """kind: the CONFIGS entry of every row, or one per row; lengths: the rows' prompts."""
    from helpers import dense_backend, retrieval_backend, saved_tiny_model, tiny_decoder
    from kvretrieve.engine.engine import Engine

    path = saved_tiny_model(tmp_path_factory, vocab=256, layers=3, heads=8, kv_heads=2, head_dim=16, max_pos=4096,
                            seed=7)
    dec = tiny_decoder(path, device, torch.float32)

    kinds = kind if isinstance(kind, tuple) else (kind,) * 3

    def engine(i):
        cfg = CONFIGS[kinds[i]]
        return Engine(dec, dense_backend(dec, 1024) if cfg is None else retrieval_backend(dec, cfg, 1024), 256)

    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(0, 256, (n,), generator=g).tolist() for n in lengths]
    steps = 12
    alone = []
    for i, p in enumerate(prompts):
        e, out = engine(i), []
        logits = e.prefill(p)
        for _ in range(steps):
            out.append(logits)
            logits = e.step(logits.argmax())
        alone.append(torch.stack(out))
    batch, got = Batch(one_launch), [[] for _ in prompts]

    def recorder(i):
        def take(logits):
            got[i].append(logits.clone())
            return logits.argmax()
        return take

    budgets = [steps - 4, steps, steps]
    rows = [batch.join(e, e.prefill(p), recorder(i), n)
            for i, (e, p, n) in enumerate(zip([engine(i) for i in range(len(prompts))], prompts, budgets))]
    for step in range(steps + 2):
        left = batch.step()
        if step == 5 and device == "cuda":
            assert 1 <= len(batch.runner.graphs) <= 2 and batch.runner.replays >= 3
        if left:
            assert not batch.runner.graphs  # the graphs the rows that left were in are gone
        if not batch.rows:
            break
    assert all(r.finish == "length" for r in rows) and [len(x) for x in got] == budgets
    for i in range(len(prompts)):
        assert torch.allclose(torch.stack(got[i]), alone[i][:budgets[i]], atol=1e-4), (kind, i)
