"""Operands of a batched step's kernels: each row (sequence) keeps its own tensors.

A batched step runs B sequences at once (issue 17: the sparse decode and the scoring take the batch).
Each row is a separate backend with its own pool, tables and index, allocated when it joined; rather
than lay them out anew in one tensor, one launch reads them through a [B, P] table of their base
addresses (P tensors a row: for the sparse decode the pool's K and V [L, Hkv, S, bs, d], the slot
tables [L, Hkv, n] and the tail length [1]; for low-rank scoring the projection, mean and sketches).
A program then offsets a row's base exactly as the one-row kernel offsets its tensor, which needs
every row's tensors to share shapes, strides and dtypes: rows of one configuration do (`mismatch`
says why others cannot).

The addresses are read on the device by the kernel, so the table is built on the host before a step,
never while a CUDA graph is being captured; a graph that read it stays valid while every row's
tensors stay where they are (engine/batch.py keys its graphs by those addresses).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from kvretrieve.kernels.checks import fail, query_group


@dataclass(frozen=True, eq=False)
class RowTensors:
    """P named tensors of each of B rows, and the table of their addresses a kernel reads them by."""
    names: tuple[str, ...]                       # what each of a row's tensors is
    parts: tuple[tuple[torch.Tensor, ...], ...]  # parts[i][b]: tensor names[i] of row b
    addresses: torch.Tensor                      # [B, P] int64 on the rows' device: parts[i][b].data_ptr() at [b, i]

    @classmethod
    def of(cls, op: str, names: tuple[str, ...], rows: list[tuple[torch.Tensor, ...]]) -> "RowTensors":
        """rows[b]: row b's tensors, in the order of names, alike across rows (else a ValueError from op)."""
        problem = mismatch(names, rows)
        if problem:
            fail(op, problem)
        parts = tuple(tuple(part) for part in zip(*rows))
        ptrs = [[t.data_ptr() for t in row] for row in rows]
        return cls(names, parts, torch.tensor(ptrs, dtype=torch.int64, device=rows[0][0].device))

    def __len__(self) -> int:
        return len(self.parts[0])

    def __getitem__(self, name: str) -> tuple[torch.Tensor, ...]:
        return self.parts[self.names.index(name)]

    def check_query(self, op: str, q: torch.Tensor, layer: int, like: str) -> tuple[int, int]:
        """q [B, Hq, d] on the rows' device, layer within the first axis of every row's `like` tensor
        [L, Hkv, ...]; returns (Hkv, G)."""
        first = self[like][0]
        L, hkv = first.shape[:2]
        if not isinstance(q, torch.Tensor) or q.dim() != 3 or q.shape[0] != len(self):
            fail(op, f"q must be [B={len(self)}, Hq, d], got {tuple(getattr(q, 'shape', ()))}")
        if q.device != first.device:
            fail(op, f"q must be on {first.device} like the rows' tensors, got {q.device}")
        if not 0 <= layer < L:
            fail(op, f"layer must be in [0, {L}), got {layer}")
        return hkv, query_group(op, q.shape[1], hkv)


@dataclass(frozen=True, eq=False)
class StepRows:
    """What a batched step's one-launch kernels read: every row's sparse-decode operands (decode_rows)
    and, where every row scores its blocks with a low-rank index this step, the indexes' operands
    (lowrank_rows: max scores; mass_rows: mass scores) with the blocks to score (the widest row's; each
    row keeps its own first ones). Where every row also selects afresh the same k blocks, select_k is
    that k and outside [B, n_blocks] (bool: each row's blocks that are no candidates) lets one top-k
    pick every row's blocks."""
    decode: RowTensors
    scale: float
    scoring: RowTensors | None = None
    mass: bool = False  # scoring holds mass_rows' operands (else lowrank_rows')
    n_blocks: int = 0
    block_size: int = 0
    select_k: int = 0
    outside: torch.Tensor | None = None
    lookup: RowTensors | None = None  # with select_k, where every row's pool can look up in one launch (lru_rows)
    lru0: int = 0                     # the pools' first LRU slot (lookups give slots from 0)


def mismatch(names: tuple[str, ...], rows) -> str | None:
    """Why these rows' tensors cannot share one launch, or None when they can."""
    if not rows:
        return "a batch needs at least one row"
    if any(len(r) != len(names) for r in rows):
        return f"every row needs {len(names)} tensors ({', '.join(names)})"
    for name, ts in zip(names, zip(*rows)):
        first = ts[0]
        for b, t in enumerate(ts):
            if (t.shape, t.stride(), t.dtype, t.device) != (first.shape, first.stride(), first.dtype, first.device):
                return (f"row {b}'s {name} differs from row 0's in shape, stride, dtype or device ({tuple(t.shape)} "
                        f"{t.dtype} on {t.device} vs {tuple(first.shape)} {first.dtype} on {first.device}): only rows "
                        "of one configuration share a launch")
    if len({t.device for t in rows[0]}) > 1:
        return "a row's tensors must all be on one device"
    return None


