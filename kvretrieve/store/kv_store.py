"""The CPU home of the full KV cache.

Layout: per layer, fixed-size segments of [K|V, kv_head, block, block_size, head_dim]. One block of
one head is block_size * head_dim contiguous elements (4 KiB for 16 x 128 bf16), so fetching a
block is one contiguous read, and a segment forms a 2-D [2*Hkv*blocks, bs*d] table that a single
index_select can gather from. New segments are appended as the context grows: old data is never
copied. Segments are pinned when CUDA is present: copies can be async, and a GPU kernel can read
blocks straight from them (kernels.fetch_blocks), finding each segment through device_offsets (its
start relative to the first segment, in elements, on the compute device).

quantize=True keeps K and V as int8 with one fp32 scale per token and head (absmax / 127, in a
parallel [K|V, kv_head, block, block_size] table): half the host memory and half the bytes a fetch
moves over PCIe. Keys are divided by a scale per channel first (`channels` [L, Hkv, d], fit to the
first keys a layer stores: quant.channel_scales). Reads (store/reads.py) dequantize to the model's
dtype; so does the fetch kernel.

Pinning fresh host memory is slow (~1 GiB/s on the H100 host: 18 GiB for a 128K prompt of the 8B
shape would cost 8+ s of a prefill), so a long prefill reserves its segments on a background
thread, layer after layer; a write waits only for its own layer's segments, which arrive long
before the prefill reaches that layer.
"""
from __future__ import annotations

import threading
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch

from ..config import KVGeometry
from ..errors import SavedPrefillError
from .saved import Tensors
from ..memory import GiB, fast_pinning
from .segments import SegmentHome
from .quant import channel_scales, copy_per_head, quantize


