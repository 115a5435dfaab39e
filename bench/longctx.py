"""Long-context quality harness (issue 14): RULER-style tasks at 8K, 16K and 32K tokens, scored for dense
attention (the reference) and for each retrieval configuration, plus teacher-forced top-1 agreement,
KL(dense || sparse) and perplexity over real text.

Tasks (bench/longctx_tasks.py, generated here with the model's tokenizer, nothing downloaded): single
needle in a repeated sentence and in real text, multi-key, multi-value and multi-query needles,
variable tracking, common- and frequent-words extraction, QA about facts planted in real text. Real
text: bench/longctx_corpus.py (CPython docs, licenses, man pages, Debian manuals). A sample counts when
every expected value is in the greedy answer (longctx_tasks.score).

    python bench/eval_models.py 1.5b && python bench/longctx.py            # GPU: 1.5B, 8K-32K, dense+default+oracle
    python bench/longctx.py --quick                                       # CPU smoke run: 0.5B, see QUICK
    python bench/longctx.py --configs lowrank:budget=4096:window=1024 --lengths 32K --merge bench/results/longctx.json

--configs: `default` (RetrievalConfig(index="lowrank"): the budget follows the context) and
`KIND[:budget=N][:window=N][:sink=N][:block=N][:rank=N][:zone=N][:rest=1][:int8=0|1]` (KIND: lowrank, ivf, bounds,
oracle, exact), and `dense`; any of them `@DTYPE`, `@WEIGHTS` or `@DTYPE+WEIGHTS` to run over a second copy
of the weights in that dtype or kept that way (WEIGHTS: int8, int4, file = a GGUF's own quantized
tensors; the reference is always dense weights in --dtype): `--dtype float32 --configs
dense@bfloat16,default@bfloat16,default` measures bf16's own distance from fp32, `dense@int8,dense@file`
issue 18's quantized weights against the same file dequantized.
Results go to bench/results/longctx.json and .md ($OUT or --out DIR), rewritten after every task and
length, so a run that is stopped keeps what it finished; progress lines say task, length and time.

Cost of the default run, per configuration: ~70 document prefills per length (single needle: 20 prompts
that each prefill from their needle on; cwe and fwe: 20 documents each; the other tasks: 2 documents
of 10 questions), 540 answers of at most 12-96 tokens, 3 x 256 teacher-forced steps. On an H200 with
the 1.5B (assumed: 32K prefill 1-2 s, retrieval prefill 1.2x that, decode 3 ms dense and ~6 ms sparse)
dense + 2 configurations are an estimated 12-21 minutes, so a GPU call of 10 minutes takes
`--lengths 8K,16K` (6-8 min), then `--lengths 32K --configs default` and `--lengths 32K --configs oracle`
(5-8 min each; dense is rerun in each), each with `--merge bench/results/longctx.json` holding the
results so far (the GPU machine's $OUT starts empty).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import eval_models  # noqa: E402
import longctx_corpus as corpus  # noqa: E402
from accuracy_metrics import token_metrics  # noqa: E402
from common import (RESULTS, add_provenance_args, config_fields, keep_runs, markdown_table,  # noqa: E402
                    provenance, source_commit, stamp, write_results)
from longctx_tasks import TASKS, Builder, Question, generate, recall, score  # noqa: E402

import kvretrieve  # noqa: E402
from kvretrieve import RetrievalConfig  # noqa: E402
from kvretrieve.api import build  # noqa: E402
from kvretrieve.config import RuntimeConfig  # noqa: E402

# The CPU smoke run (tests/test_longctx.py runs it where the 0.5B is fetched). On 2 cores the 0.5B
# (fp32) prefills 2K tokens in ~11 s dense and ~25 s with retrieval, 8K in 60-120 s, and decodes at
# 0.2-0.4 s a token: 8K prompts would take over 30 minutes, so it asks one question per task at 2K.
QUICK = {"model": "0.5b", "lengths": "2K", "samples": 1, "per_doc": 1, "configs": "default", "tf_tokens": 32,
         "tf_windows": 1}
FULL = {"model": "1.5b", "lengths": "8K,16K,32K", "samples": 20, "per_doc": 10, "configs": "default,oracle",
        "tf_tokens": 256, "tf_windows": 4}


def parse_config(spec: str) -> RetrievalConfig | None:
    """`default`, `dense` (None) or KIND[:key=value...] -> RetrievalConfig, any of them with an `@...`
    suffix (see split_variant). index="auto" is avoided on purpose: its meaning is "dense when it fits"."""
    spec = split_variant(spec)[0]
    if spec == "dense":
        return None
    if spec == "default":
        return RetrievalConfig(index="lowrank")
    kind, *opts = spec.split(":")
    fields = config_fields(opts, f"--configs {spec}")
    return RetrievalConfig(index=kind, **fields)


DTYPES, WEIGHTS = ("float32", "bfloat16", "float16"), ("dense", "int8", "int4", "file")


def split_variant(spec: str) -> tuple[str, str | None, str | None]:
    """"default@bfloat16+int8" -> ("default", "bfloat16", "int8"): that configuration runs over a second
    decoder in that dtype and with those weights (RuntimeConfig.weights; file: a GGUF's own quantized
    tensors) while the reference (dense) keeps --dtype and dense weights. `dense@bfloat16` against an
    fp32 reference is bf16's noise floor, `dense@int4` what 4-bit weights move."""
    base, _, variant = spec.partition("@")
    dtype = weights = None
    for part in filter(None, variant.split("+")):
        if part in DTYPES and dtype is None:
            dtype = part
        elif part in WEIGHTS and weights is None:
            weights = part
        else:
            raise SystemExit(f"error: --configs {spec}: unknown variant {part!r}; use a dtype ({', '.join(DTYPES)}) "
                             f"and/or weights ({', '.join(WEIGHTS)}), e.g. @bfloat16+int8")
    return base, dtype, weights


