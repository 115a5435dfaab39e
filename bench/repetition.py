"""Do chat answers fall into loops, with and without the repetition penalty? (issue 15: chat's default
of 1.1 over the last 64 tokens was set from one manual; this measures it on several real texts.)

For each of N documents drawn from the longctx corpus (Debian manuals, licenses, man pages: text
nobody here wrote), the first `--doc-tokens` tokens of it go into one chat turn with a question, and
the default model answers greedily up to `--max-new-tokens`, once per penalty. An answer loops when it
runs to the limit without an end token and fewer than half of its 8-grams are distinct.

    python bench/repetition.py --corpus .eval_models/corpus.json            # 8 documents, 1.0 and 1.1
"""
from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import longctx_corpus as corpus  # noqa: E402
from common import RESULTS, add_provenance_args, provenance, stamp, write_results  # noqa: E402

import kvretrieve  # noqa: E402
from kvretrieve.config import SamplingParams  # noqa: E402

QUESTIONS = ("Summarize this document in a few sentences.", "What are the main points of this text?")


def distinct_share(ids: list[int], n: int = 8) -> float:
    """Distinct n-grams over all n-grams of ids (1.0: no n-gram repeats; a loop drives it down)."""
    grams = [tuple(ids[i:i + n]) for i in range(len(ids) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 1.0


def pick_documents(docs: list[dict], n: int, seed: int, min_chars: int) -> list[dict]:
    """n documents of at least min_chars, spread over the corpus's kinds, drawn with a fixed seed."""
    rng = random.Random(seed)
    by_kind = {}
    for d in sorted(docs, key=lambda d: d["source"]):
        if len(d["text"]) >= min_chars:
            by_kind.setdefault(d["kind"], []).append(d)
    for group in by_kind.values():
        rng.shuffle(group)
    out, kinds = [], sorted(by_kind)
    while len(out) < n and any(by_kind.values()):
        for k in kinds:
            if by_kind[k] and len(out) < n:
                out.append(by_kind[k].pop())
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--corpus", default=".eval_models/corpus.json", help="corpus file (bench/longctx_corpus.py)")
    ap.add_argument("--documents", type=int, default=8)
    ap.add_argument("--doc-tokens", type=int, default=3000)
    ap.add_argument("--max-new-tokens", type=int, default=384)
    ap.add_argument("--penalties", default="1.0,1.1")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(RESULTS))
    add_provenance_args(ap)
    args = ap.parse_args()
    meta = provenance("cpu", args.allow_dirty)
    llm = kvretrieve.load(device="cpu", dtype="float32", max_context=args.doc_tokens + args.max_new_tokens + 256)
    docs = pick_documents(corpus.load_corpus(args.corpus), args.documents, args.seed, min_chars=4 * args.doc_tokens)
    rows = []
    for i, d in enumerate(docs):
        text = llm.tokenizer.decode(llm.tokenizer.encode(d["text"])[:args.doc_tokens])
        question = QUESTIONS[i % len(QUESTIONS)]
        messages = [{"role": "user", "content": f"{text}\n\n{question}"}]
        for penalty in (float(p) for p in args.penalties.split(",")):
            t = time.perf_counter()
            sampling = SamplingParams(max_new_tokens=args.max_new_tokens, repeat_penalty=penalty)
            res = llm.generate(messages, sampling=sampling, return_details=True)
            ids = list(res.token_ids)
            to_limit = res.finish_reason == "length"
            share = distinct_share(ids)
            rows.append({"document": d["source"], "kind": d["kind"], "question": question, "repeat_penalty": penalty,
                         "new_tokens": len(ids), "to_limit": to_limit, "distinct_8grams": round(share, 3),
                         "loops": to_limit and share < 0.5, "seconds": round(time.perf_counter() - t, 1),
                         "answer_start": res.text[:80].replace("\n", " ")})
            print(f"{d['source']} penalty {penalty}: {len(ids)} tokens, distinct 8-grams {share:.2f}", flush=True)
    summary = []
    for p in sorted({r["repeat_penalty"] for r in rows}):
        mine = [r for r in rows if r["repeat_penalty"] == p]
        summary.append(f"repeat_penalty {p}: {sum(r['loops'] for r in mine)} of {len(mine)} answers loop, "
                       f"{sum(r['to_limit'] for r in mine)} run to the limit")
    meta |= {"model": "SmolLM2-135M-Instruct (default)", "doc_tokens": args.doc_tokens,
             "max_new_tokens": args.max_new_tokens, "documents_sha256": corpus.summary(docs)["sha256"]}
    cols = ["document", "kind", "repeat_penalty", "new_tokens", "to_limit", "distinct_8grams", "loops", "seconds",
            "answer_start"]
    notes = ("An answer loops when it runs to max_new_tokens and fewer than half of its 8-grams are distinct. "
             + "; ".join(summary) + ".")
    print(notes)
    print(write_results("repetition_cpu", meta, stamp(rows, meta), cols, notes, Path(args.out)))


if __name__ == "__main__":
    main()
