"""The measuring half of bench/accuracy.py: real texts, KV replay, batched decode steps over several
attention backends, the attention probe (recall, output error) and the needle prompts.

Several configurations share one model: a decode step runs one row per configuration through the
model's decode math as a batch, and each row's attention goes to its own backend in decode mode
(begin(pos, 1), prologue(), then the backend's decode call), exactly as Engine.step drives it. The projections and the MLP then read the
weights once per step instead of once per configuration, which is most of the cost on a CPU.
"""
from __future__ import annotations

import importlib
import inspect
import math
from dataclasses import dataclass, field

import torch

from kvretrieve.kernels import rms_norm

# Stdlib modules whose docstrings form the needle haystack: prose-heavy ones, in a fixed order so
# the haystack is the same on every run of one Python version.
HAYSTACK_MODULES = ("pdb", "re", "statistics", "json", "argparse", "http.client", "urllib.request", "csv",
                    "heapq", "itertools", "copy", "unittest", "inspect", "doctest", "subprocess", "ftplib",
                    "typing", "random", "sqlite3", "smtplib", "difflib", "collections", "optparse", "string")


def pydoc_text() -> str:
    """CPython's reference documentation (the pydoc topics), the text whose continuation is scored.
    Topics that repeat an earlier one's passages are left out: a continuation the model can copy
    verbatim from its context would measure copying, not language modelling."""
    import pydoc_data.topics as topics

    kept, seen = [], ""
    for text in topics.topics.values():
        if not any(text[i:i + 200] in seen for i in range(0, len(text) - 200, 200)):
            kept.append(text)
            seen += "\n\n" + text
    return "\n\n".join(kept)


def haystack_paragraphs() -> list[str]:
    out = []
    for name in HAYSTACK_MODULES:
        doc = inspect.getdoc(importlib.import_module(name)) or ""
        out += [p.strip() for p in doc.split("\n\n") if p.strip()]
    return out


@dataclass(frozen=True)
class Fact:
    sentence: str
    questions: tuple[str, ...]
    keys: tuple[str, ...]       # every one must appear in a correct answer (case-insensitive)


# The planted facts: the only text in this benchmark not taken from a real document.
FACTS = (
    Fact("The secret passphrase of the lighthouse keeper is 'amber falcon'.",
         ("What is the secret passphrase of the lighthouse keeper?",
          "Which passphrase does the lighthouse keeper use?"), ("amber", "falcon")),
    Fact("The blue notebook was left in room 417 of the Marlowe Hotel.",
         ("In which room of the Marlowe Hotel was the blue notebook left?",
          "Where was the blue notebook left? Give the room number."), ("417",)),
    Fact("Doctor Ingrid Solberg's favourite fruit is the persimmon.",
         ("What is Doctor Ingrid Solberg's favourite fruit?",
          "Which fruit does Doctor Ingrid Solberg like best?"), ("persimmon",)),
    Fact("The ferry to Kestrel Island leaves every morning from pier number 12.",
         ("From which pier does the ferry to Kestrel Island leave?",
          "Which pier number does the Kestrel Island ferry depart from?"), ("12",)),
    Fact("The name of the mayor's old grey cat is Biscuit.",
         ("What is the name of the mayor's cat?",
          "What is the mayor's old grey cat called?"), ("biscuit",)),
)


@dataclass
class NeedlePrompt:
    ids: list[int]
    fact: Fact
    question: str
    depth: float                # where the fact sits, as a share of the haystack tokens


def needle_prompts(tokenizer, context: int, depths, n_phrasings: int, reserve: int = 16) -> list[NeedlePrompt]:
    """One haystack filling `context` tokens (prompt + answer) with FACTS[i] planted at depths[i];
    each fact asked in n_phrasings ways, one question per prompt. All prompts share the document, so
    one dense prefill serves them all (one haystack per fact would cost 3.4 prefills of 8K)."""
    facts, paras = FACTS[:len(depths)], haystack_paragraphs()
    lengths = [len(tokenizer.encode(p + "\n\n")) for p in paras]
    longest = max((q for f in facts for q in f.questions[:n_phrasings]), key=lambda q: len(tokenizer.encode(q)))

    def build(n: int):
        starts = [sum(lengths[:j]) for j in range(n + 1)]
        cuts = [min(range(n + 1), key=lambda j: abs(starts[j] - d * starts[-1])) for d in depths]
        doc = list(paras[:n])
        for cut, fact in sorted(zip(cuts, facts), key=lambda x: -x[0]):  # from the back: earlier cuts stay valid
            doc.insert(cut, fact.sentence)
        return "\n\n".join(doc), [starts[c] / starts[-1] for c in cuts]

    def prompt(doc: str, question: str) -> list[int]:
        return tokenizer.encode_chat([{"role": "user", "content": f"{doc}\n\n{question} Answer briefly."}])

    lo, hi = 1, len(paras)  # the most paragraphs whose longest prompt fits, by bisection
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if len(prompt(build(mid)[0], longest)) <= context - reserve else (lo, mid - 1)
    doc, where = build(lo)
    return [NeedlePrompt(prompt(doc, q), fact, q, w)
            for fact, w in zip(facts, where) for q in fact.questions[:n_phrasings]]


def is_correct(answer: str, fact: Fact) -> bool:
    return all(k in answer.lower() for k in fact.keys)


