"""Argument checks shared by each Triton launcher and its torch reference (kernels/reference.py).

A launcher and its reference must refuse the same inputs with the same message, so each check lives
here once: shapes, dtypes, one device, and (check_launch_device) CUDA tensors for a real Triton launch.
Every failure is a ValueError that names the op and the argument.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

import torch

from kvretrieve.models.quant import QuantWeight

if TYPE_CHECKING:  # rows.py imports this module for fail and query_group
    from kvretrieve.kernels.rows import RowTensors

_FLOATS = (torch.float32, torch.float16, torch.bfloat16)


_INTS = (torch.int32, torch.int64)


def fail(op: str, msg: str) -> None:
    raise ValueError(f"{op}: {msg}")


def _same_device(op: str, **tensors: torch.Tensor) -> None:
    devs = {name: t.device for name, t in tensors.items()}
    if len(set(devs.values())) > 1:
        fail(op, "all tensors must be on one device, got " + ", ".join(f"{k}={v}" for k, v in devs.items()))


def _float(op: str, name: str, t: torch.Tensor) -> None:
    if not isinstance(t, torch.Tensor) or t.dtype not in _FLOATS:
        fail(op, f"{name} must be a float32/float16/bfloat16 tensor, got {getattr(t, 'dtype', type(t))}")


def query_group(op: str, hq: int, hkv: int) -> int:
    if hkv <= 0 or hq % hkv != 0:
        fail(op, f"query heads ({hq}) must be a positive multiple of KV heads ({hkv})")
    return hq // hkv


def check_launch_device(op: str, *tensors: torch.Tensor) -> None:
    """Triton launchers need CUDA tensors, except under TRITON_INTERPRET=1 (CPU tests)."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        return
    for t in tensors:
        if t.device.type != "cuda":
            fail(op, f"the Triton kernel needs CUDA tensors, got one on {t.device} "
                      f"(use kvretrieve.kernels.{op}, which falls back to the torch reference)")


def check_sparse_decode(q, k_pool, v_pool, slots, tail_len) -> tuple[int, int, int, int, int]:
    """Validate sparse_decode inputs; returns (Hkv, G, n, bs, d)."""
    op = "sparse_decode"
    for name, t in (("q", q), ("k_pool", k_pool), ("v_pool", v_pool)):
        _float(op, name, t)
    if q.dim() != 2:
        fail(op, f"q must be [Hq, d], got shape {tuple(q.shape)}")
    if k_pool.dim() != 4 or v_pool.shape != k_pool.shape:
        fail(op, f"k_pool and v_pool must both be [Hkv, S, bs, d], got {tuple(k_pool.shape)} and {tuple(v_pool.shape)}")
    if q.dtype != k_pool.dtype or v_pool.dtype != k_pool.dtype:
        fail(op, f"q, k_pool, v_pool must share a dtype, got {q.dtype}, {k_pool.dtype}, {v_pool.dtype}")
    hkv, _, bs, d = k_pool.shape
    if q.shape[1] != d:
        fail(op, f"head dim of q ({q.shape[1]}) != head dim of the pool ({d})")
    g = query_group(op, q.shape[0], hkv)
    if not isinstance(slots, torch.Tensor) or slots.dim() != 2 or slots.shape[0] != hkv or slots.dtype not in _INTS:
        fail(op, f"slots must be an int32 tensor [Hkv={hkv}, n], got {getattr(slots, 'dtype', type(slots))} "
                  f"{tuple(getattr(slots, 'shape', ()))}")
    if not isinstance(tail_len, torch.Tensor) or tail_len.numel() != 1 or tail_len.dtype not in _INTS:
        fail(op, "tail_len must be an int32 tensor of shape [1] (a device tensor so CUDA graphs can capture it)")
    _same_device(op, q=q, k_pool=k_pool, v_pool=v_pool, slots=slots, tail_len=tail_len)
    return hkv, g, slots.shape[1], bs, d


