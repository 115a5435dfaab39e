"""Memory checks made before big allocations, so a request that cannot fit fails with a clear
message instead of an OOM kill halfway through a prefill."""
from __future__ import annotations

import os
from pathlib import Path

import psutil
import torch

from .errors import ResourceError
from .files import free_disk_bytes

GiB = 1 << 30
# Some hosts (VMs with memory ballooning) report far less free RAM than they will hand out. This
# variable overrides the reading: the number of GiB kvretrieve may assume are free.
FREE_RAM_OVERRIDE = "KVRETRIEVE_FREE_RAM_GB"
# Share of the free memory one allocation may take, leaving room for activations and the OS.
_HEADROOM = 0.9


def free_host_bytes() -> int:
    override = os.environ.get(FREE_RAM_OVERRIDE)
    if override:
        try:
            return int(float(override) * GiB)
        except ValueError:
            raise ResourceError(f"{FREE_RAM_OVERRIDE}={override!r} is not a number of GiB") from None
    return psutil.virtual_memory().available


def free_device_bytes(device: torch.device) -> int:
    """Bytes this process may still allocate on a CUDA device, honouring a per-process cap
    (set_per_process_memory_fraction, as apply_gpu_cap sets it: cudaMemGetInfo does not see it).
    Blocks torch's allocator caches count as free: it hands them back to the driver before it would
    fail an allocation. (Counted as used, the temporaries of making random 8B weights, or of an
    earlier session's warm-up, refused a 128K session a 24 GiB card holds.)"""
    index = device.index if device.index is not None else torch.cuda.current_device()
    free, total = torch.cuda.mem_get_info(index)
    cap = int(torch.cuda.get_per_process_memory_fraction(index) * total)
    allocated = torch.cuda.memory_allocated(index)
    cached = torch.cuda.memory_reserved(index) - allocated
    return max(0, min(free + cached, cap - allocated))


def free_bytes(device: torch.device) -> int:
    """What may still be allocated where `device` keeps its tensors: host RAM or the (capped) GPU."""
    return free_host_bytes() if device.type == "cpu" else free_device_bytes(device)


def check_allocation(nbytes: int, device: torch.device, what: str, fix: str) -> None:
    free = free_bytes(device)
    if nbytes > _HEADROOM * free:
        where = "CPU RAM" if device.type == "cpu" else f"GPU memory on {device}"
        raise ResourceError(f"not enough {where} for {what}: needs {nbytes / GiB:.2f} GiB, "
                            f"{free / GiB:.2f} GiB free; {fix}")


def check_disk_space(nbytes: int, folder: Path, what: str, fix: str) -> None:
    free = free_disk_bytes(folder)
    if nbytes > _HEADROOM * free:
        raise ResourceError(f"not enough disk space for {what} in {folder}: needs {nbytes / GiB:.2f} GiB, "
                            f"{free / GiB:.2f} GiB free; {fix}")


def apply_gpu_cap(device: torch.device, gib: float) -> None:
    """Let this process use at most `gib` GiB of the device (emulates a smaller card)."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    total = torch.cuda.get_device_properties(index).total_memory
    cap = int(gib * GiB)
    if cap > total:
        raise ResourceError(f"gpu_mem_gb={gib} is more than the GPU has ({total / GiB:.1f} GiB); lower it")
    torch.cuda.set_per_process_memory_fraction(cap / total, index)


def usable_cores() -> int:
    """The CPU cores this process may run on (its affinity, where the OS has one)."""
    return max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)


def process_rss_bytes() -> int:
    return psutil.Process().memory_info().rss


def process_disk_read_bytes() -> int | None:
    """Bytes this process has had read from storage (page-cache hits are not counted): what a store on
    disk costs in reads. None where the OS does not say (macOS)."""
    try:
        return psutil.Process().io_counters().read_bytes
    except (AttributeError, psutil.Error, OSError):
        return None


def fast_pinning() -> None:
    """Make torch pin host memory by registering malloc'd pages on several threads instead of
    cudaHostAlloc: on the H200 host, 9.4 GiB of store segments pin in 1.2 s with 16 threads against
    4.2 s (bench/results/logs/pinning_h200_5a8ff8c.txt), and a reopened or first prefill waits for them.
    A process-wide torch setting: left alone where PYTORCH_CUDA_ALLOC_CONF already says how to pin."""
    if "pinned" in os.environ.get("PYTORCH_CUDA_ALLOC_CONF", ""):
        return
    threads = 1 << (min(16, usable_cores()).bit_length() - 1)  # torch takes a power of two
    settings = f"pinned_use_cuda_host_register:True,pinned_num_register_threads:{threads}"
    try:  # torch >= 2.10 names it per accelerator; the CUDA one is deprecated there
        torch._C._accelerator_setAllocatorSettings(settings)
    except (AttributeError, RuntimeError):
        torch.cuda.memory._set_allocator_settings(settings)
