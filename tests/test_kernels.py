"""Tests for kvretrieve.kernels: references against independent float64 computations, Triton
kernels against the references (under TRITON_INTERPRET=1 in a subprocess on CPU, natively on CUDA)."""

import functools
import json
import math
import sys

import pytest
import torch

from helpers import run_interpreted
import kvretrieve.kernels as K
from kvretrieve.kernels import reference as R

INF = float("inf")


# ---------------------------------------------------------------- case builders and metrics
def decode_case(G, dtype, tail, Hkv=3, S=7, bs=8, d=16, n=10, seed=0, device="cpu"):
    """Random pool with -1 entries and (last KV head) an all-empty head."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(Hkv * G, d, generator=g).to(dtype)
    kp = torch.randn(Hkv, S, bs, d, generator=g).to(dtype)
    vp = torch.randn(Hkv, S, bs, d, generator=g).to(dtype)
    slots = torch.randint(0, S, (Hkv, n), generator=g).to(torch.int32)
    slots[0, min(1, n - 1)] = -1
    slots[-1] = -1
    tl_ = torch.tensor([tail], dtype=torch.int32)
    return [t.to(device) for t in (q, kp, vp, slots, tl_)] + [d ** -0.5]


def dense_decode(q, kp, vp, slots, tail, scale):
    """Independent float64 attention: gather selected tokens, pad, repeat_interleave KV heads."""
    Hkv, _, bs, d = kp.shape
    G, n, tail = q.shape[0] // Hkv, slots.shape[1], int(tail.reshape(()))
    ks, vs = [], []
    for h in range(Hkv):
        cols = [(int(s), tail if c == n - 1 else bs) for c, s in enumerate(slots[h].tolist()) if s >= 0]
        ks.append(torch.cat([kp[h, s, :c] for s, c in cols] + [kp.new_zeros(0, d)]).double())
        vs.append(torch.cat([vp[h, s, :c] for s, c in cols] + [vp.new_zeros(0, d)]).double())
    pad = torch.nn.utils.rnn.pad_sequence
    kd, vd = pad(ks + [ks[0].new_zeros(1, d)], True)[:Hkv], pad(vs + [vs[0].new_zeros(1, d)], True)[:Hkv]
    mask = torch.arange(kd.shape[1])[None] < torch.tensor([len(k) for k in ks])[:, None]
    kd, vd, mask = (t.repeat_interleave(G, 0) for t in (kd, vd, mask))
    s = torch.einsum("hd,htd->ht", q.double(), kd) * scale
    s = s.masked_fill(~mask, -INF)
    lse = torch.logsumexp(s, -1)
    p = torch.where(mask, torch.exp(s - lse.nan_to_num(neginf=0)[:, None]), 0.0)
    return torch.einsum("ht,htd->hd", p, vd), lse


def err(a, b):
    """Max abs difference; infinities must match exactly, NaN anywhere is an infinite error."""
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    if a.shape != b.shape or a.isnan().any() or b.isnan().any() or (a.isinf() != b.isinf()).any():
        return INF
    if (a[a.isinf()] != b[b.isinf()]).any():
        return INF
    d = (a - b).abs()[~a.isinf()]
    return d.max().item() if d.numel() else 0.0


def scoring_case(G, dtype, d=16, r=8, bs=8, nb=5, Hkv=2, seed=1, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(Hkv * G, d, generator=g)
    proj = torch.randn(Hkv, d, r, generator=g) / math.sqrt(d)
    mean = torch.randn(Hkv, d, generator=g)
    sketch = torch.randn(Hkv, nb * bs + 5, r, generator=g)
    kmin = torch.randn(Hkv, nb + 3, d, generator=g)
    kmax = kmin + torch.rand(Hkv, nb + 3, d, generator=g)
    return [t.to(dtype).to(device) for t in (q, proj, mean, sketch, kmin, kmax)]


def merge_case(dtype, H=6, d=16, seed=2, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    oa, ob = (torch.randn(H, d, generator=g).to(dtype) for _ in range(2))
    la, lb = torch.randn(H, generator=g) * 3, torch.randn(H, generator=g) * 3
    la[0], lb[1], la[2], lb[2] = -INF, -INF, -INF, -INF  # one side empty, and both
    return [t.to(device) for t in (oa, la, ob, lb)]


# ---------------------------------------------------------------- reference tests (in-process)
@pytest.mark.parametrize("G", [1, 4, 8])
@pytest.mark.parametrize("tail", [0, 3, 8])
def test_sparse_decode_reference_matches_dense(G, tail):
    args = decode_case(G, torch.float32, tail)
    out, lse = R.sparse_decode(*args)
    ref_out, ref_lse = dense_decode(*args)
    assert out.dtype == torch.float32 and lse.dtype == torch.float32
    assert err(out, ref_out) < 1e-5 and err(lse, ref_lse) < 1e-5
    assert torch.all(lse[-G:] == -INF) and torch.all(out[-G:] == 0)  # the all-empty KV head


def test_row_tensors_take_rows_of_one_configuration_only():
    """A batched launch reads every row with row 0's strides: rows that differ are refused by name,
    and the references attend and score each row over its own tensors."""
    from kvretrieve.kernels.rows import decode_rows, lowrank_rows, mismatch

    def row(S=7, seed=0):
        q, kp, vp, slots, tail, scale = decode_case(4, torch.float32, 3, S=S, seed=seed)
        return q, (kp[None], vp[None], slots[None], tail), scale

    (q0, a, scale), (q1, b, _) = row(), row(seed=1)
    with pytest.raises(ValueError, match="row 1's k_pool differs from row 0's"):
        decode_rows([a, row(S=9)[1]])
    assert "tables" in mismatch(("k_pool", "v_pool", "tables", "tail_len"), [a, a[:2] + (a[2].long(), a[3])])
    rows, q = decode_rows([a, b]), torch.stack([q0, q1])
    with pytest.raises(ValueError, match=r"q must be \[B=2"):
        R.sparse_decode_rows(q0[None], rows, 0, scale)
    with pytest.raises(ValueError, match=r"layer must be in \[0, 1\)"):
        R.sparse_decode_rows(q, rows, 1, scale)
    out, lse = R.sparse_decode_rows(q, rows, 0, scale)
    for i, (kp, vp, slots, tail) in enumerate((a, b)):
        want, want_lse = R.sparse_decode(q[i], kp[0], vp[0], slots[0], tail, scale)
        assert torch.equal(out[i], want) and torch.equal(lse[i], want_lse)
    idx = [scoring_case(4, torch.float32, seed=s)[1:4] for s in (1, 2)]  # proj, mean, sketch of two rows
    scoring = lowrank_rows([tuple(t[None] for t in x) for x in idx])
    qs = torch.randn(2, 8, 16)
    got = R.lowrank_block_scores_rows(qs, scoring, 0, 5, 8)
    for i, (proj, mean, sk) in enumerate(idx):
        assert torch.equal(got[i], R.lowrank_block_scores(qs[i], proj, mean, sk, 5, 8))
    with pytest.raises(ValueError, match="sketch's capacity"):
        R.lowrank_block_scores_rows(qs, scoring, 0, 6, 8)


def test_sparse_decode_reference_edge_cases():
    q, kp, vp, slots, _, scale = decode_case(4, torch.float32, 0)
    only_tail = torch.full_like(slots, -1)
    only_tail[:, -1] = 2
    out, lse = R.sparse_decode(q, kp, vp, only_tail, torch.tensor([0], dtype=torch.int32), scale)
    assert torch.all(out == 0) and torch.all(lse == -INF)  # tail_len 0 leaves nothing
    out, lse = R.sparse_decode(q, kp, vp, slots[:, :0], torch.tensor([0], dtype=torch.int32), scale)
    assert out.shape == q.shape and torch.all(lse == -INF)
    out, _ = R.sparse_decode(q.bfloat16(), kp.bfloat16(), vp.bfloat16(), slots, torch.tensor([5]), scale)
    assert out.dtype == torch.bfloat16


def test_lowrank_reference_exact_with_full_orthonormal_basis():
    g = torch.Generator().manual_seed(3)
    Hkv, G, d, bs, nb = 2, 4, 16, 8, 6
    q = torch.randn(Hkv * G, d, generator=g)
    keys = torch.randn(Hkv, nb * bs, d, generator=g)
    proj = torch.linalg.qr(torch.randn(Hkv, d, d, generator=g))[0]
    mean = keys.mean(1)
    sketch = torch.einsum("htd,hdr->htr", keys - mean[:, None], proj)
    got = R.lowrank_block_scores(q, proj, mean, sketch, nb, bs)
    exact = torch.einsum("hgd,htd->hgt", q.view(Hkv, G, d), keys).amax(1).view(Hkv, nb, bs).amax(-1)
    assert got.shape == (Hkv, nb) and got.dtype == torch.float32
    assert err(got, exact) < 1e-4


def test_lowrank_mass_reference_is_the_true_block_mass_with_a_full_basis():
    """With a full orthonormal basis, mean key + sketch spread is every token's exact score, so the
    mass scores are the oracle's: log of the block's softmax share summed over the group."""
    g = torch.Generator().manual_seed(4)
    Hkv, G, d, bs, nb = 2, 3, 16, 8, 7
    q = torch.randn(Hkv * G, d, generator=g)
    keys = torch.randn(Hkv, nb * bs, d, generator=g) + torch.randn(Hkv, 1, d, generator=g)
    proj = torch.linalg.qr(torch.randn(Hkv, d, d, generator=g))[0]
    sketch = torch.einsum("htd,hdr->htr", keys - keys.mean(1, keepdim=True), proj)
    means = keys.view(Hkv, nb, bs, d).mean(2)
    got = R.lowrank_block_mass(q, proj, sketch, means, nb, bs, d ** -0.5)
    s = torch.einsum("hgd,htd->hgt", q.view(Hkv, G, d), keys) * d ** -0.5
    share = s.softmax(-1).view(Hkv, G, nb, bs).sum(-1).sum(1).log()
    assert got.shape == (Hkv, nb) and got.dtype == torch.float32
    assert err(got, share) < 1e-4
    # a rank-1 basis keeps the exact mean-key part: blocks of equal keys still score exactly
    flat = means[:, :, None].expand(-1, -1, bs, -1).reshape(Hkv, nb * bs, d)
    s1 = torch.einsum("hgd,htd->hgt", q.view(Hkv, G, d), flat) * d ** -0.5
    want = s1.softmax(-1).view(Hkv, G, nb, bs).sum(-1).sum(1).log()
    flat_sketch = torch.einsum("htd,hdr->htr", flat - flat.mean(1, keepdim=True), proj[:, :, :1])
    assert err(R.lowrank_block_mass(q, proj[:, :, :1], flat_sketch, means, nb, bs, d ** -0.5), want) < 1e-4


def test_bounds_reference_is_upper_bound_and_tight_for_repeated_token():
    g = torch.Generator().manual_seed(4)
    Hkv, G, d, bs, nb = 2, 4, 16, 8, 6
    q = torch.randn(Hkv * G, d, generator=g)
    keys = torch.randn(Hkv, nb, bs, d, generator=g)
    keys[:, 2] = keys[:, 2, :1]  # block 2 holds one token repeated
    kmin, kmax = keys.amin(2), keys.amax(2)
    got = R.bounds_block_scores(q, kmin, kmax, nb)
    exact = torch.einsum("hgd,hbtd->hgbt", q.view(Hkv, G, d), keys).amax(-1).amax(1)
    assert torch.all(got >= exact - 1e-5)
    assert err(got[:, 2], exact[:, 2]) < 1e-5
    assert R.bounds_block_scores(q, kmin, kmax, 0).shape == (Hkv, 0)


def test_block_rest_reference_is_attention_over_its_mean_keys():
    """Each left-out block as block_size copies of its mean key carrying its mean value, written out as
    a pool for the float64 dense attention; a head with nothing left out gets 0 and -inf."""
    g = torch.Generator().manual_seed(15)
    hkv, G, d, bs, nb = 2, 3, 16, 4, 9
    q, means, vsums = torch.randn(hkv * G, d, generator=g), torch.randn(hkv, nb + 2, d, generator=g), \
        torch.randn(hkv, nb + 2, d, generator=g) * bs
    left = torch.rand(hkv, nb, generator=g) < 0.6
    left[-1] = False
    out, lse = R.block_rest(q, means, vsums, left, bs, d ** -0.5)
    kp = means[:, :, None].expand(-1, -1, bs, -1).contiguous()
    vp = (vsums / bs)[:, :, None].expand(-1, -1, bs, -1).contiguous()
    slots = torch.where(left, torch.arange(nb)[None], -1).int()
    want, want_lse = dense_decode(q, kp, vp, slots, torch.tensor([bs]), d ** -0.5)
    assert err(out[:G], want[:G]) < 1e-5 and err(lse[:G], want_lse[:G]) < 1e-5
    assert torch.all(lse[G:] == -INF) and torch.all(out[G:] == 0)


def test_merge_reference_equals_attention_over_union():
    g = torch.Generator().manual_seed(5)
    H, T, d = 4, 12, 16
    q, k, v = torch.randn(H, d, generator=g), torch.randn(H, T, d, generator=g), torch.randn(H, T, d, generator=g)

    def attn(kk, vv):
        s = torch.einsum("hd,htd->ht", q, kk) * 0.25
        return torch.einsum("ht,htd->hd", s.softmax(-1), vv), torch.logsumexp(s, -1)

    whole, lse_whole = attn(k, v)
    (oa, la), (ob, lb) = attn(k[:, :5], v[:, :5]), attn(k[:, 5:], v[:, 5:])
    out, lse = R.merge_attention(oa, la, ob, lb)
    assert err(out, whole) < 1e-5 and err(lse, lse_whole) < 1e-5
    oa, la, ob, lb = merge_case(torch.float32)
    out, lse = R.merge_attention(oa, la, ob, lb)
    assert err(out[0], ob[0]) == 0 and err(out[1], oa[1]) == 0 and lse[0] == lb[0]
    assert torch.all(out[2] == 0) and lse[2] == -INF and not out.isnan().any()


def test_dispatch_on_cpu_uses_reference_and_checks_inputs():
    assert isinstance(K.HAS_TRITON, bool)
    args = decode_case(4, torch.float32, 3)
    out, lse = K.sparse_decode(*args)  # the public function on CPU tensors, against float64 attention
    want, want_lse = dense_decode(*args)
    assert err(out, want) < 1e-5 and err(lse, want_lse) < 1e-5
    with pytest.raises(ValueError, match="slots"):
        K.sparse_decode(*args[:3], args[3].float(), *args[4:])
    with pytest.raises(ValueError, match="multiple"):
        K.bounds_block_scores(torch.randn(5, 16), torch.randn(2, 4, 16), torch.randn(2, 4, 16), 4)
    with pytest.raises(ValueError, match="float32"):
        K.merge_attention(torch.randn(2, 8), torch.zeros(2).half(), torch.randn(2, 8), torch.zeros(2))


@pytest.mark.skipif(not K.HAS_TRITON, reason="triton not installed")
def test_triton_launcher_rejects_cpu_tensors_without_interpreter(monkeypatch):
    from kvretrieve.kernels.sparse_decode import sparse_decode as triton_decode

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match="CUDA"):
        triton_decode(*decode_case(1, torch.float32, 3))


# ---------------------------------------------------------------- Triton vs reference
def _decode_checks(args, num_splits=None, tol=1e-5, tile_tokens=None):
    from kvretrieve.kernels.sparse_decode import sparse_decode as triton_decode

    out, lse = triton_decode(*args, num_splits=num_splits, tile_tokens=tile_tokens)
    ref_out, ref_lse = R.sparse_decode(*args)
    assert out.dtype == args[0].dtype
    return [("out", err(out, ref_out), tol), ("lse", err(lse, ref_lse), tol)]


def _rows_checks(dtype, tol, device, shape, num_splits=None):
    """The batched launches (three rows, two layers each; tails 0, 3 and 8) against each row's
    reference alone, at every layer: a program that read another row's or layer's tensors would differ."""
    from kvretrieve.kernels.mass import lowrank_block_mass_rows
    from kvretrieve.kernels.rows import decode_rows, lowrank_rows, mass_rows
    from kvretrieve.kernels.scoring import lowrank_block_scores_rows
    from kvretrieve.kernels.sparse_decode import sparse_decode_rows

    rows, qs, idx = [], [], []
    for b, tail in enumerate((0, 3, 8)):
        layers = [decode_case(4, dtype, tail, seed=10 * b + layer, device=device, **shape) for layer in range(2)]
        rows.append(tuple(torch.stack([a[i] for a in layers]) for i in (1, 2, 3)) + (layers[0][4],))
        qs.append(layers[0][0])
        d = layers[0][0].shape[1]
        cases = [scoring_case(4, dtype, d=d, nb=9, Hkv=layers[0][1].shape[0], seed=10 * b + layer, device=device)
                 for layer in range(2)]
        idx.append(tuple(torch.stack([c[i] for c in cases]) for i in (1, 2, 3, 4)))  # kmin: the block means
    scale, q, res = layers[0][5], torch.stack(qs), []
    ops, scoring = decode_rows(rows), lowrank_rows([i[:3] for i in idx])
    by_mass = mass_rows([(proj, sk, means) for proj, _, sk, means in idx])
    mag = q.float().abs().sum(-1).max().item()
    for layer in range(2):
        out, lse = sparse_decode_rows(q, ops, layer, scale, num_splits=num_splits)
        scores = lowrank_block_scores_rows(q, scoring, layer, 9, 8)
        mass = lowrank_block_mass_rows(q, by_mass, layer, 9, 8, scale)
        for b, ((k, v, t, tail), (proj, mean, sk, means)) in enumerate(zip(rows, idx)):
            ref_out, ref_lse = R.sparse_decode(q[b], k[layer], v[layer], t[layer], tail, scale)
            want = R.lowrank_block_scores(q[b], proj[layer], mean[layer], sk[layer], 9, 8)
            want_mass = R.lowrank_block_mass(q[b], proj[layer], sk[layer], means[layer], 9, 8, scale)
            res += [(f"out-{layer}-{b}", err(out[b], ref_out), tol), (f"lse-{layer}-{b}", err(lse[b], ref_lse), tol),
                    (f"scores-{layer}-{b}", err(scores[b], want) / mag, 2e-5),
                    (f"mass-{layer}-{b}", err(mass[b], want_mass) / (mag * scale), 2e-5)]
    return res


def _interp_cases(device="cpu", big=False):
    """name -> zero-arg function returning [(label, error, tolerance)]; run where Triton can launch."""
    from kvretrieve.kernels.merge import merge_attention as t_merge
    from kvretrieve.kernels.scoring import bounds_block_scores as t_bounds
    from kvretrieve.kernels.mass import lowrank_block_mass as t_mass
    from kvretrieve.kernels.scoring import lowrank_block_scores as t_lowrank
    from kvretrieve.kernels.scoring import max_dot_block_scores as t_maxdot

    shape = dict(Hkv=4, S=64, bs=64, d=128, n=150) if big else {}
    # Bigger shapes sum ~10k terms per output: allow a larger fp32 rounding drift.
    dts = {"fp32": (torch.float32, 1e-4 if big else 1e-5), "bf16": (torch.bfloat16, 2e-2), "fp16": (torch.float16, 5e-3)}
    cases = {}
    for dn, (dt, tol) in dts.items():
        for G in (1, 4, 8):
            for tail in (0, 3, 8):
                if dn == "fp16" and (G != 4 or tail != 3):
                    continue
                args = decode_case(G, dt, tail if not big else tail * 8, device=device, **shape)
                # Launcher defaults, several splits of multi-step loops, and several single-step
                # splits whose last step runs past the table.
                knobs = {0: (None, None), 3: (3, 16), 8: (None, 32)}[tail] if not big else (None, None)
                cases[f"decode-{dn}-G{G}-tail{tail}"] = lambda a=args, k=knobs, t=tol: _decode_checks(a, k[0], t, k[1])
        cases[f"decode-rows-{dn}"] = lambda d=dt, t=tol: _rows_checks(d, t, device, shape, None if big else 2)
    q, kp, vp, slots, tail, scale = decode_case(4, torch.float32, 0, device=device)
    empty = torch.full_like(slots, -1)
    empty[:, -1] = 1  # only the tail column, and tail_len = 0
    cases["decode-empty-selection"] = lambda a=[q, kp, vp, empty, tail, scale]: _decode_checks(a)
    one_col = decode_case(4, torch.float32, 5, bs=16, device=device)
    cases["decode-one-column-per-split"] = lambda a=one_col: _decode_checks(a, 10, 1e-5, 16)
    # Blocks of one token with a slot per column, as index.BlockSummary attends its summaries.
    rows = decode_case(4, torch.float32, 1, Hkv=2, S=300, bs=1, n=300 if big else 100, device=device)
    cases["decode-one-token-blocks"] = lambda a=rows: _decode_checks(a, None, 1e-5)

    def fp32_accumulation():
        # 2048 tokens in one split, 8 per step: a bf16 running sum (8 mantissa bits) would drift
        # by several percent; fp32 leaves only the bf16 rounding of p and of the output.
        g = torch.Generator().manual_seed(6)
        kp = torch.randn(1, 256, 8, 16, generator=g).bfloat16().to(device)
        vp = torch.rand(1, 256, 8, 16, generator=g).bfloat16().to(device)
        q = (0.1 * torch.randn(1, 16, generator=g)).bfloat16().to(device)
        slots = torch.arange(256, dtype=torch.int32, device=device)[None]
        args = [q, kp, vp, slots, torch.tensor([8], dtype=torch.int32, device=device), 1.0]
        from kvretrieve.kernels.sparse_decode import sparse_decode as triton_decode

        out, lse = triton_decode(*args, num_splits=1)
        want, want_lse = dense_decode(*[a.cpu() if torch.is_tensor(a) else a for a in args])
        return [("out", err(out, want), 1e-2), ("lse", err(lse, want_lse), 1e-4)]

    cases["decode-bf16-accumulates-in-fp32"] = fp32_accumulation
    for dn, (dt, tol) in dts.items():
        for G, d, r, bs, nb in ((1, 16, 8, 8, 5), (4, 32, 16, 16, 9), (8, 24, 5, 6, 3)):
            if big:
                d, r, bs, nb = 128, 32, 16, 700
            qs, proj, mean, sk, kmin, kmax = scoring_case(G, dt, d, r, bs, nb, device=device)
            mag = qs.float().abs().sum(1).max().item()  # scores grow with |q|_1; tolerate relative error
            cases[f"lowrank-{dn}-G{G}"] = lambda a=(qs, proj, mean, sk, nb, bs), s=mag: [
                ("scores", err(t_lowrank(*a), R.lowrank_block_scores(*a)) / s, 2e-5)]
            # block means: any [Hkv, >= nb, d] tensor (kmin); log-shares move with the scaled scores
            cases[f"lowrank-mass-{dn}-G{G}"] = lambda a=(qs, proj, sk, kmin, nb, bs, d ** -0.5), s=mag * d ** -0.5: [
                ("mass", err(t_mass(*a), R.lowrank_block_mass(*a)) / s, 2e-5)]
            cases[f"bounds-{dn}-G{G}"] = lambda a=(qs, kmin, kmax, nb), s=mag: [
                ("scores", err(t_bounds(*a), R.bounds_block_scores(*a)) / s, 2e-5)]
            # the exact index's scores (keys, block_size tokens) and ivf's (centroids, one per block)
            keys = kmin.view(kmin.shape[0], -1, d)  # any [Hkv, cap, d] stream will do
            for what, b in (("keys", bs), ("centroids", 1)):  # names must not depend on `big`
                cases[f"max-dot-{what}-{dn}-G{G}"] = lambda a=(qs, keys, keys.shape[1] // b, b), s=mag: [
                    ("scores", err(t_maxdot(*a), R.max_dot_block_scores(*a)) / s, 2e-5)]
        args = merge_case(dt, H=40 if big else 6, d=128 if big else 24, device=device)
        cases[f"merge-{dn}"] = lambda a=args, t=tol: [
            (name, err(x, y), t) for name, x, y in zip(("out", "lse"), t_merge(*a), R.merge_attention(*a))]

    def many_tiles_per_program(mixed):
        # Few programs force each to loop over several tiles (the path large indexes take);
        # mixed: fp32 q against a bf16 stream exercises the hi/lo split of q.
        scoring = sys.modules["kvretrieve.kernels.scoring"]
        qs, proj, mean, sk, kmin, kmax = scoring_case(4, torch.bfloat16, 32, 16, 4, 300, device=device)
        if mixed:
            qs, proj, mean = (t.float() + 1e-3 for t in (qs, proj, mean))
        old = scoring._TARGET_PROGRAMS, scoring._LOWRANK_PROGRAMS
        scoring._TARGET_PROGRAMS = scoring._LOWRANK_PROGRAMS = 2
        try:
            lr = (qs, proj, mean, sk, 300, 4)
            e1 = err(t_lowrank(*lr), R.lowrank_block_scores(*lr))
            e2 = err(t_bounds(qs, kmin, kmax, 300), R.bounds_block_scores(qs, kmin, kmax, 300))
        finally:
            scoring._TARGET_PROGRAMS, scoring._LOWRANK_PROGRAMS = old
        # several programs a head, each looping over tiles: partial normalisers must reduce
        ma = (qs, proj, sk, kmin, 300, 4, 32 ** -0.5)
        e3 = err(t_mass(*ma, 16, programs=4), R.lowrank_block_mass(*ma))
        mag = qs.float().abs().sum(1).max().item()
        return [("lowrank", e1 / mag, 2e-5), ("bounds", e2 / mag, 2e-5), ("mass", e3 / (mag * 32 ** -0.5), 2e-5)]

    def into_checks(launch, reference, q, tol, lse_tol=1e-4):
        # The same launch merged into an attended part (out, lse; one head's lse -inf): what the kernel
        # merges in must equal the reference's merge_attention of both, on every head.
        gi = torch.Generator().manual_seed(16)
        io, il = torch.randn(q.shape, generator=gi).to(q.dtype), torch.randn(q.shape[0], generator=gi) * 3
        il[0] = -INF
        into = (io.to(device), il.to(device))
        (out, lse), (want, want_lse) = launch(into), reference(into)
        return [("into out", err(out, want), tol), ("into lse", err(lse, want_lse), lse_tol)]

    def rest(dt, G, d, r, rv, bs, nb, few_programs=False):
        # The token-level rest: a head with nothing left out (lse -inf, out 0), one with most
        # blocks; few_programs makes each program loop over several tiles, whose partial softmaxes
        # the merge kernel reduces (otherwise it reduces many programs' partials 2 at a time).
        import kvretrieve.kernels.rest as t_rest

        g = torch.Generator().manual_seed(12)
        hkv = 2
        qs, proj, _, sk, bm, _ = scoring_case(G, dt, d, r, bs, nb, Hkv=hkv, seed=13, device=device)
        vproj = (torch.randn(hkv, d, rv, generator=g) / math.sqrt(d)).to(dt).to(device)
        vk = torch.randn(hkv, nb * bs + 5, rv, generator=g).to(dt).to(device)
        vs = torch.randn(hkv, nb + 3, d, generator=g).to(dt).to(device)
        left = torch.rand(hkv, nb, generator=g) < 0.7
        left[-1] = False
        args = (qs, proj, sk, bm, vproj, vk, vs, left.to(device), bs, d ** -0.5)
        knobs = {"tile_elems": 256} | ({"programs": 2} if few_programs else {"merge_chunk": 1})
        # 16-bit queries take tf32 dots on the GPU (10-bit products): their scores, hence lse, drift ~1e-3.
        tols = (1e-5, 1e-5) if dt == torch.float32 else (2e-2, 5e-3)
        out, lse = t_rest.lowrank_rest(*args, **knobs)
        merged = into_checks(lambda i: t_rest.lowrank_rest(*args, i, **knobs), lambda i: R.lowrank_rest(*args, i),
                             qs, *tols)
        want, want_lse = R.lowrank_rest(*args)
        empty = bool((lse[G:] == -INF).all() and (out[G:] == 0).all())
        return [("out", err(out[:G], want[:G]), tols[0]), ("lse", err(lse[:G], want_lse[:G]), tols[1]),
                ("empty head", 0.0 if empty else 1.0, 0.0)] + merged

    for dn, (dt, _) in dts.items():
        size = (6, 128, 32, 16, 4, 2000) if big else (3, 16, 8, 8, 4, 20)
        cases[f"lowrank-rest-{dn}"] = lambda t=dt, z=size: rest(t, *z)
    cases["lowrank-rest-many-tiles"] = lambda: rest(torch.float32, 4, 48, 8, 4, 4, 300, True)  # 2 merge programs a head
    cases["lowrank-rest-odd-sizes"] = lambda: rest(torch.float32, 1, 24, 5, 3, 6, 7)

    def block_rest(dt, G, d, nb, few_programs=False, q_dt=None):
        # The per-block rest over contiguous summary rows: a head with nothing left out, one with most
        # blocks; few_programs loops each program over several tiles, else many programs' partials
        # merge one at a time; q_dt: fp32 queries against 16-bit summaries (the upcast path).
        import kvretrieve.kernels.rest as t_rest

        g = torch.Generator().manual_seed(14)
        q = torch.randn(2 * G, d, generator=g).to(q_dt or dt)
        bm, vs = torch.randn(2, nb + 3, d, generator=g).to(dt), (torch.randn(2, nb + 3, d, generator=g) * 4).to(dt)
        left = torch.rand(2, nb, generator=g) < 0.8
        left[-1] = False
        args = [t.to(device) for t in (q, bm, vs, left)] + [4, d ** -0.5]
        knobs = dict(tile_blocks=16) | (dict(programs=2) if few_programs else dict(merge_chunk=1))
        tol = 1e-5 if dt == torch.float32 and q_dt is None else 2e-2
        out, lse = t_rest.block_rest(*args, **knobs)
        merged = into_checks(lambda i: t_rest.block_rest(*args, i, **knobs), lambda i: R.block_rest(*args, i),
                             q, tol)
        want, want_lse = R.block_rest(*args)
        empty = bool((lse[G:] == -INF).all() and (out[G:] == 0).all())
        return [("out", err(out[:G], want[:G]), tol), ("lse", err(lse[:G], want_lse[:G]), 1e-4),
                ("empty head", 0.0 if empty else 1.0, 0.0)] + merged

    for dn, (dt, _) in dts.items():
        cases[f"block-rest-{dn}"] = lambda t=dt, z=(4, 128, 8192) if big else (3, 32, 70): block_rest(t, *z)
    cases["block-rest-many-tiles"] = lambda: block_rest(torch.float32, 4, 48, 300, True)
    cases["block-rest-fp32-q-bf16-summaries"] = lambda: block_rest(torch.bfloat16, 1, 24, 40, q_dt=torch.float32)

    def lru_sequence():
        # Many lookups of random selections through both implementations, each on its own copy of
        # the state: slots, fetch flags, maps, stamps and counters must agree exactly.
        from kvretrieve.kernels.lru import lru_lookup as t_lru

        g = torch.Generator().manual_seed(11)
        H, nb, n, k = 3, 40, 24, 10
        states = [[torch.full((H, nb + 1), -1, dtype=torch.int32, device=device),
                   torch.full((H, n + 1), -1, dtype=torch.int32, device=device),
                   torch.zeros(H, n + 1, dtype=torch.int32, device=device),
                   torch.zeros(2, dtype=torch.int64, device=device)] for _ in range(2)]
        worst = 0.0
        for step in range(1, 60):
            ids = torch.stack([torch.randperm(nb, generator=g)[:k] for _ in range(H)]).to(device)
            stamp = torch.tensor([step], dtype=torch.int32, device=device)
            a = t_lru(ids, *states[0][:3], stamp, states[0][3])
            b = R.lru_lookup(ids, *states[1][:3], stamp, states[1][3])
            # the scratch columns (last) hold whatever masked-out scatters left there: not compared
            diff = [x.ne(y).sum().item() for x, y in zip(list(a), list(b))]
            diff += [x[:, :-1].ne(y[:, :-1]).sum().item() for x, y in zip(states[0][:3], states[1][:3])]
            diff += [states[0][3].ne(states[1][3]).sum().item()]
            worst = max(worst, float(sum(diff)))
        return [("mismatches", worst, 0.0)]

    def lru_rows_sequence():
        # Three rows' pools (two layers each, their own stamps and counts) looked up in one launch, step
        # after step at alternating layers, against each row's reference on its own copy of the state.
        from kvretrieve.kernels.lru import lru_lookup_rows
        from kvretrieve.kernels.rows import lru_rows

        g = torch.Generator().manual_seed(13)
        B, L, H, nb, n, k = 3, 2, 2, 40, 24, 10

        def state():
            return [torch.full((L, H, nb + 1), -1, dtype=torch.int32, device=device),
                    torch.full((L, H, n + 1), -1, dtype=torch.int32, device=device),
                    torch.zeros(L, H, n + 1, dtype=torch.int32, device=device),
                    torch.zeros(1, dtype=torch.int32, device=device), torch.zeros(2, dtype=torch.int64, device=device)]
        ours, refs = [state() for _ in range(B)], [state() for _ in range(B)]
        rows, worst = lru_rows([tuple(st) for st in ours]), 0.0
        for step in range(1, 40):
            layer = step % L
            ids = torch.stack([torch.stack([torch.randperm(nb, generator=g)[:k] for _ in range(H)])
                               for _ in range(B)]).to(device)
            for b in range(B):
                ours[b][3].fill_(step + b)
                refs[b][3].fill_(step + b)
            slot, fetch = lru_lookup_rows(ids, rows, layer)
            for b, (sob, bos, used, stamp, counts) in enumerate(refs):
                want = R.lru_lookup(ids[b], sob[layer], bos[layer], used[layer], stamp, counts)
                diff = [slot[b].ne(want[0]).sum().item(), fetch[b].ne(want[1]).sum().item()]
                diff += [x[..., :-1].ne(y[..., :-1]).sum().item() for x, y in zip(ours[b][:3], refs[b][:3])]
                diff += [ours[b][4].ne(counts).sum().item()]
                worst = max(worst, float(sum(diff)))
        return [("mismatches", worst, 0.0)]

    def fetch(dt, quantize=False):
        from kvretrieve.kernels.fetch import fetch_blocks as t_fetch
        from kvretrieve.config import KVGeometry
        from kvretrieve.store import KVStore

        g = torch.Generator().manual_seed(12)
        L, H, bs, d, S = 3, 2, 8, 16, 12
        store = KVStore(KVGeometry(L, H, d, bs, 40, torch.device(device), dt), quantize=quantize, segment_blocks=16)
        store.write(1, 0, torch.randn(H, 40, bs, d, generator=g).to(dt), torch.randn(H, 40, bs, d, generator=g).to(dt))
        store.sync_offsets()
        ids = torch.stack([torch.randperm(40, generator=g)[:S] for _ in range(H)]).to(device)   # crosses segments
        slots = torch.stack([torch.randperm(S, generator=g) for _ in range(H)]).int().to(device)
        want = torch.rand(H, S, generator=g).lt(0.6).to(device)
        pools = [torch.zeros(H, S, bs, d, dtype=dt, device=device) for _ in range(4)]
        t_fetch(store, 1, ids, want, slots, pools[0], pools[1])
        R.fetch_blocks(store, 1, ids, want, slots, pools[2], pools[3])
        # Dequantizing rounds fp32 to the pool's dtype: the interpreter's cast may differ by one unit.
        tol = pools[2].float().abs().max().item() * torch.finfo(dt).eps if quantize else 0.0
        return [("k", err(pools[0], pools[2]), tol), ("v", err(pools[1], pools[3]), tol),
                ("copied", float(pools[0].abs().sum(dim=(2, 3)).gt(0).sum() != want.sum()), 0.0)]

    def store(dt, quantize=False):
        # Blocks written from pool slots by the kernel and by the reference, into two stores that
        # start with the same contents: both must end up equal to what was expected, byte for byte
        # (int8 stores: within half a quantization step of it; kernel and reference may round a
        # code differently where their divisions differ in the last bit).
        from kvretrieve.kernels.fetch import store_blocks as t_store
        from kvretrieve.config import KVGeometry
        from kvretrieve.store import KVStore
        from kvretrieve.store.reads import read_blocks

        g = torch.Generator().manual_seed(13)
        L, H, bs, d, S = 3, 2, 8, 16, 5
        old = torch.randn(L, 2, H, 40, bs, d, generator=g).to(dt)
        pk, pv = (torch.randn(L, H, S, bs, d, generator=g).to(dt) for _ in range(2))
        expected = old.clone()
        stores = [KVStore(KVGeometry(L, H, d, bs, 40, torch.device(device), dt), quantize=quantize, segment_blocks=16)
                  for _ in range(2)]
        for st in stores:
            for layer in range(L):
                st.write(layer, 0, old[layer, 0], old[layer, 1])
            st.sync_offsets()
        if quantize:
            old = torch.stack([torch.stack(read_blocks(stores[0], layer, 0, 40)) for layer in range(L)])
            expected = old.clone()
        for block, slot in ((1, 1), (17, 4), (39, 0)):  # segments 0, 1 and 2 (block 0: below)
            expected[:, 0, :, block], expected[:, 1, :, block] = pk[:, :, slot], pv[:, :, slot]
            t_store(stores[0], block, slot, pk.to(device), pv.to(device))
            R.store_blocks(stores[1], block, slot, pk.to(device), pv.to(device))
        if device == "cuda":
            torch.cuda.synchronize()
        got = [torch.stack([torch.stack(read_blocks(st, layer, 0, 40)) for layer in range(L)]) for st in stores]
        if not quantize:
            return [("kernel", err(got[0], expected), 0.0), ("reference", err(got[1], expected), 0.0)]
        # one code, per token; keys: of the token divided by the channel scales, times them
        ch = torch.stack([stores[1].channels.cpu(), torch.ones(L, H, d)], 1)[:, :, :, None, None, :]
        step = (expected.float() / ch).abs().amax(-1, keepdim=True) / 127 * ch
        off = [((g.float() - expected.float()).abs() / step).max().item() for g in got]
        tol = 0.5 + 128 * torch.finfo(dt).eps / 2 + 1e-3  # half a code, then the rounding to dt of up to 127 codes
        # After the store is emptied the next block refits the key channel scales: before the kernel as
        # the caller (placement) does it, in the reference by its write.
        for st in stores:
            st.forget_from(0)
        stores[0].fit_missing(pk[:, :, 2].to(device))
        t_store(stores[0], 0, 2, pk.to(device), pv.to(device))
        R.store_blocks(stores[1], 0, 2, pk.to(device), pv.to(device))
        refit = err(stores[0].channels, stores[1].channels) + float(torch.equal(stores[0].channels.cpu(), ch[:, 0, :, 0, 0]))
        return [("kernel", off[0], tol), ("reference", off[1], tol),
                ("kernel-vs-reference", ((got[0].float() - got[1].float()).abs() / step).max().item(), 1.01),
                ("channels-refit", refit, 0.0)]

    cases["store-blocks-fp32"] = lambda: store(torch.float32)
    cases["store-blocks-bf16"] = lambda: store(torch.bfloat16)
    cases["store-blocks-int8-fp32"] = lambda: store(torch.float32, quantize=True)
    cases["store-blocks-int8-bf16"] = lambda: store(torch.bfloat16, quantize=True)
    cases["lru-lookup-sequence"] = lru_sequence
    cases["lru-lookup-rows-sequence"] = lru_rows_sequence
    cases["fetch-blocks-fp32"] = lambda: fetch(torch.float32)
    cases["fetch-blocks-bf16"] = lambda: fetch(torch.bfloat16)
    cases["fetch-blocks-int8-fp32"] = lambda: fetch(torch.float32, quantize=True)
    cases["fetch-blocks-int8-bf16"] = lambda: fetch(torch.bfloat16, quantize=True)
    cases["scoring-multi-tile"] = lambda: many_tiles_per_program(False)
    cases["scoring-multi-tile-fp32-q-bf16-stream"] = lambda: many_tiles_per_program(True)
    return cases


def _interpreter_can_loop():
    """Triton 3.6's interpreter int()s 1-element arrays in range(), which NumPy >= 2.5 refuses
    (3.9's does not); then only the interpreter is broken, so the tests skip."""
    import triton
    import triton.language as tl

    @triton.jit
    def probe(x_ptr, n):
        for i in range(0, n):
            tl.store(x_ptr + i, i)

    try:
        probe[(1,)](torch.zeros(2, dtype=torch.int32), 2)
        return True
    except Exception:  # noqa: BLE001 - any failure here is the interpreter's
        return False


def interp_main():
    """Entry point of the TRITON_INTERPRET=1 subprocess: prints one JSON line of results."""
    if not _interpreter_can_loop():
        print("SKIP this Triton interpreter cannot run range() over a runtime int with this NumPy")
        return
    res = {}
    for name, fn in _interp_cases().items():
        try:
            res[name] = fn()
        except Exception as e:  # noqa: BLE001 - report, the parent test shows it
            res[name] = [("exception: " + repr(e), INF, 0.0)]
    print("RESULTS " + json.dumps(res))


@pytest.fixture(scope="module")
def interp_results():
    if not K.HAS_TRITON:
        pytest.skip("triton not installed")
    return run_interpreted("test_kernels")


_CASE_NAMES = list(_interp_cases().keys()) if K.HAS_TRITON else []


@pytest.mark.parametrize("name", _CASE_NAMES)
def test_triton_interpreter_matches_reference(interp_results, name):
    for label, e, tol in interp_results[name]:
        assert e <= tol, f"{name}/{label}: error {e} > {tol}"


@functools.lru_cache(maxsize=1)
def _cuda_cases():
    return _interp_cases(device="cuda", big=True)


@pytest.mark.cuda
@pytest.mark.skipif(not (torch.cuda.is_available() and K.HAS_TRITON), reason="needs CUDA and triton")
@pytest.mark.parametrize("name", _CASE_NAMES)
def test_triton_cuda_matches_reference(name):
    for label, e, tol in _cuda_cases()[name]():
        assert e <= tol, f"{name}/{label}: error {e} > {tol}"
