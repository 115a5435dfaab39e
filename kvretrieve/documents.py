"""Documents for a prompt, measured as they are read.

A file is read in chunks and tokenized as it comes, with a running count that stops at the context:
read whole and then tokenized, a 30 MB text file took 108 s and 5.4 GiB before it was refused (now:
0.06 s, after its first 64 KiB), and a 40 GB sparse file ran out of memory. Chunks are 8 bytes per
token still free (English runs ~4 bytes a token with SmolLM2's tokenizer, so one chunk usually
settles an oversized file), 64 KiB to 1 MiB.

The ids are exactly those of the whole text. Chunks end at cuts where the token boundary does not
depend on the text around it, and each cut is checked with the tokenizer itself (the text on both
sides tokenized together and apart) rather than assumed: with SmolLM2's GPT-2-style pre-tokenizer a
cut after a paragraph's blank line changes the tokens ("\\n\\n" at the end of a text is one
pre-token, before more text it is two), a cut at a line start after a single newline does not.
"""
from __future__ import annotations

import codecs
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from .errors import InputError

MIN_CHUNK, MAX_CHUNK = 64 << 10, 1 << 20
_CONTEXT = 256  # characters on each side of a cut that the check tokenizes
_TRIES = 8      # cuts tried per kind (line starts, then spaces) before the text waits for the next chunk


@dataclass
class Document:
    path: Path
    text: str        # without a leading UTF-8 byte-order mark
    ids: list[int]   # tokenizer.encode(text, add_special_tokens=False)


def read_document(path, tokenizer, max_context: int, *, used: int = 0, progress=None,
                  chunk_bytes: int | None = None) -> Document:
    """Read and tokenize a UTF-8 text file that must fit in max_context tokens, `used` of them already
    taken (by earlier documents). Raises InputError as soon as the file is known not to fit, and for
    files that are missing, binary, not UTF-8 or empty. progress(bytes_read, file_bytes, tokens) is
    called after each chunk; chunk_bytes fixes the read size (default: from the tokens still free)."""
    p = Path(path)
    limit = max_context - used
    count = _Tokens(tokenizer)
    with _open(p) as f:
        size = os.fstat(f.fileno()).st_size
        chunks = _text_chunks(f, p, lambda: chunk_bytes or min(MAX_CHUNK, max(MIN_CHUNK, 8 * (limit - count.n))))
        for text, done, at_end in chunks:
            count.feed(text, final=at_end)
            if progress is not None:
                progress(done, size, count.n)
            if count.lower_bound() > limit:
                raise InputError(_over_message(p, count, done, size, at_end, max_context, used))
    if not count.text.strip():
        raise InputError(f"document {p} is empty; pass a file with some text")
    return Document(p, count.text, count.ids)


def _open(p: Path):
    if not p.exists():
        raise InputError(f"document {p} does not exist; check the path")
    if not p.is_file():
        raise InputError(f"document {p} is not a regular file; pass a text file")
    try:
        return open(p, "rb")
    except OSError as e:
        raise InputError(f"cannot read document {p} ({e.strerror}); check its permissions") from None