def check_decode_rows(q: torch.Tensor, rows: RowTensors, layer: int) -> tuple[int, int]:
    """sparse_decode_rows' q [B, Hq, d] against its rows (kernels/rows.py: the pools' dtype and head
    dim, the layer); returns (Hkv, G)."""
    op = "sparse_decode_rows"
    hkv, g = rows.check_query(op, q, layer, "k_pool")
    k = rows["k_pool"][0]
    if q.dtype != k.dtype or q.shape[2] != k.shape[-1]:
        fail(op, f"q must be {k.dtype} with head dim {k.shape[-1]} like the pools, got {q.dtype} {tuple(q.shape)}")
    return hkv, g


def check_lowrank_rows(q: torch.Tensor, rows: RowTensors, layer: int, n_blocks: int, block_size: int,
                       op: str = "lowrank_block_scores_rows"):
    """lowrank_block_scores_rows' (or lowrank_block_mass_rows') arguments against its rows
    (kernels/rows.py); returns (Hkv, G, r)."""
    hkv, g = rows.check_query(op, q, layer, "proj")
    _float(op, "q", q)
    proj, sketch = rows["proj"][0], rows["sketch"][0]
    if q.shape[2] != proj.shape[2]:
        fail(op, f"q must be [B, Hq, d={proj.shape[2]}], got {tuple(q.shape)}")
    if int(n_blocks) < 0 or int(block_size) <= 0 or n_blocks * block_size > sketch.shape[2]:
        fail(op, f"need 0 <= n_blocks*block_size <= {sketch.shape[2]} (the sketch's capacity) and block_size > 0, "
                 f"got {n_blocks}, {block_size}")
    if "block_means" in rows.names and n_blocks > rows["block_means"][0].shape[2]:
        fail(op, f"n_blocks {n_blocks} exceeds the block means' capacity {rows['block_means'][0].shape[2]}")
    return hkv, g, proj.shape[3]


def check_lowrank(q, proj, mean, sketch, n_blocks, block_size, op="lowrank_block_scores") -> tuple[int, int, int]:
    """Validate lowrank_block_scores inputs (mean None: lowrank_block_mass, which has none); returns
    (Hkv, G, r)."""
    for name, t in (("q", q), ("proj", proj), ("mean", mean), ("sketch", sketch)):
        if t is not None:
            _float(op, name, t)
    if q.dim() != 2 or proj.dim() != 3:
        fail(op, f"q must be [Hq, d] and proj [Hkv, d, r], got {tuple(q.shape)} and {tuple(proj.shape)}")
    hkv, d, r = proj.shape
    if q.shape[1] != d or (mean is not None and tuple(mean.shape) != (hkv, d)):
        fail(op, f"expected q [Hq, {d}] and mean [{hkv}, {d}], got {tuple(q.shape)} and {tuple(mean.shape)}")
    if sketch.dim() != 3 or sketch.shape[0] != hkv or sketch.shape[2] != r:
        fail(op, f"sketch must be [{hkv}, cap, {r}], got {tuple(sketch.shape)}")
    if int(n_blocks) < 0 or int(block_size) <= 0:
        fail(op, f"need n_blocks >= 0 and block_size > 0, got {n_blocks}, {block_size}")
    if n_blocks * block_size > sketch.shape[1]:
        fail(op, f"n_blocks*block_size = {n_blocks * block_size} exceeds sketch capacity {sketch.shape[1]}")
    g = query_group(op, q.shape[0], hkv)
    _same_device(op, q=q, proj=proj, sketch=sketch, **({} if mean is None else {"mean": mean}))
    return hkv, g, r


