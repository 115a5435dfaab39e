"""What ran beside what: a Chrome trace of GPU steps (bench/batch_decode.py --kernels N --trace) read as
kernel intervals on the device's timeline.

A batched step runs each row's small kernels on the row's stream, side by side; summed kernel time
exceeds the step, and a kernel that takes 5 us alone can take 24 beside the others (stop 34: the
merges, the fetches). Per kernel (name cut to its first 60 characters) this reports its calls, mean
and total time, how many device intervals ran beside it on average, and which kernels overlapped it
the most; for the whole trace, the busy time (any interval running), its concurrency and the longest
idle gaps. No GPU needed: the trace is a file.

    python bench/trace_overlap.py bench/results/batch_decode_trace_8.json [--top 12] [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

DEVICE_CATEGORIES = ("kernel", "gpu_memcpy", "gpu_memset")


@dataclass(frozen=True)
class Interval:
    name: str
    start: float  # us
    end: float
    stream: int


def device_intervals(trace: dict) -> list[Interval]:
    """The kernel and copy intervals of a Chrome trace (torch.profiler's export_chrome_trace)."""
    out = []
    for e in trace.get("traceEvents", []):
        if e.get("ph") == "X" and e.get("cat") in DEVICE_CATEGORIES and e.get("dur", 0) > 0:
            out.append(Interval(e["name"][:60], float(e["ts"]), float(e["ts"]) + float(e["dur"]),
                                int(e.get("args", {}).get("stream", -1))))
    return sorted(out, key=lambda i: i.start)


def concurrency(intervals: list[Interval]) -> tuple[dict[int, float], list[tuple[float, float]]]:
    """(time with exactly n intervals running, for each n >= 1; the idle gaps (start, length) between
    the first start and the last end), from a sweep over the intervals' ends."""
    edges = sorted([(i.start, 1) for i in intervals] + [(i.end, -1) for i in intervals])
    level, last, spent, gaps = 0, None, defaultdict(float), []
    for t, step in edges:
        if last is not None and t > last:
            if level:
                spent[level] += t - last
            else:
                gaps.append((last, t - last))
        level, last = level + step, t
    return dict(spent), gaps


def overlaps(intervals: list[Interval]) -> dict[str, dict]:
    """Per kernel name: calls, total and mean time, the mean number of other intervals beside it
    (time-weighted) and the names it overlapped longest (us)."""
    by_name: dict[str, dict] = {}
    running: list[Interval] = []
    for cur in intervals:
        running = [r for r in running if r.end > cur.start]
        s = by_name.setdefault(cur.name, {"calls": 0, "total_us": 0.0, "beside_us": 0.0, "with": defaultdict(float)})
        s["calls"] += 1
        s["total_us"] += cur.end - cur.start
        for r in running:  # each overlapping pair counts once for each of its two kernels
            both = min(r.end, cur.end) - cur.start
            s["with"][r.name] += both
            s["beside_us"] += both
            other = by_name[r.name]
            other["with"][cur.name] += both
            other["beside_us"] += both
        running.append(cur)
    for s in by_name.values():
        s["mean_us"] = s["total_us"] / s["calls"]
        s["mean_beside"] = s.pop("beside_us") / s["total_us"]
        s["with"] = dict(sorted(s["with"].items(), key=lambda kv: -kv[1])[:3])
    return by_name


def report(intervals: list[Interval], top: int = 12) -> dict:
    spent, gaps = concurrency(intervals)
    busy = sum(spent.values())
    span = max(i.end for i in intervals) - intervals[0].start if intervals else 0.0
    kernels = overlaps(intervals)
    ranked = sorted(kernels.items(), key=lambda kv: -kv[1]["total_us"])[:top]
    return {"span_us": span, "busy_us": busy, "idle_us": span - busy, "streams": len({i.stream for i in intervals}),
            "mean_concurrency": sum(n * t for n, t in spent.items()) / busy if busy else 0.0,
            "time_at_concurrency": {n: spent[n] for n in sorted(spent)},
            "longest_gaps_us": sorted((g for _, g in gaps), reverse=True)[:5],
            "kernels": [{"kernel": name} | s for name, s in ranked]}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("trace", type=Path)
    ap.add_argument("--top", type=int, default=12, help="kernels listed (by total time)")
    ap.add_argument("--json", type=Path, help="also write the report here")
    args = ap.parse_args(argv)
    try:
        got = report(device_intervals(json.loads(args.trace.read_text())), args.top)
    except (OSError, ValueError) as e:
        print(f"error: cannot read {args.trace} as a Chrome trace: {e}", file=sys.stderr)
        return 2
    print(f"span {got['span_us']:.0f} us, busy {got['busy_us']:.0f} us ({got['streams']} streams, "
          f"{got['mean_concurrency']:.2f} running on average), idle {got['idle_us']:.0f} us; "
          f"longest gaps {[round(g, 1) for g in got['longest_gaps_us']]}")
    print("| kernel | calls | mean us | total us | mean beside | overlapped most (us) |\n|---|---|---|---|---|---|")
    for k in got["kernels"]:
        most = ", ".join(f"{n} {t:.0f}" for n, t in k["with"].items())
        print(f"| {k['kernel']} | {k['calls']} | {k['mean_us']:.1f} | {k['total_us']:.0f} | "
              f"{k['mean_beside']:.2f} | {most} |")
    if args.json:
        args.json.write_text(json.dumps(got, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
