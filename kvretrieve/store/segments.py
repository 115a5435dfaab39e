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
import weakref
from pathlib import Path

import numpy as np
import torch

from ..memory import check_allocation, check_disk_space

SYS_PROCESS_MADVISE = 440  # the same number on every Linux architecture (new system calls share one table)
IOV_MAX = 1024             # ranges one process_madvise call takes


class SegmentHome:
    def __init__(self, pin: bool, disk_dir: Path | None = None):
        """pin: page-locked RAM segments (a CUDA store); disk_dir: file-backed segments there instead."""
        self.disk_dir = Path(disk_dir) if disk_dir is not None else None
        self.pin = pin and self.disk_dir is None
        # madvise where the OS has it (Linux, macOS); elsewhere reads only lose the advice
        libc = ctypes.CDLL(None, use_errno=True) if self.disk_dir is not None and hasattr(mmap, "MADV_RANDOM") else None
        self._madvise = getattr(libc, "madvise", None)
        # Linux >= 5.10: process_madvise takes a whole layer's ranges (~2,500 for 1,024 rows of the 8B
        # shape) in one system call instead of one call each from Python. None: one call a range.
        self._pidfd = None
        if libc is not None and hasattr(os, "pidfd_open"):
            try:
                self._pidfd = os.pidfd_open(os.getpid())
                weakref.finalize(self, os.close, self._pidfd)
                self._syscall = libc.syscall
                self._syscall.restype = ctypes.c_long
            except OSError:
                self._pidfd = None

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

    @staticmethod
    def pages(table: torch.Tensor, rows: torch.Tensor) -> np.ndarray:
        """The page numbers that rows `rows` of a 2-D `table` touch (for willneed)."""
        row_bytes = table.stride(0) * table.element_size()
        start = table.data_ptr() + rows.numpy().astype(np.int64) * row_bytes
        first, last = start // mmap.PAGESIZE, (start + row_bytes - 1) // mmap.PAGESIZE
        span = first[:, None] + np.arange(row_bytes // mmap.PAGESIZE + 2)
        return span[span <= last[:, None]]

    def willneed(self, pages: np.ndarray) -> None:
        """Start reading these pages of disk-backed segments (no wait): the reads go to the disk
        together, and the gather's faults then find them done or in flight. Adjacent pages make one
        range."""
        if self._madvise is None or not len(pages):
            return
        pages = np.unique(pages)
        cut = np.flatnonzero(np.diff(pages) != 1) + 1
        iov = np.empty((len(cut) + 1, 2), dtype=np.uint64)  # struct iovec {base, length}
        iov[:, 0] = pages[np.r_[0, cut]] * mmap.PAGESIZE
        iov[:, 1] = np.diff(np.r_[0, cut, len(pages)]) * mmap.PAGESIZE
        for i in range(0, len(iov), IOV_MAX):
            part = np.ascontiguousarray(iov[i:i + IOV_MAX])
            if self._pidfd is not None and self._syscall(
                    ctypes.c_long(SYS_PROCESS_MADVISE), ctypes.c_int(self._pidfd), ctypes.c_void_p(part.ctypes.data),
                    ctypes.c_size_t(len(part)), ctypes.c_int(mmap.MADV_WILLNEED), ctypes.c_uint(0)) >= 0:
                continue
            self._pidfd = None  # refused (an older kernel, a sandbox): one call a range from now on
            for base, length in part.tolist():
                self._advise(base, length, mmap.MADV_WILLNEED)

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