def check_lowrank_mass(q, proj, sketch, block_means, n_blocks, block_size) -> tuple[int, int, int]:
    """Validate lowrank_block_mass inputs; returns (Hkv, G, r)."""
    hkv, g, r = check_lowrank(q, proj, None, sketch, n_blocks, block_size, "lowrank_block_mass")
    _float("lowrank_block_mass", "block_means", block_means)
    if block_means.dim() != 3 or block_means.shape[0] != hkv or block_means.shape[2] != q.shape[1] \
            or block_means.shape[1] < n_blocks:
        fail("lowrank_block_mass", f"block_means must be [{hkv}, >= {n_blocks}, {q.shape[1]}], "
                                    f"got {tuple(block_means.shape)}")
    _same_device("lowrank_block_mass", q=q, block_means=block_means)
    return hkv, g, r


def check_max_dot(q, keys, n_blocks, block_size) -> tuple[int, int]:
    """Validate max_dot_block_scores inputs; returns (Hkv, G)."""
    op = "max_dot_block_scores"
    for name, t in (("q", q), ("keys", keys)):
        _float(op, name, t)
    if q.dim() != 2 or keys.dim() != 3 or keys.shape[2] != q.shape[1]:
        fail(op, f"q must be [Hq, d] and keys [Hkv, cap, d], got {tuple(q.shape)} and {tuple(keys.shape)}")
    if int(n_blocks) < 0 or int(block_size) <= 0 or n_blocks * block_size > keys.shape[1]:
        fail(op, f"need 0 <= n_blocks*block_size <= {keys.shape[1]} and block_size > 0, got {n_blocks}, {block_size}")
    g = query_group(op, q.shape[0], keys.shape[0])
    _same_device(op, q=q, keys=keys)
    return keys.shape[0], g


def check_bounds(q, kmin, kmax, n_blocks) -> tuple[int, int]:
    """Validate bounds_block_scores inputs; returns (Hkv, G)."""
    op = "bounds_block_scores"
    for name, t in (("q", q), ("kmin", kmin), ("kmax", kmax)):
        _float(op, name, t)
    if q.dim() != 2 or kmin.dim() != 3 or kmax.shape != kmin.shape or kmax.dtype != kmin.dtype:
        fail(op, f"need q [Hq, d] and kmin/kmax [Hkv, cap_blocks, d] of one dtype, got {tuple(q.shape)}, "
                  f"{tuple(kmin.shape)} {kmin.dtype}, {tuple(kmax.shape)} {kmax.dtype}")
    if kmin.shape[2] != q.shape[1]:
        fail(op, f"head dim of q ({q.shape[1]}) != head dim of kmin/kmax ({kmin.shape[2]})")
    if not 0 <= int(n_blocks) <= kmin.shape[1]:
        fail(op, f"n_blocks ({n_blocks}) must be in [0, cap_blocks={kmin.shape[1]}]")
    g = query_group(op, q.shape[0], kmin.shape[0])
    _same_device(op, q=q, kmin=kmin, kmax=kmax)
    return kmin.shape[0], g


def check_merge(out_a, lse_a, out_b, lse_b) -> None:
    """Validate merge_attention inputs."""
    op = "merge_attention"
    _float(op, "out_a", out_a)
    _float(op, "out_b", out_b)
    if out_a.dim() != 2 or out_b.shape != out_a.shape or out_b.dtype != out_a.dtype:
        fail(op, f"out_a and out_b must be [H, d] of one dtype, got {tuple(out_a.shape)} {out_a.dtype} "
                  f"and {tuple(out_b.shape)} {out_b.dtype}")
    for name, t in (("lse_a", lse_a), ("lse_b", lse_b)):
        if not isinstance(t, torch.Tensor) or t.dtype != torch.float32 or tuple(t.shape) != (out_a.shape[0],):
            fail(op, f"{name} must be float32 [{out_a.shape[0]}], got {getattr(t, 'dtype', type(t))} "
                      f"{tuple(getattr(t, 'shape', ()))}")
    _same_device(op, out_a=out_a, lse_a=lse_a, out_b=out_b, lse_b=lse_b)


