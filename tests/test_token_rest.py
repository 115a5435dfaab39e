"""The rest estimated token by token (RetrievalConfig.rest_rank): key sketches score every left-out
token, value sketches carry its value. At full rank both sketches are exact, so the estimate is exact
attention over the left-out tokens, and a decode step with it equals dense attention."""
from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from kvretrieve.config import RetrievalConfig
from kvretrieve.errors import ConfigError
from kvretrieve.kernels import reference as ref
from kvretrieve.resolve import resolve_retrieval

from test_retrieval import decoder, engines, tiny_dir  # noqa: F401 - the fixture

BS, D = 4, 16


def _inputs(g: torch.Generator, hkv=2, groups=3, n=10, r=4, rv=8):
    keys, vals = torch.randn(hkv, n * BS, D, generator=g), torch.randn(hkv, n * BS, D, generator=g)
    q = torch.randn(hkv * groups, D, generator=g)
    proj = torch.linalg.qr(torch.randn(hkv, D, r, generator=g))[0]
    vproj = torch.linalg.qr(torch.randn(hkv, D, rv, generator=g))[0]
    sketch, vsketch = (keys - keys.mean(1, keepdim=True)) @ proj, (vals - vals.mean(1, keepdim=True)) @ vproj
    means, vsums = keys.view(hkv, n, BS, D).mean(2), vals.view(hkv, n, BS, D).sum(2)
    return q, keys, vals, proj, sketch, means, vproj, vsketch, vsums


def _exact(q, keys, vals, left, scale):
    hkv = keys.shape[0]
    s = torch.einsum("hgd,htd->hgt", q.view(hkv, -1, D), keys) * scale
    s = s.masked_fill(~left.repeat_interleave(BS, 1)[:, None], -math.inf)
    return torch.einsum("hgt,htd->hgd", s.softmax(-1), vals).reshape(-1, D), s.logsumexp(-1).reshape(-1)


def test_full_rank_sketches_give_exact_attention_over_the_left_out_tokens():
    g = torch.Generator().manual_seed(0)
    q, keys, vals, _, _, means, _, _, vsums = _inputs(g)
    eye = torch.eye(D).expand(2, D, D)
    left = torch.rand(2, 10, generator=g) < 0.5
    out, lse = ref.lowrank_rest(q, eye, keys - 1.0, means, eye, vals + 2.0, vsums, left, BS, 0.3)  # any centring
    want, want_lse = _exact(q, keys, vals, left, 0.3)
    assert torch.allclose(out, want, atol=1e-5) and torch.allclose(lse, want_lse, atol=1e-5)
    out, lse = ref.lowrank_rest(q, eye, keys, means, eye, vals, vsums, torch.zeros_like(left), BS, 0.3)
    assert torch.all(out == 0) and torch.all(lse == -math.inf)  # nothing left out: no contribution


def test_low_rank_sketches_keep_each_blocks_mean_value_and_mass_ordering():
    """At rank 1 the estimate is still a convex mix of block mean values plus the value sketches'
    spread; with zero value sketches it is exactly a mix of block mean values whose weights follow
    the key sketches' token scores (checked against a direct computation)."""
    g = torch.Generator().manual_seed(1)
    q, keys, vals, proj, sketch, means, vproj, vsketch, vsums = _inputs(g, r=1, rv=1)
    left = torch.ones(2, 10, dtype=torch.bool)
    out, lse = ref.lowrank_rest(q, proj, sketch, means, vproj, torch.zeros_like(vsketch), vsums, left, BS, 0.5)
    qg = q.view(2, 3, D)
    sk = sketch.view(2, 10, BS, 1)
    st = (torch.einsum("hgr,hbtr->hgbt", torch.einsum("hgd,hdr->hgr", qg, proj), sk - sk.mean(2, keepdim=True))
          + torch.einsum("hgd,hbd->hgb", qg, means)[..., None]) * 0.5
    w = st.flatten(2).softmax(-1).view_as(st).sum(-1)                                    # [2, 3, blocks]
    want = torch.einsum("hgb,hbd->hgd", w, vsums / BS).reshape(-1, D)
    assert torch.allclose(out, want, atol=1e-5)
    assert torch.allclose(lse, st.flatten(2).logsumexp(-1).reshape(-1), atol=1e-5)


def _decode_steps(tiny_dir, rank: int, rest_rank: int, seed: int, prompt_len: int) -> dict[str, torch.Tensor]:
    """Logits [8, V] of 8 decode steps after a random prompt: dense attention ("dense"), the rest by
    block summaries ("blocks") and token by token at rest_rank ("tokens"), 16 tokens retrieved."""
    base = RetrievalConfig(index="lowrank", block_size=4, budget_tokens=16, sink_tokens=4, window_tokens=8,
                           rank=rank, block_scores="mass", rest_rank=0)
    dense, blocks = engines(tiny_dir, base)
    _, tokens = engines(tiny_dir, dataclasses.replace(base, rest_rank=rest_rank))
    g = torch.Generator().manual_seed(seed)
    prompt, steps = torch.randint(0, 256, (prompt_len,), generator=g), torch.randint(0, 256, (8,), generator=g)
    runs = {"dense": dense, "blocks": blocks, "tokens": tokens}
    for e in runs.values():
        e.forward(prompt)
    return {name: torch.cat([e.model.logits(e.forward(t.view(1))) for t in steps]) for name, e in runs.items()}


def test_decode_with_full_rank_sketches_equals_dense(tiny_dir):  # noqa: F811
    """rank = rest_rank = head_dim: what the selection leaves out is estimated exactly, so every decode
    step's logits equal dense attention's; with block summaries (rest_rank 0) they do not."""
    out = _decode_steps(tiny_dir, D, D, seed=4, prompt_len=300)
    worst = {name: (out[name] - out["dense"]).abs().max().item() for name in ("tokens", "blocks")}
    assert worst["tokens"] < 1e-3 < worst["blocks"], worst


def test_low_rank_values_move_decode_toward_dense(tiny_dir):  # noqa: F811
    """At a rank below head_dim the token-level rest is closer to dense than block summaries."""
    out = _decode_steps(tiny_dir, 8, 8, seed=5, prompt_len=400)
    want = out["dense"].log_softmax(-1)
    kl = {name: torch.nn.functional.kl_div(out[name].log_softmax(-1), want, log_target=True, reduction="sum").item()
          for name in ("tokens", "blocks")}
    assert kl["tokens"] < kl["blocks"], kl


def test_rest_rank_needs_lowrank_key_sketches():
    for bad in (dict(index="ivf"), dict(index="bounds"), dict(estimate_rest=False), dict(estimate_tokens=64)):
        with pytest.raises(ConfigError, match="rest_rank"):
            RetrievalConfig(rest_rank=8, **bad)
    with pytest.raises(ConfigError, match="rest_rank must be >= 0"):
        RetrievalConfig(rest_rank=-1)


def test_resolution_keeps_rest_rank_for_lowrank_only(tiny_dir):  # noqa: F811
    """index auto resolving to ivf (the sketches do not fit) drops rest_rank: ivf has no key sketches."""
    mc, cpu = decoder(tiny_dir).cfg, torch.device("cpu")
    got = resolve_retrieval(RetrievalConfig(rest_rank=8), mc, 4096, cpu, torch.float32, free=2**40)
    assert (got.index, got.rest_rank) == ("lowrank", 8)
    got = resolve_retrieval(RetrievalConfig(rest_rank=8), mc, 4096, cpu, torch.float32, free=1024)
    assert (got.index, got.rest_rank) == ("ivf", 0)
