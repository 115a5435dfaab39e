"""What every benchmark records next to its numbers: command, commit, device, date, versions.

A result must trace to committed code. In a git checkout the commit is HEAD's and uncommitted changes
are refused (--allow-dirty, or KVRETRIEVE_ALLOW_DIRTY=1, runs anyway and marks the commit +dirty). A
copy without git (the GPU machine) names its commit with KVRETRIEVE_COMMIT and proves it with
KVRETRIEVE_TREE, the hash of the code that `python bench/common.py tree` prints at that clean commit.
Every row carries the id of the run that made it ("run"), and the results keep every run's record
("runs"), also across merges.
"""
from __future__ import annotations

import datetime
import hashlib
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"
# KIND:key=N options of a configuration spec (bench/longctx.py --configs, bench/decode.py --kinds)
CONFIG_OPTIONS = {"budget": "budget_tokens", "window": "window_tokens", "sink": "sink_tokens", "block": "block_size",
                  "rank": "rank", "zone": "estimate_tokens", "rest": "estimate_rest",  # rest=1: estimate what is left out
                  "int8": "store_dtype",  # int8=0: the CPU store in the model's dtype
                  "mass": "block_scores",  # mass=1: lowrank scores blocks by estimated mass, not Loki's max
                  "cache": "cache_blocks",  # GPU slots per layer and head for retrieved blocks
                  "disk": "store",  # disk=1: the CPU store's segments are memory-mapped files
                  "dense": "dense_layers",  # dense=N: the first N layers attend densely
                  "vrank": "rest_rank"}  # vrank=R: the rest token by token, with value sketches of rank R


def config_fields(options: list[str], spec: str) -> dict:
    """["block=8", "rest=1", "mass=1"] -> RetrievalConfig fields {"block_size": 8, "estimate_rest": True,
    "block_scores": "mass"}."""
    fields = {}
    for o in options:
        key, _, value = o.partition("=")
        if key not in CONFIG_OPTIONS or not value.isdigit():
            raise SystemExit(f"error: bad option {o!r} in {spec!r}; use {'|'.join(CONFIG_OPTIONS)}=N")
        n = int(value)
        named = {"rest": (False, True), "int8": ("model", "int8"), "mass": ("max", "mass"), "disk": ("ram", "disk")}
        fields[CONFIG_OPTIONS[key]] = named[key][bool(n)] if key in named else n
    return fields


def device_name(device: str = "cpu") -> str:
    if device.startswith("cuda") and torch.cuda.is_available():
        return torch.cuda.get_device_name(torch.device(device))
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"{line.split(':', 1)[1].strip()} ({torch.get_num_threads()} threads)"
    except OSError:
        pass
    return platform.processor() or "cpu"


REPO = RESULTS.parent.parent
RUN_KEYS = ("command", "commit", "date", "device")


def tree_hash(root: Path = REPO) -> str:
    """A hash of the code a result depends on: kvretrieve/ and bench/ Python files and pyproject.toml,
    by relative path and content (the same on a checkout and on a copy of it)."""
    h = hashlib.sha256()
    files = sorted(p for d in ("kvretrieve", "bench") for p in (root / d).rglob("*.py")) + [root / "pyproject.toml"]
    for p in files:
        if p.is_file():
            h.update(p.relative_to(root).as_posix().encode() + b"\0" + p.read_bytes() + b"\0")
    return h.hexdigest()[:16]


