"""bench/common.py's reading of a profiled step: the device's busy time is the union of its kernels'
intervals (streams side by side overlap), host events aside."""
from __future__ import annotations

import sys
from pathlib import Path

from torch.autograd import DeviceType
from torch.autograd.profiler_util import FunctionEvent

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
import common  # noqa: E402


def _event(i: int, stream: int, start: float, end: float, device=DeviceType.CUDA) -> FunctionEvent:
    return FunctionEvent(i, f"kernel{i}", stream, start, end, device_type=device)


def test_busy_time_is_the_union_of_device_intervals_over_the_steps():
    events = [_event(0, 7, 0, 10), _event(1, 8, 5, 20), _event(2, 7, 8, 12),  # overlapping: 0-20
              _event(3, 9, 30, 40),                                          # apart: 10 more
              _event(4, 1, 0, 100, DeviceType.CPU)]                          # the host's: not counted
    got = common._busy(events, steps=2)
    assert got == {"busy_us_per_step": 15.0, "streams": 3}


def test_no_device_events_read_as_idle():
    assert common._busy([_event(0, 1, 0, 5, DeviceType.CPU)], steps=1) == {"busy_us_per_step": 0.0, "streams": 0}
