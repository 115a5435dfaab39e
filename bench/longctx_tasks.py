"""RULER-style tasks of bench/longctx.py, generated locally with the model's tokenizer, and their scorer.

A task at a length gives Questions: full prompt token ids (chat template around instruction, document
and question, then the start of the answer, as RULER does, so that a small model answers in the
expected form), the values the answer must contain, and its token budget: len(ids) + max_new <= length.

The prompts are ordered so that consecutive ones share a long prefix (LLM.prefill reuses it):
- tasks whose question can vary over one document (multi-key, multi-value, multi-query, variable
  tracking, QA) ask several questions per document, each a sample; the other needles of the document
  are its distractors, as in RULER;
- single-needle tasks keep one needle per prompt over one haystack per length and go from the deepest
  needle to the shallowest, so each prompt prefills only from its needle on (half a document on average);
- common- and frequent-words extraction have one question per document (one prefill each).
"""
from __future__ import annotations

import math
import random
import re
import string
from dataclasses import dataclass
from typing import Callable

from accuracy_metrics import FACTS, Fact, is_correct

# The passkey-retrieval filler sentence (Mohtashami & Jaggi, 2023), the "repeated sentence" haystack.
REPEAT = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
TASKS = ("niah_single_repeat", "niah_single_text", "niah_multikey", "niah_multivalue", "niah_multiquery", "vt",
         "cwe", "fwe", "qa")
# Answer tokens: room for the answer in the form a small model gives it (Qwen2.5 writes "1. key-name:
# 1234567" lines for multi-query, ~17 tokens each; 56 cut 4K answers short), not much more.
MAX_NEW = {"niah_single_repeat": 12, "niah_single_text": 12, "niah_multikey": 12, "niah_multivalue": 64,
           "niah_multiquery": 96, "vt": 48, "cwe": 80, "fwe": 32, "qa": 24}
ONE_NEEDLE = ("A special magic number is hidden in the following text. Remember it: you will be asked about it "
              "after the text.")
NEEDLES = ("Some special magic numbers are hidden in the following text. Remember them: you will be asked about "
           "them after the text.")


@dataclass
class Question:
    task: str
    ids: list[int]
    expected: tuple[str, ...]   # every one must appear in the answer, as a whole word (any case)
    max_new: int
    doc: int                    # the document (questions of one document share its prefill)
    depth: float | None = None  # single needle: where it sits, as a share of the haystack tokens
    fact: Fact | None = None    # QA: scored by accuracy_metrics.is_correct instead


def found(answer: str, expected) -> list[bool]:
    """Per expected value: whether it appears in the answer as a whole word (digits not part of a
    longer number, names not part of a longer name), in any case."""
    return [bool(re.search(rf"(?<![A-Za-z0-9]){re.escape(v)}(?![A-Za-z0-9])", answer, re.I)) for v in expected]


def score(answer: str, q: Question) -> bool:
    """Strict but fair: every expected value is found (QA: accuracy_metrics.is_correct)."""
    if q.fact is not None:
        return is_correct(answer, q.fact)
    return all(found(answer, q.expected))


def recall(answer: str, expected) -> float:
    """Partial credit, as RULER reports it for multi-value tasks: the share of the expected values
    found. Where few samples are fully right for any configuration (variable tracking, word
    extraction with this model), it still tells configurations apart."""
    hits = found(answer, expected)
    return sum(hits) / len(hits) if hits else 0.0


