"""The operands of a batch's sparse decode: each row (sequence) keeps its own pool and slot tables.

A batched step attends B sequences at once (issue 17: the sparse decode takes the batch). Each row
is a separate backend with its own tensors, allocated when it joined; rather than lay them out anew
in one tensor, one launch reads them through a [B, 4] table of their base addresses (the pool's K and
V [L, Hkv, S, bs, d], the slot tables [L, Hkv, n], the tail length [1]). That needs every row's
tensors to share shapes, strides and dtypes, which rows of one configuration do; RowOperands
checks it once per composition of the batch.

The addresses are read on the device by the kernel, so the table is built on the host before a step,
never while a CUDA graph is being captured; a graph that read it stays valid while every row's
tensors stay where they are (engine/batch.py keys its graphs by those addresses).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from kvretrieve.kernels.checks import fail, query_group

_OP = "sparse_decode_rows"


@dataclass(frozen=True, eq=False)
class RowOperands:
    k: tuple[torch.Tensor, ...]       # per row: the pool's keys [L, Hkv, S, bs, d]
    v: tuple[torch.Tensor, ...]       # per row: values, like k
    tables: tuple[torch.Tensor, ...]  # per row: slots attended [L, Hkv, n] int32 (-1 = skip)
    tails: tuple[torch.Tensor, ...]   # per row: tokens in the last column's block [1] int32
    scale: float
    addresses: torch.Tensor           # [B, 4] int64 on the rows' device: k, v, tables, tail of each row

    @classmethod
    def of(cls, rows: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, float]]) -> "RowOperands":
        """rows[b] = (k, v, tables, tail, scale) of row b: a backend's sparse_operands()."""
        problem = mismatch(rows)
        if problem:
            fail(_OP, problem)
        k, v, tables, tails, scales = (tuple(part) for part in zip(*rows))
        ptrs = [[t.data_ptr() for t in row[:4]] for row in rows]
        return cls(k, v, tables, tails, float(scales[0]), torch.tensor(ptrs, dtype=torch.int64, device=k[0].device))

    def check_query(self, q: torch.Tensor, layer: int) -> tuple[int, int]:
        """q [B, Hq, d] of the rows' dtype and device, layer in range; returns (Hkv, G)."""
        L, hkv, _, _, d = self.k[0].shape
        if not isinstance(q, torch.Tensor) or q.dim() != 3 or q.shape[0] != len(self.k) or q.shape[2] != d:
            fail(_OP, f"q must be [B={len(self.k)}, Hq, d={d}], got {tuple(getattr(q, 'shape', ()))}")
        if q.dtype != self.k[0].dtype or q.device != self.k[0].device:
            fail(_OP, f"q must be {self.k[0].dtype} on {self.k[0].device} like the pools, got {q.dtype} on {q.device}")
        if not 0 <= layer < L:
            fail(_OP, f"layer must be in [0, {L}), got {layer}")
        return hkv, query_group(_OP, q.shape[1], hkv)


def mismatch(rows) -> str | None:
    """Why these rows (sparse_operands() of each) cannot share one launch, or None when they can."""
    if not rows:
        return "a batch needs at least one row"
    k, v, tables, tails, scales = (tuple(part) for part in zip(*rows))
    for name, ts in (("k_pool", k), ("v_pool", v), ("tables", tables), ("tail_len", tails)):
        first = ts[0]
        for b, t in enumerate(ts):
            if (t.shape, t.stride(), t.dtype, t.device) != (first.shape, first.stride(), first.dtype, first.device):
                return (f"row {b}'s {name} differs from row 0's in shape, stride, dtype or device ({tuple(t.shape)} "
                        f"{t.dtype} on {t.device} vs {tuple(first.shape)} {first.dtype} on {first.device}): only rows "
                        "of one configuration share a launch")
    if len(set(scales)) > 1:
        return f"rows must share one softmax scale, got {sorted(set(scales))}"
    if k[0].dim() != 5 or v[0].shape != k[0].shape or v[0].dtype != k[0].dtype:
        return (f"k_pool and v_pool must both be [L, Hkv, S, bs, d] of one dtype, got {tuple(k[0].shape)} {k[0].dtype} "
                f"and {tuple(v[0].shape)} {v[0].dtype}")
    if tables[0].dim() != 3 or tables[0].shape[:2] != k[0].shape[:2] or tables[0].dtype != torch.int32:
        return (f"tables must be int32 [L, Hkv, n] matching the pool's {tuple(k[0].shape[:2])}, got "
                f"{tables[0].dtype} {tuple(tables[0].shape)}")
    if tails[0].numel() != 1 or tails[0].dtype != torch.int32:
        return f"tail_len must be an int32 tensor of one element, got {tails[0].dtype} {tuple(tails[0].shape)}"
    if len({t.device for t in (k[0], v[0], tables[0], tails[0])}) > 1:
        return "a row's pool, tables and tail_len must be on one device"
    return None

__all__ = ["RowOperands", "mismatch"]
