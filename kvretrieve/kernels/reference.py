"""Pure-torch references of the kernels, plus the argument checks shared with the Triton launchers.

Every reference has the same signature and return contract as its Triton launcher, runs on any
device, and accumulates in float32. They are the fallback where Triton is missing and the ground
truth in the tests, so they favour clarity over speed, but avoid host syncs (no `.item()`) so they
stay usable on CUDA tensors too.
"""

from __future__ import annotations

import math
import os

import torch
import torch.nn.functional as F

from kvretrieve.models.quant import QuantWeight, dequantize

_FLOATS = (torch.float32, torch.float16, torch.bfloat16)
_INTS = (torch.int32, torch.int64)


def _fail(op: str, msg: str) -> None:
    raise ValueError(f"{op}: {msg}")


def _same_device(op: str, **tensors: torch.Tensor) -> None:
    devs = {name: t.device for name, t in tensors.items()}
    if len(set(devs.values())) > 1:
        _fail(op, "all tensors must be on one device, got " + ", ".join(f"{k}={v}" for k, v in devs.items()))


def _float(op: str, name: str, t: torch.Tensor) -> None:
    if not isinstance(t, torch.Tensor) or t.dtype not in _FLOATS:
        _fail(op, f"{name} must be a float32/float16/bfloat16 tensor, got {getattr(t, 'dtype', type(t))}")


def _group(op: str, hq: int, hkv: int) -> int:
    if hkv <= 0 or hq % hkv != 0:
        _fail(op, f"query heads ({hq}) must be a positive multiple of KV heads ({hkv})")
    return hq // hkv


