"""Zero-copy transfers between the pinned CPU store and the GPU block pool, as Triton kernels.

Pinned host memory is mapped into the GPU's address space (UVA), so a kernel can load from it over
PCIe. Each program copies one (head, selected block) pair: when its fetch flag is set it reads the
block's K and V rows (bs * d contiguous elements each) from the store segment that holds them and
writes them into the pool slot. No host gather, no staging buffer, no host sync: the selection never
leaves the GPU, which is what lets a decode step run as one CUDA graph. Measured at ~50 GB/s on an
H100 host for 4 KiB rows, against ~25 GB/s for index_select into staging + cudaMemcpy.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from kvretrieve.kernels.checks import check_fetch, check_launch_device, check_store


@triton.jit
def _row_from_store(base_ptr, scale_ptr, src, s_src, ch_ptr, cols, D: tl.constexpr, QUANT: tl.constexpr,
                    CH: tl.constexpr):
    """One block row of K or V from the store: quantized, int8 codes times their token's scale (fp32),
    and for keys (CH) times their channel's scale (ch_ptr: the head's D scales)."""
    x = tl.load(base_ptr + src + cols)
    if QUANT:  # a constexpr branch: one return type per compiled variant
        x = x.to(tl.float32) * tl.load(scale_ptr + s_src + cols // D)
        if CH:
            x = x * tl.load(ch_ptr + cols % D)
    return x


@triton.jit
def _row_to_store(base_ptr, scale_ptr, dst, s_dst, ch_ptr, x, BS: tl.constexpr, D: tl.constexpr,
                  QUANT: tl.constexpr, CH: tl.constexpr):
    """Write one block row x [BS, D] to the store; quantized: rounded half away from zero, like
    store.quant.quantize, keys (CH) divided by their channel's scale first."""
    offs = tl.arange(0, BS)[:, None] * D + tl.arange(0, D)[None, :]
    if QUANT:
        x = x.to(tl.float32)
        if CH:
            x = x / tl.load(ch_ptr + tl.arange(0, D))[None, :]
        amax = tl.max(tl.abs(x), 1)
        scale = tl.where(amax > 0, amax / 127, 1.0)
        v = x / scale[:, None]
        q = tl.where(v >= 0, tl.floor(v + 0.5), -tl.floor(0.5 - v))
        tl.store(base_ptr + dst + offs, tl.minimum(tl.maximum(q, -127.0), 127.0).to(tl.int8))
        tl.store(scale_ptr + s_dst + tl.arange(0, BS), scale)
    else:
        tl.store(base_ptr + dst + offs, x)


@triton.jit(do_not_specialize=["layer"])
def _fetch_kernel(base_ptr, seg_offsets_ptr, scale_ptr, scale_offsets_ptr, ch_ptr, ids_ptr, fetch_ptr, slots_ptr,
                  pool_k_ptr, pool_v_ptr, layer, n_seg, k, seg_blocks, H, S,
                  BS: tl.constexpr, D: tl.constexpr, QUANT: tl.constexpr):
    h = tl.program_id(0).to(tl.int64)  # int64 offsets: a segment of 32 layers exceeds 2^31 elements
    j = tl.program_id(1)
    if tl.load(fetch_ptr + h * k + j) != 0:
        block = tl.load(ids_ptr + h * k + j).to(tl.int64)
        slot = tl.load(slots_ptr + h * k + j).to(tl.int64)
        seg = block // seg_blocks
        # A segment of a layer is [2 (K|V), H, seg_blocks, BS * D] (its scales [2, H, seg_blocks, BS]);
        # its start is given relative to the store's first segment, in elements, so one base
        # pointer reaches every segment.
        row = h * seg_blocks + block % seg_blocks
        src = tl.load(seg_offsets_ptr + layer * n_seg + seg) + row * (BS * D)
        s_src = tl.load(scale_offsets_ptr + layer * n_seg + seg) + row * BS
        dst = (h * S + slot) * (BS * D)
        cols = tl.arange(0, BS * D)
        ch = ch_ptr + (layer * H + h) * D  # the store's channels [L, H, D]
        k_row = _row_from_store(base_ptr, scale_ptr, src, s_src, ch, cols, D, QUANT, True)
        v_row = _row_from_store(base_ptr, scale_ptr, src + H * seg_blocks * BS * D, s_src + H * seg_blocks * BS,
                                ch, cols, D, QUANT, False)
        tl.store(pool_k_ptr + dst + cols, k_row.to(pool_k_ptr.dtype.element_ty))
        tl.store(pool_v_ptr + dst + cols, v_row.to(pool_v_ptr.dtype.element_ty))


