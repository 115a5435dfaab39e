"""The CPU home of the full KV cache.

Layout: per layer, fixed-size segments of [K|V, kv_head, block, block_size, head_dim]. One block of
one head is block_size * head_dim contiguous elements (4 KiB for 16 x 128 bf16), so fetching a
block is one contiguous read, and a segment forms a 2-D [2*Hkv*blocks, bs*d] table that a single
index_select can gather from. New segments are appended as the context grows: old data is never
copied. Segments are pinned when CUDA is present: copies can be async, and a GPU kernel can read
blocks straight from them (kernels.fetch_blocks), finding each segment through device_offsets (its
start relative to the first segment, in elements, on the compute device).

Pinning fresh host memory is slow (~1 GiB/s on the H100 host: 18 GiB for a 128K prompt of the 8B
shape would cost 8+ s of a prefill), so a long prefill reserves its segments on a background
thread, layer after layer; a write waits only for its own layer's segments, which arrive long
before the prefill reaches that layer.
"""
from __future__ import annotations

import threading

import torch

from .memory import GiB, check_allocation


class KVStore:
    def __init__(self, num_layers: int, num_kv_heads: int, head_dim: int, block_size: int, max_tokens: int,
                 dtype: torch.dtype, pin: bool, segment_blocks: int = 1024, device: torch.device | None = None):
        self.L, self.H, self.d, self.bs = num_layers, num_kv_heads, head_dim, block_size
        self.max_blocks = -(-max_tokens // block_size)
        self.seg_blocks = min(segment_blocks, self.max_blocks)
        self.dtype, self.pin = dtype, pin
        self.n_segments = -(-self.max_blocks // self.seg_blocks)
        self.segments: list[list[torch.Tensor]] = [[] for _ in range(num_layers)]
        self.reserved = 0             # segments per layer that exist or are being allocated
        self._layer_ready = [threading.Event() for _ in range(num_layers)]
        for e in self._layer_ready:
            e.set()
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self._host_offsets = torch.zeros(num_layers, self.n_segments, dtype=torch.int64)
        self.device_offsets = torch.zeros(num_layers, self.n_segments, dtype=torch.int64, device=device or "cpu")
        self._offsets_synced = 0      # segments per layer whose offsets device_offsets holds

    @property
    def bytes_per_block(self) -> int:
        """All layers, K and V, all heads: the host memory one block of tokens costs."""
        return 2 * self.L * self.H * self.bs * self.d * torch.finfo(self.dtype).bits // 8

    @property
    def capacity_blocks(self) -> int:
        return self.reserved * self.seg_blocks

    @property
    def base(self) -> torch.Tensor:
        """The segment every offset is relative to."""
        self._wait(0)
        return self.segments[0][0]

    def nbytes(self) -> int:
        return sum(s.numel() * s.element_size() for layer in self.segments for s in layer)

    def check_fits(self, n_tokens: int) -> None:
        """Refuse up front (before any allocation) a context whose KV cannot fit in free RAM."""
        missing = -(-n_tokens // self.bs) - self.capacity_blocks
        if missing > 0:
            need = -(-missing // self.seg_blocks) * self.seg_blocks * self.bytes_per_block
            check_allocation(need, torch.device("cpu"), f"the KV cache of {n_tokens:,} tokens in CPU memory "
                             f"({self.bytes_per_block * n_tokens / self.bs / GiB:.1f} GiB)",
                             "lower --max-context, or set KVRETRIEVE_FREE_RAM_GB if this host reports less "
                             "free memory than it can hand out")

    def ensure(self, n_blocks: int, background: bool = False) -> None:
        """Make room for n_blocks; with background=True the segments are allocated on a thread and
        each layer's write waits for its own."""
        if n_blocks > self.max_blocks:
            raise ValueError(f"{n_blocks} blocks exceed the store's maximum {self.max_blocks}")
        want = -(-n_blocks // self.seg_blocks)
        if want <= self.reserved:
            return
        self.check_fits(n_blocks * self.bs)
        self.join()
        have, self.reserved = self.reserved, want
        for e in self._layer_ready:
            e.clear()
        if background:
            self._thread = threading.Thread(target=self._allocate, args=(have, want), daemon=True,
                                            name="kvretrieve-store-alloc")
            self._thread.start()
        else:
            self._allocate(have, want)

    def _allocate(self, have: int, want: int) -> None:
        try:
            shape = (2, self.H, self.seg_blocks, self.bs, self.d)
            for layer in range(self.L):
                for i in range(have, want):
                    seg = torch.empty(shape, dtype=self.dtype, pin_memory=self.pin)
                    first = self.segments[0][0] if self.segments[0] else seg
                    self._host_offsets[layer, i] = (seg.data_ptr() - first.data_ptr()) // seg.element_size()
                    self.segments[layer].append(seg)
                self._layer_ready[layer].set()
        except BaseException as e:  # noqa: BLE001 - re-raised in the thread that waits
            self._error = e
            for ev in self._layer_ready:
                ev.set()

    def _wait(self, layer: int) -> None:
        self._layer_ready[layer].wait()
        if self._error is not None:
            err, self._error = self._error, None
            raise err

    def join(self) -> None:
        """Wait for a background reservation to finish."""
        for layer in range(self.L):
            self._wait(layer)
        self._thread = None

    def sync_offsets(self) -> None:
        """Copy the segments' offsets to the device (before a kernel reads the store)."""
        if self._offsets_synced != self.reserved:
            self.join()
            self.device_offsets.copy_(self._host_offsets)
            self._offsets_synced = self.reserved

    def write(self, layer: int, first_block: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store full blocks first_block.. of one layer; k, v [Hkv, nb, bs, d] on any device.
        From CUDA this is an async D2H copy on the current stream: keep k, v alive until it finishes."""
        nb = k.shape[1]
        self.ensure(first_block + nb)
        self._wait(layer)
        done = 0
        while done < nb:
            seg, off = divmod(first_block + done, self.seg_blocks)
            n = min(nb - done, self.seg_blocks - off)
            dst = self.segments[layer][seg]
            dst[0, :, off:off + n].copy_(k[:, done:done + n], non_blocking=True)
            dst[1, :, off:off + n].copy_(v[:, done:done + n], non_blocking=True)
            done += n

    def read(self, layer: int, first_block: int, n_blocks: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Blocks first_block.. of one layer as k, v [Hkv, n_blocks, bs, d] (CPU tensors)."""
        self._wait(layer)
        if n_blocks == 0:
            empty = self.segments[layer][0][0, :, :0] if self.segments[layer] else \
                torch.empty(self.H, 0, self.bs, self.d, dtype=self.dtype)
            return empty, empty
        parts_k, parts_v, done = [], [], 0
        while done < n_blocks:
            seg, off = divmod(first_block + done, self.seg_blocks)
            n = min(n_blocks - done, self.seg_blocks - off)
            parts_k.append(self.segments[layer][seg][0, :, off:off + n])
            parts_v.append(self.segments[layer][seg][1, :, off:off + n])
            done += n
        if len(parts_k) == 1:
            return parts_k[0], parts_v[0]
        return torch.cat(parts_k, 1), torch.cat(parts_v, 1)

    def gather(self, layer: int, heads: torch.Tensor, blocks: torch.Tensor, out: torch.Tensor) -> None:
        """out[0, i], out[1, i] = K and V of block blocks[i] of head heads[i]; out [2, m, bs*d] (CPU).

        One index_select per segment touched and K|V: a segment is laid out as [K|V, head, block],
        so row = head * SB + block % SB of its K or V table.
        """
        self._wait(layer)
        seg = blocks // self.seg_blocks
        rows = heads * self.seg_blocks + blocks % self.seg_blocks
        width = self.bs * self.d
        for s in torch.unique(seg).tolist():
            pick = (seg == s).nonzero().flatten()
            table = self.segments[layer][s].view(2, self.H * self.seg_blocks, width)
            r = rows.index_select(0, pick) if len(pick) != len(rows) else rows
            for kv in (0, 1):
                if len(pick) == len(rows):
                    torch.index_select(table[kv], 0, r, out=out[kv, :len(rows)])
                else:
                    out[kv].index_copy_(0, pick, table[kv].index_select(0, r))
