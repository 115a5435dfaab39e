"""Documents measured as they are read (kvretrieve.documents): chunked tokenization gives exactly the
ids of the whole text, files past the context are refused after their first chunk, in well under a
second and without reading them whole, and the CLI says so in one line."""
from __future__ import annotations

import io
import json
import time
import tracemalloc
from pathlib import Path

import pytest
from pydoc_data.topics import topics

from kvretrieve.documents import ReadProgress, read_document
from kvretrieve.errors import InputError
from kvretrieve.models.tokenizer import Tokenizer
from test_cli import FAST, assert_user_error, run

TEXT = "\n\n".join(topics.values())  # Python's reference text: 465K characters, ~113K SmolLM2 tokens
BIG = 1 << 30
REFUSE_S = 2.0  # measured 0.06 s for a 30 MB file with an 8K context (before: 108 s and 5.4 GiB)


@pytest.fixture(scope="module")
def tok(smol_dir):
    return Tokenizer(smol_dir, json.loads((smol_dir / "config.json").read_text()))


@pytest.fixture(scope="module")
def prepending_tok(tmp_path_factory):
    """A SentencePiece-style tokenizer (trained here on TEXT) that marks the start of every text it is
    given: a chunk tokenized on its own would start with a token the whole text does not have there."""
    from tokenizers import Tokenizer as Fast, models, pre_tokenizers, trainers

    fast = Fast(models.BPE(unk_token="[UNK]"))
    fast.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first")
    fast.train_from_iterator([TEXT[i:i + 10_000] for i in range(0, len(TEXT), 10_000)],
                             trainers.BpeTrainer(vocab_size=2000, special_tokens=["[UNK]"]))
    d = tmp_path_factory.mktemp("sp")
    fast.save(str(d / "tokenizer.json"))
    t = Tokenizer(d, {})
    assert t.encode("x\nWorld", add_special_tokens=False)[-2:] != t.encode("World", add_special_tokens=False)
    return t


VARIANTS = {
    "lines": TEXT,  # paragraphs of wrapped lines
    "paragraphs": "\n\n".join(p.replace("\n", " ") for p in TEXT.split("\n\n")),  # no single line breaks
    "crlf": TEXT.replace("\n", "\r\n"),
    "cjk": "\u4e00\u4e8c\u4e09 \u56db\u4e94\u516d\u3002\n" * 30_000,  # 3-byte characters cut by chunk edges
}