# Block and slot change every call: specialising on them (== 1, multiples of 16) would compile new
# variants mid-generation (a 300 ms step was measured).
@triton.jit(do_not_specialize=["block", "slot"])
def _store_kernel(base_ptr, seg_offsets_ptr, scale_ptr, scale_offsets_ptr, ch_ptr, pool_k_ptr, pool_v_ptr, block, slot,
                  n_seg, seg_blocks, H, S, BS: tl.constexpr, D: tl.constexpr, QUANT: tl.constexpr):
    layer = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1).to(tl.int64)
    seg = block // seg_blocks
    row = h * seg_blocks + block % seg_blocks
    dst = tl.load(seg_offsets_ptr + layer * n_seg + seg) + row * (BS * D)
    s_dst = tl.load(scale_offsets_ptr + layer * n_seg + seg) + row * BS
    src = ((layer * H + h) * S + slot) * (BS * D)
    offs = tl.arange(0, BS)[:, None] * D + tl.arange(0, D)[None, :]
    ch = ch_ptr + (layer * H + h) * D
    _row_to_store(base_ptr, scale_ptr, dst, s_dst, ch, tl.load(pool_k_ptr + src + offs), BS, D, QUANT, True)
    _row_to_store(base_ptr, scale_ptr, dst + H * seg_blocks * BS * D, s_dst + H * seg_blocks * BS,
                  ch, tl.load(pool_v_ptr + src + offs), BS, D, QUANT, False)


def _store_pointers(store, cuda: bool):
    """(data base, data offsets, scale base, scale offsets, key channel scales) for a kernel; an
    unquantized store passes its data twice as scales (never read)."""
    wrap = _HostPointer if cuda else (lambda t: t)
    base = wrap(store.base)
    if not store.quantized:
        return base, store.device_offsets, base, store.device_offsets, store.channels
    return base, store.device_offsets, wrap(store.scale_base), store.device_scale_offsets, store.channels


class _HostPointer:
    """Hands Triton a pinned CPU tensor's address (its launcher accepts any object with data_ptr
    and dtype; a plain CPU tensor would be refused)."""

    def __init__(self, t):
        self.t, self.dtype = t, t.dtype

    def data_ptr(self) -> int:
        return self.t.data_ptr()


def fetch_blocks(store, layer, ids, fetch, slots, pool_k, pool_v):
    """Same contract as kernels.reference.fetch_blocks."""
    check_fetch(store, layer, ids, fetch, slots, pool_k, pool_v)
    check_launch_device("fetch_blocks", ids, fetch, slots, pool_k, pool_v)
    h, k = ids.shape
    if k == 0 or not store.reserved:
        return
    # the offsets must be current (store.sync_offsets(), between steps): a graph replays this launch
    _fetch_kernel[(h, k)](*_store_pointers(store, pool_k.is_cuda), ids.contiguous(),
                          fetch.contiguous().view(torch.int8), slots.contiguous(), pool_k, pool_v, int(layer),
                          store.n_segments, k, store.seg_blocks, h, pool_k.shape[1], BS=store.bs, D=store.d,
                          QUANT=store.quantized, num_warps=4)


def store_blocks(store, block, slot, pool_k, pool_v):
    """Same contract as kernels.reference.store_blocks: one program per (layer, head) writes the
    block's K and V rows into pinned host memory over PCIe (UVA), ordered on the current stream like
    any kernel, instead of 2 * L copies launched from the host. A quantized store's key channel scales
    must be fit already (KVStore.fit_missing)."""
    check_store(store, block, slot, pool_k, pool_v)
    check_launch_device("store_blocks", pool_k, pool_v)
    _store_kernel[(store.L, store.H)](*_store_pointers(store, pool_k.is_cuda), pool_k, pool_v, int(block),
                                      int(slot), store.n_segments, store.seg_blocks, store.H, pool_k.shape[2],
                                      BS=store.bs, D=store.d, QUANT=store.quantized, num_warps=4)
