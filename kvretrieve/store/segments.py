"""Where the store's segments live: host RAM (pinned where a GPU reads them in place), or files.

A disk segment is a shared memory map of a file made for it and unlinked at once: the map keeps
it alive, the operating system keeps in RAM what fits and writes the rest back to the file, and
the disk space returns when the store lets go of the segment or the process ends (even by a crash:
no file is left behind). So a context whose KV cache is larger than the RAM still runs, its blocks
read from disk as decode selects them (a CUDA store on disk is not pinned: its fetches take the
reference path: a host sync a layer, the selected rows gathered into pinned staging and copied up
asynchronously). A disk segment is advised random: by default a page fault
reads the pages about it too, and a decode step, whose selection is scattered rows of 2 KiB, read
the whole file for the 4% of it that it selected (bench/results/probe_disk_gather_cpu.json).
"""
from __future__ import annotations

import ctypes
import mmap
import os
import tempfile
from pathlib import Path

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
            if self._madvise is not None:  # no read-around on a fault: decode reads scattered rows
                self._madvise(ctypes.c_void_p(seg.data_ptr()), ctypes.c_size_t(seg.nbytes), mmap.MADV_RANDOM)
            return seg
        finally:
            os.close(fd)
            os.unlink(path)

    def check_fits(self, nbytes: int, what: str) -> None:
        """Refuse up front a store that cannot fit where its segments go."""
        if self.disk_dir is None:
            check_allocation(nbytes, torch.device("cpu"), f"{what} in CPU memory",
                             "lower max_context, keep the store on disk (RetrievalConfig.store='disk'), or "
                             "set KVRETRIEVE_FREE_RAM_GB if this host reports less free memory than it can "
                             "hand out")
            return
        check_disk_space(nbytes, self.disk_dir, what, "lower max_context or point KVRETRIEVE_CACHE at a larger disk")