@pytest.mark.parametrize("variant", VARIANTS)
def test_chunked_ids_equal_the_whole_texts(tmp_path, tok, variant):
    text = VARIANTS[variant]
    path = tmp_path / "doc.txt"
    path.write_bytes(text.encode())
    whole = tok.encode(text, add_special_tokens=False)
    seen = []
    doc = read_document(path, tok, len(whole), chunk_bytes=4096, progress=lambda *a: seen.append(a))
    assert doc.text == text and doc.ids == whole
    assert len(seen) > 100 and 0 < seen[len(seen) // 2][2] < len(whole)  # counted as it was read
    assert read_document(path, tok, len(whole)).ids == whole  # the default chunks


def test_chunks_of_a_tokenizer_that_marks_text_starts(tmp_path, prepending_tok):
    path = tmp_path / "doc.txt"
    path.write_text(TEXT)
    whole = prepending_tok.encode(TEXT, add_special_tokens=False)
    assert read_document(path, prepending_tok, len(whole), chunk_bytes=4096).ids == whole


def _write_repeated(path: Path, size: int) -> None:
    with open(path, "w") as f:
        while f.tell() < size:
            f.write(TEXT)


def test_oversized_files_are_refused_after_their_first_chunk(tmp_path, tok):
    sparse, text_then_holes, text = tmp_path / "sparse.bin", tmp_path / "holes.txt", tmp_path / "big.txt"
    with open(sparse, "wb") as f:
        f.truncate(BIG)
    text_then_holes.write_text(TEXT)
    with open(text_then_holes, "r+b") as f:
        f.truncate(BIG)  # 1 GB whose first 465 KB are text: refused before it reaches the holes
    _write_repeated(text, 30_000_000)
    cases = {sparse: ["binary", "offset 0"],
             text_then_holes: ["over the 8,192-token context after its first", "all 1.1 GB of this file: about ",
                               "max_context"],
             text: ["over the 8,192-token context after its first", "MB of this file: about 7.", "M tokens",
                    "max_context"]}
    for path, fragments in cases.items():
        tracemalloc.start()
        t0 = time.perf_counter()
        with pytest.raises(InputError) as e:
            read_document(path, tok, 8192)
        elapsed, (_, peak) = time.perf_counter() - t0, tracemalloc.get_traced_memory()
        tracemalloc.stop()
        assert elapsed < REFUSE_S and peak < 16 << 20, (path, elapsed, peak)
        for fragment in fragments:
            assert fragment in str(e.value), str(e.value)
        if path != sparse:
            at_least = int(str(e.value).split("at least ")[1].split(" ")[0].replace(",", ""))
            assert 8192 < at_least < 8 * 8192


def test_earlier_documents_count_and_a_file_read_whole_is_counted_exactly(tmp_path, tok):
    path = tmp_path / "doc.txt"
    path.write_text(TEXT[:20_000])
    n = len(tok.encode(TEXT[:20_000], add_special_tokens=False))
    assert len(read_document(path, tok, n + 100, used=100).ids) == n
    with pytest.raises(InputError, match=f"over the {n + 99:,}-token context: the documents take {n + 100:,} "
                                         "tokens \\(100 of them earlier documents\\); pass fewer or smaller"):
        read_document(path, tok, n + 99, used=100)


def test_bytes_that_are_not_utf8_text(tmp_path, tok):
    cases = {
        b"\xef\xbb\xbf" + "caf\u00e9 ".encode() * 30_000: None,  # the BOM is dropped, é is cut by chunk edges
        b"word " * 30_000 + b"caf\xe9": "not UTF-8 text (invalid byte at offset 150,003)",
        b"word " * 30_000 + b"\x00\x01": "binary, not text (a NUL byte at offset 150,000)",
        "The keeper lit the lamp.".encode("utf-16"): "UTF-16",
        b" \n\t": "empty",
    }
    for data, message in cases.items():
        (tmp_path / "doc.txt").write_bytes(data)
        if message is None:
            doc = read_document(tmp_path / "doc.txt", tok, 1 << 20, chunk_bytes=4099)
            assert doc.text == "caf\u00e9 " * 30_000 and doc.ids == tok.encode(doc.text, add_special_tokens=False)
            continue
        with pytest.raises(InputError, match=message.replace("(", "\\(").replace(")", "\\)")):
            read_document(tmp_path / "doc.txt", tok, 1 << 20, chunk_bytes=4099)
    for path, message in {tmp_path / "missing.txt": "does not exist", tmp_path: "not a regular file"}.items():
        with pytest.raises(InputError, match=message):
            read_document(path, tok, 1 << 20)


class _Terminal(io.StringIO):
    def isatty(self):
        return True


def test_progress_line_only_when_reading_takes_a_while(tmp_path, tok):
    small, large = tmp_path / "small.txt", tmp_path / "large.txt"
    small.write_text(TEXT[:50_000])
    large.write_text(TEXT)
    quiet, shown = _Terminal(), _Terminal()
    for path, stream, after_s in ((small, quiet, 0.5), (large, shown, 0.0)):
        with ReadProgress(path, stream=stream, after_s=after_s) as progress:
            read_document(path, tok, 1 << 20, progress=progress, chunk_bytes=65536)
    assert quiet.getvalue() == ""  # 50 KB: read in ~0.05 s
    lines = shown.getvalue().split("\r")[1:]
    assert len(lines) == 8 and "65.5 KB of 466.3 KB" in lines[0] and lines[-1].startswith("reading large.txt: "
                                                                                          "466.3 KB of 466.3 KB")
    assert lines[-1].endswith("\n")


def test_cli_refuses_an_oversized_document_in_one_line(tmp_path, smol_dir):
    big = tmp_path / "big.txt"
    _write_repeated(big, 30_000_000)
    result = run("chat", "-d", str(big), "--model", str(smol_dir), *FAST, input="hi\n")
    assert_user_error(result, str(big), "over the 8,192-token context after its first", "documents take at least",
                      "--max-context", "longer context")
    assert "reading" not in result.stderr  # refused before a progress line was due