class KVStore:
    def __init__(self, geo: KVGeometry, quantize: bool = False, segment_blocks: int = 1024,
                 disk_dir: Path | None = None):
        """geo: the cache's shape; its device is the compute device (pinned segments, async copies and
        kernels reading the store when it is CUDA). quantize: int8 with a scale per token and head.
        disk_dir: segments as memory-mapped files there (store.segments), not in RAM."""
        num_layers = geo.layers
        self.L, self.H, self.d, self.bs = geo.layers, geo.kv_heads, geo.head_dim, geo.block_size
        self.max_blocks = geo.max_blocks
        self.seg_blocks = min(segment_blocks, self.max_blocks)
        self.home = SegmentHome(geo.device.type == "cuda", disk_dir)
        self.device, self.pin = geo.device, self.home.pin
        self.dtype, self.quantized = geo.dtype, quantize  # dtype: what reads give back
        self.n_segments = -(-self.max_blocks // self.seg_blocks)
        self.segments: list[list[torch.Tensor]] = [[] for _ in range(num_layers)]
        self.scales: list[list[torch.Tensor]] = [[] for _ in range(num_layers)]   # quantized stores only
        self.reserved = 0             # segments per layer that exist or are being allocated
        # Writes from the device run on their own stream (D2H overlaps compute); this event marks the last.
        self.d2h = torch.cuda.Stream(geo.device) if self.pin else None
        if self.pin:
            fast_pinning()
        self._written: torch.cuda.Event | None = None
        self._layer_ready = [threading.Event() for _ in range(num_layers)]
        for e in self._layer_ready:
            e.set()
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        # data, scales; numpy: the reserving thread writes it, and a torch tensor made under a caller's
        # torch.inference_mode() could not be written outside it (threads start outside it)
        self._host_offsets = np.zeros((2, num_layers, self.n_segments), dtype=np.int64)
        self.offsets = torch.zeros(2, num_layers, self.n_segments, dtype=torch.int64, device=geo.device)
        self._offsets_synced = 0      # segments per layer whose offsets device_offsets holds
        # Key channel scales (quantized stores): on the compute device, where kernels read them in place.
        self.channels = torch.ones(num_layers, self.H, self.d, dtype=torch.float32, device=geo.device)
        self.fitted = [False] * num_layers  # per layer: channels fit to its first stored keys

    @property
    def device_offsets(self) -> torch.Tensor:
        """[L, n_segments]: each segment's start relative to the first one, in elements."""
        return self.offsets[0]

    @property
    def device_scale_offsets(self) -> torch.Tensor:
        """[L, n_segments]: the same for the scale tables of a quantized store (relative to the first)."""
        return self.offsets[1]

    @property
    def bytes_per_block(self) -> int:
        """All layers, K and V, all heads: the host memory one block of tokens costs."""
        per_token = self.d + 4 if self.quantized else self.d * torch.finfo(self.dtype).bits // 8
        return 2 * self.L * self.H * self.bs * per_token

    @property
    def capacity_blocks(self) -> int:
        return self.reserved * self.seg_blocks

    @property
    def base(self) -> torch.Tensor:
        """The segment every offset is relative to."""
        self.wait_layer(0)
        return self.segments[0][0]

    @property
    def scale_base(self) -> torch.Tensor:
        """The scale table every scale offset is relative to (quantized stores)."""
        self.wait_layer(0)
        return self.scales[0][0]

    def nbytes(self) -> int:
        return sum(s.numel() * s.element_size() for tables in (self.segments, self.scales) for layer in tables
                   for s in layer)

    def check_fits(self, n_tokens: int) -> None:
        """Refuse up front (before any allocation) a context whose KV cannot fit in free RAM."""
        missing = -(-n_tokens // self.bs) - self.capacity_blocks
        if missing > 0:
            need = -(-missing // self.seg_blocks) * self.seg_blocks * self.bytes_per_block
            self.home.check_fits(need, f"the KV cache of {n_tokens:,} tokens "
                                       f"({self.bytes_per_block * n_tokens / self.bs / GiB:.1f} GiB)")

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
            tables = [(self.segments, shape, torch.int8 if self.quantized else self.dtype)]
            if self.quantized:
                tables.append((self.scales, shape[:-1], torch.float32))
            for layer in range(self.L):
                for i in range(have, want):
                    for t, (segs, shp, dt) in enumerate(tables):
                        seg = self.home.new(shp, dt)
                        first = segs[0][0] if segs[0] else seg
                        self._host_offsets[t, layer, i] = (seg.data_ptr() - first.data_ptr()) // seg.element_size()
                        segs[layer].append(seg)
                self._layer_ready[layer].set()
        except BaseException as e:  # noqa: BLE001 - re-raised in the thread that waits
            self._error = e
            for ev in self._layer_ready:
                ev.set()

    def wait_layer(self, layer: int) -> None:
        """Wait until the layer's segments are reserved (a reservation on a thread); re-raise its error."""
        self._layer_ready[layer].wait()
        if self._error is not None:
            err, self._error = self._error, None
            raise err

    def join(self) -> None:
        """Wait for a background reservation to finish."""
        for layer in range(self.L):
            self.wait_layer(layer)
        self._thread = None

    def sync_offsets(self) -> None:
        """Copy the segments' offsets to the device (before a kernel reads the store)."""
        if self._offsets_synced != self.reserved:
            self.join()
            self.offsets.copy_(torch.from_numpy(self._host_offsets))
            self._offsets_synced = self.reserved

    def write(self, layer: int, first_block: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store full blocks first_block.. of one layer; k, v [Hkv, nb, bs, d] on any device.
        From CUDA this is an async D2H copy on the current stream: keep k, v alive until it finishes."""
        nb = k.shape[1]
        self.ensure(first_block + nb)
        self.wait_layer(layer)
        if self.quantized:  # on k's device, so only int8 and scales cross PCIe
            if not self.fitted[layer]:
                self.fit_channels(layer, k)
            (k, k_scale), (v, v_scale) = quantize(k, self.key_channels(layer, k.device)), quantize(v)
        done = 0
        while done < nb:
            seg, off = divmod(first_block + done, self.seg_blocks)
            n = min(nb - done, self.seg_blocks - off)
            pairs = [(self.segments[layer][seg], k, v)]
            if self.quantized:
                pairs.append((self.scales[layer][seg], k_scale, v_scale))
            for dst, ks, vs in pairs:
                copy_per_head(dst[0, :, off:off + n], ks[:, done:done + n])
                copy_per_head(dst[1, :, off:off + n], vs[:, done:done + n])
            done += n

    def fit_channels(self, layer: int, k: torch.Tensor) -> None:
        """Fit the layer's key channel scales to k [Hkv, ..., d], the first keys it stores; they hold
        until the store is emptied (forget_from(0)), so every block is read with the scales it was
        written with, rewrites (ivf's clustering) included."""
        self.channels[layer] = channel_scales(k).to(self.channels.device)
        self.fitted[layer] = True

    def fit_missing(self, k: torch.Tensor) -> None:
        """k [L, Hkv, ..., d]: fit the channel scales of the layers that have none yet (before a kernel
        that writes every layer's block, kernels.store_blocks, which only reads them)."""
        if not self.quantized:
            return
        for layer in range(self.L):
            if not self.fitted[layer]:
                self.fit_channels(layer, k[layer])

    def forget_from(self, block: int) -> None:
        """Blocks from `block` on hold nothing any more (a truncation); when none are left, the next
        conversation's first keys fit the channel scales afresh."""
        if block == 0:
            self.fitted = [False] * self.L

    def key_channels(self, layer: int, device: torch.device) -> torch.Tensor:
        """The layer's key channel scales on `device`, shaped [Hkv, 1, 1, d] for rows [Hkv, nb, bs, d]."""
        return self.channels[layer].to(device)[:, None, None, :]

    def write_async(self, layer: int, first_block: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """write() from the compute stream's tensors without stalling it: on a CUDA device the copy
        runs on the store's own stream once the compute stream has produced k, v, and keeps them alive
        until it has read them."""
        if self.d2h is None:
            self.write(layer, first_block, k, v)
            return
        self.d2h.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self.d2h):
            self.write(layer, first_block, k, v)
            k.record_stream(self.d2h)
            v.record_stream(self.d2h)
            self.mark_written()

    def mark_written(self) -> None:
        """The current stream has just queued writes to the store (write_async, kernels.store_blocks)."""
        if self.d2h is not None:
            self._written = torch.cuda.Event()
            self._written.record(torch.cuda.current_stream(self.device))

    def wait_host(self) -> None:
        """The host is about to read the store: every queued write must have landed."""
        if self._written is not None:
            self._written.synchronize()

    def wait_device(self) -> None:
        """The compute stream waits for queued writes: before a kernel reads stored blocks, and before a
        ring slot whose old block is still being copied out is overwritten."""
        if self._written is not None:
            torch.cuda.current_stream(self.device).wait_event(self._written)

    def state(self, n_blocks: int) -> dict[str, torch.Tensor]:
        """What a saved prefill keeps: blocks 0..n_blocks-1 as stored (int8 with their scales, or the
        model's dtype), as views named L.S (layer, segment) and L.S.scale, and the key channel scales."""
        self.wait_host()
        self.join()
        out = {"channels": self.channels, "fitted": torch.tensor(self.fitted)}
        for layer in range(self.L):
            for seg in range(-(-n_blocks // self.seg_blocks)):
                n = min(self.seg_blocks, n_blocks - seg * self.seg_blocks)
                out[f"{layer}.{seg}"] = self.segments[layer][seg][:, :, :n]
                if self.quantized:
                    out[f"{layer}.{seg}.scale"] = self.scales[layer][seg][:, :, :n]
        return out

    def load_state(self, state: Mapping[str, torch.Tensor]) -> None:
        """Take back what state() gave, into this store's own segments (their size may differ). A
        whole segment of a private state (store.saved.Tensors: copy-on-write mappings of a saved
        file) becomes the segment itself when the store is not pinned: reopening copies nothing, and
        its pages are read from the file when decoding first touches them."""
        adopt = isinstance(state, Tensors) and state.private and not self.pin
        stored = torch.int8 if self.quantized else self.dtype
        for layer in range(self.L):
            first, seg = 0, 0
            while (kv := state.get(f"{layer}.{seg}")) is not None:
                n = kv.shape[2]
                if kv.dtype != stored or kv.shape[:2] != (2, self.H) or kv.shape[3:] != (self.bs, self.d):
                    raise SavedPrefillError(f"the saved store holds {kv.dtype} blocks of shape {tuple(kv.shape)}, "
                                            f"this one {stored} of (2, {self.H}, n, {self.bs}, {self.d}); reopen it "
                                            "with the model, dtype and store_dtype it was saved with")
                self.ensure(first + n)
                self.wait_layer(layer)
                scale = state.get(f"{layer}.{seg}.scale")
                if adopt and n == self.seg_blocks and first % n == 0:
                    self.segments[layer][first // n] = kv
                    if scale is not None:
                        self.scales[layer][first // n] = scale
                    for t in (kv, scale) if scale is not None else (kv,):
                        self.home.advise_random(t)  # the file is the store (store="disk"): no read-around
                else:
                    self._copy_in(layer, first, kv, scale)
                first, seg = first + n, seg + 1
        self.channels.copy_(state["channels"])
        self.fitted = [bool(f) for f in state["fitted"].tolist()]

    def _copy_in(self, layer: int, first_block: int, kv: torch.Tensor, scale: torch.Tensor | None) -> None:
        """Blocks first_block.. of one layer, as stored: kv [2, Hkv, n, bs, d] (and scale [2, Hkv, n, bs])."""
        done, n_blocks = 0, kv.shape[2]
        while done < n_blocks:
            seg, off = divmod(first_block + done, self.seg_blocks)
            n = min(n_blocks - done, self.seg_blocks - off)
            self.segments[layer][seg][:, :, off:off + n].copy_(kv[:, :, done:done + n])
            if scale is not None:
                self.scales[layer][seg][:, :, off:off + n].copy_(scale[:, :, done:done + n])
            done += n