def check_lru(ids, slot_of_block, block_of_slot, last_used, stamp) -> tuple[int, int, int]:
    """Validate lru_lookup inputs; returns (H, k, lru slots n)."""
    op = "lru_lookup"
    if not isinstance(ids, torch.Tensor) or ids.dim() != 2 or ids.dtype != torch.int64:
        fail(op, f"ids must be an int64 tensor [H, k], got {getattr(ids, 'dtype', type(ids))}")
    h, k = ids.shape
    for name, t in (("slot_of_block", slot_of_block), ("block_of_slot", block_of_slot), ("last_used", last_used)):
        if t.dtype != torch.int32 or t.dim() != 2 or t.shape[0] != h or not t.is_contiguous():
            fail(op, f"{name} must be a contiguous int32 tensor [H={h}, n + 1], got {t.dtype} {tuple(t.shape)}")
    n = block_of_slot.shape[1] - 1
    if last_used.shape != block_of_slot.shape or n < k:
        fail(op, f"need last_used shaped like block_of_slot and at least k={k} LRU slots, got {n}")
    if stamp.dtype != torch.int32 or stamp.numel() != 1:
        fail(op, "stamp must be an int32 tensor of shape [1]")
    _same_device(op, ids=ids, slot_of_block=slot_of_block, block_of_slot=block_of_slot, last_used=last_used,
                 stamp=stamp)
    return h, k, n


def check_fetch(store, layer, ids, fetch, slots, pool_k, pool_v) -> None:
    op = "fetch_blocks"
    if pool_k.dim() != 4 or pool_v.shape != pool_k.shape or not pool_k.is_contiguous() or not pool_v.is_contiguous():
        fail(op, f"pool_k and pool_v must be contiguous [Hkv, S, bs, d], got {tuple(pool_k.shape)}")
    if tuple(pool_k.shape[2:]) != (store.bs, store.d) or pool_k.shape[0] != store.H or pool_k.dtype != store.dtype:
        fail(op, f"pool blocks {tuple(pool_k.shape)} {pool_k.dtype} do not match the store's "
                  f"[{store.H}, S, {store.bs}, {store.d}] {store.dtype}")
    if ids.shape != fetch.shape or ids.shape != slots.shape or ids.dim() != 2 or ids.shape[0] != store.H:
        fail(op, f"ids, fetch and slots must all be [Hkv, k], got {tuple(ids.shape)}, {tuple(fetch.shape)}, "
                  f"{tuple(slots.shape)}")
    if not 0 <= layer < store.L:
        fail(op, f"layer {layer} out of range [0, {store.L})")
    _same_device(op, ids=ids, fetch=fetch, slots=slots, pool_k=pool_k, pool_v=pool_v)


def check_store(store, block, slot, pool_k, pool_v) -> None:
    op = "store_blocks"
    if pool_k.dim() != 5 or pool_v.shape != pool_k.shape or not pool_k.is_contiguous() or not pool_v.is_contiguous():
        fail(op, f"pool_k and pool_v must be contiguous [L, Hkv, S, bs, d], got {tuple(pool_k.shape)}")
    if tuple(pool_k.shape[3:]) != (store.bs, store.d) or tuple(pool_k.shape[:2]) != (store.L, store.H) \
            or pool_k.dtype != store.dtype:
        fail(op, f"pool {tuple(pool_k.shape)} {pool_k.dtype} does not match the store's "
                  f"[{store.L}, {store.H}, S, {store.bs}, {store.d}] {store.dtype}")
    if not 0 <= slot < pool_k.shape[2]:
        fail(op, f"slot {slot} out of range [0, {pool_k.shape[2]})")
    if not 0 <= block < store.capacity_blocks:
        fail(op, f"block {block} is past the store's reserved {store.capacity_blocks} blocks (store.ensure first)")