def tokens_of(s: str) -> int:
    s = s.strip().upper()
    return int(s[:-1]) * 1024 if s.endswith("K") else int(s)


def resolve_model(name: str) -> tuple[Path, str | None, str]:
    """(path, sha256, description) of an evaluation model name (fetched when missing) or a path."""
    if name in eval_models.MODELS:
        m = eval_models.MODELS[name]
        return eval_models.fetch(name, log=lambda s: print(s, flush=True)), m.sha256, m.model
    path = Path(name)
    if not path.exists():
        raise SystemExit(f"error: --model {name}: no such file; give 0.5b, 1.5b or a GGUF file / HF directory")
    return path, eval_models.sha256_of(path) if path.is_file() else None, path.name


@torch.inference_mode()
def answer(llm, q: Question) -> list[int]:
    """Greedy answer ids (without the EOS). The prompt goes through llm.prefill, which reuses the
    prefix cached by the previous question (the document); the answer's tokens are then fed with
    engine.step, and the next prefill cuts the cache back to the shared prefix."""
    logits, out, eos = llm.prefill(q.ids), [], llm.tokenizer.eos_ids
    while True:
        token = int(logits.argmax())
        if token in eos:
            return out
        out.append(token)
        if len(out) == q.max_new:
            return out
        logits = llm.engine.step(torch.tensor(token, device=llm.device))


@torch.inference_mode()
def forced_logits(llm, ids: list[int], start: int, n: int) -> torch.Tensor:
    """Logits [n, V] (fp32) predicting ids[start:start + n], the text fed one decode step at a time
    after a prefill of ids[:start]; the cache is reset afterwards."""
    llm.reset()
    out = [llm.prefill(ids[:start])]
    for t in ids[start:start + n - 1]:
        out.append(llm.engine.step(torch.tensor(t, device=llm.device)))
    llm.reset()
    return torch.stack(out).float()


