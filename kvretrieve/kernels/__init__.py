"""Attention, block-scoring and fused decoder-layer kernels (RMSNorm, RoPE, SiLU gate).

The public functions dispatch to the Triton launchers for CUDA tensors when Triton is importable,
and to the pure-torch references (kvretrieve.kernels.reference) otherwise. Signatures and return
contracts are identical on both paths.
"""

from __future__ import annotations

from kvretrieve.kernels import reference as _ref

try:
    from kvretrieve.kernels import fetch as _tfetch
    from kvretrieve.kernels import fused as _tfused
    from kvretrieve.kernels import lru as _tlru
    from kvretrieve.kernels import mass as _tmass
    from kvretrieve.kernels import merge as _tmerge
    from kvretrieve.kernels import qlinear as _tqlinear
    from kvretrieve.kernels import rest as _trest
    from kvretrieve.kernels import scoring as _tscore
    from kvretrieve.kernels import sparse_decode as _tdecode
    from kvretrieve.kernels import topk as _ttopk

    HAS_TRITON = True
except Exception:  # noqa: BLE001 - a missing or broken Triton must never break the CPU path
    HAS_TRITON = False


def _use_triton(t) -> bool:
    return HAS_TRITON and t.is_cuda


def sparse_decode(q, k_pool, v_pool, slots, tail_len, scale):
    """Decode attention of q [Hq, d] over pool slots slots [Hkv, n] of k_pool/v_pool
    [Hkv, S, bs, d] (-1 = skip; last column holds tail_len [1] tokens)
    -> (out [Hq, d] in q.dtype, lse [Hq] float32; empty head: 0 and -inf)."""
    impl = _tdecode.sparse_decode if _use_triton(q) else _ref.sparse_decode
    return impl(q, k_pool, v_pool, slots, tail_len, scale)


def sparse_decode_rows(q, rows, layer, scale):
    """sparse_decode for the rows of a batched step in one launch: q [B, Hq, d], row b over layer
    `layer` of its own pool and table (rows: kernels.rows.decode_rows) -> (out [B, Hq, d], lse [B, Hq])."""
    impl = _tdecode.sparse_decode_rows if _use_triton(q) else _ref.sparse_decode_rows
    return impl(q, rows, layer, scale)


def lowrank_block_scores(q, proj, mean, sketch, n_blocks, block_size):
    """Loki block scores: q [Hq, d], proj [Hkv, d, r], mean [Hkv, d], sketch [Hkv, cap, r]
    -> [Hkv, n_blocks] float32."""
    impl = _tscore.lowrank_block_scores if _use_triton(q) else _ref.lowrank_block_scores
    return impl(q, proj, mean, sketch, n_blocks, block_size)


def lowrank_block_scores_rows(q, rows, layer, n_blocks, block_size):
    """lowrank_block_scores for the rows of a batched step in one launch: q [B, Hq, d], row b over layer
    `layer` of its own index (rows: kernels.rows.lowrank_rows) -> [B, Hkv, n_blocks] float32."""
    impl = _tscore.lowrank_block_scores_rows if _use_triton(q) else _ref.lowrank_block_scores_rows
    return impl(q, rows, layer, n_blocks, block_size)


def lowrank_block_mass_rows(q, rows, layer, n_blocks, block_size, scale):
    """lowrank_block_mass for the rows of a batched step in one launch of each kernel: q [B, Hq, d], row b
    over layer `layer` of its own index (rows: kernels.rows.mass_rows) -> [B, Hkv, n_blocks] float32."""
    impl = _tmass.lowrank_block_mass_rows if _use_triton(q) else _ref.lowrank_block_mass_rows
    return impl(q, rows, layer, n_blocks, block_size, scale)


def lowrank_block_mass(q, proj, sketch, block_means, n_blocks, block_size, scale):
    """Estimated log attention share of each block, summed over the GQA group: q [Hq, d],
    proj [Hkv, d, r], sketch [Hkv, cap, r], block_means [Hkv, cap_blocks, d] -> [Hkv, n_blocks] float32."""
    impl = _tmass.lowrank_block_mass if _use_triton(q) else _ref.lowrank_block_mass
    return impl(q, proj, sketch, block_means, n_blocks, block_size, scale)


def block_rest(q, block_means, vsums, left_out, block_size, scale, into=None):
    """Attention of q [Hq, d] over the blocks left_out [Hkv, n] marks, each block_size keys equal to its
    mean key block_means [Hkv, cap_blocks, d] with its mean value (vsums [Hkv, cap_blocks, d] / block_size)
    -> (out [Hq, d] in q.dtype, lse [Hq] float32; nothing left out: 0 and -inf), merged by LSE with
    into = (out, lse) of the attended part when given."""
    impl = _trest.block_rest if _use_triton(q) else _ref.block_rest
    return impl(q, block_means, vsums, left_out, block_size, scale, into)


def lowrank_rest(q, proj, sketch, block_means, vproj, vsketch, vsums, left_out, block_size, scale, into=None):
    """Attention of q [Hq, d] over the tokens of the blocks left_out [Hkv, n] marks, estimated token by
    token from key sketches proj [Hkv, d, r], sketch [Hkv, cap, r], block_means [Hkv, cap_blocks, d] and
    value sketches vproj [Hkv, d, rv], vsketch [Hkv, cap, rv], vsums [Hkv, cap_blocks, d]
    -> (out [Hq, d] in q.dtype, lse [Hq] float32; nothing left out: 0 and -inf), merged by LSE with
    into = (out, lse) of the attended part when given."""
    impl = _trest.lowrank_rest if _use_triton(q) else _ref.lowrank_rest
    return impl(q, proj, sketch, block_means, vproj, vsketch, vsums, left_out, block_size, scale, into)