def _text_chunks(f, p: Path, chunk_size):
    """(text, bytes read so far, at the end) for each chunk: decoded as UTF-8 across chunk edges."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    done = 0
    while True:
        want = chunk_size()
        try:
            raw = f.read(want)
        except OSError as e:
            raise InputError(f"cannot read document {p} ({e.strerror})") from None
        skip = 0
        if done == 0:
            if raw[:2] in (b"\xff\xfe", b"\xfe\xff"):
                raise InputError(f"document {p} is UTF-16 text, not UTF-8; convert it, e.g. "
                                 f"`iconv -f utf-16 -t utf-8 {p.name}`")
            skip = 3 if raw.startswith(codecs.BOM_UTF8) else 0  # a leading byte-order mark is not part of the text
        nul = raw.find(b"\x00")
        if nul >= 0:
            raise InputError(f"document {p} is binary, not text (a NUL byte at offset {done + nul:,}); pass a "
                             "UTF-8 text file (convert PDFs etc. to text first)")
        at_end = len(raw) < want  # a short read of a regular file: its end
        held = len(decoder.getstate()[0])  # the start of a character cut by the previous chunk's end
        try:
            text = decoder.decode(raw[skip:], final=at_end)
        except UnicodeDecodeError as e:
            at = done + skip - held + e.start
            raise InputError(f"document {p} is not UTF-8 text (invalid byte at offset {at:,}); convert it, e.g. "
                             f"`iconv -f latin1 -t utf-8 {p.name}`") from None
        done += len(raw)
        yield text, done, at_end
        if at_end:
            return


class _Tokens:
    """The ids of a text that arrives in pieces, equal to those of the whole text."""

    def __init__(self, tokenizer):
        self.tok = tokenizer
        self.ids: list[int] = []
        self.parts: list[str] = []  # text whose ids are final
        # The end of that text, tokenized again in front of the next piece and dropped: some tokenizers
        # give the start of a text other ids than the same words mid-text (a SentencePiece prefix space).
        self.context = ""
        self.pending = ""           # text read, its ids not final yet

    @property
    def n(self) -> int:
        return len(self.ids)

    @property
    def text(self) -> str:
        return "".join(self.parts) + self.pending

    def feed(self, text: str, final: bool) -> None:
        self.pending += text
        cut = len(self.pending) if final else self._cut()
        if cut:
            piece, self.pending = self.pending[:cut], self.pending[cut:]
            self.ids += self._encode_after(self.context, piece)
            self.parts.append(piece)
            self.context = (self.context + piece)[-_CONTEXT:]

    def lower_bound(self) -> int:
        """Tokens the whole text has at least: the final ids, and those of text still waiting for a cut when
        there is much of it (a text without line breaks or spaces), less one for a token the cut may split."""
        if len(self.pending) < MIN_CHUNK:
            return self.n
        return self.n + len(self.tok.encode(self.pending, add_special_tokens=False)) - 1

    def _encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False)

    def _encode_after(self, context: str, text: str) -> list[int]:
        head = self._encode(context)
        ids = self._encode(context + text)
        if ids[:len(head)] != head:  # the cut before `text` was checked, so this is a bug
            raise RuntimeError(f"chunked tokenization lost the token boundary before {text[:40]!r}")
        return ids[len(head):]

    def _cut(self) -> int:
        """The last place in the pending text, at a line start or else before a space, where the tokens do not
        depend on what lies across it; 0 if none."""
        text = self.pending
        for mark in ("\n", " "):
            end, tries = len(text) - 1, 0
            while tries < _TRIES:
                at = text.rfind(mark, 0, end)
                if at <= 0:
                    break
                end = at
                if text[at + 1].isspace() or (mark == " " and text[at - 1].isspace()):
                    continue  # inside a run of white space, whose tokens depend on its length
                tries += 1
                cut = at + 1 if mark == "\n" else at
                if self._stable(cut):
                    return cut
        return 0

    def _stable(self, cut: int) -> bool:
        before = (self.context + self.pending[:cut])[-_CONTEXT:]
        ids = self._encode(before)
        return self._encode(before + self.pending[cut:cut + _CONTEXT])[:len(ids)] == ids


def _over_message(p: Path, count: _Tokens, done: int, size: int, at_end: bool, max_context: int, used: int) -> str:
    notes = [f"{used:,} of them earlier documents"] if used else []
    if at_end:
        how = f": the documents take {used + count.n:,} tokens"
    else:
        how = f" after its first {_size(done)}: the documents take at least {used + count.lower_bound():,} tokens"
        notes.append(f"all {_size(size)} of this file: about {_tokens(count.lower_bound() * size / max(1, done))}")
    how += f" ({'; '.join(notes)})" if notes else ""
    files = "fewer or smaller documents" if used else "a smaller file"
    return (f"document {p} is over the {max_context:,}-token context{how}; pass {files}, raise max_context, or "
            "load a model with a longer context")


def _size(n: float) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n:.0f} bytes"


def _tokens(n: float) -> str:
    return f"{n / 1e6:.1f}M tokens" if n >= 1e6 else f"{n:,.0f} tokens"


class ReadProgress:
    """A progress line on stderr for read_document(progress=...), shown only once reading has taken half a
    second (a file that fits an 8K context is read in milliseconds). Use as a context manager."""

    def __init__(self, path, stream=None, after_s: float = 0.5):
        self.name, self.stream, self.after_s = Path(path).name, stream or sys.stderr, after_s
        self.t0, self.shown = time.perf_counter(), False

    def __call__(self, done: int, size: int, tokens: int) -> None:
        elapsed = time.perf_counter() - self.t0
        if elapsed < self.after_s:
            return
        line = f"reading {self.name}: {_size(done)} of {_size(size)}, {tokens:,} tokens, {elapsed:.1f} s"
        if self.stream.isatty():
            self.stream.write(f"\r{line}\x1b[K")
        elif not self.shown:  # a log gets one line, not one per chunk
            self.stream.write(f"{line} ...\n")
        self.stream.flush()
        self.shown = True

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        if self.shown and self.stream.isatty():
            self.stream.write("\n")
            self.stream.flush()


def with_documents(turns: list[dict], documents: str, system: str | None) -> list[dict]:
    """Chat messages as `kvretrieve chat` sends them: the documents in front of the first user message,
    and the system message first unless the turns bring their own. A prefill of the documents (saved
    or live) is then a prefix of every turn's tokens."""
    turns = list(turns)
    user = next((i for i, m in enumerate(turns) if m.get("role") == "user"), None)
    if documents and user is not None:
        turns[user] = {**turns[user], "content": f"{documents}\n\n{turns[user]['content']}"}
    own_system = bool(turns) and turns[0].get("role") == "system"
    return ([{"role": "system", "content": system}] if system and not own_system else []) + turns

