"""Bringing missed blocks from CPU memory into pool slots.

gather (host, into pinned staging) -> H2D copy -> scatter into the pool's slots. With CUDA and
async=True the copy and the scatter run on a side stream and end with an event per layer, so the
host moves on at once and only that layer's attention waits (main.wait_event). Staging buffers are
used round robin; before the host overwrites one it waits for the copy that last read it.
"""
from __future__ import annotations

import torch

from .gpu_cache import BlockPool
from .kv_store import KVStore


class Fetcher:
    def __init__(self, store: KVStore, pool: BlockPool, device: torch.device, use_async: bool,
                 max_blocks_per_fetch: int, buffers: int = 3):
        self.store, self.pool, self.device = store, pool, device
        self.cuda = device.type == "cuda"
        self.stream = torch.cuda.Stream(device) if self.cuda and use_async else None
        width = store.bs * store.d
        shape = (2, max_blocks_per_fetch, width)
        self.host = [torch.empty(shape, dtype=store.dtype, pin_memory=self.cuda) for _ in range(buffers)]
        self.dev = [torch.empty(shape, dtype=store.dtype, device=device) for _ in range(buffers)] if self.cuda else None
        self.done = [None] * buffers           # event after the copy that last read host[i]
        self.layer_ready: dict[int, torch.cuda.Event] = {}
        self.turn = 0
        self.h2d_bytes = 0

    def fetch(self, layer: int, heads, blocks, slots) -> None:
        """Load blocks[i] of head heads[i] (numpy int arrays) into pool slot slots[i]."""
        m = len(blocks)
        if m == 0:
            return
        i = self.turn = (self.turn + 1) % len(self.host)
        if self.done[i] is not None:
            self.done[i].synchronize()
        host = self.host[i]
        self.store.gather(layer, torch.from_numpy(heads), torch.from_numpy(blocks), host)
        flat = torch.from_numpy(heads * self.pool.slots + slots)
        self.h2d_bytes += 2 * m * host.shape[2] * host.element_size()
        pool_k = self.pool.k[layer].view(-1, host.shape[2])
        pool_v = self.pool.v[layer].view(-1, host.shape[2])
        if not self.cuda:
            pool_k.index_copy_(0, flat, host[0, :m])
            pool_v.index_copy_(0, flat, host[1, :m])
            return
        stream = self.stream or torch.cuda.current_stream(self.device)
        with torch.cuda.stream(stream):
            flat = flat.to(self.device)
            dev = self.dev[i]
            dev[:, :m].copy_(host[:, :m], non_blocking=True)
            pool_k.index_copy_(0, flat, dev[0, :m])
            pool_v.index_copy_(0, flat, dev[1, :m])
            event = torch.cuda.Event()
            event.record(stream)
        self.done[i] = event
        if self.stream is not None:
            self.layer_ready[layer] = event
        else:  # synchronous path: the copy must be complete before anything else runs
            event.synchronize()

    def wait(self, layer: int) -> None:
        """Make the current stream wait for this layer's copies (no host sync)."""
        event = self.layer_ready.pop(layer, None)
        if event is not None:
            torch.cuda.current_stream(self.device).wait_event(event)