def max_dot_block_scores(q, keys, n_blocks, block_size):
    """Exact block scores: q [Hq, d], keys [Hkv, cap, d] -> [Hkv, n_blocks] float32, the max of q.k
    over a block's block_size keys and the group's query heads."""
    impl = _tscore.max_dot_block_scores if _use_triton(q) else _ref.max_dot_block_scores
    return impl(q, keys, n_blocks, block_size)


def bounds_block_scores(q, kmin, kmax, n_blocks):
    """Quest upper-bound block scores: q [Hq, d], kmin/kmax [Hkv, cap_blocks, d]
    -> [Hkv, n_blocks] float32."""
    impl = _tscore.bounds_block_scores if _use_triton(q) else _ref.bounds_block_scores
    return impl(q, kmin, kmax, n_blocks)


def merge_attention(out_a, lse_a, out_b, lse_b):
    """LSE merge of two partial attentions: out_* [H, d], lse_* [H] float32
    -> (out [H, d] in out_a.dtype, lse [H] float32)."""
    impl = _tmerge.merge_attention if _use_triton(out_a) else _ref.merge_attention
    return impl(out_a, lse_a, out_b, lse_b)


def lru_lookup(ids, slot_of_block, block_of_slot, last_used, stamp, counts):
    """Resolve block ids [H, k] against a per-head LRU slot cache on the device, no host sync
    -> (slot [H, k] int32, fetch [H, k] bool). See kernels.reference.lru_lookup."""
    impl = _tlru.lru_lookup if _use_triton(ids) else _ref.lru_lookup
    return impl(ids, slot_of_block, block_of_slot, last_used, stamp, counts)


def lru_lookup_rows(ids, rows, layer):
    """lru_lookup for the rows of a batched step in one launch: ids [B, H, k], row b against layer `layer`
    of its own pool (rows: kernels.rows.lru_rows) -> (slot [B, H, k] int32, fetch [B, H, k] bool)."""
    impl = _tlru.lru_lookup_rows if _use_triton(ids) else _ref.lru_lookup_rows
    return impl(ids, rows, layer)


def fetch_blocks(store, layer, ids, fetch, slots, pool_k, pool_v):
    """Copy K,V blocks ids[h, j] of `layer` from the CPU store into pool slots slots[h, j] where
    fetch[h, j]; on CUDA a kernel reads the pinned store directly (no host sync)."""
    impl = _tfetch.fetch_blocks if _use_triton(ids) and store.pin else _ref.fetch_blocks
    return impl(store, layer, ids, fetch, slots, pool_k, pool_v)


def store_blocks(store, block, slot, pool_k, pool_v):
    """Write pool slot `slot` of every layer (pool_k, pool_v [L, Hkv, S, bs, d]) to the CPU store
    as block `block`; on CUDA one kernel writes the pinned store directly (store.sync_offsets first)."""
    impl = _tfetch.store_blocks if _use_triton(pool_k) and store.pin else _ref.store_blocks
    return impl(store, block, slot, pool_k, pool_v)


def rms_norm(x, weight, eps):
    """RMSNorm of x [T, n] with weight [n] (x's dtype) -> [T, n] in x.dtype: normalised in fp32,
    rounded to x.dtype, then scaled by the weight."""
    impl = _tfused.rms_norm if _use_triton(x) else _ref.rms_norm
    return impl(x, weight, eps)


def apply_rope(x, cos, sin):
    """RoPE of x [T, H, d] with cos/sin [T, d] (x's dtype) -> new [T, H, d], rotating pairs (i, i + d/2)."""
    impl = _tfused.apply_rope if _use_triton(x) else _ref.apply_rope
    return impl(x, cos, sin)


def silu_mul(gate_up):
    """gate_up [T, 2m] (gate | up) -> silu(gate) * up [T, m] in its dtype."""
    impl = _tfused.silu_mul if _use_triton(gate_up) else _ref.silu_mul
    return impl(gate_up)


def topk_indices(scores, k):
    """Indices [H, k] int64 of the k highest scores per row of scores [H, n] float32, in no particular
    order. On CUDA a radix-select kernel (k up to half its slice), else torch.topk."""
    triton_ok = _use_triton(scores) and 2 * k <= _ttopk.TOPK_SLICE
    return (_ttopk.topk_indices if triton_ok else _ref.topk_indices)(scores, k)


def quant_linear(x, w, bias=None):
    """x [T, K] @ w^T + bias for a QuantWeight w [N, K] (kvretrieve.models.quant; bits 8 or 4) and
    bias [N] in x's dtype or None -> [T, N] in x.dtype, accumulated in fp32. On CUDA, T <= 16 reads
    the codes once for all rows (decode is bound by the weight's bytes); longer T dequantizes the
    weight into a buffer and calls F.linear."""
    impl = _tqlinear.quant_linear if _use_triton(x) else _ref.quant_linear
    return impl(x, w, bias)


__all__ = ["HAS_TRITON", "sparse_decode", "sparse_decode_rows", "lowrank_block_scores", "lowrank_block_scores_rows",
           "lowrank_block_mass", "lowrank_block_mass_rows", "block_rest", "lowrank_rest", "bounds_block_scores",
           "merge_attention", "lru_lookup", "lru_lookup_rows", "fetch_blocks", "store_blocks",
           "max_dot_block_scores", "rms_norm", "apply_rope", "silu_mul", "topk_indices", "quant_linear"]
