"""What every benchmark records next to its numbers: command, commit, device, date, versions."""
from __future__ import annotations

import datetime
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
                  "int8": "store_dtype"}  # int8=0: the CPU store in the model's dtype


def config_fields(options: list[str], spec: str) -> dict:
    """["block=8", "rest=1"] -> RetrievalConfig fields {"block_size": 8, "estimate_rest": True}."""
    fields = {}
    for o in options:
        key, _, value = o.partition("=")
        if key not in CONFIG_OPTIONS or not value.isdigit():
            raise SystemExit(f"error: bad option {o!r} in {spec!r}; use {'|'.join(CONFIG_OPTIONS)}=N")
        n = int(value)
        fields[CONFIG_OPTIONS[key]] = bool(n) if key == "rest" else ("int8" if n else "model") if key == "int8" else n
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


def provenance(device: str = "cpu") -> dict:
    """KVRETRIEVE_COMMIT names the commit where git cannot (a copy of the tree on a GPU machine)."""
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=RESULTS.parent, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                               text=True, cwd=RESULTS.parent).stdout.strip()
        commit += "+dirty" if dirty else ""
    except (OSError, subprocess.CalledProcessError):
        commit = "unknown"
    commit = os.environ.get("KVRETRIEVE_COMMIT", commit)
    versions = {"python": platform.python_version(), "torch": torch.__version__}
    for name in ("transformers", "triton"):
        try:
            versions[name] = __import__(name).__version__
        except ImportError:
            pass
    return {"command": " ".join([Path(sys.argv[0]).as_posix()] + sys.argv[1:]), "commit": commit,
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "device": device_name(device), "versions": versions}


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
    md += [f"- run: `{r['command']}` at {r['commit']}, {r['date']}" for r in meta.get("runs", [])] + ["",
          markdown_table(rows, columns), ""]
    if notes:
        md += [notes, ""]
    (out_dir / f"{name}.md").write_text("\n".join(md))
    return out_dir / f"{name}.json"
