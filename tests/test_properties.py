"""Property tests (hypothesis) over RetrievalConfig and prompt lengths, on test_retrieval.py's tiny
random Llama (3 layers, 8 query and 2 KV heads, head_dim 16) in fp32 on the CPU.

Each example draws a valid configuration (any index kind, block size, sinks, window, budget, rank,
pool size and the options the config has) and a script: a prompt (1-48 or 200-400 tokens), a
continuation, decode steps, a truncation anywhere (to 0 included) and more decode steps. Two
properties: no valid configuration crashes or produces non-finite logits, and with a budget that
covers the context the retrieval backend gives dense attention's logits. The two runtime bugs they
found (since fixed) are pinned down at the end as regression tests.
"""
from __future__ import annotations

import dataclasses

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvretrieve.config import INDEX_KINDS, RetrievalConfig
import test_retrieval
from test_retrieval import engines, run_script

tiny_dir = test_retrieval.tiny_dir  # its module-scoped fixture: the tiny model, saved once for this module

FIELDS = {f.name for f in dataclasses.fields(RetrievalConfig)}
VOCAB, HEAD_DIM = 256, 16  # of tiny_dir's model
SETTINGS = settings(max_examples=25, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])


@st.composite
def scripts(draw):
    """(prompt, continuation, decode steps, truncate_to, capacity) as token tensors and lengths."""
    n_prompt = draw(st.integers(1, 48) | st.integers(200, 400))  # short ones, and ones that fill ivf segments
    n_cont, n_steps = draw(st.integers(1, 64)), draw(st.integers(1, 12))
    total = n_prompt + n_cont + n_steps
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
    tokens = torch.randint(0, VOCAB, (total,), generator=g)
    truncate_to = draw(st.integers(0, total))
    capacity = max(total, truncate_to + min(5, n_steps)) + draw(st.integers(0, 16))
    return tokens[:n_prompt], tokens[n_prompt:n_prompt + n_cont], tokens[n_prompt + n_cont:], truncate_to, capacity


@st.composite
def configs(draw, min_budget: int = 0):
    """A valid RetrievalConfig; min_budget > 0 makes the budget cover that many tokens."""
    index = draw(st.sampled_from(INDEX_KINDS))
    bs = draw(st.sampled_from([4, 8, 16, 32]))
    if min_budget:
        budget = -(-max(min_budget, bs) // bs) * bs + bs * draw(st.integers(0, 2))
    else:
        budget = draw(st.none() | st.integers(bs, 320))
    kw = dict(index=index, block_size=bs, budget_tokens=budget, sink_tokens=draw(st.integers(0, 48)),
              window_tokens=draw(st.none() | st.integers(0, 96)), rank=draw(st.integers(1, HEAD_DIM)))
    budget_blocks = RetrievalConfig(**kw).budget_blocks
    kw["cache_blocks"] = draw(st.none() | st.integers(budget_blocks, 3 * budget_blocks))
    if index == "ivf":
        kw.update(kmeans=draw(st.sampled_from(["torch", "faiss"])), cluster_tokens=64 * bs * draw(st.integers(1, 2)),
                  estimate_tokens=draw(st.sampled_from([0, bs, 64])))
    optional = {"speculative": st.booleans(), "prefetch": st.booleans(), "reselect_every": st.integers(1, 4)}
    kw.update({name: draw(strategy) for name, strategy in optional.items() if name in FIELDS})
    return RetrievalConfig(**kw)


@SETTINGS
@given(cfg=configs(), script=scripts())
def test_any_valid_configuration_runs(tiny_dir, cfg, script):
    prompt, cont, steps, truncate_to, capacity = script
    _, sparse = engines(tiny_dir, cfg, capacity=capacity)
    logits = run_script(sparse, prompt, cont, steps, truncate_to)
    assert len(logits) == 2 + len(steps) + min(5, len(steps))
    for row in logits:
        assert row.shape[-1] == VOCAB and torch.isfinite(row).all(), cfg
    assert sparse.backend.length == truncate_to + min(5, len(steps))


@SETTINGS
@given(data=st.data(), script=scripts())
def test_budget_covering_the_context_equals_dense(tiny_dir, data, script):
    prompt, cont, steps, truncate_to, capacity = script
    cfg = data.draw(configs(min_budget=len(prompt) + len(cont) + len(steps)), label="cfg")
    dense, sparse = engines(tiny_dir, cfg, capacity=capacity)
    want = run_script(dense, prompt, cont, steps, truncate_to)
    got = run_script(sparse, prompt, cont, steps, truncate_to)
    for i, (a, b) in enumerate(zip(want, got)):
        assert torch.allclose(a, b, atol=2e-5, rtol=1e-5), (i, (a - b).abs().max().item(), cfg)


# ---- runtime bugs the properties found, fixed; kept as regression tests ------------------------------

def test_continuation_while_less_than_a_block_is_cached(tiny_dir):
    dense, sparse = engines(tiny_dir, RetrievalConfig(index="lowrank", block_size=16, budget_tokens=64, rank=8))
    ids = torch.arange(1, 13)
    want = [dense.model.logits(dense.forward(part)) for part in (ids[:5], ids[5:])]
    got = [sparse.model.logits(sparse.forward(part)) for part in (ids[:5], ids[5:])]
    assert all(torch.allclose(a, b, atol=2e-5, rtol=1e-5) for a, b in zip(want, got))


def test_truncation_into_the_block_being_filled(tiny_dir):
    """300 tokens cached (block 18 holds 288..299, not yet stored); truncating to 290 must keep 288, 289."""
    cfg = RetrievalConfig(index="lowrank", block_size=16, budget_tokens=512, sink_tokens=16, window_tokens=32, rank=8)
    dense, sparse = engines(tiny_dir, cfg)
    ids = torch.randint(0, VOCAB, (303,), generator=torch.Generator().manual_seed(1))
    for engine in (dense, sparse):
        engine.forward(ids[:300])
        engine.truncate(290)
    for t in ids[300:]:
        a, b = dense.model.logits(dense.forward(t.view(1))), sparse.model.logits(sparse.forward(t.view(1)))
        assert torch.allclose(a, b, atol=2e-5, rtol=1e-5), (a - b).abs().max()