def _git(*args: str) -> str | None:
    try:
        return subprocess.run(["git", *args], capture_output=True, text=True, cwd=REPO, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def source_commit(allow_dirty: bool = False) -> str:
    """The commit the running code is, checked (see the module docstring); SystemExit when it cannot
    be traced and allow_dirty is off."""
    allow = allow_dirty or os.environ.get("KVRETRIEVE_ALLOW_DIRTY") == "1"
    given, commit = os.environ.get("KVRETRIEVE_COMMIT"), _git("rev-parse", "--short", "HEAD")
    if commit is not None:
        if given and not (commit.startswith(given) or given.startswith(commit)):
            raise SystemExit(f"error: KVRETRIEVE_COMMIT={given} but this checkout is at {commit}; unset it")
        if not _git("status", "--porcelain", "--untracked-files=no"):
            return commit
        if not allow:
            raise SystemExit("error: the working tree has uncommitted changes, so results could not be traced to a "
                             "commit; commit them, or pass --allow-dirty (the results are then marked +dirty)")
        return commit + "+dirty"
    if given and os.environ.get("KVRETRIEVE_TREE") == tree_hash():
        return given
    if allow:
        return (given or "unknown") + "+unverified"
    raise SystemExit(f"error: no git here, so name the commit: KVRETRIEVE_COMMIT and KVRETRIEVE_TREE as printed by "
                     f"`python bench/common.py tree` at that commit (this copy's code hashes to {tree_hash()}), "
                     "or pass --allow-dirty")


def provenance(device: str = "cpu", allow_dirty: bool = False) -> dict:
    """The record of this run (RUN_KEYS, versions), its commit checked by source_commit."""
    versions = {"python": platform.python_version(), "torch": torch.__version__}
    for name in ("transformers", "triton"):
        try:
            versions[name] = __import__(name).__version__
        except ImportError:
            pass
    return {"command": " ".join([Path(sys.argv[0]).as_posix()] + sys.argv[1:]), "commit": source_commit(allow_dirty),
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "device": device_name(device), "versions": versions}


def run_id(meta: dict) -> str:
    return f"{meta['commit']} {meta['date']}"


def stamp(rows: list[dict], meta: dict) -> list[dict]:
    """Rows made by this run, each marked with the run's id."""
    for r in rows:
        r["run"] = run_id(meta)
    return rows


def keep_runs(previous: dict | None, meta: dict, rows: list[dict]) -> dict:
    """meta with "runs": the records of the runs whose rows `rows` still hold (all earlier ones while
    any row predates per-row ids) and this run's, newest last."""
    previous = previous or {}
    runs = list(previous.get("runs") or previous.get("merged_runs") or [])
    if all(k in previous for k in RUN_KEYS) and run_id(previous) not in {run_id(r) for r in runs}:
        runs.append({k: previous[k] for k in RUN_KEYS})  # the previous file's own run
    ids = {r.get("run") for r in rows}
    if None not in ids:  # every row says which run made it: drop the runs none of them came from
        runs = [r for r in runs if run_id(r) in ids]
    runs = [r for r in runs if run_id(r) != run_id(meta)] + [{k: meta[k] for k in RUN_KEYS}]
    return {**meta, "runs": runs}


def add_provenance_args(ap) -> None:
    ap.add_argument("--allow-dirty", action="store_true",
                    help="run with uncommitted changes (the results' commit is then marked +dirty)")


def markdown_table(rows: list[dict], columns: list[str]) -> str:
    def fmt(v):
        if isinstance(v, float):
            return f"{v:.3g}" if abs(v) < 100 else f"{v:.0f}"
        return "" if v is None else str(v)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(fmt(r.get(c)) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def write_results(name: str, meta: dict, rows: list[dict], columns: list[str], notes: str = "",
                  out_dir: Path = RESULTS) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"{name}.json").write_text(json.dumps({**meta, "rows": rows}, indent=1))
    md = [f"# {name}", "", f"- command: `{meta['command']}`", f"- commit: {meta['commit']}",
          f"- device: {meta['device']}", f"- date: {meta['date']}",
          f"- versions: {', '.join(f'{k} {v}' for k, v in meta['versions'].items())}"]
    md += [f"- run: `{r['command']}` at {r['commit']}, {r['date']}, {r.get('device', '')}" for r in meta.get("runs", [])]
    cols = columns + ["run"] if any("run" in r for r in rows) and "run" not in columns else columns
    md += ["", markdown_table(rows, cols), ""]
    if notes:
        md += [notes, ""]
    (out_dir / f"{name}.md").write_text("\n".join(md))
    return out_dir / f"{name}.json"


def kernel_times(step, steps: int, trace: Path | None = None) -> list[dict]:
    """GPU time a step by kernel over `steps` calls of step() (CUPTI sees the kernels inside replayed
    graphs): the top 15 and the sum over all kernels ("all kernels"). Against a step's wall time, the
    sum says how busy the GPU was; with streams side by side it can exceed the wall time. One more step
    runs first as the profiler's warm-up, unrecorded: profiling from the first step counted 3 of 4
    steps' kernels (24 LRU lookups a step for the 8B shape's 32 layers, 21 for the 1.5B's 28; H100,
    bench/results/batch_decode_8b_32k_launch.json), so the kernel_ms of those runs read ~1/4 low. The
    "all kernels" row also says how long the device was busy a step (_busy). trace: also write the
    profiled steps' timeline there (Chrome trace JSON: which kernels overlap, on which streams).
    Time everything else first: the profiler stays attached after it ends and slows what follows."""
    schedule = torch.profiler.schedule(wait=0, warmup=1, active=steps, repeat=1)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA], schedule=schedule) as prof:
        for _ in range(steps + 1):
            step()
            torch.cuda.synchronize()
            prof.step()
    if trace is not None:
        trace.parent.mkdir(parents=True, exist_ok=True)
        prof.export_chrome_trace(str(trace))
    rows = [{"kernel": e.key[:90], "us_per_step": getattr(e, "device_time_total", 0) / steps,
             "calls_per_step": e.count / steps} for e in prof.key_averages()]
    rows.sort(key=lambda r: -r["us_per_step"])
    total = {"kernel": "all kernels", "us_per_step": sum(r["us_per_step"] for r in rows),
             "calls_per_step": sum(r["calls_per_step"] for r in rows)}
    total.update(_busy(prof.events(), steps))
    return rows[:15] + [total]


def _busy(events, steps: int) -> dict:
    """How much of a step the device had any kernel or copy running (the union of their intervals) and on
    how many streams: with rows' streams side by side, summed kernel time over busy time is how many ran
    at once on average, and busy time under the step's wall time is time nothing ran (dependencies,
    launches)."""
    device = [e for e in events if e.device_type == torch.autograd.DeviceType.CUDA]
    busy, end = 0.0, float("-inf")
    for a, b in sorted((e.time_range.start, e.time_range.end) for e in device):
        busy += max(0.0, b - max(a, end))
        end = max(end, b)
    return {"busy_us_per_step": busy / steps, "streams": len({e.thread for e in device})}


if __name__ == "__main__":  # python bench/common.py tree: what a copy without git needs to name its commit
    if sys.argv[1:] != ["tree"]:
        raise SystemExit("usage: python bench/common.py tree")
    untracked = _git("ls-files", "--others", "--exclude-standard", "kvretrieve", "bench")
    if _git("status", "--porcelain", "--untracked-files=no") or any(f.endswith(".py") for f in (untracked or "").split()):
        raise SystemExit("error: commit your changes first (a GPU copy of a dirty tree cannot be traced)")
    print(f"KVRETRIEVE_COMMIT={_git('rev-parse', '--short', 'HEAD')} KVRETRIEVE_TREE={tree_hash()}")