def attended(cfg: RetrievalConfig, context: int) -> float:
    """The share of a context's tokens a decode step attends per KV head: sinks, window, retrieved
    blocks and the partly filled tail block."""
    window, budget = cfg.plan(context)
    return min(1.0, (cfg.sink_blocks + window + budget + 1) * cfg.block_size / context)


def teacher_forced(llms: dict, ids: list[int], length: int, n: int, windows: int = 1) -> list[dict]:
    """top-1 agreement, KL(dense || config) and perplexities over the n real tokens ending at length,
    in each of `windows` documents cut from the text at evenly spaced offsets (the first at 0): one
    window of 256 tokens moves top-1 in steps of 0.004 and hangs on a few near-tied positions."""
    stride = (len(ids) - length) // windows
    if stride < 0:
        raise SystemExit(f"error: the corpus has {len(ids)} tokens, fewer than one {length}-token window")
    per = {}  # config -> the metrics of each window
    for w in range(windows):
        doc = ids[w * stride:w * stride + length]
        dense = forced_logits(llms["dense"], doc, length - n, n)
        targets = torch.tensor(doc[length - n:], device=dense.device)
        for name, llm in llms.items():
            logits = dense if name == "dense" else forced_logits(llm, doc, length - n, n)
            per.setdefault(name, []).append(token_metrics(dense, logits, targets))
    rows = []
    for name, ms in per.items():
        mean = lambda k: sum(m[k] for m in ms) / len(ms)  # noqa: E731 (windows have equal positions)
        gmean = lambda k: math.exp(sum(math.log(m[k]) for m in ms) / len(ms))  # noqa: E731 (ppl: mean NLL)
        row = {"task": "teacher_forced", "length": length, "config": name, "ppl_dense": gmean("ppl_dense"),
               "ppl": gmean("ppl")}
        if name != "dense":
            cfg = llms[name].retrieval
            row |= {"attended": attended(cfg, length) if cfg else 1.0, "top1_agree": mean("top1_agree"), "kl": mean("kl"), "kl_max": max(m["kl_max"] for m in ms),
                    "positions": sum(m["positions"] for m in ms), "windows": len(ms),
                    "top1_by_window": [round(m["top1_agree"], 4) for m in ms]}
        rows.append(row)
    return rows


def run_task(llms: dict, questions: list[Question], tok) -> tuple[list[dict], list[dict]]:
    """Every configuration answers every question; returns the result rows and the answers."""
    rows, answers = [], [{"expected": list(q.expected), "doc": q.doc, "depth": q.depth} for q in questions]
    dense_ids = []
    for name, llm in llms.items():
        t, correct, same, partial = time.perf_counter(), 0, 0, 0.0
        for i, q in enumerate(questions):
            ids = answer(llm, q)
            text = tok.decode(ids)
            answers[i][name] = text
            correct += score(text, q)
            partial += recall(text, q.expected)
            if name == "dense":
                dense_ids.append(ids)
            same += ids == dense_ids[i]
        q0 = questions[0]
        rows.append({"task": q0.task, "length": None, "config": name, "correct": correct, "samples": len(questions),
                     "score": correct / len(questions), "recall": partial / len(questions),
                     "same_as_dense": same / len(questions),
                     "prompt_tokens": round(sum(len(q.ids) for q in questions) / len(questions)),
                     "documents": len({q.doc for q in questions}), "seconds": round(time.perf_counter() - t, 1)})
        llm.reset()
    return rows, answers


COLUMNS = ["task", "length", "config", "correct", "samples", "score", "recall", "same_as_dense", "prompt_tokens",
           "documents", "seconds"]


