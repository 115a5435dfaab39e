"""Reopening a saved prefill against prefilling again (saved prefills, kvretrieve.persist).

For each attention kind: prefill a document of --context tokens (real text from the longctx corpus
with a real model; random tokens with --shape), save it, and reopen it in a fresh LLM over the same
weights (the model stays loaded, as in a chat that starts with a cached document). Medians of
--repeats of: the prefill, the save, the reopen (every file's checksum included), and the time to the
first answer token of a 16-token question after each: a fresh prefill of document + question against
reopen + the question. The reopened cache must give the logits the saved one gives (same_logits).
Reopen times read the files just written (the page cache holds them), as a chat reopening a document
it saved earlier the same day would. On a GPU they include pinning the store's host memory: torch's
cache of pinned memory is emptied before the reopening LLM is built, as in a fresh process.

    python bench/reopen.py                                  # CPU: the default model, an 8K document
    python bench/reopen.py --shape llama3-8b --context 128K --kinds lowrank   # GPU, random weights
"""
from __future__ import annotations

import argparse
import gc
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import torch  # noqa: E402

import longctx_corpus as corpus  # noqa: E402
from common import RESULTS, add_provenance_args, config_fields, provenance, stamp, write_results  # noqa: E402

from kvretrieve.api import build, load_decoder  # noqa: E402
from kvretrieve.config import RetrievalConfig, RuntimeConfig  # noqa: E402

COLUMNS = ["kind", "context", "tokens", "prefill_s", "save_s", "save_mb", "reopen_s", "reopen_share",
           "first_token_prefill_s", "first_token_reopen_s", "same_logits", "repeats"]
NOTES = ("reopen_share: reopen_s / prefill_s. first_token_*: from an empty cache to the logits of a 16-token "
         "question's last token, by a prefill of document + question, or by reopening the document and "
         "prefilling the question. Medians of `repeats` runs; the files are read back from the page cache.")


def config(kind: str) -> RetrievalConfig | None:
    """dense, or KIND[:key=value...] (bench/common.py CONFIG_OPTIONS)."""
    if kind == "dense":
        return None
    name, *opts = kind.split(":")
    return RetrievalConfig(index=name, **config_fields(opts, f"--kinds {kind}"))


def document(tokenizer, n: int, vocab: int) -> tuple[list[int], list[int]]:
    """n document ids (real text, or random ids without a tokenizer) and 16 question ids."""
    if tokenizer is None:
        g = torch.Generator().manual_seed(0)
        return torch.randint(0, vocab, (n,), generator=g).tolist(), torch.randint(0, vocab, (16,), generator=g).tolist()
    text = "\n\n".join(d["text"] for d in corpus.load_corpus(None))
    ids = tokenizer.encode(text, add_special_tokens=False)
    if len(ids) < n:
        raise SystemExit(f"error: the corpus has {len(ids):,} tokens, fewer than --context {n:,}")
    question = tokenizer.encode("\n\nIn one sentence, what is the text above about? It is about",
                                add_special_tokens=False)
    return ids[:n], (question * 16)[:16]


def empty_host_cache() -> None:
    """Give the pinned memory torch keeps for reuse back to the OS (a fresh process has none)."""
    gc.collect()
    if torch.cuda.is_available():
        for name in ("_accelerator_emptyHostCache", "_host_emptyCache"):  # torch 2.13, 2.11
            if hasattr(torch._C, name):
                getattr(torch._C, name)()
                return
        raise SystemExit("error: this torch cannot empty its pinned-memory cache; reopen times would not count pinning")


def timed(fn):
    t = time.perf_counter()
    out = fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return out, time.perf_counter() - t


def measure(decoder, tok, source, kind: str, doc: list[int], question: list[int], capacity: int, chunk: int,
            folder: Path) -> dict:
    cfg = config(kind)
    llm = build(decoder, tok, source, capacity, chunk, cfg)
    _, prefill_s = timed(lambda: llm.prefill(doc))
    info, save_s = timed(lambda: llm.save(folder / "doc.kvr"))
    want = llm.prefill(doc + question)
    llm.reset()
    _, cold_s = timed(lambda: llm.prefill(doc + question))
    del llm
    empty_host_cache()  # or the new store would take the old one's pinned memory, and its pinning cost nothing
    again = build(decoder, tok, source, capacity, chunk, cfg)
    _, reopen_s = timed(lambda: again.resume(folder / "doc.kvr"))
    got, ask_s = timed(lambda: again.prefill(doc + question))
    del again
    return {"prefill_s": prefill_s, "save_s": save_s, "save_mb": info.bytes / 1e6, "reopen_s": reopen_s,
            "first_token_prefill_s": cold_s, "first_token_reopen_s": reopen_s + ask_s,
            "same_logits": bool(torch.equal(want, got))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", help="checkpoint (default: the default model)")
    ap.add_argument("--shape", help="random weights of a named shape instead (e.g. llama3-8b)")
    ap.add_argument("--context", default="8K", help="document tokens, e.g. 8K or 128K")
    ap.add_argument("--kinds", default="dense,lowrank", help="dense and/or index kinds (KIND:key=value...)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--dir", help="where the saves go (default: a temporary folder, removed after)")
    ap.add_argument("--out", default=os.environ.get("OUT", str(RESULTS)))
    ap.add_argument("--name", help="results file stem (default reopen_<device type>)")
    add_provenance_args(ap)
    args = ap.parse_args()
    n = int(args.context[:-1]) * 1024 if args.context.upper().endswith("K") else int(args.context)
    runtime = RuntimeConfig(device=args.device, dtype=args.dtype, max_context=n + 64)
    decoder, tok, source = load_decoder(args.model, runtime, dense_kv=False, shape=args.shape)
    meta = provenance(str(decoder.device), args.allow_dirty)
    doc, question = document(tok, n - 16, decoder.cfg.vocab_size)
    folder = Path(args.dir or tempfile.mkdtemp(prefix="kvretrieve-reopen-"))
    rows = []
    try:
        for kind in args.kinds.split(","):
            runs = [measure(decoder, tok, source, kind, doc, question, n + 64, runtime.prefill_chunk, folder)
                    for _ in range(args.repeats)]
            row = {"kind": kind, "context": n, "tokens": len(doc), "repeats": args.repeats,
                   "same_logits": all(r["same_logits"] for r in runs)}
            row |= {k: round(statistics.median(r[k] for r in runs), 3) for k in runs[0] if k != "same_logits"}
            row["reopen_share"] = round(row["reopen_s"] / row["prefill_s"], 4)
            rows.append(row)
            print(row, flush=True)
    finally:
        if not args.dir:
            shutil.rmtree(folder, ignore_errors=True)
    name = args.name or f"reopen_{decoder.device.type}"
    meta |= {"model": str(source), "dtype": str(decoder.dtype), "run_by": "bench/reopen.py"}
    print(write_results(name, meta, stamp(rows, meta), COLUMNS, NOTES, Path(args.out)))


if __name__ == "__main__":
    main()
