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


def test_trace_overlap_reads_concurrency_gaps_and_who_ran_beside_whom(tmp_path):
    """bench/trace_overlap.py on a small Chrome trace: kernels A and B overlap for 5 us, C and a copy
    D for 1 us, one idle gap of 5 us; the host's events are not device time."""
    import json

    import trace_overlap

    def ev(name, ts, dur, stream, cat="kernel"):
        return {"ph": "X", "cat": cat, "name": name, "ts": ts, "dur": dur, "args": {"stream": stream}}
    trace = {"traceEvents": [ev("A", 0, 10, 1), ev("B", 5, 10, 2), ev("C", 20, 5, 1), ev("D", 22, 1, 3, "gpu_memcpy"),
                             ev("host", 0, 50, 0, "cpu_op")]}
    got = trace_overlap.report(trace_overlap.device_intervals(trace))
    assert (got["span_us"], got["busy_us"], got["idle_us"], got["streams"]) == (25.0, 20.0, 5.0, 3)
    assert got["time_at_concurrency"] == {1: 14.0, 2: 6.0} and got["longest_gaps_us"] == [5.0]
    assert abs(got["mean_concurrency"] - 26 / 20) < 1e-12
    k = {r["kernel"]: r for r in got["kernels"]}
    assert (k["A"]["mean_beside"], k["B"]["mean_beside"], k["C"]["mean_beside"], k["D"]["mean_beside"]) == \
        (0.5, 0.5, 0.2, 1.0)
    assert k["A"]["with"] == {"B": 5.0} and k["C"]["with"] == {"D": 1.0}
    path = tmp_path / "t.json"
    path.write_text(json.dumps(trace))
    assert trace_overlap.main([str(path), "--json", str(tmp_path / "r.json")]) == 0
    assert json.loads((tmp_path / "r.json").read_text())["busy_us"] == 20.0
    (tmp_path / "bad.json").write_text("{not json")
    assert trace_overlap.main([str(tmp_path / "bad.json")]) == 2