class Builder:
    """Builds the prompts of one tokenizer; paragraph token counts are computed once.

    tokenizer: encode(text) -> ids, encode_chat(messages) -> ids. paragraphs: the corpus's real text.
    vocab: real words (keys, common words)."""

    def __init__(self, tokenizer, paragraphs: list[str], vocab: list[str]):
        self.tok, self.paras, self.vocab, self._count = tokenizer, paragraphs, vocab, {}
        self._lead = len(tokenizer.encode(""))  # a BOS that encode() adds, if any

    def tokens(self, text: str) -> int:
        if len(text) > 2000:  # a whole listing: counted once, not worth keeping
            return len(self.tok.encode(text)) - self._lead
        if text not in self._count:
            self._count[text] = len(self.tok.encode(text)) - self._lead
        return self._count[text]

    def text_units(self, rng: random.Random, budget: int, start: int | None = None) -> list[str]:
        """Corpus paragraphs in order from a drawn one (wrapping), at most budget tokens in all; a
        paragraph that would overflow is skipped, so that smaller ones after it fill the rest."""
        i = rng.randrange(len(self.paras)) if start is None else start
        out, used = [], 0
        for j in range(i, i + len(self.paras)):
            n = self.tokens(self.paras[j % len(self.paras)] + "\n\n")
            if used + n <= budget:
                out.append(self.paras[j % len(self.paras)])
                used += n
            elif budget - used < 16 or len(out) > 0 and j - i > 2 * len(out) + 50:
                break
        return out

    def repeat_units(self, budget: int) -> list[str]:
        return [REPEAT] * max(0, budget // self.tokens(REPEAT + " "))

    def prompt(self, instruction: str, units: list[str], joiner: str, inserts: list[tuple[float, str]],
               question: str, answer_start: str) -> list[int]:
        """Chat prompt: instruction, the units with each insert (depth in [0, 1], text) at the unit
        boundary nearest its depth in tokens, the question; then the start of the answer."""
        cum = [0]
        for u in units:
            cum.append(cum[-1] + self.tokens(u + joiner))
        at: dict[int, list[str]] = {}
        for depth, text in inserts:
            b = min(range(len(cum)), key=lambda j: abs(cum[j] - depth * cum[-1]))
            at.setdefault(b, []).append(text)
        pieces = []
        for j in range(len(units) + 1):
            pieces += at.get(j, []) + units[j:j + 1]
        doc = joiner.join(pieces)
        ids = self.tok.encode_chat([{"role": "user", "content": f"{instruction}\n\n{doc}\n\n{question}"}])
        return ids + self.tok.encode(answer_start)[self._lead:]

    def fit(self, make: Callable[[int], list[Question]], length: int) -> list[Question]:
        """make(budget) with about the largest haystack budget whose prompts all fit length (prompt +
        answer tokens): from the overhead of an empty haystack, steps by the measured overshoot, kept
        between the largest budget known to fit and the smallest known not to (units are coarse)."""
        def worst(qs):
            return max(len(q.ids) + q.max_new for q in qs)

        lo, hi, best = 0, length, make(0)
        if worst(best) > length:
            raise RuntimeError(f"the prompts of {best[0].task} need more than {length} tokens without any haystack")
        budget = length - worst(best)
        for _ in range(12):
            qs = make(budget)
            over = worst(qs) - length
            if over <= 0:
                lo, best = budget, qs if worst(qs) > worst(best) else best
            else:
                hi = budget
            if -0.01 * length <= over <= 0 or hi - lo <= 8:
                break
            budget = budget - over - (8 if over > 0 else 0)
            if not lo < budget < hi:
                budget = (lo + hi) // 2
        return best

    # ---- the draws a task needs -------------------------------------------------------------------
    def keys(self, rng: random.Random, n: int) -> list[str]:
        words = rng.sample(self.vocab, 2 * n)
        return [f"{a}-{b}" for a, b in zip(words[::2], words[1::2])]


def numbers(rng: random.Random, n: int, digits: int = 7) -> list[str]:
    out: list[str] = []
    while len(out) < n:
        v = str(rng.randrange(10 ** (digits - 1), 10 ** digits))
        if v not in out:
            out.append(v)
    return out


def doc_rng(seed: int, task: str, length: int, doc: int) -> random.Random:
    return random.Random(f"{seed}:{task}:{length}:{doc}")  # str seeds hash with sha512: same on every machine


def single_needle(b: Builder, task: str, length: int, n: int, seed: int) -> list[Question]:
    """n prompts over one haystack, each with one needle; deepest first, so each shares the previous
    prompt's tokens up to its own needle."""
    rng, haystack = doc_rng(seed, task, length, 0), task.rsplit("_", 1)[1]
    keys, values = b.keys(rng, n), numbers(rng, n)
    depths = [(i + 0.5) / n for i in range(n)][::-1]  # mid-points: 20 samples span 2.5% .. 97.5%
    start = rng.randrange(len(b.paras))

    def make(budget):
        units = b.repeat_units(budget) if haystack == "repeat" else b.text_units(rng, budget, start)
        joiner = " " if haystack == "repeat" else "\n\n"
        return [Question(task, b.prompt(ONE_NEEDLE, units, joiner, [(d, f"The special magic number for {k} is: {v}.")],
                                        f"What is the special magic number for {k} mentioned in the text above?",
                                        f"The special magic number for {k} mentioned in the text above is"),
                         (v,), MAX_NEW[task], i, depth=d) for i, (k, v, d) in enumerate(zip(keys, values, depths))]
    return b.fit(make, length)


def _needle_doc(b: Builder, task: str, rng: random.Random, q: int) -> tuple[list, list[tuple], str]:
    """The needles and questions of one multi-needle document: (inserts, [(question, answer start,
    expected)], instruction)."""
    if task == "niah_multikey":
        keys, values = b.keys(rng, q), numbers(rng, q)
        return ([(rng.random(), f"The special magic number for {k} is: {v}.") for k, v in zip(keys, values)],
                [(f"What is the special magic number for {k} mentioned in the text above?",
                  f"The special magic number for {k} mentioned in the text above is", (v,))
                 for k, v in zip(keys, values)],
                NEEDLES)
    if task == "niah_multivalue":
        keys, values = b.keys(rng, q), numbers(rng, 4 * q)
        groups = [tuple(values[4 * i:4 * i + 4]) for i in range(q)]
        return ([(rng.random(), f"One of the special magic numbers for {k} is: {v}.") for k, g in zip(keys, groups)
                 for v in g],
                [(f"What are all the special magic numbers for {k} mentioned in the text above?",
                  f"The special magic numbers for {k} mentioned in the text above are", g)
                 for k, g in zip(keys, groups)],
                NEEDLES)
    if task == "niah_multiquery":
        keys, values = b.keys(rng, 4 * q), numbers(rng, 4 * q)
        asks = []
        for i in range(q):
            ks, vs = keys[4 * i:4 * i + 4], tuple(values[4 * i:4 * i + 4])
            names = f"{', '.join(ks[:3])} and {ks[3]}"
            asks.append((f"What are all the special magic numbers for {names} mentioned in the text above?",
                         f"The special magic numbers for {names} mentioned in the text above are", vs))
        inserts = [(rng.random(), f"The special magic number for {k} is: {v}.") for k, v in zip(keys, values)]
        return inserts, asks, NEEDLES
    if task == "vt":  # q chains of 4 hops: VAR A = value, VAR B = VAR A, ...; each chain's statements in order
        names = list(dict.fromkeys("".join(rng.choices(string.ascii_uppercase, k=5)) for _ in range(10 * q)))[:5 * q]
        values, inserts, asks = numbers(rng, q, 5), [], []
        for c in range(q):
            chain, where = names[5 * c:5 * c + 5], sorted(rng.random() for _ in range(5))
            inserts += [(where[0], f"VAR {chain[0]} = {values[c]}.")]
            inserts += [(w, f"VAR {x} = VAR {prev}.") for w, x, prev in zip(where[1:], chain[1:], chain)]
            asks.append((f"Find all variables that are assigned the value {values[c]} in the text above.",
                         f"Answer: According to the chains of variable assignments in the text above, 5 variables "
                         f"are assigned the value {values[c]}, they are:", tuple(chain)))
        return inserts, asks, "Memorize and track the chains of variable assignments hidden in the following text."
    raise ValueError(task)


def needle_docs(b: Builder, task: str, length: int, n: int, per_doc: int, seed: int) -> list[Question]:
    """n questions over ceil(n / per_doc) documents, each with its own needles (and, for real text,
    its own corpus window); variable tracking sits in the repeated sentence, as in RULER."""
    out = []
    for d in range(math.ceil(n / per_doc)):
        rng = doc_rng(seed, task, length, d)
        inserts, asks, instruction = _needle_doc(b, task, rng, min(per_doc, n - d * per_doc))
        start = rng.randrange(len(b.paras))

        def make(budget):
            units = b.repeat_units(budget) if task == "vt" else b.text_units(rng, budget, start)
            joiner = " " if task == "vt" else "\n\n"
            return [Question(task, b.prompt(instruction, units, joiner, inserts, question, answer), expected,
                             MAX_NEW[task], d) for question, answer, expected in asks]
        out += b.fit(make, length)
    return out


def qa_docs(b: Builder, length: int, n: int, per_doc: int, seed: int) -> list[Question]:
    """Every FACT planted at drawn depths of a real-text window; each of its phrasings is a question."""
    out = []
    for d in range(math.ceil(n / per_doc)):
        rng = doc_rng(seed, "qa", length, d)
        asks = [(f, q) for f in FACTS for q in f.questions]
        rng.shuffle(asks)
        asks, inserts, start = asks[:min(per_doc, n - d * per_doc)], [(rng.random(), f.sentence) for f in FACTS], \
            rng.randrange(len(b.paras))

        def make(budget):
            units = b.text_units(rng, budget, start)
            return [Question("qa", b.prompt("Answer the question using the documents below. Give only the answer.",
                                            units, "\n\n", inserts, f"Question: {q}", "Answer:"),
                             f.keys, MAX_NEW["qa"], d, fact=f) for f, q in asks]
        out += b.fit(make, length)
    return out


def word_docs(b: Builder, task: str, length: int, n: int, seed: int) -> list[Question]:
    """One document per sample. cwe: a numbered list where 10 real words appear 30 times and the
    others 3 times (RULER's counts; below ~12K entries the 10 appear fewer times, at least 6). fwe:
    coded text of random 5-letter words with Zipf (a = 2) counts, asking the 3 most frequent."""
    out = []
    for d in range(n):
        rng = doc_rng(seed, task, length, d)
        order = rng.random()  # seeds the shuffle, the same in every fitting round
        if task == "cwe":
            words = rng.sample(b.vocab, len(b.vocab))
            per_entry = sum(b.tokens(f" {1000 + i}. {w}") for i, w in enumerate(words[:50])) / 50

            def make(budget):
                entries = budget / per_entry
                common = max(6, min(30, int(entries / 40)))  # RULER's 30, fewer where 300 entries do not fit
                rare = max(0, int((entries - 10 * common) / 3))
                if rare > len(words) - 10:
                    raise RuntimeError(f"the corpus has {len(words)} words, too few for cwe at {length} tokens")
                entries = words[:10] * common + words[10:10 + rare] * 3
                random.Random(order).shuffle(entries)
                listing = " ".join(f"{i + 1}. {w}" for i, w in enumerate(entries))
                return [Question(task, b.prompt("Below is a numbered list of words. Some of them appear more often "
                                                "than the others: remember which.", [listing], "", [],
                                                "What are the 10 most common words in the list above?",
                                                "Answer: The 10 words that appear most often in the list are:"),
                                 tuple(words[:10]), MAX_NEW[task], d)]
        else:
            coded = list(dict.fromkeys("".join(rng.choices(string.ascii_lowercase, k=5)) for _ in range(600)))[:500]
            weights = [1 / r ** 2 for r in range(1, len(coded) + 1)]
            per_word = sum(b.tokens(" " + w) for w in coded[:50]) / 50

            def make(budget):
                total = max(40, int(budget / per_word))
                counts = [round(total * w / sum(weights)) for w in weights]
                text = [w for w, c in zip(coded, counts) for _ in range(c)]
                random.Random(order).shuffle(text)
                return [Question(task, b.prompt("Read the following coded text and keep track of how often each "
                                                "coded word appears.", [" ".join(text)], "", [],
                                                "What are the three most frequently appearing coded words in the coded "
                                                "text above?", "Answer: According to the coded text above, the three "
                                                "most frequently appearing coded words are:"),
                                 tuple(coded[:3]), MAX_NEW[task], d)]
        out += b.fit(make, length)
    return out


def generate(b: Builder, task: str, length: int, n: int, per_doc: int, seed: int) -> list[Question]:
    """The n samples of a task at a length, in the order that shares the most prefill."""
    if task.startswith("niah_single"):
        return single_needle(b, task, length, n, seed)
    if task in ("niah_multikey", "niah_multivalue", "niah_multiquery", "vt"):
        return needle_docs(b, task, length, n, per_doc, seed)
    if task == "qa":
        return qa_docs(b, length, n, per_doc, seed)
    if task in ("cwe", "fwe"):
        return word_docs(b, task, length, n, seed)
    raise ValueError(f"unknown task {task!r}; tasks: {', '.join(TASKS)}")