DECODE = ("k_pool", "v_pool", "tables", "tail_len")
LOWRANK = ("proj", "mean", "sketch")
MASS = ("proj", "sketch", "block_means")
LRU = ("slot_of_block", "block_of_slot", "last_used", "stamp", "counts")


def decode_rows(rows: list[tuple[torch.Tensor, ...]]) -> RowTensors:
    """The sparse decode's rows: (pool K, pool V [L, Hkv, S, bs, d], tables [L, Hkv, n] int32, tail_len
    [1] int32) each, as a backend's sparse_operands() gives them."""
    op = "sparse_decode_rows"
    got = RowTensors.of(op, DECODE, rows)
    k, v, tables, tail = (got[n][0] for n in DECODE)
    if k.dim() != 5 or v.shape != k.shape or v.dtype != k.dtype:
        fail(op, f"k_pool and v_pool must both be [L, Hkv, S, bs, d] of one dtype, got {tuple(k.shape)} {k.dtype} "
                 f"and {tuple(v.shape)} {v.dtype}")
    if tables.dim() != 3 or tables.shape[:2] != k.shape[:2] or tables.dtype != torch.int32:
        fail(op, f"tables must be int32 [L, Hkv, n] matching the pool's {tuple(k.shape[:2])}, got "
                 f"{tables.dtype} {tuple(tables.shape)}")
    if tail.numel() != 1 or tail.dtype != torch.int32:
        fail(op, f"tail_len must be an int32 tensor of one element, got {tail.dtype} {tuple(tail.shape)}")
    return got


def lowrank_rows(rows: list[tuple[torch.Tensor, ...]]) -> RowTensors:
    """Low-rank max scoring's rows: (proj [L, Hkv, d, r], mean [L, Hkv, d], sketch [L, Hkv, cap, r])
    each, as an index's row_operands() gives them."""
    op = "lowrank_block_scores_rows"
    got = RowTensors.of(op, LOWRANK, rows)
    proj, mean, sketch = (got[n][0] for n in LOWRANK)
    L, hkv, d, _ = _sketches(op, proj, sketch)
    if mean.shape != (L, hkv, d):
        fail(op, f"mean must be [L, Hkv, d] = {(L, hkv, d)} like proj, got {tuple(mean.shape)}")
    return got


def mass_rows(rows: list[tuple[torch.Tensor, ...]]) -> RowTensors:
    """Low-rank mass scoring's rows: (proj [L, Hkv, d, r], sketch [L, Hkv, cap, r], block_means
    [L, Hkv, cap_blocks, d]) each, as an index's row_operands() gives them."""
    op = "lowrank_block_mass_rows"
    got = RowTensors.of(op, MASS, rows)
    proj, sketch, means = (got[n][0] for n in MASS)
    L, hkv, d, _ = _sketches(op, proj, sketch)
    if means.dim() != 4 or means.shape[:2] != (L, hkv) or means.shape[3] != d:
        fail(op, f"block_means must be [L, Hkv, cap_blocks, d] with {(L, hkv)} and d={d} like proj, got "
                 f"{tuple(means.shape)}")
    return got


def lru_rows(rows: list[tuple[torch.Tensor, ...]]) -> RowTensors:
    """The block pools' lookup state of each row: (slot_of_block [L, H, blocks + 1], block_of_slot and
    last_used [L, H, n + 1], all int32; the step's stamp [1] int32; counts [2] int64), as a pool's
    lookup_operands() gives them."""
    op = "lru_lookup_rows"
    got = RowTensors.of(op, LRU, rows)
    sob, bos, used, stamp, counts = (got[n][0] for n in LRU)
    if sob.dim() != 3 or bos.shape != used.shape or bos.dim() != 3 or bos.shape[:2] != sob.shape[:2] \
            or stamp.shape != (1,) or counts.shape != (2,):
        fail(op, f"slot_of_block [L, H, blocks + 1], block_of_slot and last_used [L, H, n + 1], stamp [1] and "
                 f"counts [2] disagree: {tuple(sob.shape)}, {tuple(bos.shape)}, {tuple(used.shape)}, "
                 f"{tuple(stamp.shape)}, {tuple(counts.shape)}")
    return got


def _sketches(op: str, proj: torch.Tensor, sketch: torch.Tensor) -> tuple[int, int, int, int]:
    """(L, Hkv, d, r) of proj [L, Hkv, d, r] and sketch [L, Hkv, cap, r], or a ValueError from op."""
    L, hkv, d, r = proj.shape if proj.dim() == 4 else (0, 0, 0, 0)
    if proj.dim() != 4 or sketch.dim() != 4 or sketch.shape[:2] != (L, hkv) or sketch.shape[3] != r:
        fail(op, f"proj [L, Hkv, d, r] and sketch [L, Hkv, cap, r] disagree: {tuple(proj.shape)}, "
                 f"{tuple(sketch.shape)}")
    return L, hkv, d, r


__all__ = ["RowTensors", "StepRows", "mismatch", "decode_rows", "lowrank_rows", "mass_rows", "lru_rows", "DECODE",
           "LOWRANK", "MASS", "LRU"]