def summary_tables(rows: list[dict], tf_rows: list[dict], configs: list[str]) -> str:
    """Markdown: correct/samples per task and length, one column per configuration; then the
    teacher-forced metrics."""
    cells = {(r["task"], r["length"], r["config"]): f"{r['correct']}/{r['samples']}"
             + (f" ({r['recall']:.2f})" if r.get("recall") is not None else "") for r in rows}
    keys = list(dict.fromkeys((r["task"], r["length"]) for r in rows))
    pivot = [{"task": t, "length": n, **{c: cells.get((t, n, c)) for c in configs}} for t, n in keys]
    out = ["## Correct answers per task and length (in brackets: the share of expected values found)", "",
           markdown_table(pivot, ["task", "length"] + configs)]
    if tf_rows:
        out += ["", "## Teacher-forced over real text (tokens ending at `length`)", "",
                markdown_table(tf_rows, ["length", "config", "attended", "top1_agree", "kl", "kl_max", "ppl_dense", "ppl",
                                         "positions", "top1_by_window"])]
    return "\n".join(out)


def out_dir(args) -> Path:
    return Path(args.out or os.environ.get("OUT") or RESULTS)


def previous(args) -> dict | None:
    """The results that --merge adds to (read once, before this run writes anything)."""
    if args.merge is None:
        return None
    path = Path(args.merge) if args.merge else out_dir(args) / f"{args.name}.json"
    return json.loads(path.read_text()) if path.is_file() else None


def save(args, meta: dict, rows: list[dict], tf_rows: list[dict], answers: dict, configs: list[str],
         prev: dict | None = None) -> Path:
    stamp(rows + tf_rows, meta)
    if prev is not None:  # rows of this run replace the same (task, length, config) rows of prev
        key = lambda r: (r["task"], r["length"], r["config"])  # noqa: E731
        new = {key(r) for r in rows + tf_rows}
        rows = [r for r in prev.get("rows", []) if key(r) not in new] + rows
        tf_rows = [r for r in prev.get("teacher_forced", []) if key(r) not in new] + tf_rows
        old = prev.get("answers", {})
        answers = {**old, **{k: [{**a, **b} for a, b in zip(old[k], v)] if len(old.get(k, [])) == len(v) else v
                             for k, v in answers.items()}}
        configs = list(dict.fromkeys(["dense"] + [r["config"] for r in rows]))
    meta = keep_runs(prev, meta, rows + tf_rows)
    return write(args.name, meta, rows, tf_rows, answers, configs, out_dir(args))


def write(name: str, meta: dict, rows: list[dict], tf_rows: list[dict], answers: dict, configs: list[str],
          out: Path) -> Path:
    c = meta["corpus"]
    head = (f"Model: {meta['model']} ({meta['dtype']}), sha256 {meta['model_sha256']}. Corpus: sha256 {c['sha256']}, "
            f"{c['documents']} documents, characters by kind {c['chars_by_kind']}. Timings (s): {meta['timings']}.\n\n")
    notes = (head + summary_tables(rows, tf_rows, configs) + "\n\nA sample is correct when every expected value "
             "is in the greedy answer as a whole word (QA: the fact's key words). recall: the share of the expected "
             "values found, over the samples. same_as_dense: answers identical to dense, token for token. "
             "documents: distinct documents (prefills) behind the samples.")
    return write_results(name, {**meta, "teacher_forced": tf_rows, "answers": answers}, rows, COLUMNS, notes, out)


def rescore(path: Path, allow_dirty: bool = False) -> Path:
    """Recompute each row's recall from the answers a results file stores (no model needed), and
    rewrite its JSON and markdown in place; the runs that made them stay as recorded."""
    data = json.loads(path.read_text())
    rows, tf_rows, answers = data.pop("rows"), data.pop("teacher_forced"), data.pop("answers")
    for r in rows:
        samples = answers.get(f"{r['task']}@{r['length']}", [])
        if samples and all(r["config"] in a for a in samples):
            r["recall"] = sum(recall(a[r["config"]], a["expected"]) for a in samples) / len(samples)
    configs = list(dict.fromkeys(["dense"] + [r["config"] for r in rows]))
    data["rescored"] = {"command": " ".join(sys.argv), "commit": source_commit(allow_dirty),
                        "note": "the recall column, derived from the stored answers"}
    return write(path.stem, data, rows, tf_rows, answers, configs, path.parent)


