"""Saved prefills on the command line: chat's document cache, `kvretrieve prefill` and `chat --resume`,
`kvretrieve cache list|clear`, and what a damaged, foreign or unwritable save does (one line, the chat
goes on or the command exits 1)."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from test_cli import DOC, FAST, assert_user_error, run

SMALL = [*FAST, "--max-context", "1024", "--max-new-tokens", "12"]
QUESTION = "Who was the first keeper of the lighthouse?\n"


def chat(*args):
    result = run("chat", *args, *SMALL, input=QUESTION)
    assert result.exit_code == 0, result.output
    return result


def answer(result) -> str:
    return result.stdout.strip()


def saves(root: Path) -> list[Path]:
    return sorted(root.glob("*.kvr"))


def test_chat_saves_its_documents_and_reopens_them_next_time(smol_dir, tmp_path):
    root = Path(os.environ["KVRETRIEVE_DOC_CACHE"])
    first = chat("-d", str(DOC))
    assert "saved for next time" in first.stderr and len(saves(root)) == 1
    second = chat("-d", str(DOC))
    assert "reopened their saved prefill" in second.stderr and "prefill:" not in second.stderr
    assert answer(second) == answer(first) == answer(chat("-d", str(DOC), "--no-doc-cache"))
    listed = run("cache", "list")
    assert listed.exit_code == 0 and saves(root)[0].name in listed.stdout and "1 saved" in listed.stderr
    other = tmp_path / "other.txt"
    other.write_text(DOC.read_text().replace("Ellory", "Marlowe"))
    assert "saved for next time" in chat("-d", str(other)).stderr and len(saves(root)) == 2
    assert "saved for next time" in chat("-d", str(DOC), "--retrieval", "lowrank").stderr  # another layout
    assert len(saves(root)) == 3
    cleared = run("cache", "clear")
    assert cleared.exit_code == 0 and "removed 3 saved prefills" in cleared.stderr and saves(root) == []
    chat("-d", str(DOC), "--no-doc-cache")
    assert saves(root) == []


def test_the_cap_evicts_the_least_recently_used_and_refuses_what_cannot_fit(smol_dir, tmp_path):
    root = Path(os.environ["KVRETRIEVE_DOC_CACHE"])
    docs = []
    for i, name in enumerate(("Marlowe", "Quill", "Stroud")):
        docs.append(tmp_path / f"d{i}.txt")
        docs[-1].write_text(DOC.read_text().replace("Ellory", name))
    chat("-d", str(docs[0]))
    one = sum(p.stat().st_size for p in saves(root)[0].iterdir())
    cap = ["--doc-cache-gb", str(2.5 * one / 2**30)]  # room for two
    chat("-d", str(docs[1]), *cap)
    first_save = {p.name for p in saves(root)}
    chat("-d", str(docs[0]), *cap)  # used again: now docs[1] is the least recently used
    chat("-d", str(docs[2]), *cap)
    kept = {p.name for p in saves(root)}
    assert len(kept) == 2 and len(first_save - kept) == 1
    assert "reopened" in chat("-d", str(docs[0]), *cap).stderr
    assert "saved for next time" in chat("-d", str(docs[1]), *cap).stderr  # it was the one evicted
    tiny = chat("-d", str(DOC), "--doc-cache-gb", str(one / 4 / 2**30))
    assert "not kept" in tiny.stderr and "--doc-cache-gb" in tiny.stderr
    assert_user_error(run("chat", "-d", str(DOC), "--doc-cache-gb", "0", *SMALL, input=QUESTION), "doc_cache_gb")


def test_a_damaged_save_in_the_cache_is_prefilled_again_and_replaced(smol_dir):
    root = Path(os.environ["KVRETRIEVE_DOC_CACHE"])
    want = answer(chat("-d", str(DOC)))
    part = saves(root)[0] / "part-000.safetensors"
    part.write_bytes(part.read_bytes()[:-10])
    again = chat("-d", str(DOC))
    assert "could not be reopened" in again.stderr and "cut short" in again.stderr
    assert "saved for next time" in again.stderr and answer(again) == want
    assert "reopened their saved prefill" in chat("-d", str(DOC)).stderr


def test_an_unwritable_cache_leaves_the_chat_going(smol_dir, tmp_path, monkeypatch):
    blocked = tmp_path / "file-not-folder"
    blocked.write_text("x")
    monkeypatch.setenv("KVRETRIEVE_DOC_CACHE", str(blocked / "documents"))
    result = chat("-d", str(DOC))
    assert "not saved for next time" in result.stderr and "Margaret" in answer(result)


def test_prefill_then_chat_resume_answers_as_chat_with_the_document(smol_dir, tmp_path):
    out = tmp_path / "light.kvr"
    made = run("prefill", "-d", str(DOC), "--system", "Be brief.", "-o", str(out), *FAST, "--max-context", "1024")
    assert made.exit_code == 0, made.output
    assert f"chat --resume {out}" in made.stdout and (out / "chat.json").is_file()
    resumed = chat("--resume", str(out))
    assert f"reopened {out}" in resumed.stderr and "prefill:" not in resumed.stderr.split("reopened")[0]
    assert answer(resumed) == answer(chat("-d", str(DOC), "--system", "Be brief.", "--no-doc-cache"))


def test_resume_mistakes_give_one_line(smol_dir, tmp_path):
    out = tmp_path / "light.kvr"
    assert run("prefill", "-d", str(DOC), "-o", str(out), *FAST, "--max-context", "1024").exit_code == 0
    assert_user_error(run("chat", "--resume", str(tmp_path / "nope.kvr"), *SMALL, input=QUESTION),
                      "no saved prefill at")
    assert_user_error(run("chat", "--resume", str(out), *SMALL, "--retrieval", "lowrank", input=QUESTION),
                      "saved with dense attention, this model runs retrieval")
    assert_user_error(run("chat", "--resume", str(out), *SMALL, "--max-context", "128", input=QUESTION),
                      "holds 326 tokens", "--max-context >= 326")
    both = run("chat", "--resume", str(out), "-d", str(DOC), *SMALL, input=QUESTION)
    assert both.exit_code == 2 and "--resume alone" in both.output
    assert_user_error(run("prefill", "-d", str(tmp_path / "missing.txt"), *FAST), "missing.txt")
    (out / "chat.json").unlink()
    assert_user_error(run("chat", "--resume", str(out), *SMALL, input=QUESTION), "chat.json is missing")


@pytest.mark.parametrize("args", [["prefill", "--help"], ["cache", "--help"], ["cache", "list", "--help"]])
def test_help_describes_every_option(args):
    result = run(*args)
    assert result.exit_code == 0 and "Usage:" in result.output
