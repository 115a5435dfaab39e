"""Where a reopen's time goes (issue 16, item 4: 128K of the 8B shape in <= 2 s on the H200 host).

Prefills --context random tokens of a named shape, saves them, then in a fresh LLM times: opening with
every checksum, opening without, `resume(verify=False)` under cProfile (the main thread's functions by
own time), and three host-side rates that bound a reopen: pinned allocation (cudaHostAlloc, and
malloc + cudaHostRegister on threads where torch offers it), reading a saved part into pinned memory
with readinto (1 and 8 threads), and copying from a private map of it (page faults included).

    python bench/probes/probe_reopen.py --shape llama3-8b --context 128K --out $OUT
"""
from __future__ import annotations

import argparse
import cProfile
import io
import json
import os
import pstats
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import torch  # noqa: E402

from reopen import config, document  # noqa: E402

from kvretrieve.api import build, load_decoder  # noqa: E402
from kvretrieve.cli.options import parse_tokens  # noqa: E402
from kvretrieve.config import RuntimeConfig  # noqa: E402
from kvretrieve.store.saved import SavedPrefill  # noqa: E402

GiB = 1 << 30


def timed(fn):
    t = time.perf_counter()
    out = fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return out, round(time.perf_counter() - t, 3)


def read_into(path: Path, dest: torch.Tensor, offset: int) -> None:
    with open(path, "rb", buffering=0) as f:
        f.seek(offset)
        view = memoryview(dest.numpy()).cast("B")
        done = 0
        while done < len(view):
            n = f.readinto(view[done:done + (64 << 20)])
            if not n:
                break
            done += n


def host_rates(parts: list[Path]) -> dict:
    out = {}
    size = min(p.stat().st_size for p in parts[:8])
    _, out["pinned_alloc_4gib_s"] = timed(lambda: [torch.empty(GiB, dtype=torch.uint8, pin_memory=True) for _ in range(4)])
    bufs = [torch.empty(size, dtype=torch.uint8, pin_memory=True) for _ in range(8)]
    _, out["readinto_pinned_1thread_gbps"] = timed(lambda: read_into(parts[0], bufs[0], 0))
    out["readinto_pinned_1thread_gbps"] = round(size / 1e9 / max(out["readinto_pinned_1thread_gbps"], 1e-9), 2)
    n = min(8, len(parts))
    with ThreadPoolExecutor(n) as pool:
        _, s = timed(lambda: list(pool.map(lambda i: read_into(parts[i], bufs[i], 0), range(n))))
    out[f"readinto_pinned_{n}threads_gbps"] = round(n * size / 1e9 / s, 2)
    mapped = torch.from_file(str(parts[1]), shared=False, size=size, dtype=torch.uint8)
    _, s = timed(lambda: bufs[1].copy_(mapped))
    out["copy_from_private_map_gbps"] = round(size / 1e9 / s, 2)
    try:
        torch.cuda.memory._set_allocator_settings("pinned_use_cuda_host_register:True,pinned_num_register_threads:8")
        _, out["pinned_register_8threads_4gib_s"] = timed(
            lambda: [torch.empty(GiB, dtype=torch.uint8, pin_memory=True) for _ in range(4)])
    except Exception as e:  # noqa: BLE001 - a probe reports what this torch lacks
        out["pinned_register_error"] = repr(e)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", default="llama3-8b")
    ap.add_argument("--context", default="128K")
    ap.add_argument("--kind", default="lowrank")
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    args = ap.parse_args()
    n = parse_tokens(args.context)
    runtime = RuntimeConfig(max_context=n + 64)
    decoder, tok, source = load_decoder(None, runtime, dense_kv=False, shape=args.shape)
    doc, _ = document(tok, n - 16, decoder.cfg.vocab_size)
    folder = Path(tempfile.mkdtemp(prefix="kvretrieve-probe-reopen-")) / "doc.kvr"
    cfg = config(args.kind)
    llm = build(decoder, tok, source, n + 64, runtime.prefill_chunk, cfg)
    llm.prefill(doc)
    _, save_s = timed(lambda: llm.save(folder))
    del llm
    row = {"context": n, "kind": args.kind, "save_s": save_s}
    _, row["open_verify_s"] = timed(lambda: SavedPrefill(folder, verify=True))
    _, row["open_noverify_s"] = timed(lambda: SavedPrefill(folder, verify=False))
    again = build(decoder, tok, source, n + 64, runtime.prefill_chunk, cfg)
    prof = cProfile.Profile()
    t = time.perf_counter()
    prof.runcall(again.resume, folder, verify=False)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    row["resume_noverify_s"] = round(time.perf_counter() - t, 3)
    text = io.StringIO()
    pstats.Stats(prof, stream=text).sort_stats("tottime").print_stats(25)
    del again
    if torch.cuda.is_available():
        row |= host_rates(sorted(folder.glob("*.safetensors")))
    print(json.dumps(row, indent=1))
    print(text.getvalue())
    Path(args.out, "probe_reopen.json").write_text(json.dumps(row, indent=1) + "\n")
    Path(args.out, "probe_reopen_profile.txt").write_text(text.getvalue())


if __name__ == "__main__":
    main()