def load_all(path: Path, args, configs: dict, max_context: int) -> dict:
    """One LLM per configuration ("dense" first: the reference) over ONE decoder per dtype and weights:
    each keeps its own cache, so the questions of a document reuse its prefill in every configuration,
    and the weights are read (and on a GPU held) once: 7 separate loads of the 1.5B took 112 s of a 180 s
    H200 call."""
    device = "cuda" if args.device == "auto" and torch.cuda.is_available() else args.device
    dtype = args.dtype if args.dtype != "auto" else ("bfloat16" if device.startswith("cuda") else "float32")

    def decoder(want: tuple[str, str]):
        weights = "auto" if want[1] == "file" else want[1]  # auto keeps a GGUF's own quantized tensors
        return kvretrieve.load(str(path), device=device, dtype=want[0], weights=weights, max_context=max_context,
                               retrieval=None)

    dense = decoder((dtype, "dense"))
    decoders = {(dtype, "dense"): dense.model}
    chunk = RuntimeConfig().prefill_chunk
    llms = {"dense": dense}
    for name, cfg in configs.items():
        _, want_dtype, want_weights = split_variant(name)
        want = (want_dtype or dtype, want_weights or "dense")
        if want not in decoders:
            decoders[want] = decoder(want).model
        llms[name] = build(decoders[want], dense.tokenizer, dense.source, max_context, chunk, cfg)
    return llms


def run(args) -> Path:
    t0 = time.perf_counter()
    configs = {spec: parse_config(spec) for spec in args.configs.split(",") if spec}
    if "dense" in configs:
        raise SystemExit("error: --configs dense: dense is always run (the reference); dense@DTYPE or dense@WEIGHTS runs it in another dtype or with quantized weights")
    lengths, tasks = [tokens_of(s) for s in args.lengths.split(",")], [t for t in args.tasks.split(",") if t]
    if unknown := set(tasks) - set(TASKS):
        raise SystemExit(f"error: unknown task(s) {', '.join(sorted(unknown))}; tasks: {', '.join(TASKS)}")
    path, sha, description = resolve_model(args.model)
    docs = corpus.load_corpus(args.corpus)
    timings = {"corpus_s": round(time.perf_counter() - t0, 1)}
    llms = load_all(path, args, configs, max(lengths) + 16)
    timings["load_s"] = round(time.perf_counter() - t0 - timings["corpus_s"], 1)
    llm0 = next(iter(llms.values()))
    tok, device = llm0.tokenizer, str(llm0.device)
    builder = Builder(tok, corpus.corpus_paragraphs(docs), corpus.vocabulary(docs))
    text_ids = tok.encode("\n\n".join(d["text"] for d in docs))
    meta = provenance(device, args.allow_dirty) | {
        "model": description, "model_path": str(path), "model_sha256": sha, "dtype": str(llm0.model.dtype),
        "corpus": corpus.summary(docs), "configs": {"dense": None} | {k: asdict(c) if c else None for k, c in configs.items()},
        "lengths": lengths, "tasks": tasks, "samples": args.samples, "questions_per_document": args.per_doc,
        "teacher_forced_tokens": args.tf_tokens, "teacher_forced_windows": args.tf_windows, "seed": args.seed,
        "quick": args.quick, "timings": timings}
    rows, tf_rows, answers, out, prev = [], [], {}, None, previous(args)
    names = list(llms)

    def log(what: str) -> None:
        print(f"[{time.perf_counter() - t0:6.0f}s] {what}", flush=True)

    log(f"loaded {description} ({device}, {meta['dtype']}), corpus {meta['corpus']['sha256'][:12]}")
    for length in lengths:
        if args.tf_tokens:
            t = time.perf_counter()
            tf_rows += teacher_forced(llms, text_ids, length, args.tf_tokens, args.tf_windows)
            timings[f"teacher_forced@{length}_s"] = round(time.perf_counter() - t, 1)
            mine = tf_rows[len(tf_rows) - len(names):]
            log(f"teacher_forced {length}: dense ppl {mine[0]['ppl']:.3f}" + "".join(
                f", {r['config']} top1 {r['top1_agree']:.3f} kl {r['kl']:.4f}" for r in mine[1:]))
            out = save(args, meta, rows, tf_rows, answers, names, prev)
        for task in tasks:
            t = time.perf_counter()
            questions = generate(builder, task, length, args.samples, args.per_doc, args.seed)
            new, answers[f"{task}@{length}"] = run_task(llms, questions, tok)
            for r in new:
                r["length"] = length
            rows += new
            timings[f"{task}@{length}_s"] = round(time.perf_counter() - t, 1)
            log(f"{task} {length}: " + ", ".join(f"{r['config']} {r['correct']}/{r['samples']}" for r in new)
                + f" ({timings[f'{task}@{length}_s']:.0f}s)")
            out = save(args, meta, rows, tf_rows, answers, names, prev)
    timings["total_s"] = round(time.perf_counter() - t0, 1)
    out = save(args, meta, rows, tf_rows, answers, names, prev)
    log(f"wrote {out}")
    return out


