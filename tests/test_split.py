"""Dense first layers (RetrievalConfig.dense_layers, backends.SplitKV): each layer is computed by the
backend that owns it, exactly as that backend computes it alone; saved state and rollbacks hold."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from kvretrieve.backends import DenseKV, RetrievalKV, SplitKV, make_backend
from kvretrieve.config import RetrievalConfig
from kvretrieve.engine.engine import Engine
from kvretrieve.errors import ConfigError
from kvretrieve.resolve import geometry, resolve_retrieval

from helpers import kv_geometry, saved_tiny_model, tiny_decoder

L, HKV, HQ, D = 4, 2, 4, 16
CFG = RetrievalConfig(index="lowrank", block_size=4, budget_tokens=8, sink_tokens=4, window_tokens=8, rank=4,
                      store_dtype="model", store="ram", kmeans="torch", block_scores="max", estimate_rest=False,
                      rest_rank=0)


def protocol_outputs(backend, steps: int, truncate_to: int, seed: int = 0) -> list[torch.Tensor]:
    """Drive a backend through a prefill of 96 tokens, decode steps, a rollback and more steps, with
    random q, k, v of every layer (the same for every backend given the same seed): each layer's output."""
    g = torch.Generator().manual_seed(seed)
    rnd = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    outs = []
    backend.begin(0, 96)
    for layer in range(L):
        backend.begin_layer(layer, rnd(96, HKV, D), rnd(96, HKV, D))
        outs.append(backend.attend(layer, rnd(96, HQ, D), 0))
        backend.end_layer(layer)
    backend.commit(96)
    for phase in range(2):
        for _ in range(steps):
            n = backend.length
            backend.begin(n, 1)
            backend.prologue()
            for layer in range(L):
                outs.append(backend.decode(layer, rnd(1, HQ, D) * 3, rnd(1, HKV, D), rnd(1, HKV, D)))
            backend.commit(n + 1)
        if phase == 0:
            backend.truncate(truncate_to)
    return outs


@pytest.mark.parametrize("first", [1, 2, 3])
def test_each_layer_is_computed_by_the_backend_that_owns_it(first):
    """Layers below dense_layers give exactly the dense backend's outputs, the others exactly those of a
    retrieval backend alone (its layer i is the split's first + i); the tight budget makes the two differ."""
    geo = kv_geometry(L, HKV, D, 4, 64)
    cfg = dataclasses.replace(CFG, dense_layers=first)
    split = make_backend(cfg, geo, 200)
    assert isinstance(split, SplitKV)
    got = protocol_outputs(split, 12, 100)
    want_dense = protocol_outputs(DenseKV(geo, 200), 12, 100)
    want_retrieval = protocol_outputs(RetrievalKV(CFG, geo, 200), 12, 100)
    differ = 0
    for i, (g, d, r) in enumerate(zip(got, want_dense, want_retrieval)):
        layer = i % L
        torch.testing.assert_close(g, d if layer < first else r, atol=0, rtol=0)
        differ += not torch.allclose(d, r, atol=1e-3)
    assert differ >= L - first  # every retrieval layer's decode left something out at this budget
    assert split.memory()["dense_layers"] == 2 * first * HKV * 208 * D * 4  # 200 tokens in pages of 16


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return saved_tiny_model(tmp_path_factory, vocab=256, layers=3, heads=8, kv_heads=2, head_dim=16, max_pos=4096,
                            seed=7)


def split_engine(tiny_dir, first: int, capacity: int = 512, device: str = "cpu", **fields) -> Engine:
    dec = tiny_decoder(tiny_dir, device)
    cfg = resolve_retrieval(dataclasses.replace(CFG, dense_layers=first, store_dtype="auto", block_size=8,
                                                budget_tokens=32, window_tokens=16, sink_tokens=8, **fields),
                            dec.cfg, capacity, dec.device, dec.dtype)
    return Engine(dec, make_backend(cfg, geometry(dec.cfg, capacity, cfg.block_size, dec.device, dec.dtype), capacity),
                  64)


def test_saved_state_of_a_split_backend_decodes_as_the_original(tiny_dir):
    """state() -> load_state() into a fresh split backend: the next steps' logits are the original's."""
    g = torch.Generator().manual_seed(1)
    prompt, steps = torch.randint(0, 256, (300,), generator=g), torch.randint(0, 256, (20,), generator=g)
    a, b = split_engine(tiny_dir, 1), split_engine(tiny_dir, 1)
    a.prefill(prompt.tolist())
    for t in steps[:10]:
        a.step(t)
    state = {k: t.clone() for k, t in a.backend.state().items()}
    assert any(k.startswith("dense.") for k in state) and any(k.startswith("retrieval.store.") for k in state)
    b.backend.load_state(state, a.backend.length)
    for t in steps[10:]:
        torch.testing.assert_close(b.step(t), a.step(t), atol=0, rtol=0)


def test_speculative_prefetch_reaches_the_retrieving_layers_only(tiny_dir):
    """The model asks for layer + 1's blocks while layer runs: with the first layer dense only layer 1
    asks (for layer 2, the retrieval part's layer 1); outputs equal those without speculation."""
    g = torch.Generator().manual_seed(2)
    prompt, steps = torch.randint(0, 256, (300,), generator=g), torch.randint(0, 256, (12,), generator=g)
    plain, spec = split_engine(tiny_dir, 1), split_engine(tiny_dir, 1, speculative=True)
    plain.prefill(prompt.tolist())
    spec.prefill(prompt.tolist())
    for t in steps:
        torch.testing.assert_close(spec.step(t), plain.step(t), atol=0, rtol=0)
    c = spec.backend.counters()
    assert c["spec_total"] == 12 * 1 * 2 * 4 and 0 < c["spec_hits"] <= c["spec_total"]  # 12 steps, 1 layer, 2 heads


def test_dense_layers_out_of_range_are_refused(tiny_dir):
    with pytest.raises(ConfigError, match="dense_layers must be >= 0"):
        RetrievalConfig(dense_layers=-1)
    with pytest.raises(ConfigError, match=r"between 1 and 2 for this model \(3 layers\), got 3"):
        split_engine(tiny_dir, 3)


@pytest.mark.cuda
def test_cuda_graph_steps_of_a_split_backend_equal_eager_steps(tiny_dir):
    g = torch.Generator().manual_seed(5)
    prompt, steps = torch.randint(0, 256, (400,), generator=g), torch.randint(0, 256, (40,), generator=g)
    eager, graph = split_engine(tiny_dir, 1, device="cuda"), split_engine(tiny_dir, 1, device="cuda")
    eager.graphs = False
    outs = []
    for e in (eager, graph):
        e.prefill(prompt.tolist())
        outs.append(torch.stack([e.step(t.cuda()) for t in steps]))
    assert graph._captured
    torch.testing.assert_close(outs[0], outs[1], atol=1e-5, rtol=0)
