"""Where the store's segments live: host RAM (pinned where a GPU reads them in place), or files.

A disk segment is a shared memory map of a file made for it and unlinked at once: the map keeps
it alive, the operating system keeps in RAM what fits and writes the rest back to the file, and
the disk space returns when the store lets go of the segment or the process ends (even by a crash:
no file is left behind). So a context whose KV cache is larger than the RAM still runs, its blocks
read from disk as decode selects them (a CUDA store on disk is not pinned: its fetches take the
reference path: a host sync a layer, the selected rows gathered into pinned staging and copied up
asynchronously). A disk segment is advised random: by default a page fault
reads the pages about it too, and a decode step, whose selection is scattered rows of 2 KiB, read
the whole file for the 4% of it that it selected (bench/results/probe_disk_gather_cpu.json). Before
a gather, the pages of the selected rows are asked for all at once (willneed): a page fault waits for
one read, so faulting the rows in one after another reads at the disk's latency, not its throughput.
"""
from __future__ import annotations

import ctypes
import mmap
import os
import tempfile
from pathlib import Path

import numpy as np
import torch

from ..memory import check_allocation, check_disk_space


class SegmentHome:
    def __init__(self, pin: bool, disk_dir: Path | None = None):
        """pin: page-locked RAM segments (a CUDA store); disk_dir: file-backed segments there instead."""
        self.disk_dir = Path(disk_dir) if disk_dir is not None else None
        self.pin = pin and self.disk_dir is None
        # madvise where the OS has it (Linux, macOS); elsewhere reads only lose the advice
        libc = ctypes.CDLL(None) if self.disk_dir is not None and hasattr(mmap, "MADV_RANDOM") else None
        self._madvise = getattr(libc, "madvise", None)

    def new(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        if self.disk_dir is None:
            return torch.empty(shape, dtype=dtype, pin_memory=self.pin)
        numel = 1
        for n in shape:
            numel *= n
        self.disk_dir.mkdir(parents=True, exist_ok=True)
        fd, path = tempfile.mkstemp(dir=self.disk_dir, prefix="kvstore-", suffix=".seg")
        try:
            os.ftruncate(fd, numel * dtype.itemsize)  # sparse: blocks take disk space once written
            seg = torch.from_file(path, shared=True, size=numel, dtype=dtype).view(shape)
            self.advise_random(seg)
            return seg
        finally:
            os.close(fd)
            os.unlink(path)

    def advise_random(self, seg: torch.Tensor) -> None:
        """No read-around on a fault: decode reads scattered rows (a disk home only)."""
        if self._madvise is not None:
            self._advise(seg.data_ptr(), seg.nbytes, mmap.MADV_RANDOM)

    def willneed(self, table: torch.Tensor, rows: torch.Tensor) -> None:
        """Start reading the pages of rows `rows` of a 2-D disk-backed `table` (no wait): the reads go
        to the disk together, and the gather's faults then find them done or in flight. Adjacent
        pages are asked for in one call."""
        if self._madvise is None or not len(rows):
            return
        row_bytes = table.stride(0) * table.element_size()
        start = table.data_ptr() + rows.numpy().astype(np.int64) * row_bytes
        first, last = start // mmap.PAGESIZE, (start + row_bytes - 1) // mmap.PAGESIZE
        span = first[:, None] + np.arange(row_bytes // mmap.PAGESIZE + 2)
        pages = np.unique(span[span <= last[:, None]])
        breaks = np.flatnonzero(np.diff(pages) != 1) + 1
        for run in np.split(pages, breaks):
            self._advise(int(run[0]) * mmap.PAGESIZE, len(run) * mmap.PAGESIZE, mmap.MADV_WILLNEED)

    def _advise(self, address: int, nbytes: int, advice: int) -> None:
        start = address - address % mmap.PAGESIZE  # madvise takes whole pages (a view may start mid-page)
        address, nbytes = start, nbytes + address - start
        self._madvise(ctypes.c_void_p(address), ctypes.c_size_t(nbytes), advice)

    def check_fits(self, nbytes: int, what: str) -> None:
        """Refuse up front a store that cannot fit where its segments go."""
        if self.disk_dir is None:
            check_allocation(nbytes, torch.device("cpu"), f"{what} in CPU memory",
                             "lower max_context, keep the store on disk (RetrievalConfig.store='disk'), or "
                             "set KVRETRIEVE_FREE_RAM_GB if this host reports less free memory than it can "
                             "hand out")
            return
        check_disk_space(nbytes, self.disk_dir, what, "lower max_context or point KVRETRIEVE_CACHE at a larger disk")