def parse(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help=f"CPU smoke run: defaults {QUICK}")
    ap.add_argument("--model", help="0.5b, 1.5b (fetched by bench/eval_models.py) or a GGUF file / HF directory")
    ap.add_argument("--device", default="auto", help="auto (cuda when there is one), cpu, cuda, cuda:N")
    ap.add_argument("--dtype", default="auto", help="auto: bfloat16 on a GPU, float32 on the CPU (its bf16 "
                                                    "attention was slower at 8K on the 2-core development machine)")
    ap.add_argument("--lengths", help="prompt lengths in tokens, e.g. 8K,16K,32K")
    ap.add_argument("--tasks", default=",".join(TASKS), help="comma-separated subset of " + ",".join(TASKS) + " ('': teacher forcing only)")
    ap.add_argument("--samples", type=int, help="samples per task and length")
    ap.add_argument("--per-doc", type=int, help="questions per document for the multi-needle, vt and qa tasks")
    ap.add_argument("--configs", help="retrieval configurations besides dense, e.g. default,oracle,lowrank:budget=4096")
    ap.add_argument("--tf-tokens", type=int, help="teacher-forced tokens at each length (0: none)")
    ap.add_argument("--tf-windows", type=int, help="documents (text offsets) the teacher-forced tokens are taken from")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--corpus", help="corpus file: read when it exists, else built here and written there")
    ap.add_argument("--out", help="results directory (default $OUT, else bench/results)")
    ap.add_argument("--name", help="results file stem (default longctx; --quick: longctx_quick_<device type>)")
    ap.add_argument("--merge", nargs="?", const="", metavar="FILE",
                    help="keep the rows of other tasks/lengths/configs of FILE (default: the output file)")
    ap.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    ap.add_argument("--rescore", metavar="FILE", help="only recompute the recall column of FILE from its stored answers")
    add_provenance_args(ap)
    args = ap.parse_args(argv)
    for key, value in (QUICK if args.quick else FULL).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.name is None:
        cuda = args.device.startswith("cuda") or (args.device == "auto" and torch.cuda.is_available())
        args.name = f"longctx_quick_{'cuda' if cuda else 'cpu'}" if args.quick else "longctx"
    if args.threads:
        torch.set_num_threads(args.threads)
    return args


if __name__ == "__main__":
    options = parse()
    print(rescore(Path(options.rescore), options.allow_dirty) if options.rescore else run(options))
