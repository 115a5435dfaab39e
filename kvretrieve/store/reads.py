"""Blocks back out of the CPU store (store/kv_store.py): whole runs of a layer, and scattered rows.

read_blocks serves what needs a layer's blocks in order (a continuation prefill's earlier keys, ivf's
rewrite in cluster order): on the CPU they are views of the store where one segment holds them and it is
not quantized; for a CUDA device they are copied up as stored (async, from pinned memory) and dequantized
there. gather_blocks is the CPU decode path's fetch (kernels.reference.fetch_blocks): the rows a step
selects, one index_select per segment touched and K|V; from a disk store the pages of every selected row
are asked for at once first.
"""
from __future__ import annotations

import numpy as np
import torch

from .kv_store import KVStore
from .quant import copy_per_head, dequantize


def read_blocks(store: KVStore, layer: int, first_block: int, n_blocks: int,
                device: torch.device | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Blocks first_block.. of one layer as k, v [Hkv, n_blocks, bs, d] in the model's dtype: CPU
    tensors (views of the store when one segment holds them and it is not quantized), or on a
    CUDA `device`, where they are copied up as stored (async, from pinned memory) and dequantized."""
    store.wait_layer(layer)
    runs, done = [], 0
    while done < n_blocks:
        seg, off = divmod(first_block + done, store.seg_blocks)
        n = min(n_blocks - done, store.seg_blocks - off)
        runs.append((seg, slice(off, off + n)))
        done += n
    if device is not None and device.type == "cuda":
        return _read_to(store, layer, runs, n_blocks, device)
    out = []
    for kv in (0, 1):
        if store.quantized:
            ch = store.key_channels(layer, torch.device("cpu")) if kv == 0 else None
            parts = [dequantize(store.segments[layer][s][kv, :, r], store.scales[layer][s][kv, :, r], store.dtype,
                                ch) for s, r in runs]
        else:
            parts = [store.segments[layer][s][kv, :, r] for s, r in runs]
        out.append(parts[0] if len(parts) == 1 else torch.cat(parts, 1) if parts
                   else torch.empty(store.H, 0, store.bs, store.d, dtype=store.dtype))
    return out[0], out[1]


def _read_to(store: KVStore, layer: int, runs: list, n_blocks: int,
             device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    # Dequantizing on the GPU instead of the host keeps a follow-up prompt after a long document
    # from converting every earlier token on the CPU.
    raw = torch.empty(2, store.H, n_blocks, store.bs, store.d, dtype=store.segments[layer][0].dtype, device=device)
    scale = torch.empty(raw.shape[:-1], dtype=torch.float32, device=device) if store.quantized else None
    done = 0
    for s, r in runs:
        n = r.stop - r.start
        for kv in (0, 1):
            copy_per_head(raw[kv, :, done:done + n], store.segments[layer][s][kv, :, r])
            if scale is not None:
                copy_per_head(scale[kv, :, done:done + n], store.scales[layer][s][kv, :, r])
        done += n
    if scale is None:
        return raw[0], raw[1]
    k = dequantize(raw[0], scale[0], store.dtype, store.key_channels(layer, device))
    return k, dequantize(raw[1], scale[1], store.dtype)  # one at a time: half the fp32 temporary


def _table(store: KVStore, layer: int, seg: int) -> torch.Tensor:
    """Segment seg of a layer as [K|V, Hkv * seg_blocks, bs * d]: row head * SB + block % SB."""
    return store.segments[layer][seg].view(2, store.H * store.seg_blocks, store.bs * store.d)


def _scale_table(store: KVStore, layer: int, seg: int) -> torch.Tensor:
    return store.scales[layer][seg].view(2, store.H * store.seg_blocks, store.bs)


def gather_blocks(store: KVStore, layer: int, heads: torch.Tensor, blocks: torch.Tensor,
                  out: torch.Tensor) -> None:
    """out[0, i], out[1, i] = K and V of block blocks[i] of head heads[i]; out [2, m, bs*d] (CPU,
    the model's dtype).

    One index_select per segment touched and K|V: a segment is laid out as [K|V, head, block],
    so row = head * SB + block % SB of its K or V table (and of its scale table).
    """
    store.wait_layer(layer)
    seg = blocks // store.seg_blocks
    rows = heads * store.seg_blocks + blocks % store.seg_blocks
    width = store.bs * store.d
    # Each gathered row's head's key channel scales, [m, 1, d] (read once: a CUDA store keeps them there).
    ch = store.channels[layer].cpu().index_select(0, heads)[:, None, :] if store.quantized else None
    picks = []
    for s in torch.unique(seg).tolist():
        pick = (seg == s).nonzero().flatten()
        picks.append((s, pick, rows.index_select(0, pick) if len(pick) != len(rows) else rows))
    if store.home.disk_dir is not None:  # every read of the step in flight before the first fault waits
        tables = [(t[kv], r) for s, _, r in picks for kv in (0, 1) for t in
                  ((_table(store, layer, s), _scale_table(store, layer, s)) if store.quantized
                   else (_table(store, layer, s),))]
        store.home.willneed(np.concatenate([store.home.pages(t, r) for t, r in tables]))
    for s, pick, r in picks:
        table = _table(store, layer, s)
        for kv in (0, 1):
            if store.quantized:
                scales = _scale_table(store, layer, s)[kv].index_select(0, r)
                row_ch = ch.index_select(0, pick) if kv == 0 else None
                got = dequantize(table[kv].index_select(0, r).view(-1, store.bs, store.d), scales, store.dtype, row_ch)
                out[kv].index_copy_(0, pick, got.view(-1, width))
            elif len(pick) == len(rows):
                torch.index_select(table[kv], 0, r, out=out[kv, :len(rows)])
            else:
                out[kv].index_copy_(0, pick, table[kv].index_select(0, r))
