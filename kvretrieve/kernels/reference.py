"""Pure-torch references of the kernels (their argument checks, shared with the launchers: kernels/checks.py).

Every reference has the same signature and return contract as its Triton launcher, runs on any
device, and accumulates in float32. They are the fallback where Triton is missing and the ground
truth in the tests, so they favour clarity over speed, but avoid host syncs (no `.item()`) so they
stay usable on CUDA tensors too.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from kvretrieve.kernels.checks import (check_bounds, check_decode_rows, check_fetch, check_lowrank, check_lowrank_mass,
                                       check_lowrank_rows, check_lru, check_max_dot, check_merge, check_quant_linear,
                                       check_rms_norm, check_rope, check_silu_mul, check_sparse_decode, check_store,
                                       check_topk, query_group)
from kvretrieve.models.quant import QuantWeight, dequantize
from kvretrieve.store.reads import gather_blocks


def sparse_decode(q, k_pool, v_pool, slots, tail_len, scale):
    """Attention of q [Hq, d] over the pool slots listed in slots [Hkv, n] (-1 = skip; the last
    column holds tail_len [1] tokens, the others bs). Returns out [Hq, d] (q.dtype), lse [Hq] f32."""
    hkv, g, n, bs, d = check_sparse_decode(q, k_pool, v_pool, slots, tail_len)
    hq = q.shape[0]
    if n == 0:
        return q.new_zeros(hq, d), torch.full((hq,), float("-inf"), device=q.device)
    # Only the selected blocks are gathered, as rows (head, slot) of the flattened pool: index_select
    # gives the same tensor 2.6-3.2x faster on CPUs than indexing with a (head, slot) pair of tensors
    # (bench/results/probe_cpu_gather.md), and this reference is the CPU's decode path.
    rows = (torch.arange(hkv, device=q.device)[:, None] * k_pool.shape[1] + slots.clamp(min=0).long()).reshape(-1)
    k = k_pool.reshape(-1, bs, d).index_select(0, rows).reshape(hkv, n * bs, d).float()
    v = v_pool.reshape(-1, bs, d).index_select(0, rows).reshape(hkv, n * bs, d).float()
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



def sparse_decode_rows(q, rows, layer, scale):
    """sparse_decode of each row b: q [B, Hq, d] over layer `layer` of its own pool and table
    (rows: kernels.rows.decode_rows) -> (out [B, Hq, d], lse [B, Hq] float32)."""
    check_decode_rows(q, rows, layer)
    outs = [sparse_decode(q[b], k[layer], v[layer], t[layer], tail, scale)
            for b, (k, v, t, tail) in enumerate(zip(*rows.parts))]
    return torch.stack([o for o, _ in outs]), torch.stack([lse for _, lse in outs])


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



def lowrank_block_scores_rows(q, rows, layer, n_blocks, block_size):
    """lowrank_block_scores of each row b: q [B, Hq, d] over layer `layer` of its own index
    (rows: kernels.rows.lowrank_rows) -> [B, Hkv, n_blocks] float32."""
    check_lowrank_rows(q, rows, layer, n_blocks, block_size)
    return torch.stack([lowrank_block_scores(q[b], proj[layer], mean[layer], sketch[layer], n_blocks, block_size)
                        for b, (proj, mean, sketch) in enumerate(zip(*rows.parts))])

def lowrank_block_mass_rows(q, rows, layer, n_blocks, block_size, scale):
    """lowrank_block_mass of each row b: q [B, Hq, d] over layer `layer` of its own index
    (rows: kernels.rows.mass_rows) -> [B, Hkv, n_blocks] float32."""
    check_lowrank_rows(q, rows, layer, n_blocks, block_size, "lowrank_block_mass_rows")
    return torch.stack([lowrank_block_mass(q[b], proj[layer], sketch[layer], means[layer], n_blocks, block_size, scale)
                        for b, (proj, sketch, means) in enumerate(zip(*rows.parts))])


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
    g = query_group("block_rest", hq, hkv)
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
    g, bs, r, rv = query_group("lowrank_rest", hq, hkv), block_size, proj.shape[-1], vproj.shape[-1]
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


def lru_lookup(ids, slot_of_block, block_of_slot, last_used, stamp, counts):
    """Resolve distinct block ids [H, k] (int64) against a per-head LRU cache of n slots, on the
    device and without a host sync, so a decode step can run inside a CUDA graph.

    State, updated in place: slot_of_block [H, blocks + 1] int32 (-1: not cached), block_of_slot and
    last_used [H, n + 1] int32; the last column of each is scratch, where masked-out scatters land
    (fixed shapes, no boolean indexing). stamp [1] int32 is this lookup's time; counts [2] int64
    (hits, misses) is accumulated unless None.
    Returns (slot [H, k] int32 in [0, n), fetch [H, k] bool: the block was given a slot now and must
    be loaded into it). Hits are stamped before victims are picked, so a victim never belongs to
    this selection; a head's m misses take its m least recently used slots (equal stamps: the lower
    slot first), the r-th miss the r-th of them in slot order (the order the kernel finds them in)."""
    h, k, n = check_lru(ids, slot_of_block, block_of_slot, last_used, stamp)
    nb = slot_of_block.shape[1] - 1
    now = stamp.expand(h, k)
    cur = slot_of_block.gather(1, ids)
    hit = cur >= 0
    last_used.scatter_(1, torch.where(hit, cur, n).long(), now)
    stalest = torch.sort(last_used[:, :n], dim=1, stable=True).indices
    slots = torch.arange(n, device=ids.device).expand(h, n)
    take = torch.zeros(h, n, dtype=torch.bool, device=ids.device)
    take.scatter_(1, stalest, slots < (~hit).sum(1, keepdim=True))             # the m stalest
    order = torch.sort((~take).int(), dim=1, stable=True).indices           # the victims first, in slot order
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


def lru_lookup_rows(ids, rows, layer):
    """lru_lookup of each row b: ids [B, H, k] against layer `layer` of its own pool's maps, stamp and
    counts (rows: kernels.rows.lru_rows) -> (slot [B, H, k] int32, fetch [B, H, k] bool)."""
    got = [lru_lookup(ids[b], sob[layer], bos[layer], used[layer], stamp, counts)
           for b, (sob, bos, used, stamp, counts) in enumerate(zip(*rows.parts))]
    return torch.stack([s for s, _ in got]), torch.stack([f for _, f in got])


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
    gather_blocks(store, layer, heads, blocks, rows)
    flat = (heads * pool_k.shape[1] + dst).to(pool_k.device)
    up = rows.to(pool_k.device, non_blocking=True)
    pool_k.view(-1, rows.shape[2]).index_copy_(0, flat, up[0])
    pool_v.view(-1, rows.shape[2]).index_copy_(0, flat, up[1])


def store_blocks(store, block, slot, pool_k, pool_v):
    """Write pool slot `slot` of every layer (pool_k, pool_v [L, Hkv, S, bs, d]) to the CPU store
    (kv_store.KVStore) as block `block` of that layer: a decode step that completes a block hands it
    to the store for all layers at once. From CUDA the copies are async on the current stream."""
    check_store(store, block, slot, pool_k, pool_v)
    for layer in range(store.L):
        store.write(layer, block, pool_k[layer, :, slot:slot + 1], pool_v[layer, :, slot:slot + 1])


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


def topk_indices(scores, k):
    """Indices [H, k] int64 of the k highest scores of each row of scores [H, n] float32, in no
    particular order (among equal scores, any)."""
    check_topk(scores, k)
    return torch.topk(scores, k, dim=1, sorted=False).indices


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
