"""Saved prefills (kvretrieve.persist, store/saved.py): a reopened KV cache decodes exactly as the one
that was saved, for dense and every index kind; damaged, foreign and half-written saves are refused
with a clear message and leave the session usable."""
from __future__ import annotations

import json
import mmap
import shutil
from pathlib import Path

import pytest
import torch

import kvretrieve
from kvretrieve import RetrievalConfig
from kvretrieve.errors import SavedPrefillError
from kvretrieve.store import saved as saved_mod

from helpers import save_with_tokenizer, tiny_hf_model

SMALL = dict(block_size=4, budget_tokens=32, window_tokens=16, sink_tokens=4, rank=8, cluster_tokens=256)
CONFIGS = {
    "dense": None,
    "lowrank": RetrievalConfig(index="lowrank", block_scores="max", **SMALL),
    "lowrank-mass-int8": RetrievalConfig(index="lowrank", block_scores="mass", store_dtype="int8", **SMALL),
    "bounds": RetrievalConfig(index="bounds", **SMALL),
    "exact-zone": RetrievalConfig(index="exact", estimate_tokens=16, estimate_rest=False, **SMALL),
    "ivf-int8": RetrievalConfig(index="ivf", store_dtype="int8", **SMALL),
    "lowrank-dense-first": RetrievalConfig(index="lowrank", block_scores="max", dense_layers=1, **SMALL),
    "lowrank-token-rest": RetrievalConfig(index="lowrank", block_scores="mass", rest_rank=4, **SMALL),
}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, smol_dir):
    """A tiny random model with the default model's tokenizer (saved prefills fingerprint both)."""
    out = tmp_path_factory.mktemp("tiny-persist")
    return save_with_tokenizer(tiny_hf_model(vocab=49152, max_pos=8192, layers=3, heads=8, kv_heads=2, seed=5), out,
                               smol_dir)


def load(model_dir, cfg, max_context=1024, **kw):
    return kvretrieve.load(model_dir, device="cpu", dtype=kw.pop("dtype", "float32"), max_context=max_context,
                           retrieval=cfg, **kw)