def check_launch_device(op: str, *tensors: torch.Tensor) -> None:
    """Triton launchers need CUDA tensors, except under TRITON_INTERPRET=1 (CPU tests)."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        return
    for t in tensors:
        if t.device.type != "cuda":
            _fail(op, f"the Triton kernel needs CUDA tensors, got one on {t.device} "
                      f"(use kvretrieve.kernels.{op}, which falls back to the torch reference)")


def check_sparse_decode(q, k_pool, v_pool, slots, tail_len) -> tuple[int, int, int, int, int]:
    """Validate sparse_decode inputs; returns (Hkv, G, n, bs, d)."""
    op = "sparse_decode"
    for name, t in (("q", q), ("k_pool", k_pool), ("v_pool", v_pool)):
        _float(op, name, t)
    if q.dim() != 2:
        _fail(op, f"q must be [Hq, d], got shape {tuple(q.shape)}")
    if k_pool.dim() != 4 or v_pool.shape != k_pool.shape:
        _fail(op, f"k_pool and v_pool must both be [Hkv, S, bs, d], got {tuple(k_pool.shape)} and {tuple(v_pool.shape)}")
    if q.dtype != k_pool.dtype or v_pool.dtype != k_pool.dtype:
        _fail(op, f"q, k_pool, v_pool must share a dtype, got {q.dtype}, {k_pool.dtype}, {v_pool.dtype}")
    hkv, _, bs, d = k_pool.shape
    if q.shape[1] != d:
        _fail(op, f"head dim of q ({q.shape[1]}) != head dim of the pool ({d})")
    g = _group(op, q.shape[0], hkv)
    if not isinstance(slots, torch.Tensor) or slots.dim() != 2 or slots.shape[0] != hkv or slots.dtype not in _INTS:
        _fail(op, f"slots must be an int32 tensor [Hkv={hkv}, n], got {getattr(slots, 'dtype', type(slots))} "
                  f"{tuple(getattr(slots, 'shape', ()))}")
    if not isinstance(tail_len, torch.Tensor) or tail_len.numel() != 1 or tail_len.dtype not in _INTS:
        _fail(op, "tail_len must be an int32 tensor of shape [1] (a device tensor so CUDA graphs can capture it)")
    _same_device(op, q=q, k_pool=k_pool, v_pool=v_pool, slots=slots, tail_len=tail_len)
    return hkv, g, slots.shape[1], bs, d


def check_lowrank(q, proj, mean, sketch, n_blocks, block_size, op="lowrank_block_scores") -> tuple[int, int, int]:
    """Validate lowrank_block_scores inputs (mean None: lowrank_block_mass, which has none); returns
    (Hkv, G, r)."""
    for name, t in (("q", q), ("proj", proj), ("mean", mean), ("sketch", sketch)):
        if t is not None:
            _float(op, name, t)
    if q.dim() != 2 or proj.dim() != 3:
        _fail(op, f"q must be [Hq, d] and proj [Hkv, d, r], got {tuple(q.shape)} and {tuple(proj.shape)}")
    hkv, d, r = proj.shape
    if q.shape[1] != d or (mean is not None and tuple(mean.shape) != (hkv, d)):
        _fail(op, f"expected q [Hq, {d}] and mean [{hkv}, {d}], got {tuple(q.shape)} and {tuple(mean.shape)}")
    if sketch.dim() != 3 or sketch.shape[0] != hkv or sketch.shape[2] != r:
        _fail(op, f"sketch must be [{hkv}, cap, {r}], got {tuple(sketch.shape)}")
    if int(n_blocks) < 0 or int(block_size) <= 0:
        _fail(op, f"need n_blocks >= 0 and block_size > 0, got {n_blocks}, {block_size}")
    if n_blocks * block_size > sketch.shape[1]:
        _fail(op, f"n_blocks*block_size = {n_blocks * block_size} exceeds sketch capacity {sketch.shape[1]}")
    g = _group(op, q.shape[0], hkv)
    _same_device(op, q=q, proj=proj, sketch=sketch, **({} if mean is None else {"mean": mean}))
    return hkv, g, r


def check_lowrank_mass(q, proj, sketch, block_means, n_blocks, block_size) -> tuple[int, int, int]:
    """Validate lowrank_block_mass inputs; returns (Hkv, G, r)."""
    hkv, g, r = check_lowrank(q, proj, None, sketch, n_blocks, block_size, "lowrank_block_mass")
    _float("lowrank_block_mass", "block_means", block_means)
    if block_means.dim() != 3 or block_means.shape[0] != hkv or block_means.shape[2] != q.shape[1] \
            or block_means.shape[1] < n_blocks:
        _fail("lowrank_block_mass", f"block_means must be [{hkv}, >= {n_blocks}, {q.shape[1]}], "
                                    f"got {tuple(block_means.shape)}")
    _same_device("lowrank_block_mass", q=q, block_means=block_means)
    return hkv, g, r


def check_max_dot(q, keys, n_blocks, block_size) -> tuple[int, int]:
    """Validate max_dot_block_scores inputs; returns (Hkv, G)."""
    op = "max_dot_block_scores"
    for name, t in (("q", q), ("keys", keys)):
        _float(op, name, t)
    if q.dim() != 2 or keys.dim() != 3 or keys.shape[2] != q.shape[1]:
        _fail(op, f"q must be [Hq, d] and keys [Hkv, cap, d], got {tuple(q.shape)} and {tuple(keys.shape)}")
    if int(n_blocks) < 0 or int(block_size) <= 0 or n_blocks * block_size > keys.shape[1]:
        _fail(op, f"need 0 <= n_blocks*block_size <= {keys.shape[1]} and block_size > 0, got {n_blocks}, {block_size}")
    g = _group(op, q.shape[0], keys.shape[0])
    _same_device(op, q=q, keys=keys)
    return keys.shape[0], g


def check_bounds(q, kmin, kmax, n_blocks) -> tuple[int, int]:
    """Validate bounds_block_scores inputs; returns (Hkv, G)."""
    op = "bounds_block_scores"
    for name, t in (("q", q), ("kmin", kmin), ("kmax", kmax)):
        _float(op, name, t)
    if q.dim() != 2 or kmin.dim() != 3 or kmax.shape != kmin.shape or kmax.dtype != kmin.dtype:
        _fail(op, f"need q [Hq, d] and kmin/kmax [Hkv, cap_blocks, d] of one dtype, got {tuple(q.shape)}, "
                  f"{tuple(kmin.shape)} {kmin.dtype}, {tuple(kmax.shape)} {kmax.dtype}")
    if kmin.shape[2] != q.shape[1]:
        _fail(op, f"head dim of q ({q.shape[1]}) != head dim of kmin/kmax ({kmin.shape[2]})")
    if not 0 <= int(n_blocks) <= kmin.shape[1]:
        _fail(op, f"n_blocks ({n_blocks}) must be in [0, cap_blocks={kmin.shape[1]}]")
    g = _group(op, q.shape[0], kmin.shape[0])
    _same_device(op, q=q, kmin=kmin, kmax=kmax)
    return kmin.shape[0], g


def check_merge(out_a, lse_a, out_b, lse_b) -> None:
    """Validate merge_attention inputs."""
    op = "merge_attention"
    _float(op, "out_a", out_a)
    _float(op, "out_b", out_b)
    if out_a.dim() != 2 or out_b.shape != out_a.shape or out_b.dtype != out_a.dtype:
        _fail(op, f"out_a and out_b must be [H, d] of one dtype, got {tuple(out_a.shape)} {out_a.dtype} "
                  f"and {tuple(out_b.shape)} {out_b.dtype}")
    for name, t in (("lse_a", lse_a), ("lse_b", lse_b)):
        if not isinstance(t, torch.Tensor) or t.dtype != torch.float32 or tuple(t.shape) != (out_a.shape[0],):
            _fail(op, f"{name} must be float32 [{out_a.shape[0]}], got {getattr(t, 'dtype', type(t))} "
                      f"{tuple(getattr(t, 'shape', ()))}")
    _same_device(op, out_a=out_a, lse_a=lse_a, out_b=out_b, lse_b=lse_b)


def sparse_decode(q, k_pool, v_pool, slots, tail_len, scale):
    """Attention of q [Hq, d] over the pool slots listed in slots [Hkv, n] (-1 = skip; the last
    column holds tail_len [1] tokens, the others bs). Returns out [Hq, d] (q.dtype), lse [Hq] f32."""
    hkv, g, n, bs, d = check_sparse_decode(q, k_pool, v_pool, slots, tail_len)
    hq = q.shape[0]
    if n == 0:
        return q.new_zeros(hq, d), torch.full((hq,), float("-inf"), device=q.device)
    heads = torch.arange(hkv, device=q.device)[:, None]
    idx = slots.clamp(min=0).long()
    k = k_pool[heads, idx].reshape(hkv, n * bs, d).float()  # gathers only the selected blocks
    v = v_pool[heads, idx].reshape(hkv, n * bs, d).float()
    col = torch.arange(n, device=q.device)[:, None]
    tok = torch.arange(bs, device=q.device)[None, :]
    tail = tail_len.reshape(()).clamp(0, bs)
    valid = torch.where(col == n - 1, tok < tail, torch.ones_like(tok, dtype=torch.bool))  # [n, bs]
    valid = (valid[None] & (slots >= 0)[:, :, None]).reshape(hkv, 1, n * bs)
    s = torch.einsum("hgd,htd->hgt", q.float().view(hkv, g, d), k) * scale
    s = s.masked_fill(~valid, float("-inf"))
    lse = torch.logsumexp(s, dim=-1)  # -inf for a head with no valid token
    # Subtracting a finite stand-in keeps exp(-inf - -inf) = NaN out of fully masked heads.
    p = torch.exp(s - torch.where(torch.isinf(lse), torch.zeros_like(lse), lse)[..., None])
    out = torch.einsum("hgt,htd->hgd", p, v)
    return out.reshape(hq, d).to(q.dtype), lse.reshape(hq)


def lowrank_block_scores(q, proj, mean, sketch, n_blocks, block_size):
    """Loki-style block scores [Hkv, n_blocks] f32: max over a block's tokens and the group's
    query heads of q·mean + (q @ proj)·sketch. q [Hq, d], proj [Hkv, d, r], mean [Hkv, d],
    sketch [Hkv, cap, r]."""
    hkv, g, r = check_lowrank(q, proj, mean, sketch, n_blocks, block_size)
    if n_blocks == 0:
        return torch.empty(hkv, 0, dtype=torch.float32, device=q.device)
    qg = q.float().view(hkv, g, -1)
    qr = torch.einsum("hgd,hdr->hgr", qg, proj.float())
    qm = torch.einsum("hgd,hd->hg", qg, mean.float())
    sk = sketch[:, : n_blocks * block_size].float()
    s = torch.einsum("hgr,htr->hgt", qr, sk) + qm[..., None]
    return s.amax(dim=1).view(hkv, n_blocks, block_size).amax(dim=-1)


def lowrank_block_mass(q, proj, sketch, block_means, n_blocks, block_size, scale):
    """Log of each block's estimated attention share, summed over the GQA group: [Hkv, n_blocks] f32.
    Token t of block b scores scale * (q.mean_b + (q @ proj).(sketch_t - mean of b's sketches)): the
    block's exact mean key plus the sketches' spread around it. Per query head, a block's log-mass
    is the log-sum-exp over its tokens less the head's log-sum-exp over all n_blocks; the group's
    shares add. q [Hq, d], proj [Hkv, d, r], sketch [Hkv, cap, r], block_means [Hkv, cap_blocks, d]."""
    hkv, g, r = check_lowrank_mass(q, proj, sketch, block_means, n_blocks, block_size)
    if n_blocks == 0:
        return torch.empty(hkv, 0, dtype=torch.float32, device=q.device)
    qg = q.float().view(hkv, g, -1)
    qr = torch.einsum("hgd,hdr->hgr", qg, proj.float())
    sk = sketch[:, :n_blocks * block_size].float().view(hkv, n_blocks, block_size, r)
    st = torch.einsum("hgr,hbtr->hgbt", qr, sk) * scale
    x = st.logsumexp(-1) - st.mean(-1) + torch.einsum("hgd,hbd->hgb", qg, block_means[:, :n_blocks].float()) * scale
    return (x - x.logsumexp(-1, keepdim=True)).logsumexp(1)


def block_rest(q, block_means, vsums, left_out, block_size, scale, into=None):
    """Attention of q [Hq, d] over the blocks where left_out [Hkv, n] is True, each block counted as
    block_size keys equal to its mean key block_means [Hkv, cap_blocks, d], each with its mean value
    vsums / block_size (vsums [Hkv, cap_blocks, d]) -> (out [Hq, d] in q.dtype, lse [Hq] f32); a head
    with no block left out gets 0 and -inf. into: (out, lse) of the attended part, merged in by LSE."""
    hkv, n = left_out.shape
    hq, d = q.shape
    g = _group("block_rest", hq, hkv)
    s = torch.einsum("hgd,hbd->hgb", q.float().view(hkv, g, d), block_means[:, :n].float()) * scale
    s = (s + math.log(block_size)).masked_fill(~left_out[:, None], float("-inf"))
    lse = s.logsumexp(-1)                                                             # [Hkv, G]
    w = torch.exp(s - lse[..., None]).nan_to_num(0.0)                                 # no block: lse -inf, w 0
    out = torch.einsum("hgb,hbd->hgd", w, vsums[:, :n].float()) / block_size
    return _merged(into, out.reshape(hq, d).to(q.dtype), lse.reshape(hq))


def _merged(into, out, lse):
    return (out, lse) if into is None else merge_attention(*into, out, lse)


def lowrank_rest(q, proj, sketch, block_means, vproj, vsketch, vsums, left_out, block_size, scale, into=None):
    """Attention of q [Hq, d] over every token of the blocks where left_out [Hkv, n] is True, each token
    estimated from sketches: token t of block b scores scale * (q.mean_b + (q @ proj).(sketch_t - mean of
    b's sketches)), as lowrank_block_mass, and carries the value vsums_b / bs + (vsketch_t - mean of b's
    vsketches) @ vproj^T: the block's exact mean value plus the value sketches' spread around it.
    proj [Hkv, d, r], sketch [Hkv, cap, r], block_means [Hkv, cap_blocks, d], vproj [Hkv, d, rv],
    vsketch [Hkv, cap, rv], vsums [Hkv, cap_blocks, d] -> (out [Hq, d] in q.dtype, lse [Hq] f32); a
    head with no block left out gets 0 and -inf (what merge_attention treats as no contribution). into:
    (out, lse) of the attended part, merged in by LSE."""
    hkv, n = left_out.shape
    hq, d = q.shape
    g, bs, r, rv = _group("lowrank_rest", hq, hkv), block_size, proj.shape[-1], vproj.shape[-1]
    qg = q.float().view(hkv, g, d)
    sk = sketch[:, :n * bs].float().view(hkv, n, bs, r)
    st = torch.einsum("hgr,hbtr->hgbt", torch.einsum("hgd,hdr->hgr", qg, proj.float()), sk - sk.mean(2, keepdim=True))
    st = (st + torch.einsum("hgd,hbd->hgb", qg, block_means[:, :n].float())[..., None]) * scale
    st = st.masked_fill(~left_out[:, None, :, None], float("-inf"))
    lse = st.flatten(2).logsumexp(-1)                                                # [Hkv, G]
    w = torch.exp(st - lse[..., None, None]).nan_to_num(0.0)                         # no block: lse -inf, w 0
    vc = vsketch[:, :n * bs].float().view(hkv, n, bs, rv)
    spread = torch.einsum("hgbt,hbtr->hgr", w, vc - vc.mean(2, keepdim=True))
    out = (torch.einsum("hgb,hbd->hgd", w.sum(-1), vsums[:, :n].float()) / bs
           + torch.einsum("hgr,hdr->hgd", spread, vproj.float()))
    return _merged(into, out.reshape(hq, d).to(q.dtype), lse.reshape(hq))


def max_dot_block_scores(q, keys, n_blocks, block_size):
    """Block maxima [Hkv, n_blocks] f32 of q.k over a block's keys and the group's query heads (the
    exact index's scores; block_size 1 over centroids: ivf's). q [Hq, d], keys [Hkv, cap, d]."""
    hkv, g = check_max_dot(q, keys, n_blocks, block_size)
    qg = q.float().view(hkv, g, -1)
    s = qg @ keys[:, :n_blocks * block_size].float().transpose(1, 2)                # [Hkv, G, n*bs]
    return s.amax(1).view(hkv, n_blocks, block_size).amax(2)


def bounds_block_scores(q, kmin, kmax, n_blocks):
    """Quest upper bounds [Hkv, n_blocks] f32: max over the group's query heads of
    sum_c max(q_c*kmin_c, q_c*kmax_c). q [Hq, d], kmin/kmax [Hkv, cap_blocks, d]."""
    hkv, g = check_bounds(q, kmin, kmax, n_blocks)
    qg = q.float().view(hkv, g, -1)
    # max(q*lo, q*hi) picks hi where q >= 0 and lo where q < 0, so the bound splits into two
    # matmuls and never materialises a [G, blocks, d] product.
    pos, neg = qg.clamp(min=0), qg.clamp(max=0)
    lo, hi = kmin[:, :n_blocks].float(), kmax[:, :n_blocks].float()
    ub = torch.einsum("hgd,hbd->hgb", pos, hi) + torch.einsum("hgd,hbd->hgb", neg, lo)
    if n_blocks == 0:
        return ub.new_empty(hkv, 0)
    return ub.amax(dim=1)


def merge_attention(out_a, lse_a, out_b, lse_b):
    """Merge two partial attentions over disjoint keys: out_* [H, d], lse_* [H] f32 ->
    (out [H, d] in out_a.dtype, lse [H] f32). -inf on a side means it saw no key."""
    check_merge(out_a, lse_a, out_b, lse_b)
    m = torch.maximum(lse_a, lse_b)
    m_safe = torch.where(torch.isinf(m), torch.zeros_like(m), m)  # both -inf: avoid -inf - -inf
    wa, wb = torch.exp(lse_a - m_safe), torch.exp(lse_b - m_safe)
    tot = wa + wb
    denom = torch.where(tot > 0, tot, torch.ones_like(tot))
    out = (wa[:, None] * out_a.float() + wb[:, None] * out_b.float()) / denom[:, None]
    lse = torch.where(tot > 0, m_safe + torch.log(denom), torch.full_like(m, float("-inf")))
    return out.to(out_a.dtype), lse


def check_lru(ids, slot_of_block, block_of_slot, last_used, stamp) -> tuple[int, int, int]:
    """Validate lru_lookup inputs; returns (H, k, lru slots n)."""
    op = "lru_lookup"
    if not isinstance(ids, torch.Tensor) or ids.dim() != 2 or ids.dtype != torch.int64:
        _fail(op, f"ids must be an int64 tensor [H, k], got {getattr(ids, 'dtype', type(ids))}")
    h, k = ids.shape
    for name, t in (("slot_of_block", slot_of_block), ("block_of_slot", block_of_slot), ("last_used", last_used)):
        if t.dtype != torch.int32 or t.dim() != 2 or t.shape[0] != h or not t.is_contiguous():
            _fail(op, f"{name} must be a contiguous int32 tensor [H={h}, n + 1], got {t.dtype} {tuple(t.shape)}")
    n = block_of_slot.shape[1] - 1
    if last_used.shape != block_of_slot.shape or n < k:
        _fail(op, f"need last_used shaped like block_of_slot and at least k={k} LRU slots, got {n}")
    if stamp.dtype != torch.int32 or stamp.numel() != 1:
        _fail(op, "stamp must be an int32 tensor of shape [1]")
    _same_device(op, ids=ids, slot_of_block=slot_of_block, block_of_slot=block_of_slot, last_used=last_used,
                 stamp=stamp)
    return h, k, n


def lru_lookup(ids, slot_of_block, block_of_slot, last_used, stamp, counts):
    """Resolve distinct block ids [H, k] (int64) against a per-head LRU cache of n slots, on the
    device and without a host sync, so a decode step can run inside a CUDA graph.

    State, updated in place: slot_of_block [H, blocks + 1] int32 (-1: not cached), block_of_slot and
    last_used [H, n + 1] int32; the last column of each is scratch, where masked-out scatters land
    (fixed shapes, no boolean indexing). stamp [1] int32 is this lookup's time; counts [2] int64
    (hits, misses) is accumulated unless None.
    Returns (slot [H, k] int32 in [0, n), fetch [H, k] bool: the block was given a slot now and must
    be loaded into it). Hits are stamped before victims are picked, so a victim never belongs to
    this selection; the r-th miss of a head takes the head's r-th least recently used slot."""
    h, k, n = check_lru(ids, slot_of_block, block_of_slot, last_used, stamp)
    nb = slot_of_block.shape[1] - 1
    now = stamp.expand(h, k)
    cur = slot_of_block.gather(1, ids)
    hit = cur >= 0
    last_used.scatter_(1, torch.where(hit, cur, n).long(), now)
    order = torch.sort(last_used[:, :n], dim=1, stable=True).indices        # stalest first
    rank = (~hit).long().cumsum(1) - 1
    victim = order.gather(1, rank.clamp(min=0))
    old = block_of_slot.gather(1, victim).long()
    slot_of_block.scatter_(1, torch.where(~hit & (old >= 0), old, nb), torch.full_like(cur, -1))
    slot_of_block.scatter_(1, torch.where(hit, nb, ids), victim.int())
    block_of_slot.scatter_(1, torch.where(hit, n, victim), ids.int())
    last_used.scatter_(1, torch.where(hit, n, victim), now)
    if counts is not None:
        counts += torch.stack([hit.sum(), (~hit).sum()])
    return torch.where(hit, cur, victim.int()), ~hit


def check_fetch(store, layer, ids, fetch, slots, pool_k, pool_v) -> None:
    op = "fetch_blocks"
    if pool_k.dim() != 4 or pool_v.shape != pool_k.shape or not pool_k.is_contiguous() or not pool_v.is_contiguous():
        _fail(op, f"pool_k and pool_v must be contiguous [Hkv, S, bs, d], got {tuple(pool_k.shape)}")
    if tuple(pool_k.shape[2:]) != (store.bs, store.d) or pool_k.shape[0] != store.H or pool_k.dtype != store.dtype:
        _fail(op, f"pool blocks {tuple(pool_k.shape)} {pool_k.dtype} do not match the store's "
                  f"[{store.H}, S, {store.bs}, {store.d}] {store.dtype}")
    if ids.shape != fetch.shape or ids.shape != slots.shape or ids.dim() != 2 or ids.shape[0] != store.H:
        _fail(op, f"ids, fetch and slots must all be [Hkv, k], got {tuple(ids.shape)}, {tuple(fetch.shape)}, "
                  f"{tuple(slots.shape)}")
    if not 0 <= layer < store.L:
        _fail(op, f"layer {layer} out of range [0, {store.L})")
    _same_device(op, ids=ids, fetch=fetch, slots=slots, pool_k=pool_k, pool_v=pool_v)


def fetch_blocks(store, layer, ids, fetch, slots, pool_k, pool_v):
    """Copy K,V block ids[h, j] of one layer from the CPU store (kv_store.KVStore) into pool slot
    slots[h, j] of head h, wherever fetch[h, j]. pool_k, pool_v: the layer's pool [Hkv, S, bs, d].
    (On CUDA this reference brings the selection to the host: the Triton kernel does not.)"""
    check_fetch(store, layer, ids, fetch, slots, pool_k, pool_v)
    heads, cols = fetch.cpu().nonzero(as_tuple=True)
    if len(heads) == 0:
        return
    blocks, dst = ids.cpu()[heads, cols], slots.cpu()[heads, cols].long()
    # Gathered into pinned staging (torch caches pinned blocks, so this allocates once per size) for
    # a GPU pool: the copy up is then one async DMA, not a pageable copy the host waits for.
    rows = torch.empty(2, len(heads), store.bs * store.d, dtype=store.dtype, pin_memory=pool_k.is_cuda)
    store.gather(layer, heads, blocks, rows)
    flat = (heads * pool_k.shape[1] + dst).to(pool_k.device)
    up = rows.to(pool_k.device, non_blocking=True)
    pool_k.view(-1, rows.shape[2]).index_copy_(0, flat, up[0])
    pool_v.view(-1, rows.shape[2]).index_copy_(0, flat, up[1])


def check_store(store, block, slot, pool_k, pool_v) -> None:
    op = "store_blocks"
    if pool_k.dim() != 5 or pool_v.shape != pool_k.shape or not pool_k.is_contiguous() or not pool_v.is_contiguous():
        _fail(op, f"pool_k and pool_v must be contiguous [L, Hkv, S, bs, d], got {tuple(pool_k.shape)}")
    if tuple(pool_k.shape[3:]) != (store.bs, store.d) or tuple(pool_k.shape[:2]) != (store.L, store.H) \
            or pool_k.dtype != store.dtype:
        _fail(op, f"pool {tuple(pool_k.shape)} {pool_k.dtype} does not match the store's "
                  f"[{store.L}, {store.H}, S, {store.bs}, {store.d}] {store.dtype}")
    if not 0 <= slot < pool_k.shape[2]:
        _fail(op, f"slot {slot} out of range [0, {pool_k.shape[2]})")
    if not 0 <= block < store.capacity_blocks:
        _fail(op, f"block {block} is past the store's reserved {store.capacity_blocks} blocks (store.ensure first)")


def store_blocks(store, block, slot, pool_k, pool_v):
    """Write pool slot `slot` of every layer (pool_k, pool_v [L, Hkv, S, bs, d]) to the CPU store
    (kv_store.KVStore) as block `block` of that layer: a decode step that completes a block hands it
    to the store for all layers at once. From CUDA the copies are async on the current stream."""
    check_store(store, block, slot, pool_k, pool_v)
    for layer in range(store.L):
        store.write(layer, block, pool_k[layer, :, slot:slot + 1], pool_v[layer, :, slot:slot + 1])


def check_rms_norm(x, weight, eps) -> None:
    """Validate rms_norm inputs."""
    op = "rms_norm"
    _float(op, "x", x)
    _float(op, "weight", weight)
    if x.dim() != 2 or x.shape[1] == 0:
        _fail(op, f"x must be [T, n] with n > 0, got shape {tuple(x.shape)}")
    if tuple(weight.shape) != (x.shape[1],) or weight.dtype != x.dtype:
        _fail(op, f"weight must be [{x.shape[1]}] in x's dtype {x.dtype}, got {tuple(weight.shape)} {weight.dtype}")
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not eps >= 0:
        _fail(op, f"eps must be a number >= 0, got {eps!r}")
    _same_device(op, x=x, weight=weight)


def check_rope(x, cos, sin) -> None:
    """Validate apply_rope inputs."""
    op = "apply_rope"
    for name, t in (("x", x), ("cos", cos), ("sin", sin)):
        _float(op, name, t)
    if x.dim() != 3 or x.shape[2] % 2:
        _fail(op, f"x must be [T, H, d] with an even d, got shape {tuple(x.shape)}")
    want = (x.shape[0], x.shape[2])
    for name, t in (("cos", cos), ("sin", sin)):
        if tuple(t.shape) != want or t.dtype != x.dtype:
            _fail(op, f"{name} must be [T, d] = {list(want)} in x's dtype {x.dtype}, got {tuple(t.shape)} {t.dtype}")
    _same_device(op, x=x, cos=cos, sin=sin)


def check_silu_mul(gate_up) -> None:
    """Validate silu_mul inputs."""
    op = "silu_mul"
    _float(op, "gate_up", gate_up)
    if gate_up.dim() != 2 or gate_up.shape[1] % 2:
        _fail(op, f"gate_up must be [T, 2m] (gate then up), got shape {tuple(gate_up.shape)}")


def rms_norm(x, weight, eps):
    """RMSNorm of x [T, n] with weight [n] -> [T, n] in x.dtype. Normalises in fp32, rounds to the
    model dtype, then scales by the weight in that dtype: the reference order, which fp16/bf16 need."""
    check_rms_norm(x, weight, eps)
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


def apply_rope(x, cos, sin):
    """Rotary embedding of x [T, H, d] with cos/sin [T, d] -> new [T, H, d]; rotates the pairs
    (i, i + d/2), the layout of HF checkpoints."""
    check_rope(x, cos, sin)
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos[:, None, :] + rotated * sin[:, None, :]


def silu_mul(gate_up):
    """SwiGLU gate of gate_up [T, 2m] (gate | up) -> silu(gate) * up [T, m]."""
    check_silu_mul(gate_up)
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


def check_topk(scores, k) -> tuple[int, int]:
    """Validate topk_indices inputs -> (rows, n)."""
    op = "topk_indices"
    if not isinstance(scores, torch.Tensor) or scores.dtype != torch.float32 or scores.dim() != 2:
        _fail(op, f"scores must be a float32 [H, n] tensor, got {getattr(scores, 'dtype', type(scores))} "
                  f"{tuple(getattr(scores, 'shape', ()))}")
    if scores.shape[1] and scores.stride(1) != 1:
        _fail(op, "scores rows must be contiguous (a column slice is fine, a transpose is not)")
    if isinstance(k, bool) or not isinstance(k, int) or not 0 <= k <= scores.shape[1]:
        _fail(op, f"k must be an int in [0, {scores.shape[1]}], got {k!r}")
    return scores.shape[0], scores.shape[1]


def topk_indices(scores, k):
    """Indices [H, k] int64 of the k highest scores of each row of scores [H, n] float32, in no
    particular order (among equal scores, any)."""
    check_topk(scores, k)
    return torch.topk(scores, k, dim=1, sorted=False).indices


def check_quant_linear(x, w, bias) -> tuple[int, int, int]:
    """Validate quant_linear inputs -> (T, N, K)."""
    op = "quant_linear"
    if not isinstance(w, QuantWeight):
        _fail(op, f"w must be a QuantWeight, got {type(w).__name__}")
    _float(op, "x", x)
    n, k = w.shape
    if x.dim() != 2 or x.shape[1] != k:
        _fail(op, f"x must be [T, K] with K = {k}, the input features of w [{n}, {k}], got shape {tuple(x.shape)}")
    if k == 0 or w.group % 16:
        _fail(op, f"w's group ({w.group}) must be a multiple of 16 and K ({k}) positive")
    if bias is not None and (not isinstance(bias, torch.Tensor) or tuple(bias.shape) != (n,) or bias.dtype != x.dtype):
        _fail(op, f"bias must be [N] = [{n}] in x's dtype {x.dtype}, got {getattr(bias, 'dtype', type(bias))} "
                  f"{tuple(getattr(bias, 'shape', ()))}")
    parts = {"x": x, "codes": w.codes, "scales": w.scales, "mins": w.mins, "bias": bias}
    _same_device(op, **{name: t for name, t in parts.items() if t is not None})
    return x.shape[0], n, k


def quant_linear(x, w, bias=None):
    """x [T, K] @ w^T + bias [N] for a QuantWeight w [N, K] -> [T, N] in x.dtype: the weight
    dequantized in fp32, products, sums and bias in fp32, one rounding to x.dtype at the end (what
    the kernels approximate; they differ by accumulation order, and 2..16 rows by rounding the
    dequantized weight to x's dtype for the tensor cores)."""
    check_quant_linear(x, w, bias)
    out = x.float() @ dequantize(w).t()
    if bias is not None:
        out = out + bias.float()
    return out.to(x.dtype)