# ---- running several backends as one batch --------------------------------------------------------------
class FanOut:
    """The attention callable of a batched decode step: row i's q, k, v go to backend i."""

    def __init__(self, backends):
        self.backends = backends

    def __call__(self, layer, q, k, v):
        return torch.cat([b.decode(layer, q[i:i + 1], k[i:i + 1], v[i:i + 1]) for i, b in enumerate(self.backends)])


@torch.inference_mode()
def batched_step(model, backends, tokens: torch.Tensor, pos: int) -> torch.Tensor:
    """Append tokens[i] at position pos to backend i (a decode step for each); returns logits [K, V].

    The layer math is Decoder.layer's decode path with K rows instead of one (the model's own
    projection, MLP and norm functions); rows only meet in the matmuls, which treat them apart.
    tests/test_accuracy_quick.py checks the logits against Engine.step.
    """
    for b in backends:
        b.begin(pos, 1)
        b.prologue()
    x, eps, fan = model.embed(tokens), model.cfg.rms_eps, FanOut(backends)
    cos, sin = (t.expand(len(backends), -1) for t in model.rope_tables(pos, 1))
    for layer in range(model.cfg.num_layers):
        w = model.w.layers[layer]
        q, k, v = model.project_qkv(layer, rms_norm(x, w.attn_norm, eps), cos, sin)
        x += model.linear(fan(layer, q, k, v).reshape(len(backends), -1), w.o, w.o_bias)
        x += model.mlp(layer, rms_norm(x, w.mlp_norm, eps))
    for b in backends:
        b.commit(pos + 1)
    return model.logits(x)


@torch.inference_mode()
def replay(backend, dense, n: int) -> None:
    """Give a retrieval backend the prefill of tokens 0..n-1 from a dense cache holding them.

    Retrieval prefill is dense attention, so its K,V equal the dense ones; handing them over with
    the segment protocol (begin_layer, end_layer) builds what a real prefill builds (store, index,
    sinks, window) and skips the attention, whose output only the next layer would need.
    """
    backend.begin(0, n)
    for layer in range(backend.L):
        backend.begin_layer(layer, dense.k[layer, :, :n].transpose(0, 1), dense.v[layer, :, :n].transpose(0, 1))
        backend.end_layer(layer)
    backend.commit(n)


@dataclass
class Probe:
    """Observer of one retrieval backend: on active steps, recomputes dense attention from the
    layer's full K,V and measures what the selected set keeps of it."""

    backend: object
    active: bool = False
    recall: list = field(default_factory=list)     # per layer: sums over sampled steps
    err: list = field(default_factory=list)
    count: list = field(default_factory=list)
    attended: float = 0.0
    samples: int = 0
    heads: list | None = None  # [] to keep every call's (layer, kept mass [Hkv, G]) as well

    def __post_init__(self):
        L = self.backend.L
        self.recall, self.err, self.count = [0.0] * L, [0.0] * L, [0] * L
        self.backend.observer = self

    @torch.inference_mode()
    def __call__(self, layer, q, ids, lo, hi, n, out):
        if not self.active:
            return
        b = self.backend
        H, bs, d = b.H, b.bs, q.shape[-1]
        k, v = b.layer_kv(layer, n)
        p = (torch.einsum("hgd,nhd->hgn", q.float().view(H, -1, d), k.float()) * b.scale).softmax(-1)
        keep = torch.zeros(H, n, dtype=torch.bool)
        keep[:, :lo * bs] = True
        keep[:, hi * bs:] = True
        if ids.numel():
            tok = torch.as_tensor(ids).cpu()[:, :, None] * bs + torch.arange(bs)
            keep.scatter_(1, tok.reshape(H, -1), True)
        dense_out = torch.einsum("hgn,nhd->hgd", p, v.float()).reshape(out.shape)
        kept = (p * keep[:, None]).sum(-1)
        if self.heads is not None:
            self.heads.append((layer, kept))
        self.recall[layer] += kept.mean().item()
        self.err[layer] += ((out.float() - dense_out).norm() / dense_out.norm()).item()
        self.count[layer] += 1
        self.attended += keep.sum(1).float().mean().item()
        self.samples += 1

    def summary(self) -> dict:
        rec = [r / max(1, c) for r, c in zip(self.recall, self.count)]
        err = [e / max(1, c) for e, c in zip(self.err, self.count)]
        return {"attn_recall": sum(rec) / len(rec), "attn_recall_min_layer": min(rec),
                "out_rel_err": sum(err) / len(err), "out_rel_err_max_layer": max(err),
                "attended_tokens": self.attended / max(1, self.samples), "probe_steps": max(self.count),
                "attn_recall_layers": [round(r, 4) for r in rec], "out_rel_err_layers": [round(e, 4) for e in err]}


def token_metrics(dense_logits: torch.Tensor, sparse_logits: torch.Tensor, targets: torch.Tensor) -> dict:
    """Teacher-forced comparison over positions: top-1 agreement, mean KL(dense || sparse) and the
    perplexity of the targets under each."""
    ld, ls = dense_logits.float().log_softmax(-1), sparse_logits.float().log_softmax(-1)
    kl = (ld.exp() * (ld - ls)).sum(-1)
    nll_d = -ld.gather(1, targets[:, None]).mean().item()
    nll_s = -ls.gather(1, targets[:, None]).mean().item()
    return {"top1_agree": (ld.argmax(-1) == ls.argmax(-1)).float().mean().item(), "kl": kl.mean().item(),
            "kl_max": kl.max().item(), "ppl_dense": math.exp(nll_d), "ppl": math.exp(nll_s),
            "positions": len(targets)}