def prompt(n: int, seed: int = 0) -> list[int]:
    return torch.randint(0, 49152, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def greedy(llm, logits: torch.Tensor, steps: int, follow_up: list[int]) -> list[torch.Tensor]:
    """Logits of `steps` greedy decode steps, then of a multi-token continuation (a follow-up question)
    that the prefix cache appends, then of one more step."""
    out, token = [logits], logits.argmax()
    for _ in range(steps):
        out.append(llm.engine.step(token))
        token = out[-1].argmax()
    out.append(llm.prefill(llm.cached_ids + follow_up))
    out.append(llm.engine.step(out[-1].argmax()))
    return out


@pytest.mark.parametrize("name", list(CONFIGS))
def test_a_reopened_prefill_decodes_exactly_as_the_saved_one(tiny, tmp_path, name):
    """Prefill 613 tokens (a partly filled tail block; ivf clusters two segments), save, go on; a fresh
    LLM that reopens the save goes on with bitwise the same logits; so does one of another capacity
    (its store segments and pool tables sized differently), against a prefill at that capacity."""
    ids, follow = prompt(613), prompt(37, seed=1)
    a = load(tiny, CONFIGS[name])
    logits = a.prefill(ids)
    info = a.save(tmp_path / "doc.kvr")
    assert info.tokens == 613 and info.bytes == sum(p.stat().st_size for p in (tmp_path / "doc.kvr").iterdir()
                                                    if p.name != "manifest.json")
    want = greedy(a, logits, 20, follow)
    b = load(tiny, CONFIGS[name], resume=tmp_path / "doc.kvr")
    assert b.cached_ids == ids and b.engine.length == 613
    got = greedy(b, logits, 20, follow)
    assert all(torch.equal(x, y) for x, y in zip(want, got)), name
    wide = load(tiny, CONFIGS[name], max_context=2048)
    want = greedy(wide, wide.prefill(ids), 20, follow)
    c = load(tiny, CONFIGS[name], max_context=2048, resume=tmp_path / "doc.kvr")
    assert all(torch.equal(x, y) for x, y in zip(want, greedy(c, logits, 20, follow))), name


def test_a_save_after_decoding_and_a_truncation_reopens_what_the_cache_held(tiny, tmp_path):
    """Saved mid-conversation (after decode steps filled blocks, and a truncation), the reopened cache
    holds what the live one held: the ids up to the cache's length, and the same next logits."""
    cfg = CONFIGS["ivf-int8"]
    a = load(tiny, cfg)
    a.generate(" ".join(["lighthouse"] * 400), max_new_tokens=30)
    a.prefill(a.cached_ids[:-45])  # a truncation (past a block boundary) and one token run again
    a.save(tmp_path / "mid.kvr")
    b = load(tiny, cfg, resume=tmp_path / "mid.kvr")
    follow = prompt(9, seed=2)
    assert b.cached_ids == a.cached_ids
    assert torch.equal(a.prefill(a.cached_ids + follow), b.prefill(b.cached_ids + follow))


def damage(path: Path, how: str) -> None:
    part = path / "part-000.safetensors"
    if how == "truncated":
        part.write_bytes(part.read_bytes()[:-100])
    elif how == "flipped":
        data = bytearray(part.read_bytes())
        data[len(data) // 2] ^= 0xFF
        part.write_bytes(bytes(data))
    elif how == "no manifest":
        (path / "manifest.json").unlink()
    elif how == "bad manifest":
        (path / "manifest.json").write_text("{not json")
    elif how == "missing part":
        part.unlink()
    elif how == "format version":
        m = json.loads((path / "manifest.json").read_text())
        (path / "manifest.json").write_text(json.dumps(m | {"format_version": 99}))


@pytest.mark.parametrize("how,message", [("truncated", "cut short"), ("flipped", "does not match its checksum"),
                                         ("no manifest", "has no manifest.json"), ("bad manifest", "damaged manifest"),
                                         ("missing part", "is missing"), ("format version", "format version 99")])
def test_a_damaged_save_is_refused_and_the_session_goes_on(tiny, tmp_path, how, message):
    a = load(tiny, CONFIGS["lowrank"])
    ids = prompt(300)
    a.prefill(ids)
    a.save(tmp_path / "d.kvr")
    damage(tmp_path / "d.kvr", how)
    with pytest.raises(SavedPrefillError, match=message):
        a.resume(tmp_path / "d.kvr")
    assert a.cached_ids == ids  # refused before anything was loaded: the session's cache is as it was
    fresh = load(tiny, CONFIGS["lowrank"])
    fresh.prefill(ids)
    more = ids + prompt(20, seed=3)
    assert torch.equal(a.prefill(more), fresh.prefill(more))
    with pytest.raises(SavedPrefillError, match="no saved prefill at"):
        a.resume(tmp_path / "nowhere.kvr")


def test_a_save_in_many_parts_reopens_whole_and_checks_every_part(tiny, tmp_path, monkeypatch):
    """Pieces of parts are what the checksums run in parallel over: a save cut into many parts reopens
    to the same logits, and a byte changed inside a later piece of a part is caught."""
    monkeypatch.setattr(saved_mod, "PART_BYTES", 16 << 10)
    monkeypatch.setattr(saved_mod, "PIECE_BYTES", mmap.ALLOCATIONGRANULARITY)
    a = load(tiny, CONFIGS["lowrank-mass-int8"])
    ids, follow = prompt(300), prompt(9, seed=4)
    a.prefill(ids)
    a.save(tmp_path / "many.kvr")
    parts = sorted((tmp_path / "many.kvr").glob("part-*.safetensors"))
    assert len(parts) > 4
    b = load(tiny, CONFIGS["lowrank-mass-int8"], resume=tmp_path / "many.kvr")
    assert torch.equal(a.prefill(ids + follow), b.prefill(ids + follow))
    files = json.loads((tmp_path / "many.kvr" / "manifest.json").read_text())["files"]
    part = max(parts, key=lambda p: len(files[p.name]["crc32"]))  # the part cut into the most pieces
    assert len(files[part.name]["crc32"]) >= 3
    data = bytearray(part.read_bytes())
    data[mmap.ALLOCATIONGRANULARITY + 100] ^= 0xFF
    part.write_bytes(bytes(data))
    with pytest.raises(SavedPrefillError, match=f"{part.name} does not match its checksum"):
        b.resume(tmp_path / "many.kvr")


def test_a_prompt_that_starts_with_a_saved_document_reopens_it(tiny, tmp_path):
    """With a document cache, a prompt that starts with a saved prefill's tokens reopens it instead of
    prefilling them (reused_tokens) and answers as a session that had prefilled the document itself;
    a damaged save, or no cache, means a prefill and the same answer."""
    from kvretrieve.doc_cache import DocumentCache
    from kvretrieve.persist import document_key

    cfg = CONFIGS["lowrank"]
    text = " ".join(f"The keeper of light {i} wrote that the lamp burned {i % 7} hours." for i in range(60))
    question = text + "\n\nHow many hours did lamp 12 burn?"
    a = load(tiny, cfg)
    doc = a.tokenize(text)
    assert a.tokenize(question)[:len(doc)] == doc and len(doc) > 256 + 64
    a.prefill(doc)
    cache = DocumentCache(tmp_path / "docs")
    path = cache.path_for(document_key(a, doc))
    a.save(path)
    want = a.generate(question, max_new_tokens=6, return_details=True)  # the document was in its live cache
    b = load(tiny, cfg)
    b.document_cache = cache
    got = b.generate(question, max_new_tokens=6, return_details=True)
    assert got.reused_tokens == len(doc) and got.token_ids == want.token_ids
    plain = load(tiny, cfg).generate(question, max_new_tokens=6, return_details=True)
    assert plain.reused_tokens == 0 and plain.token_ids == want.token_ids
    damage(path, "flipped")
    c = load(tiny, cfg)
    c.document_cache = cache
    passed_over = c.generate(question, max_new_tokens=6, return_details=True)
    assert passed_over.reused_tokens == 0 and passed_over.token_ids == want.token_ids


def test_a_save_from_another_model_dtype_layout_or_a_shorter_context_is_refused(tiny, tmp_path):
    a = load(tiny, CONFIGS["lowrank"])
    a.prefill(prompt(300))
    a.save(tmp_path / "s.kvr")
    cases = [(dict(dtype="bfloat16"), CONFIGS["lowrank"], "saved with dtype float32, this model runs bfloat16"),
             ({}, RetrievalConfig(index="lowrank", **(SMALL | {"block_size": 8, "cluster_tokens": 512})), r"block_size=4 \(here 8\)"),
             ({}, CONFIGS["bounds"], r"index='lowrank' \(here 'bounds'\)"),
             ({}, CONFIGS["lowrank-dense-first"], r"dense_layers=None \(here 1\)"),
             ({}, RetrievalConfig(index="lowrank", rest_rank=4, **SMALL), r"rest_rank=16 \(here 4\)"),
             ({}, None, "saved with retrieval attention, this model runs dense"),
             (dict(max_context=256), CONFIGS["lowrank"], "holds 300 tokens but this context holds 256")]
    for kw, cfg, message in cases:
        with pytest.raises(SavedPrefillError, match=message):
            load(tiny, cfg, **{"max_context": 1024, **kw}).resume(tmp_path / "s.kvr")
    other = save_with_tokenizer(tiny_hf_model(vocab=49152, max_pos=4096, layers=3, heads=8, kv_heads=2, seed=6),
                                tmp_path / "other", tiny)
    with pytest.raises(SavedPrefillError, match="saved with another model"):
        load(other, CONFIGS["lowrank"]).resume(tmp_path / "s.kvr")
    retemplated = tmp_path / "retemplated"  # the same weights, another chat template
    shutil.copytree(tiny, retemplated)
    (retemplated / "chat_template.jinja").write_text("{% for m in messages %}{{ m.content }}{% endfor %}")
    with pytest.raises(SavedPrefillError, match="saved with another tokenizer"):
        load(retemplated, CONFIGS["lowrank"]).resume(tmp_path / "s.kvr")


@pytest.mark.parametrize("failure", [KeyboardInterrupt, OSError(28, "No space left on device")])
def test_an_interrupted_or_failed_save_leaves_nothing_behind(tiny, tmp_path, monkeypatch, failure):
    """Ctrl-C or a full disk part-way through writing: no folder under the name, no temporary beside
    it; an earlier save under that name stays whole."""
    a = load(tiny, CONFIGS["lowrank"])
    a.prefill(prompt(300))
    a.save(tmp_path / "keep.kvr")
    before = sorted(p.name for p in (tmp_path / "keep.kvr").iterdir())
    real, calls = saved_mod.save_file, []

    def failing(tensors, filename, *args, **kw):
        real(tensors, filename, *args, **kw)  # a part lands, then the failure
        calls.append(filename)
        raise failure
    monkeypatch.setattr(saved_mod, "save_file", failing)
    for name in ("new.kvr", "keep.kvr"):
        with pytest.raises(KeyboardInterrupt if failure is KeyboardInterrupt else SavedPrefillError):
            a.save(tmp_path / name)
    assert len(calls) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep.kvr"]
    assert sorted(p.name for p in (tmp_path / "keep.kvr").iterdir()) == before
    monkeypatch.undo()
    load(tiny, CONFIGS["lowrank"]).resume(tmp_path / "keep.kvr")  # still whole: its checksums hold


def test_an_interrupted_reopen_leaves_an_empty_cache(tiny, tmp_path, monkeypatch):
    cfg = CONFIGS["ivf-int8"]
    a = load(tiny, cfg)
    ids = prompt(613)
    want = a.prefill(ids)
    a.save(tmp_path / "s.kvr")
    b = load(tiny, cfg)
    b.prefill(prompt(100, seed=4))
    real, reads = saved_mod.SavedPrefill.tensor, []

    def interrupted(self, name):
        reads.append(name)
        if len(reads) == 12:
            raise KeyboardInterrupt
        return real(self, name)
    monkeypatch.setattr(saved_mod.SavedPrefill, "tensor", interrupted)
    with pytest.raises(KeyboardInterrupt):
        b.resume(tmp_path / "s.kvr")
    assert b.cached_tokens == 0 and b.engine.length == 0
    monkeypatch.undo()
    assert torch.equal(b.prefill(ids), want)  # a fresh prefill after it is a fresh prefill


def test_saving_an_empty_cache_is_refused(tiny, tmp_path):
    with pytest.raises(SavedPrefillError, match="the KV cache is empty"):
        load(tiny, None).save(tmp_path / "e.kvr")
    assert not (tmp_path / "e.kvr").exists()


def test_a_reopened_store_maps_whole_segments_from_the_file_and_never_writes_it(tiny, tmp_path):
    """On the CPU, a reopened store keeps the saved file's whole segments as copy-on-write mappings
    (no copy at reopen); decoding and a rewrite into them (a truncated, re-prefilled document) give what
    the saved session gives, and the file stays as saved (its checksums hold for the next reopen)."""
    cfg = RetrievalConfig(index="lowrank", store_dtype="int8", **SMALL)
    ids, other = prompt(4200), prompt(300, seed=5)  # blocks of 4: the first 1,024-block segment is full
    a = load(tiny, cfg, max_context=5000)
    logits = a.prefill(ids)
    a.save(tmp_path / "big.kvr")
    b = load(tiny, cfg, max_context=5000, resume=tmp_path / "big.kvr")
    manifest = json.loads((tmp_path / "big.kvr" / "manifest.json").read_text())
    part = tmp_path / "big.kvr" / manifest["tensors"]["kv.store.0.0"]
    store = b.engine.backend.store
    assert store.segments[0][0].untyped_storage().nbytes() == part.stat().st_size  # the file's mapping
    assert store.scales[0][0].untyped_storage().nbytes() == \
        (tmp_path / "big.kvr" / manifest["tensors"]["kv.store.0.0.scale"]).stat().st_size
    want = greedy(a, logits, 12, other[:20])
    assert all(torch.equal(x, y) for x, y in zip(want, greedy(b, logits, 12, other[:20])))
    rewritten = ids[:2000] + other  # blocks 500.. of segment 0 are written again
    assert torch.equal(a.prefill(rewritten), b.prefill(rewritten))
    c = load(tiny, cfg, max_context=5000, resume=tmp_path / "big.kvr")  # verify=True: the file is intact
    assert torch.equal(c.prefill(ids + other[:5]), load(tiny, cfg, max_context=5000,
                                                        resume=tmp_path / "big.kvr").prefill(ids + other[:5]))
