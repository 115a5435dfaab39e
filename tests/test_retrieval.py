"""Retrieval runtime: equals dense when the budget covers the context, exact top-k, LRU accounting,
store growth and capacity errors, speculative prefetch, and the async path on CUDA."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from kvretrieve.config import RetrievalConfig
from kvretrieve.errors import ConfigError, ResourceError
from kvretrieve.cache import BlockPool
from kvretrieve.engine.engine import Engine
from kvretrieve.index import ExactIndex, IVFIndex, LowRankIndex, top_blocks
from kvretrieve.memory import free_device_bytes
from kvretrieve.models.llama import Decoder
from kvretrieve.resolve import fine_layout, resolve_retrieval
from kvretrieve.backends import RetrievalKV
from kvretrieve.store import KVStore
from kvretrieve.store.reads import gather_blocks, read_blocks

from helpers import dense_backend, kv_geometry, retrieval_backend, saved_tiny_model, tiny_decoder

KINDS = ["lowrank", "bounds", "exact"]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return saved_tiny_model(tmp_path_factory, vocab=256, layers=3, heads=8, kv_heads=2, head_dim=16, max_pos=4096,
                            seed=7)


def decoder(model_dir, device="cpu", dtype=torch.float32) -> Decoder:
    return tiny_decoder(model_dir, device, dtype)


def engines(model_dir, retrieval: RetrievalConfig, device="cpu", dtype=torch.float32, capacity=1024):
    dec = decoder(model_dir, device, dtype)
    dense = Engine(dec, dense_backend(dec, capacity), 4096)
    # append_chunk_blocks=5 and prefill chunks of 64 rows: long segments reach the store in several
    # chunks and attend query chunk by query chunk, as 128K prompts do (the dense side takes one chunk)
    return dense, Engine(dec, retrieval_backend(dec, retrieval, capacity, append_chunk_blocks=5), 64)


def run_script(engine, prompt, continuation, decode_tokens, truncate_to):
    """prefill, a multi-token continuation, decode steps, a truncation and decode again: the logits."""
    out = [engine.model.logits(engine.forward(prompt))]
    out.append(engine.model.logits(engine.forward(continuation)))
    for t in decode_tokens:
        out.append(engine.model.logits(engine.forward(t.view(1))))
    engine.truncate(truncate_to)
    for t in decode_tokens[:5]:
        out.append(engine.model.logits(engine.forward(t.view(1))))
    return out


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("block_size,sink,window,reselect", [(16, 32, 64, 1), (8, 0, 0, 1), (4, 4, 8, 1),
                                                             (4, 4, 8, 3)])
def test_full_budget_equals_dense(tiny_dir, kind, block_size, sink, window, reselect):
    """With the budget covering the context, retrieval is dense attention, also when selections are
    reused between steps (a new candidate block changes the selection's width: a fresh one)."""
    cfg = RetrievalConfig(index=kind, block_size=block_size, budget_tokens=512, sink_tokens=sink,
                          window_tokens=window, rank=8, reselect_every=reselect)
    dense, sparse = engines(tiny_dir, cfg)
    g = torch.Generator().manual_seed(0)
    prompt, cont = torch.randint(0, 256, (203,), generator=g), torch.randint(0, 256, (37,), generator=g)
    steps = torch.randint(0, 256, (45,), generator=g)
    for a, b in zip(run_script(dense, prompt, cont, steps, 230), run_script(sparse, prompt, cont, steps, 230)):
        assert torch.allclose(a, b, atol=2e-5, rtol=1e-5), (a - b).abs().max()


@pytest.mark.parametrize("kind", ["lowrank", "ivf"])
def test_int8_store_with_full_budget_stays_next_to_dense(tiny_dir, kind):
    """The int8 store changes only what comes back from CPU memory: with the budget covering the
    context the logits differ from dense by quantization noise, far less than a sparse selection."""
    base = dict(index=kind, block_size=8, budget_tokens=512, sink_tokens=8, window_tokens=16, rank=8,
                cluster_tokens=512)
    dense, exact = engines(tiny_dir, RetrievalConfig(**base))
    _, quant = engines(tiny_dir, RetrievalConfig(**base, store_dtype="int8"))
    g = torch.Generator().manual_seed(0)
    prompt, cont = torch.randint(0, 256, (203,), generator=g), torch.randint(0, 256, (37,), generator=g)
    steps = torch.randint(0, 256, (45,), generator=g)
    ref, same, noisy = (run_script(e, prompt, cont, steps, 230) for e in (dense, exact, quant))
    assert all(torch.allclose(a, b, atol=2e-5, rtol=1e-5) for a, b in zip(ref, same))
    kl = [torch.nn.functional.kl_div(b.log_softmax(-1), a.log_softmax(-1), log_target=True, reduction="batchmean")
          for a, b in zip(ref[2:], noisy[2:])]  # decode steps: what the store feeds
    assert max(kl) < 1e-3 and not all(torch.allclose(a, b, atol=1e-6) for a, b in zip(ref[2:], noisy[2:]))
    d = quant.backend.store.d  # fp32 model: 4 bytes a value become 1, plus a 4-byte scale per token
    assert quant.backend.store.nbytes() * 4 * d == exact.backend.store.nbytes() * (d + 4)
    for e, per_token in ((exact, 4 * d), (quant, d + 4)):  # what a missed block moves: K and V of bs tokens
        c = e.backend.counters()
        assert c["misses"] > 0 and c["h2d_bytes"] == c["misses"] * 2 * 8 * per_token


def planted_run(kind: str, sabotage: str | None = None, reselect: int = 1, steps: int = 12, observer=None):
    """Attention that only a working selection keeps: per layer and KV head, 6 blocks of keys along a
    direction u amid small random keys, and decode queries along u (99% of the softmax mass on those
    blocks), with a budget of 8 blocks out of 128. Drives a RetrievalKV through the engine's protocol
    (begin, prologue, the decode calls, commit) and returns the worst relative error of its attention
    output against exact attention over every token, and the backend. sabotage replaces the index's
    scores by random ("random") or negated ("negated") ones: the mechanism these tests guard.
    observer(backend), if given, makes the backend's observer."""
    L, H, G, d, bs, n = 2, 2, 2, 32, 8, 1024
    cfg = RetrievalConfig(index=kind, block_size=bs, budget_tokens=8 * bs, sink_tokens=bs, window_tokens=4 * bs,
                          rank=8, reselect_every=reselect, cluster_tokens=512, kmeans="torch", store_dtype="model",
                          block_scores="max", store="ram", rest_rank=0)
    backend = RetrievalKV(cfg, kv_geometry(L, H, d, bs, n // bs + 8), n + 32, append_chunk_blocks=5)
    if sabotage:
        scores = backend.index.scores
        backend.index.scores = lambda layer, q, nb: (torch.randn_like(scores(layer, q, nb)) if sabotage == "random"
                                                     else -scores(layer, q, nb))
    backend.observer = observer(backend) if observer else None
    g = torch.Generator().manual_seed(5)
    u = torch.nn.functional.normalize(torch.randn(L, H, d, generator=g), dim=-1)
    keys, values = 0.3 * torch.randn(L, n, H, d, generator=g), torch.randn(L, n, H, d, generator=g)
    for layer in range(L):
        for h in range(H):
            for b in torch.randperm(n // bs - 6, generator=g)[:6] + 1:     # past the sink, before the window
                rows = slice(int(b) * bs, int(b + 1) * bs)
                keys[layer, rows, h] = 4 * u[layer, h] + 0.3 * torch.randn(bs, d, generator=g)
    backend.begin(0, n)
    for layer in range(L):
        backend.begin_layer(layer, keys[layer], values[layer])
        backend.end_layer(layer)
    backend.commit(n)
    q = 12 * u.repeat_interleave(G, 1)                                             # [L, Hq, d]
    worst = 0.0
    for step in range(steps):
        k_new, v_new = 0.3 * torch.randn(L, 1, H, d, generator=g), torch.randn(L, 1, H, d, generator=g)
        keys, values = torch.cat([keys, k_new], 1), torch.cat([values, v_new], 1)
        backend.begin(n + step, 1)
        backend.prologue()
        for layer in range(L):
            out = backend.decode(layer, q[layer, None], k_new[layer], v_new[layer])[0]
            p = (torch.einsum("hgd,nhd->hgn", q[layer].view(H, G, d), keys[layer]) * d ** -0.5).softmax(-1)
            ref = torch.einsum("hgn,nhd->hgd", p, values[layer]).reshape(H * G, d)
            worst = max(worst, ((out - ref).norm() / ref.norm()).item())
        backend.commit(n + step + 1)
    return worst, backend


@pytest.mark.parametrize("kind", KINDS + ["ivf", "oracle"])
def test_small_budget_keeps_the_attention_only_a_working_selection_keeps(kind):
    """8 of 128 blocks attended: the output matches exact attention when the index finds the planted
    blocks, and is far off when its scores are random or negated (so this test guards the selection)."""
    err, backend = planted_run(kind)
    assert err < 0.05, err
    c = backend.counters()
    assert c["hits"] + c["misses"] == 12 * 2 * 2 * 8  # steps x layers x kv heads x budget blocks
    for sabotage in ("random", "negated"):
        assert planted_run(kind, sabotage)[0] > 0.5, sabotage


def test_reused_selection_skips_lookups_and_never_counts_a_token_twice():
    """reselect_every=4: one step in four selects (and looks up), the others reuse its slots; a reused
    block that entered the window leaves the table, so the attended set has no duplicates; the reused
    selection still holds the planted blocks (and would not with broken scores)."""
    seen = []

    def observer(backend):
        def check(layer, q, ids, lo, hi, n, out):
            seen.append(layer)
            for h in range(backend.H):
                row = [s for s in backend.plan.tables[layer, h].tolist() if s >= 0]
                assert len(row) == len(set(row)), row  # no pool slot (so no block) attended twice
        return check

    err, backend = planted_run("lowrank", reselect=4, steps=40, observer=observer)
    assert err < 0.05, err
    c = backend.counters()
    assert c["hits"] + c["misses"] == 10 * 2 * 2 * 8  # 10 selecting steps of 40 x layers x kv heads x budget
    assert len(seen) == 40 * 2
    assert planted_run("lowrank", "negated", reselect=4, steps=8)[0] > 0.5


def test_speculative_prefetch_gives_identical_outputs(tiny_dir):
    base = RetrievalConfig(index="lowrank", block_size=8, budget_tokens=64, sink_tokens=8, window_tokens=16, rank=8,
                           reselect_every=1)
    _, plain = engines(tiny_dir, base)
    _, spec = engines(tiny_dir, dataclasses.replace(base, speculative=True))
    g = torch.Generator().manual_seed(2)
    prompt, steps = torch.randint(0, 256, (300,), generator=g), torch.randint(0, 256, (12,), generator=g)
    plain.forward(prompt)
    spec.forward(prompt)
    for t in steps:
        assert torch.equal(plain.forward(t.view(1)), spec.forward(t.view(1)))
    c = spec.backend.counters()
    assert c["spec_total"] == 12 * 2 * 2 * 8 and 0 < c["spec_hits"] <= c["spec_total"]  # layers 1 and 2 speculate


def test_exact_index_returns_true_top_k():
    g = torch.Generator().manual_seed(3)
    L, H, G, d, bs, nb = 1, 2, 4, 16, 8, 20
    idx = ExactIndex(kv_geometry(L, H, d, bs, nb))
    keys = torch.randn(H, nb, bs, d, generator=g)
    idx.add(0, 0, keys, keys)
    q = torch.randn(H * G, d, generator=g)
    truth = torch.einsum("hgd,hnbd->hgnb", q.view(H, G, d), keys).amax(-1).amax(1)  # [H, nb]
    scores = idx.scores(0, q, nb)
    assert torch.allclose(scores, truth, atol=1e-5)
    picked = top_blocks(scores[:, 2:17], 5) + 2
    for h in range(H):
        want = set((torch.topk(truth[h, 2:17], 5).indices + 2).tolist())
        assert set(picked[h].tolist()) == want


def test_lru_accounting_and_eviction_order():
    """The device-side LRU (kernels.lru_lookup through BlockPool.lookup) against a plain Python
    model of least-recently-used replacement, over random selections."""
    cfg = RetrievalConfig(block_size=4, budget_tokens=16, sink_tokens=4, window_tokens=8, cache_blocks=6)
    pool = BlockPool(cfg, kv_geometry(1, 2, 8, cfg.block_size, 64))
    rng = np.random.default_rng(4)
    model = [dict() for _ in range(2)]  # per head: block -> (slot, last used)
    hits = misses = 0
    for step in range(1, 300):
        ids = np.stack([rng.choice(12, 4, replace=False) for _ in range(2)])
        slots, fetch = pool.lookup(0, torch.from_numpy(ids), torch.tensor([step], dtype=torch.int32))
        slots = slots.numpy() - pool.lru0
        for h in range(2):
            cached = model[h]
            for j, b in enumerate(ids[h]):
                if b in cached:
                    assert not fetch[h, j] and slots[h, j] == cached[b][0]
                    cached[b] = (cached[b][0], step)
                    hits += 1
                else:
                    assert fetch[h, j]
                    misses += 1
            new = [b for b in ids[h] if b not in cached]
            # the misses take the m stalest slots not picked now (empty ones first: never used), equal
            # stamps by slot, handed out in slot order
            free = set(range(6)) - {s for s, _ in cached.values()}
            stale = sorted([(0, s, None) for s in free] + [(t, s, b) for b, (s, t) in cached.items() if t < step])
            victims = sorted(stale[:len(new)], key=lambda e: e[1])
            for b, (_, slot, old) in zip(new, victims):
                if old is not None:
                    del cached[old]
                assert slots[h, list(ids[h]).index(b)] == slot
                cached[b] = (slot, step)
            assert len(set(slots[h])) == 4 and len(cached) <= 6
            for b, (s, _) in cached.items():
                assert pool.slot_of_block[0, h, b] == s and pool.block_of_slot[0, h, s] == b
        assert pool.counts.tolist() == [hits, misses]


def test_store_grows_without_copying_and_refuses_what_cannot_fit(monkeypatch):
    store = KVStore(kv_geometry(2, 2, 8, 4, 1024), segment_blocks=16)
    k = torch.randn(2, 20, 4, 8)
    store.write(1, 0, k[:, :10], k[:, :10] + 1)
    first = store.segments[1][0].data_ptr()
    store.write(1, 10, k[:, 10:], k[:, 10:] + 1)
    assert store.segments[1][0].data_ptr() == first and len(store.segments[1]) == 2
    rk, rv = read_blocks(store, 1, 0, 20)
    assert torch.equal(rk, k) and torch.equal(rv, k + 1)
    out = torch.empty(2, 3, 32)
    gather_blocks(store, 1, torch.tensor([1, 0, 1]), torch.tensor([18, 3, 5]), out)
    assert torch.equal(out[0], torch.stack([k[1, 18], k[0, 3], k[1, 5]]).view(3, 32))
    monkeypatch.setenv("KVRETRIEVE_FREE_RAM_GB", "0.00001")
    with pytest.raises(ResourceError, match="CPU RAM.*KVRETRIEVE_FREE_RAM_GB"):
        store.ensure(100)
    assert len(store.segments[1]) == 2  # nothing was allocated


def test_int8_store_reads_within_half_a_step_in_half_the_memory():
    """quantize=True: int8 codes and a scale per token and head (keys divided by a scale per channel
    first); read and gather give the model's dtype back, each value within half a quantization step
    of what was written."""
    from kvretrieve.store.quant import channel_scales, dequantize, quantize

    g = torch.Generator().manual_seed(3)
    k = (torch.randn(2, 40, 4, 8, generator=g) * torch.rand(2, 40, 4, 1, generator=g) * 5).to(torch.bfloat16)
    k[0, 3, 1] = 0  # an all-zero token keeps scale 1, no NaN
    plain = KVStore(kv_geometry(2, 2, 8, 4, 1024, dtype=torch.bfloat16), segment_blocks=16)
    store = KVStore(kv_geometry(2, 2, 8, 4, 1024, dtype=torch.bfloat16), quantize=True, segment_blocks=16)
    for s in (plain, store):
        s.write(1, 0, k, -k)
    rk, rv = read_blocks(store, 1, 0, 40)                                   # three segments
    assert rk.dtype == rv.dtype == torch.bfloat16
    c = channel_scales(k)[:, None, None, :]
    assert torch.equal(store.channels[1], c[:, 0, 0]) and torch.equal(store.channels[0], torch.ones(2, 8))
    k_step = (k.float() / c).abs().amax(-1, keepdim=True) / 127 * c
    v_step = k.float().abs().amax(-1, keepdim=True) / 127
    for got, want, step in ((rk, k, k_step), (rv, -k, v_step)):
        assert ((got.float() - want.float()).abs() <= step / 2 + want.float().abs() * 2 ** -8 + 1e-6).all()
    assert not torch.equal(rk, k) and torch.equal(rk[0, 3, 1], k[0, 3, 1])
    assert torch.equal(rk, dequantize(*quantize(k, c), torch.bfloat16, c))
    assert torch.equal(rv, dequantize(*quantize(-k), torch.bfloat16))
    out = torch.empty(2, 3, 32, dtype=torch.bfloat16)
    gather_blocks(store, 1, torch.tensor([1, 0, 1]), torch.tensor([18, 3, 35]), out)
    assert torch.equal(out[0], torch.stack([rk[1, 18], rk[0, 3], rk[1, 35]]).view(3, 32))
    assert torch.equal(out[1], torch.stack([rv[1, 18], rv[0, 3], rv[1, 35]]).view(3, 32))
    # int8 codes (half of bf16) + an fp32 scale per token of 8 values (a quarter; 1/64 at head_dim 128)
    assert store.nbytes() == plain.nbytes() // 2 + plain.nbytes() // 4
    assert store.bytes_per_block * 4 == plain.bytes_per_block * 3


def test_key_channel_scales_keep_small_channels_of_outlier_keys():
    """Keys whose few channels are 50x the rest (as Qwen2's key bias makes them): one int8 scale per
    row leaves the small channels a few levels, and the attention logits q.k of a query that weighs
    the small channels move by ~10x more than with the store's channel scales."""
    g = torch.Generator().manual_seed(0)
    k = torch.randn(2, 64, 16, 128, generator=g)
    k[..., :4] *= 50
    q = torch.randn(2, 128, generator=g)
    q[:, :4] = 0  # the logits the outliers do not decide
    store = KVStore(kv_geometry(1, 2, 128, 16, 1024), quantize=True, segment_blocks=64)
    store.write(0, 0, k, k)
    rk, rv = read_blocks(store, 0, 0, 64)
    from kvretrieve.store.quant import dequantize, quantize
    row_only = dequantize(*quantize(k), torch.float32)
    err = lambda x: (torch.einsum("hd,hntd->hnt", q, x - k)).abs().mean().item()  # noqa: E731
    assert err(rk) * 8 < err(row_only)
    assert torch.equal(rv, row_only)  # values keep their per-row scale alone


def test_store_reserves_in_the_background_and_writes_wait_for_their_layer():
    store = KVStore(kv_geometry(3, 2, 8, 4, 1024), segment_blocks=16)
    store.ensure(100, background=True)                  # 7 segments per layer, on a thread
    k = torch.randn(2, 100, 4, 8)
    for layer in (2, 0, 1):
        store.write(layer, 0, k + layer, k - layer)
    store.join()
    assert [len(s) for s in store.segments] == [7, 7, 7] and store.capacity_blocks == 112
    for layer in range(3):
        rk, rv = read_blocks(store, layer, 0, 100)
        assert torch.equal(rk, k + layer) and torch.equal(rv, k - layer)
    store.sync_offsets()  # what the fetch kernel reads: each segment's start relative to the first one
    base = store.segments[0][0].data_ptr()
    for layer in range(3):
        for i, seg in enumerate(store.segments[layer]):
            assert store.device_offsets[layer, i] * 4 == seg.data_ptr() - base


def test_retrieval_config_validation():
    for bad, msg in [(dict(budget_tokens=2), "at least one block"), (dict(block_size=16, budget_tokens=8), "16 tokens"),
                     (dict(max_budget_tokens=2), "max_budget_tokens"), (dict(window_tokens=-1), "window_tokens"),
                     (dict(index="faiss"), "unknown RetrievalConfig.index"), (dict(block_size=12), "power of two"),
                     (dict(block_size=16, cache_blocks=4), "cache_blocks"), (dict(store_dtype="fp8"), "store_dtype"),
                     (dict(block_scores="best"), "block_scores")]:
        with pytest.raises(ConfigError, match=msg):
            RetrievalConfig(**bad)


def test_store_dtype_auto_is_int8_on_a_gpu_only(tiny_dir):
    mc = decoder(tiny_dir).cfg

    def stored(s, device):
        cfg = resolve_retrieval(RetrievalConfig(index="lowrank", store_dtype=s), mc, 1024, torch.device(device),
                                torch.float32)
        assert cfg.resolved
        return cfg.store_dtype

    assert [stored(s, "cuda") for s in ("auto", "model", "int8")] == ["int8", "model", "int8"]
    assert [stored(s, "cpu") for s in ("auto", "model", "int8")] == ["model", "model", "int8"]
    _, engine = engines(tiny_dir, RetrievalConfig(block_size=8, budget_tokens=32, window_tokens=16, rank=8))
    assert not engine.backend.store.quantized  # on this CPU machine, auto keeps the model's dtype


def test_rank_above_head_dim_is_refused(tiny_dir):
    with pytest.raises(ConfigError, match="head_dim 16"):
        engines(tiny_dir, RetrievalConfig(rank=32))


@pytest.mark.cuda
@pytest.mark.parametrize("kind,store", [(k, "model") for k in KINDS + ["ivf"]] + [("lowrank", "int8"), ("ivf", "int8"),
                                                                                 ("lowrank-mass", "int8")])
def test_cuda_graph_steps_equal_eager_steps(tiny_dir, kind, store):
    """Decode steps replayed from CUDA graphs (misses read from pinned memory by the fetch kernel)
    give the same logits as eager steps, with and without speculative prefetch."""
    kind, _, scores = kind.partition("-")
    base = RetrievalConfig(index=kind, block_size=8, budget_tokens=64, sink_tokens=8, window_tokens=16, rank=8,
                           cluster_tokens=512, store_dtype=store, block_scores=scores or "max")
    _, eager = engines(tiny_dir, base, device="cuda")
    eager.graphs = False
    _, graph = engines(tiny_dir, base, device="cuda")
    _, spec = engines(tiny_dir, dataclasses.replace(base, speculative=True), device="cuda")
    g = torch.Generator().manual_seed(5)
    prompt, steps = torch.randint(0, 256, (700,), generator=g), torch.randint(0, 256, (64,), generator=g)
    outs = []
    for e in (eager, graph, spec):
        e.prefill(prompt.tolist())
        outs.append(torch.stack([e.step(t.cuda()) for t in steps]))
    assert graph._captured and spec._captured  # the graph path really ran
    assert torch.allclose(outs[0], outs[1], atol=1e-5) and torch.allclose(outs[0], outs[2], atol=1e-5)
    assert graph.backend.counters()["misses"] > 0


@pytest.mark.cuda
def test_cuda_rest_on_a_side_stream_equals_the_rest_in_line(tiny_dir):
    """The token-level rest begun on a side stream beside the fetch (graph replays included) gives the
    logits of the rest computed in line after the sparse decode (RestEstimate without a side stream)."""
    base = RetrievalConfig(index="lowrank", block_size=4, budget_tokens=64, sink_tokens=8, window_tokens=16, rank=8,
                           rest_rank=4, estimate_rest=True)
    _, side = engines(tiny_dir, base, device="cuda")
    _, inline = engines(tiny_dir, base, device="cuda")
    inline.backend.rest.side = None
    g = torch.Generator().manual_seed(9)
    prompt, steps = torch.randint(0, 256, (700,), generator=g), torch.randint(0, 256, (48,), generator=g)
    outs = []
    for e in (side, inline):
        e.prefill(prompt.tolist())
        outs.append(torch.stack([e.step(t.cuda()) for t in steps]))
    assert side._captured and side.backend.rest.side is not None
    assert torch.allclose(outs[0], outs[1], atol=1e-5)


def test_observer_sees_what_decode_attended(tiny_dir):
    """The observer hook reports the attended set; attention restricted to it, recomputed from the
    layer's full K,V, equals the sparse kernel's output."""
    cfg = RetrievalConfig(index="bounds", block_size=8, budget_tokens=32, sink_tokens=8, window_tokens=16,
                          estimate_rest=False)  # the output is then the attended set's alone
    _, sparse = engines(tiny_dir, cfg)
    backend, seen = sparse.backend, []

    def observer(layer, q, ids, lo, hi, n, out):
        k, v = backend.layer_kv(layer, n)
        keep = torch.zeros(backend.H, n, dtype=torch.bool)
        keep[:, :lo * 8] = True
        keep[:, hi * 8:] = True
        for h in range(backend.H):
            for b in ids[h]:
                keep[h, b * 8:(b + 1) * 8] = True
        G = q.shape[0] // backend.H
        s = torch.einsum("hgd,nhd->hgn", q.view(backend.H, G, -1), k) * backend.scale
        p = s.masked_fill(~keep[:, None], float("-inf")).softmax(-1)
        ref = torch.einsum("hgn,nhd->hgd", p, v).reshape(q.shape)
        seen.append((ids.shape, (out - ref).abs().max().item(), keep.sum(1).tolist()))

    backend.observer = observer
    g = torch.Generator().manual_seed(6)
    sparse.forward(torch.randint(0, 256, (301,), generator=g))
    sparse.forward(torch.tensor([3]))
    assert len(seen) == 3  # one call per layer
    for shape, err, attended in seen:
        assert shape == (2, 4) and err < 1e-5
        n_full = 302 // 8
        window_and_tail = 302 - (n_full - 2) * 8  # 2 window blocks + the 6-token tail
        assert attended == [8 + 32 + window_and_tail] * 2  # sink block + 4 selected blocks + window


@pytest.mark.parametrize("kmeans", ["torch", "faiss"])
def test_ivf_clustered_storage_keeps_full_budget_exact(tiny_dir, kmeans):
    """Segments stored in cluster order (and shortened by a truncation into them, the blocks cut off
    back in natural order) leave the output exact when the budget covers the context."""
    cfg = RetrievalConfig(index="ivf", block_size=4, budget_tokens=1024, sink_tokens=8, window_tokens=16,
                          cluster_tokens=256, kmeans=kmeans)
    dense, sparse = engines(tiny_dir, cfg)
    g = torch.Generator().manual_seed(8)
    prompt, cont = torch.randint(0, 256, (650,), generator=g), torch.randint(0, 256, (300,), generator=g)
    steps = torch.randint(0, 256, (40,), generator=g)
    outs = []
    for engine in (dense, sparse):
        outs.append(run_script(engine, prompt, cont, steps, 700))  # 700: inside a clustered segment
    segments = sparse.backend.placement.clusters.segments[0]
    # 700 tokens are 175 blocks, 4 of them the window: the segment from block 130 keeps 41 of its 64
    assert [(first, nb) for first, nb, *_ in segments] == [(2, 64), (66, 64), (130, 41)]
    for a, b in zip(*outs):
        assert torch.allclose(a, b, atol=2e-5, rtol=1e-5), (a - b).abs().max()


def test_ivf_finds_planted_clusters():
    """Keys drawn around a few directions: the blocks of one direction must be what the index ranks
    first for a query along that direction (recall against exact)."""
    from kvretrieve.index import IVFIndex

    g = torch.Generator().manual_seed(9)
    H, d, bs, n = 2, 32, 8, 512
    dirs = torch.nn.functional.normalize(torch.randn(H, 8, d, generator=g), dim=-1) * 4
    labels = torch.randint(0, 8, (H, n), generator=g)
    keys = torch.gather(dirs, 1, labels[..., None].expand(-1, -1, d)) + 0.3 * torch.randn(H, n, d, generator=g)
    idx = IVFIndex(kv_geometry(1, H, d, bs, n // bs), kmeans="torch")
    perm = idx.cluster_order(keys)
    stored = torch.gather(keys, 1, perm[..., None].expand(-1, -1, d)).view(H, n // bs, bs, d)
    idx.add(0, 0, stored, stored)
    exact = ExactIndex(kv_geometry(1, H, d, bs, n // bs))
    exact.add(0, 0, stored, stored)
    q = dirs[:, 3].repeat_interleave(2, 0)                                      # 2 query heads per KV head
    for h in range(H):
        want = int((labels[h] == 3).sum()) // bs                                  # blocks this cluster fills
        got = set(top_blocks(idx.scores(0, q, n // bs), want)[h].tolist())
        truth = set(top_blocks(exact.scores(0, q, n // bs), want)[h].tolist())
        assert len(got & truth) >= want - 1  # at most a boundary block differs from the oracle
        members = torch.gather(labels[h], 0, perm[h]).view(-1, bs) == 3
        assert members[sorted(got)].float().mean() > 0.8                      # blocks are nearly pure
        assert members[sorted(got)].sum() >= 0.85 * members.sum()             # and hold the cluster


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
def test_block_summary_estimates_match_their_formula(device):
    """A block counts as block_size keys at its mean key, each with the block's mean value: the zone
    (given blocks) and the rest (a mask of blocks) against that formula written out (on CUDA through
    the Triton sparse decode and block_rest kernels, fp32 with tf32-free dots)."""
    from kvretrieve.index import BlockSummary

    g = torch.Generator().manual_seed(10)
    summary = BlockSummary(kv_geometry(1, 2, 16, 4, 10, device=device))
    k, v = torch.randn(2, 10, 4, 16, generator=g), torch.randn(2, 10, 4, 16, generator=g)
    summary.add(0, 0, k.to(device), v.to(device))
    q, blocks = torch.randn(6, 16, generator=g), torch.tensor([[1, 4, 7], [0, 2, 9]])
    mask = torch.zeros(2, 10, dtype=torch.bool).scatter(1, blocks, True)
    for out, lse in (summary.estimate(0, q.to(device), blocks.to(device), 0.25),
                     summary.estimate_rest(0, q.to(device), mask.to(device), 0.25)):
        out, lse = out.cpu(), lse.cpu()
        for h in range(6):
            kv = h // 3
            mean, vs = k[kv, blocks[kv]].mean(1), v[kv, blocks[kv]]             # [3, d], [3, 4, d]
            w = 4 * torch.exp(0.25 * mean @ q[h])                               # 4 keys at each mean key
            assert torch.allclose(lse[h], torch.log(w.sum()), atol=1e-5)
            assert torch.allclose(out[h], (w[:, None] * vs.mean(1)).sum(0) / w.sum(), atol=1e-5)
    out, lse = summary.estimate_rest(0, q.to(device), torch.zeros(2, 10, dtype=torch.bool, device=device), 0.25)
    assert torch.all(lse == float("-inf")) and torch.all(out == 0)  # nothing left out


def test_ivf_errors():
    from kvretrieve.index.ivf import resolve_kmeans

    with pytest.raises(ConfigError, match="faiss-gpu"):
        resolve_kmeans("faiss-gpu", torch.device("cpu"))
    with pytest.raises(ConfigError, match="choose one"):
        RetrievalConfig(index="lowrank", estimate_tokens=64, estimate_rest=True)
    assert resolve_kmeans("auto", torch.device("cpu")) == "faiss"


@pytest.mark.parametrize("kind", ["ivf", "lowrank"])
def test_estimating_the_left_out_blocks_in_decode(tiny_dir, kind):
    """The zone (the next-ranked blocks) and the rest (every candidate not attended) add their
    summary-estimated mass: the output stays finite, a zone that covers every candidate gives what
    the rest gives, and both move toward dense."""
    base = RetrievalConfig(index=kind, block_size=4, budget_tokens=32, sink_tokens=4, window_tokens=8, rank=8,
                           cluster_tokens=256, kmeans="torch", estimate_rest=False)
    dense, plain = engines(tiny_dir, base)
    _, zoned = engines(tiny_dir, dataclasses.replace(base, estimate_tokens=1024))
    _, rest = engines(tiny_dir, dataclasses.replace(base, estimate_rest=True, rest_rank=0))  # by block summaries
    g = torch.Generator().manual_seed(11)
    prompt, steps = torch.randint(0, 256, (500,), generator=g), torch.randint(0, 256, (6,), generator=g)
    errs = {"plain": [], "zoned": [], "rest": []}
    for e in (dense, plain, zoned, rest):
        e.forward(prompt)
    for t in steps:
        ref = dense.model.logits(dense.forward(t.view(1)))
        outs = {name: e.model.logits(e.forward(t.view(1))) for name, e in (("plain", plain), ("zoned", zoned),
                                                                            ("rest", rest))}
        assert torch.allclose(outs["zoned"], outs["rest"], atol=1e-4)
        for name, out in outs.items():
            assert torch.isfinite(out).all()
            errs[name].append(torch.nn.functional.kl_div(out.log_softmax(-1), ref.log_softmax(-1), log_target=True,
                                                         reduction="sum").item())
    assert sum(errs["zoned"]) < sum(errs["plain"]) and sum(errs["rest"]) < sum(errs["plain"])


def test_auto_budget_is_the_measured_default():
    """The layout auto gives beyond 40K tokens (blocks of 16) follows the context exactly as the
    configuration the accuracy benchmark chose (bench/accuracy.py default_cell), and caps retrieval
    for long contexts."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
    from accuracy import default_cell

    cfg = fine_layout(RetrievalConfig(), "lowrank", 131072)
    assert (cfg.block_size, cfg.block_scores, cfg.max_budget_tokens) == (16, "max", 2048)
    for context in (2048, 4096, 8192):
        sink, window, budget = default_cell(context).split()
        assert (cfg.sink_blocks * 16, *[n * 16 for n in cfg.plan(context)]) == (sink, window, budget)
    assert [n * 16 for n in cfg.plan(131072)] == [512, 2048]
    assert RetrievalConfig(block_size=16, budget_tokens=64, window_tokens=32).plan(131072) == (2, 4)


def test_auto_layout_follows_the_capacity(tiny_dir):
    """Left to auto, lowrank up to 40K tokens of capacity takes blocks of 4, mass scores and at most
    3,456 retrieved: at 32K that attends 1/8 of the context (the measured quality default,
    bench/results/longctx_levers2.md); beyond, blocks of 16, max and 2,048 (128K's speed). Set fields
    are kept, and kinds other than lowrank keep blocks of 16."""
    mc, cpu = decoder(tiny_dir).cfg, torch.device("cpu")

    def layout(cfg, capacity):
        got = resolve_retrieval(cfg, mc, capacity, cpu, torch.float32)
        assert got.resolved
        return got.index, got.block_size, got.block_scores, got.max_budget_tokens

    assert layout(RetrievalConfig(rank=8), 32768) == ("lowrank", 4, "mass", 3456)
    assert layout(RetrievalConfig(rank=8), 40960) == ("lowrank", 4, "mass", 3456)
    assert layout(RetrievalConfig(rank=8), 40961) == ("lowrank", 16, "max", 2048)
    assert layout(RetrievalConfig(index="lowrank", rank=8), 131072) == ("lowrank", 16, "max", 2048)
    assert layout(RetrievalConfig(index="exact"), 32768) == ("exact", 16, "max", 2048)
    assert layout(RetrievalConfig(rank=8, block_size=8), 32768) == ("lowrank", 8, "mass", 2048)
    assert layout(RetrievalConfig(rank=8, block_scores="max"), 32768) == ("lowrank", 4, "max", 3456)
    assert layout(RetrievalConfig(rank=8, max_budget_tokens=1024), 131072)[3] == 1024
    fine = resolve_retrieval(RetrievalConfig(rank=8), mc, 32768, cpu, torch.float32)
    window, budget = fine.plan(32768)
    attended = fine.sink_tokens + (window + budget + 1) * fine.block_size   # + the partly filled tail block
    assert (window * 4, budget * 4) == (512, 3456) and attended <= 32768 / 8
    assert [n * 4 for n in fine.plan(8192)] == [512, 1516]   # shorter contexts follow it: a quarter attended


def test_auto_plan_moves_in_steps_of_1024_tokens():
    """Each new (window, budget) is a new CUDA graph to capture: below the caps the plan stays put over
    each 1,024 tokens of context (it used to move a block every 16 tokens with blocks of 4)."""
    cfg = RetrievalConfig(block_size=4)
    assert len({cfg.plan(c) for c in range(8193, 9217)}) == 1
    assert cfg.plan(9217) != cfg.plan(9216)
    assert all(cfg.plan(c) == cfg.plan(-(-c // 1024) * 1024) for c in range(4096, 16384))


def test_auto_budget_in_decode(tiny_dir):
    _, sparse = engines(tiny_dir, RetrievalConfig(index="bounds", block_size=4, reselect_every=1), capacity=2100)
    g = torch.Generator().manual_seed(12)
    sparse.forward(torch.randint(0, 256, (2000,), generator=g))
    for t in torch.randint(0, 256, (5,), generator=g):
        sparse.forward(t.view(1))
    window, budget = RetrievalConfig(block_size=4).plan(2005)
    c = sparse.backend.counters()
    assert (window, budget) == (64, 187)  # 1,024 attended: 16 sink, 256 window, 748 retrieved, 4 tail
    assert c["hits"] + c["misses"] == 5 * 3 * 2 * budget


def test_backend_leaves_the_callers_kv_alone(tiny_dir):
    """begin_layer/end_layer may reorder what they store (ivf), never the caller's tensors: the
    accuracy benchmark hands backends views of a dense cache."""
    cfg = RetrievalConfig(index="ivf", block_size=4, budget_tokens=64, sink_tokens=4, window_tokens=8,
                          cluster_tokens=256, kmeans="torch")
    _, sparse = engines(tiny_dir, cfg)
    backend = sparse.backend
    g = torch.Generator().manual_seed(13)
    k, v = torch.randn(600, 2, 16, generator=g), torch.randn(600, 2, 16, generator=g)
    k0, v0 = k.clone(), v.clone()
    backend.begin(0, 600)
    for layer in range(backend.L):
        backend.begin_layer(layer, k, v)
        backend.attend(layer, torch.randn(600, 8, 16, generator=g), 0)
        backend.end_layer(layer)
    backend.commit(600)
    assert backend.placement.clusters.segments[0] and torch.equal(k, k0) and torch.equal(v, v0)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
def test_lookup_and_fetch_stress_slots_always_hold_their_blocks(device):
    """Many steps of random selections through a small cache: after lookup + fetch (on CUDA the
    zero-copy kernel, queued on the stream with no host sync) every selected block's slot holds
    exactly that block's K and V from the store, and attention over the table equals attention
    over the same blocks taken from the store."""
    from kvretrieve import kernels

    dev = torch.device(device)
    L, H, d, bs, nb = 2, 3, 16, 8, 64
    cfg = RetrievalConfig(block_size=bs, budget_tokens=6 * bs, sink_tokens=0, window_tokens=0, cache_blocks=8)
    store = KVStore(kv_geometry(L, H, d, bs, nb, dev), segment_blocks=16)
    g = torch.Generator().manual_seed(21)
    keys, values = torch.randn(L, H, nb, bs, d, generator=g), torch.randn(L, H, nb, bs, d, generator=g)
    for layer in range(L):
        store.write(layer, 0, keys[layer], values[layer])
    store.sync_offsets()
    pool = BlockPool(cfg, kv_geometry(L, H, d, bs, nb, dev))
    pool.ensure_lru()
    q = torch.randn(H * 2, d, generator=g).to(dev)
    weights = torch.cat([torch.full((12,), 8.0), torch.ones(nb - 12)])
    fetched = 0
    for step in range(1, 400):
        layer = step % L
        # skewed selections: the first 12 blocks come back often (hits), the rest rarely (evictions)
        ids = torch.multinomial(weights.expand(H, -1), 4, replacement=False, generator=g).to(dev)
        slots, fetch = pool.lookup(layer, ids, torch.tensor([step], dtype=torch.int32, device=dev))
        kernels.fetch_blocks(store, layer, ids, fetch, slots, pool.k[layer], pool.v[layer])
        fetched += int(fetch.sum())
        heads = torch.arange(H, device=dev)[:, None]
        want_k = keys[layer].to(dev)[heads, ids]
        assert torch.equal(pool.k[layer][heads, slots.long()], want_k)
        assert torch.equal(pool.v[layer][heads, slots.long()], values[layer].to(dev)[heads, ids])
        table = torch.cat([slots, torch.full((H, 1), -1, dtype=torch.int32, device=dev)], 1)
        out, _ = kernels.sparse_decode(q, pool.k[layer], pool.v[layer], table,
                                       torch.zeros(1, dtype=torch.int32, device=dev), d ** -0.5)
        ref_table = torch.cat([ids.int().cpu(), torch.full((H, 1), -1, dtype=torch.int32)], 1)  # same empty tail
        ref, _ = kernels.reference.sparse_decode(q.cpu(), keys[layer], values[layer], ref_table,
                                                 torch.zeros(1, dtype=torch.int32), d ** -0.5)
        assert torch.allclose(out.cpu(), ref, atol=1e-5)
    hits, misses = pool.counts.tolist()
    assert misses == fetched and hits > 0 and misses > 8 * H  # both paths and many evictions ran


@pytest.mark.parametrize("device,total", [("cpu", 768), pytest.param("cuda", 4096, marks=pytest.mark.cuda)])
def test_long_generation_memory_stays_flat_and_seeds_repeat(tiny_dir, device, total):
    """4,096 tokens (on the GPU, with CUDA graphs; 768 on the CPU, where a step is slow) sampled with
    retrieval: after warm-up the allocated device memory does not grow, host memory grows only by the
    store segments the context needs, and a second run with the same seed gives the same tokens."""
    from kvretrieve.config import SamplingParams
    from kvretrieve.engine.sampling import make_generator, sample

    cfg = RetrievalConfig(index="lowrank", block_size=16, budget_tokens=128, sink_tokens=16, window_tokens=64,
                          rank=8)
    params = SamplingParams(temperature=0.8, top_k=50, seed=1234)
    runs = []
    for _ in range(2):
        _, engine = engines(tiny_dir, cfg, device=device, capacity=total + 300)
        backend, dev = engine.backend, torch.device(device)
        gen = make_generator(params, dev)
        token = sample(engine.prefill([i % 250 + 1 for i in range(256)]), params, gen)
        tokens, allocated = [], {}
        for i in range(total - 256):
            token = sample(engine.step(token), params, gen)
            tokens.append(int(token))
            if dev.type == "cuda" and i in (256, total - 257):
                allocated[i] = torch.cuda.memory_allocated(dev)
        segments = -(-(total // 16) // backend.store.seg_blocks)
        assert backend.store.reserved == segments and backend.store.nbytes() == segments * backend.store.seg_blocks \
            * backend.store.bytes_per_block
        if allocated:
            assert allocated[256] == allocated[total - 257], allocated
            assert engine._captured  # the graph path really ran
        runs.append(tokens)
    assert runs[0] == runs[1] and len(set(runs[0])) > 20


def test_oracle_index_ranks_blocks_by_their_true_attention_mass():
    """oracle scores = log of each block's softmax mass summed over the GQA group; so its top-k keeps
    at least as much mass as the exact (max q.k) ranking, for every KV head."""
    g = torch.Generator().manual_seed(5)
    L, H, G, d, bs, nb = 1, 2, 3, 16, 4, 24
    oracle = ExactIndex(kv_geometry(L, H, d, bs, nb), mass=True)
    exact = ExactIndex(kv_geometry(L, H, d, bs, nb))
    keys = torch.randn(H, nb, bs, d, generator=g) * 2
    for idx in (oracle, exact):
        idx.add(0, 0, keys, keys)
    q = torch.randn(H * G, d, generator=g)
    p = torch.softmax(torch.einsum("hgd,htd->hgt", q.view(H, G, d), keys.view(H, nb * bs, d)) * d ** -0.5, -1)
    mass = p.view(H, G, nb, bs).sum(-1).sum(1)                                     # [H, nb]
    assert torch.allclose(oracle.scores(0, q, nb).exp(), mass, atol=1e-6)
    for k in (1, 4, 9):
        kept = [mass.gather(1, top_blocks(idx.scores(0, q, nb), k)).sum(1) for idx in (oracle, exact)]
        assert torch.all(kept[0] >= kept[1] - 1e-6)
        assert torch.allclose(kept[0], mass.topk(k, dim=1).values.sum(1))


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
def test_lowrank_mass_scores_are_the_oracles_at_full_rank_and_keep_more_mass_than_max_below(device):
    """block_scores="mass": at rank = head_dim they are the oracle's scores (the true attention share
    of each block, summed over the group); at a low rank they keep more true mass in their top-k
    than Loki's max scores, summed over heads and queries (keys with a strong shared direction,
    whose within-block spread the sketches only partly see)."""
    g = torch.Generator().manual_seed(12)
    H, G, d, bs, nb = 2, 4, 32, 8, 64
    base = torch.randn(H, 1, 1, d, generator=g) * 3
    keys = (base + torch.randn(H, nb, 1, d, generator=g) + 1.5 * torch.randn(H, nb, bs, d, generator=g)).to(device)
    geo = kv_geometry(1, H, d, bs, nb, device=device)
    oracle = ExactIndex(geo, mass=True)
    full, low, loki = LowRankIndex(geo, d, mass=True), LowRankIndex(geo, 4, mass=True), LowRankIndex(geo, 4)
    for idx in (oracle, full, low, loki):
        if idx is not oracle:
            idx.fit(0, keys.flatten(1, 2).transpose(0, 1))
        idx.add(0, 0, keys, keys)
    qs = torch.randn(16, H * G, d, generator=g).to(device) * 2
    assert torch.allclose(full.scores(0, qs[0], nb), oracle.scores(0, qs[0], nb), atol=1e-4)
    kept = {"mass": 0.0, "max": 0.0}
    for q in qs:
        mass = oracle.scores(0, q, nb).exp()
        for name, idx in (("mass", low), ("max", loki)):
            kept[name] += mass.gather(1, top_blocks(idx.scores(0, q, nb), 8)).sum().item()
    assert kept["mass"] > 1.05 * kept["max"], kept


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
def test_lowrank_mass_at_full_rank_decodes_as_the_oracle(tiny_dir, device):
    """Through the engine: lowrank with block_scores="mass" and rank = head_dim picks the oracle's
    blocks, so a small budget (and the rest's estimate) gives the oracle engine's logits; Loki's
    max scores do not."""
    base = RetrievalConfig(index="oracle", block_size=8, budget_tokens=32, sink_tokens=8, window_tokens=16,
                           store_dtype="model")
    mass = dataclasses.replace(base, index="lowrank", rank=16, block_scores="mass", rest_rank=0)  # the oracle's rest
    loki = dataclasses.replace(mass, block_scores="max")
    engines_ = [engines(tiny_dir, c, device=device)[1] for c in (base, mass, loki)]
    g = torch.Generator().manual_seed(8)
    prompt, steps = torch.randint(0, 256, (400,), generator=g), torch.randint(0, 256, (24,), generator=g)
    outs = []
    for e in engines_:
        e.prefill(prompt.tolist())
        outs.append(torch.stack([e.step(t.to(device)) for t in steps]))
    assert torch.allclose(outs[0], outs[1], atol=1e-4), (outs[0] - outs[1]).abs().max()
    assert not torch.allclose(outs[0], outs[2], atol=1e-4)


@pytest.mark.cuda
def test_cuda_store_is_pinned_from_load_and_a_context_beyond_ram_is_refused_there(tiny_dir, monkeypatch):
    """On CUDA the CPU store is reserved (pinned) on a thread from the moment the backend is made, so the
    first prefill does not pin; a capacity the RAM cannot hold is refused then, before any prefill, by a
    RAM store, while store="auto" (the default) puts it on disk, unpinned."""
    cfg = RetrievalConfig(index="lowrank", block_size=8, budget_tokens=64, window_tokens=16, rank=8)
    _, engine = engines(tiny_dir, cfg, device="cuda", capacity=4096)
    store = engine.backend.store
    store.join()
    assert store.pin and store.home.disk_dir is None
    assert store.reserved == store.n_segments and store.nbytes() >= store.max_blocks * store.bytes_per_block
    monkeypatch.setenv("KVRETRIEVE_FREE_RAM_GB", str(store.nbytes() / 2 / 2**30))
    with pytest.raises(ResourceError, match="max_context"):
        engines(tiny_dir, dataclasses.replace(cfg, store="ram"), device="cuda", capacity=4096)
    on_disk = engines(tiny_dir, cfg, device="cuda", capacity=4096)[1]
    assert not on_disk.backend.store.pin and on_disk.backend.store.home.disk_dir is not None
    # it decodes as the pinned store does, eagerly (its fetches read the selection on the host: no graph)
    g = torch.Generator().manual_seed(9)
    prompt, steps = torch.randint(0, 256, (600,), generator=g).cuda(), torch.randint(0, 256, (6,), generator=g)
    outs = []
    for e in (engine, on_disk):
        e.forward(prompt)
        outs.append(torch.stack([e.step(t.cuda()) for t in steps]))
    assert on_disk.backend.graph_key() is None and not on_disk._captured
    assert torch.allclose(outs[0], outs[1], atol=1e-4)


def test_auto_index_takes_lowrank_while_its_sketches_fit_and_ivf_beyond(tiny_dir, monkeypatch):
    """index="auto" (the default) is lowrank while its key sketches take at most half of the free
    memory, ivf past that; explicit kinds are kept as asked."""
    cfg = RetrievalConfig(rank=8, block_size=16)
    assert cfg.index == "auto"
    mc, cpu = decoder(tiny_dir).cfg, torch.device("cpu")
    capacity = 1000 * cfg.block_size - 16             # 1,000 blocks with the tail block
    sketch = mc.num_layers * mc.num_kv_heads * 1000 * cfg.block_size * cfg.rank * 4  # fp32
    means = mc.num_layers * mc.num_kv_heads * 1000 * mc.head_dim * 4  # block mean keys (mass scores, the rest)
    # the rest adds the value sums; its mean keys are the mass scores' own; at this capacity (the fine
    # layout) it counts token by token through value sketches of rank 16 (= head_dim): a basis and a mean
    # per layer and head, 16 values per token
    values = mc.num_layers * mc.num_kv_heads * (1000 * cfg.block_size * 16 + mc.head_dim * 17) * 4
    for rest, scores, need in ((None, "mass", sketch + 2 * means + values), (False, "mass", sketch + means),
                               (False, "max", sketch)):
        for free, kind in [(2 * need, "lowrank"), (2 * need - 4096, "ivf")]:
            monkeypatch.setenv("KVRETRIEVE_FREE_RAM_GB", str(free / 2**30))
            got = resolve_retrieval(dataclasses.replace(cfg, estimate_rest=rest, block_scores=scores), mc, capacity,
                                    cpu, torch.float32)
            assert (got.index, got.estimate_rest) == (kind, rest is None and kind == "lowrank")
            assert resolve_retrieval(dataclasses.replace(cfg, index="bounds"), mc, capacity, cpu,
                                     torch.float32).index == "bounds"
    monkeypatch.delenv("KVRETRIEVE_FREE_RAM_GB")
    dense, auto = engines(tiny_dir, dataclasses.replace(cfg, budget_tokens=64, window_tokens=16))
    _, lowrank = engines(tiny_dir, RetrievalConfig(index="lowrank", rank=8, budget_tokens=64, window_tokens=16))
    assert auto.backend.cfg.index == "lowrank" and isinstance(auto.backend.index, LowRankIndex)
    prompt = torch.randint(0, 256, (300,), generator=torch.Generator().manual_seed(3))
    assert torch.equal(auto.forward(prompt), lowrank.forward(prompt))


@pytest.mark.parametrize("kind", KINDS + ["ivf", "oracle"])
def test_memory_counts_each_part_of_every_index_kind(tiny_dir, kind):
    """backend.memory() (what `kvretrieve profile` reports) for every kind: the index's bytes are the
    device tensors it holds (ivf's once named a tensor it no longer has, and profile failed)."""
    _, sparse = engines(tiny_dir, RetrievalConfig(index=kind, rank=8, budget_tokens=64, window_tokens=16,
                                                  estimate_rest=False))
    sparse.forward(torch.randint(0, 256, (100,), generator=torch.Generator().manual_seed(0)))
    index = sparse.backend.index
    held = sum(t.numel() * t.element_size() for t in vars(index).values() if isinstance(t, torch.Tensor))
    mem = sparse.backend.memory()
    assert mem["index"] == held > 0 and mem["store"] > 0 and mem["pool"] > 0


def test_auto_attention_is_dense_while_the_whole_kv_fits(tiny_dir, monkeypatch):
    """RetrievalConfig() (index="auto", what load() and the CLI default to) is dense attention while the
    KV cache of the whole capacity and a prefill's working set fit in 90% of the free memory, retrieval
    beyond; None and explicit kinds are kept whatever the memory."""
    from kvretrieve.resolve import dense_kv_bytes, prefill_workspace_bytes, resolve_attention

    mc, cpu, f32 = decoder(tiny_dir).cfg, torch.device("cpu"), torch.float32
    need = dense_kv_bytes(mc, 4096, f32) + prefill_workspace_bytes(mc, 4096, 4096, f32)
    for free, mode in [(need / 0.89, "dense"), (need / 0.91, "retrieval")]:
        monkeypatch.setenv("KVRETRIEVE_FREE_RAM_GB", str(free / 2**30))
        choice = resolve_attention(RetrievalConfig(), mc, 4096, cpu, f32, 4096)
        assert choice.mode == mode, choice.reason
        assert choice.retrieval is None if mode == "dense" else choice.retrieval.resolved
        assert ("fits" if mode == "dense" else "does not fit") in choice.reason
        assert resolve_attention(None, mc, 4096, cpu, f32, 4096).mode == "dense"
        assert resolve_attention(RetrievalConfig(index="bounds"), mc, 4096, cpu, f32, 4096).retrieval.index == "bounds"


@pytest.mark.cuda
def test_auto_index_on_a_capped_gpu_turns_to_ivf(tiny_dir):
    """free_device_bytes honours set_per_process_memory_fraction (what --gpu-mem-gb sets), so a capacity
    whose sketches would crowd the capped device gets the ivf index, which then decodes."""
    dev = torch.device("cuda", 0)  # set_per_process_memory_fraction wants an index
    cfg = RetrievalConfig(rank=8, block_size=8, budget_tokens=64, window_tokens=16)
    total = torch.cuda.get_device_properties(dev).total_memory
    dec = decoder(tiny_dir, "cuda")
    torch.cuda.empty_cache()
    # 3 layers x 2 heads x 8 ranks x fp32 = 192 B of sketches per token: 600 MiB at 3.3M tokens
    capacity = 600 * 2**20 // 192
    try:
        torch.cuda.set_per_process_memory_fraction((torch.cuda.memory_allocated(dev) + 2**30) / total, dev)
        assert free_device_bytes(dev) <= 2**30
        backend = retrieval_backend(dec, cfg, capacity)
        assert backend.cfg.index == "ivf" and isinstance(backend.index, IVFIndex)
        backend.store.join()
        prompt = torch.randint(0, 256, (512,), generator=torch.Generator().manual_seed(4)).cuda()
        assert torch.isfinite(dec.logits(Engine(dec, backend, 64).forward(prompt))).all()
        del backend
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0, dev)
    backend = retrieval_backend(dec, cfg, capacity)
    backend.store.join()
    assert backend.cfg.index == "lowrank"


@pytest.mark.cuda
def test_out_of_memory_in_a_prefill_is_a_resource_error_and_the_cache_stays(tiny_dir):
    """An OOM during a pass (what a capacity whose caches fit at load can still meet in a long
    prefill) reaches the user as a ResourceError with fixes, the pass rolled back."""
    dev = torch.device("cuda", 0)  # set_per_process_memory_fraction wants an index
    cfg = RetrievalConfig(index="lowrank", rank=8, block_size=8, budget_tokens=64, window_tokens=16)
    dense, engine = engines(tiny_dir, cfg, device="cuda", capacity=4096)
    engine.backend.store.join()
    prompt = torch.randint(0, 256, (3000,), generator=torch.Generator().manual_seed(5)).cuda()
    total = torch.cuda.get_device_properties(dev).total_memory
    for e in (dense, engine):
        e.forward(prompt[:99])
        first = e.forward(prompt[99:100], last_logits=True)  # the reference, in the shape it is redone in
        torch.cuda.empty_cache()
        try:  # no allocation beyond the memory already held
            torch.cuda.set_per_process_memory_fraction(torch.cuda.memory_reserved(dev) / total, dev)
            with pytest.raises(ResourceError, match="out of GPU memory while running 2,900 tokens after 100"):
                e.forward(prompt[100:])
        finally:
            torch.cuda.set_per_process_memory_fraction(1.0, dev)
        assert e.length == 100
        e.truncate(99)
        assert torch.allclose(e.forward(prompt[99:100], last_logits=True), first, atol=1e-5)


@pytest.mark.cuda
@pytest.mark.parametrize("kind", [None, "lowrank", "ivf"])
def test_warm_up_leaves_an_empty_cache_that_decodes_as_a_fresh_one(tiny_dir, kind):
    """Engine.warm_up (kvretrieve.load runs it on CUDA) prefills and decodes a throwaway prompt, then
    truncates to 0: what follows must match an engine that never warmed up."""
    cfg = RetrievalConfig(index=kind, rank=8, block_size=8, budget_tokens=64, window_tokens=16,
                          cluster_tokens=512) if kind else None
    prompt = torch.randint(0, 256, (1500,), generator=torch.Generator().manual_seed(6)).cuda()
    runs = []
    for warm in (True, False):
        dense, engine = engines(tiny_dir, cfg or RetrievalConfig(index="lowrank", rank=8), device="cuda",
                                capacity=4096)
        e = engine if kind else dense
        if warm:
            e.warm_up()
            assert e.length == 0 and not e._captured, "warm-up captures no graph (its shapes are not the prompt's)"
            if kind:  # nor keeps the decode pool's LRU region through the next prefill
                assert e.backend.pool.k.shape[2] == e.backend.pool.lru0
        logits = [e.forward(prompt, last_logits=True)]
        for _ in range(12):
            logits.append(e.step(logits[-1].argmax()))
        runs.append(torch.stack(logits))
    assert torch.equal(runs[0].argmax(-1), runs[1].argmax(-1))
    assert torch.allclose(runs[0], runs[1], atol=1e-4, rtol=1e-4)


@pytest.mark.cuda
@pytest.mark.parametrize("quantize", [False, True])
def test_store_reads_to_the_gpu_equal_reads_on_the_host(quantize):
    """read_blocks(..., device=cuda) (a continuation prefill's earlier tokens) copies per head and
    dequantizes on the GPU: the same values as the host path, across segment boundaries."""
    L, H, d, bs, nb = 2, 3, 16, 4, 40
    dev = torch.device("cuda")
    store = KVStore(kv_geometry(L, H, d, bs, nb, dev), quantize=quantize, segment_blocks=16)
    g = torch.Generator().manual_seed(8)
    k, v = (torch.randn(H, nb, bs, d, generator=g).to(dev) for _ in range(2))
    store.write(1, 0, k, v)
    torch.cuda.synchronize()
    for first, n in [(0, nb), (5, 30), (16, 16), (3, 1)]:
        host = read_blocks(store, 1, first, n)
        gpu = read_blocks(store, 1, first, n, dev)
        for a, b in zip(host, gpu):
            assert b.device.type == "cuda" and torch.allclose(a, b.cpu(), atol=1e-6)
    assert torch.allclose(read_blocks(store, 1, 0, nb, dev)[0], k, atol=0 if not quantize else k.abs().max().item() / 100)


@pytest.mark.cuda
@pytest.mark.parametrize("store", ["model", "int8"])
def test_continuation_prefill_on_cuda_equals_dense(tiny_dir, store):
    """A continuation (earlier tokens read back from the store on the GPU) and the steps after it, with
    the budget covering the context: dense attention, up to int8 noise."""
    cfg = RetrievalConfig(index="lowrank", block_size=8, budget_tokens=512, sink_tokens=8, window_tokens=16,
                          rank=8, store_dtype=store)
    dense, sparse = engines(tiny_dir, cfg, device="cuda")
    g = torch.Generator().manual_seed(9)
    prompt, cont = torch.randint(0, 256, (203,), generator=g).cuda(), torch.randint(0, 256, (37,), generator=g).cuda()
    steps = torch.randint(0, 256, (20,), generator=g).cuda()
    for a, b in zip(run_script(dense, prompt, cont, steps, 230), run_script(sparse, prompt, cont, steps, 230)):
        if store == "model":
            assert torch.allclose(a, b, atol=2e-4), (a - b).abs().max()
        else:
            kl = torch.nn.functional.kl_div(b.log_softmax(-1), a.log_softmax(-1), log_target=True, reduction="batchmean")
            assert kl < 1e-3, kl


def test_key_channel_scales_fit_once_per_conversation():
    """A layer's channel scales come from its first stored keys and hold for every later write,
    rewrites included (ivf's clustering rewrites blocks it has read back), until the store is emptied."""
    from kvretrieve.store.quant import channel_scales

    g = torch.Generator().manual_seed(1)
    k1, k2, k3 = (torch.randn(2, 4, 4, 8, generator=g) * (i + 1) for i in range(3))
    store = KVStore(kv_geometry(1, 2, 8, 4, 1024), quantize=True, segment_blocks=16)
    store.write(0, 0, k1, k1)
    store.write(0, 4, k2, k2)
    store.write(0, 0, k2, k2)  # a rewrite in place
    store.forget_from(2)
    store.write(0, 2, k3, k3)
    assert torch.equal(store.channels[0], channel_scales(k1))
    store.forget_from(0)  # a new conversation
    store.write(0, 0, k3, k3)
    assert torch.equal(store.channels[0], channel_scales(k3))


@pytest.mark.parametrize("vector", [True, False], ids=["process_madvise", "madvise"])
def test_a_disk_store_reads_ahead_exactly_the_pages_a_gather_selects(tmp_path, vector):
    """SegmentHome.willneed: the pages of the selected rows of a disk segment come into RAM, and no
    others (mincore), in one process_madvise call or, where the kernel refuses it, a madvise a range."""
    import ctypes
    import mmap
    import platform

    from kvretrieve.store.segments import SegmentHome

    home = SegmentHome(False, tmp_path)
    if home._madvise is None:
        pytest.skip("no madvise on this OS")
    if not vector:
        home._pidfd = None
    P = mmap.PAGESIZE
    seg = home.new((64, 2 * P), torch.uint8)  # never written: a sparse file, no page in RAM
    rows = torch.tensor([3, 4, 17, 40, 63])
    home.willneed(home.pages(seg, rows))
    vec = (ctypes.c_ubyte * (seg.nbytes // P))()
    assert ctypes.CDLL(None).mincore(ctypes.c_void_p(seg.data_ptr()), ctypes.c_size_t(seg.nbytes), vec) == 0
    assert {i for i, b in enumerate(vec) if b & 1} == {2 * r + j for r in rows.tolist() for j in (0, 1)}
    release = tuple(int(x) for x in platform.release().split("-")[0].split(".")[:2])
    if vector and platform.system() == "Linux" and release >= (5, 10):  # the one call was taken, not the fallback
        assert home._pidfd is not None
    half = seg.view(256, P // 2)  # half-page rows: a row's page once, however many rows share it
    assert home.pages(half, torch.tensor([0, 1, 5])).tolist() == [0 + half.data_ptr() // P] * 2 + [2 + half.data_ptr() // P]


def test_a_disk_store_decodes_as_the_ram_store_from_unlinked_mapped_files(tiny_dir, tmp_path, monkeypatch):
    """RetrievalConfig(store="disk"): the store's segments are shared maps of files under
    KVRETRIEVE_CACHE/stores, unlinked as soon as they are mapped (nothing is left on disk, even by a
    crash); prefill, decode and a truncation give bitwise the logits of the same store in RAM."""
    from pathlib import Path

    monkeypatch.setenv("KVRETRIEVE_CACHE", str(tmp_path))
    cfg = RetrievalConfig(index="lowrank", rank=8, budget_tokens=64, window_tokens=16, sink_tokens=4)
    g = torch.Generator().manual_seed(21)
    prompt, more = torch.randint(0, 256, (700,), generator=g), torch.randint(0, 256, (40,), generator=g)
    steps = torch.randint(0, 256, (6,), generator=g)
    _, ram = engines(tiny_dir, dataclasses.replace(cfg, store="ram"))
    _, disk = engines(tiny_dir, dataclasses.replace(cfg, store="disk"))
    assert disk.backend.cfg.store == "disk" and ram.backend.cfg.store == "ram"
    want = run_script(ram, prompt, more, steps, 720)
    got = run_script(disk, prompt, more, steps, 720)
    assert all(torch.equal(a, b) for a, b in zip(want, got))
    stores = tmp_path / "stores"
    mapped = [line for line in Path("/proc/self/maps").read_text().splitlines() if str(stores) in line]
    assert mapped and all(line.endswith("(deleted)") for line in mapped)
    assert not any(stores.iterdir())


def test_a_backend_made_under_inference_mode_prefills(tiny_dir):
    """A backend made inside torch.inference_mode() (a user's `with torch.inference_mode():
    kvretrieve.load(...)`) reserves its store's segments on a thread, which starts outside inference
    mode: what that thread records must not be an inference tensor (it was, and the first prefill
    raised). The prefill equals one of a backend made outside."""
    cfg = RetrievalConfig(index="lowrank", rank=8, block_size=8, budget_tokens=64, window_tokens=16)
    prompt = torch.randint(0, 256, (300,), generator=torch.Generator().manual_seed(6))
    _, outside = engines(tiny_dir, cfg)
    with torch.inference_mode():
        _, inside = engines(tiny_dir, cfg)
    want = outside.model.logits(outside.forward(prompt))
    assert torch.equal(inside.model.logits(inside.forward(prompt)), want)
    assert inside.backend.store.capacity_blocks == outside.backend.store.capacity_blocks > 0


def test_the_block_cache_never_outgrows_the_context():
    """cache_blocks beyond the context's blocks could hold nothing: the pool takes the context's blocks
    (cache_blocks=10**30 reads as "all of them" instead of failing to allocate), never fewer than
    the budget; within the context it takes what it is given."""
    geo = kv_geometry(2, 2, 8, 4, 64)
    for asked, slots in ((10**30, 64), (64, 64), (40, 40), (None, 2 * 8)):
        cfg = RetrievalConfig(index="lowrank", block_size=4, budget_tokens=32, sink_tokens=4, window_tokens=8,
                              cache_blocks=asked)
        assert BlockPool(cfg, geo).n_lru == slots, asked
    big_budget = RetrievalConfig(index="lowrank", block_size=4, budget_tokens=400, sink_tokens=4, window_tokens=8,
                                 cache_blocks=200)
    assert BlockPool(big_budget, geo).n_lru == 100  # the budget's blocks, above the context's 64