def check_rms_norm(x, weight, eps) -> None:
    """Validate rms_norm inputs."""
    op = "rms_norm"
    _float(op, "x", x)
    _float(op, "weight", weight)
    if x.dim() != 2 or x.shape[1] == 0:
        fail(op, f"x must be [T, n] with n > 0, got shape {tuple(x.shape)}")
    if tuple(weight.shape) != (x.shape[1],) or weight.dtype != x.dtype:
        fail(op, f"weight must be [{x.shape[1]}] in x's dtype {x.dtype}, got {tuple(weight.shape)} {weight.dtype}")
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not eps >= 0:
        fail(op, f"eps must be a number >= 0, got {eps!r}")
    _same_device(op, x=x, weight=weight)


def check_rope(x, cos, sin) -> None:
    """Validate apply_rope inputs."""
    op = "apply_rope"
    for name, t in (("x", x), ("cos", cos), ("sin", sin)):
        _float(op, name, t)
    if x.dim() != 3 or x.shape[2] % 2:
        fail(op, f"x must be [T, H, d] with an even d, got shape {tuple(x.shape)}")
    want = (x.shape[0], x.shape[2])
    for name, t in (("cos", cos), ("sin", sin)):
        if tuple(t.shape) != want or t.dtype != x.dtype:
            fail(op, f"{name} must be [T, d] = {list(want)} in x's dtype {x.dtype}, got {tuple(t.shape)} {t.dtype}")
    _same_device(op, x=x, cos=cos, sin=sin)


def check_silu_mul(gate_up) -> None:
    """Validate silu_mul inputs."""
    op = "silu_mul"
    _float(op, "gate_up", gate_up)
    if gate_up.dim() != 2 or gate_up.shape[1] % 2:
        fail(op, f"gate_up must be [T, 2m] (gate then up), got shape {tuple(gate_up.shape)}")


def check_topk(scores, k) -> tuple[int, int]:
    """Validate topk_indices inputs -> (rows, n)."""
    op = "topk_indices"
    if not isinstance(scores, torch.Tensor) or scores.dtype != torch.float32 or scores.dim() != 2:
        fail(op, f"scores must be a float32 [H, n] tensor, got {getattr(scores, 'dtype', type(scores))} "
                  f"{tuple(getattr(scores, 'shape', ()))}")
    if scores.shape[1] and scores.stride(1) != 1:
        fail(op, "scores rows must be contiguous (a column slice is fine, a transpose is not)")
    if isinstance(k, bool) or not isinstance(k, int) or not 0 <= k <= scores.shape[1]:
        fail(op, f"k must be an int in [0, {scores.shape[1]}], got {k!r}")
    return scores.shape[0], scores.shape[1]


def check_quant_linear(x, w, bias) -> tuple[int, int, int]:
    """Validate quant_linear inputs -> (T, N, K)."""
    op = "quant_linear"
    if not isinstance(w, QuantWeight):
        fail(op, f"w must be a QuantWeight, got {type(w).__name__}")
    _float(op, "x", x)
    n, k = w.shape
    if x.dim() != 2 or x.shape[1] != k:
        fail(op, f"x must be [T, K] with K = {k}, the input features of w [{n}, {k}], got shape {tuple(x.shape)}")
    if k == 0 or w.group % 16:
        fail(op, f"w's group ({w.group}) must be a multiple of 16 and K ({k}) positive")
    if bias is not None and (not isinstance(bias, torch.Tensor) or tuple(bias.shape) != (n,) or bias.dtype != x.dtype):
        fail(op, f"bias must be [N] = [{n}] in x's dtype {x.dtype}, got {getattr(bias, 'dtype', type(bias))} "
                  f"{tuple(getattr(bias, 'shape', ()))}")
    parts = {"x": x, "codes": w.codes, "scales": w.scales, "mins": w.mins, "bias": bias}
    _same_device(op, **{name: t for name, t in parts.items() if t is not None})
    return x.shape[0], n, k
