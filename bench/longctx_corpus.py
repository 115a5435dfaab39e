"""The real text of bench/longctx.py: haystacks, QA contexts and the teacher-forced continuation.

Sources, all written by people outside this project and installed on a Debian machine: CPython's
reference docs (pydoc_data, as bench/accuracy.py uses), the license texts in /usr/share/common-licenses,
English man pages (troff source, stripped to text here in Python so the result does not depend on a
groff version) and READMEs / NEWS / .txt manuals under /usr/share/doc. A GPU machine may have fewer of
them, so the corpus is built once (deterministically: sorted paths, fixed caps) and can be written to a
file (`--corpus FILE`) that the other machine reads; its sha256 goes into the results.

Corpus = list of documents {"source": path, "text": paragraphs joined by blank lines, each paragraph
one line}. A paragraph of 60+ characters that already appeared is dropped (the GPL family, man-page
boilerplate), so a haystack or continuation rarely repeats itself verbatim.
"""
from __future__ import annotations

import gzip
import hashlib
import json
import re
from collections import Counter
from pathlib import Path

from accuracy_metrics import pydoc_text

LICENSES = Path("/usr/share/common-licenses")
MAN = Path("/usr/share/man")
DOC = Path("/usr/share/doc")
# Man sections in order of how much prose they hold (overviews, file formats, commands, admin); the
# caps keep the corpus ~2.5 MB (~600K tokens): many 32K haystack windows, and a build of a few seconds.
MAN_SECTIONS = ("man7", "man5", "man1", "man8")
MAN_CHARS, DOC_CHARS, FILE_CHARS, MIN_DOC_CHARS = 1_200_000, 700_000, 60_000, 800
DOC_NAMES = re.compile(r"^(readme|news)(\.(md|txt|rst))?(\.gz)?$|\.txt(\.gz)?$", re.I)

_ESCAPES = [(re.compile(p), r) for p, r in (
    (r"\\f(\[[^\]]*\]|\(..|.)", ""), (r"\\s[+-]?\d", ""), (r"\\\*(\[[^\]]*\]|\(..|.)", ""),
    (r"\\\((em|en)", "-"), (r"\\\((aq|cq|oq)", "'"), (r"\\\((lq|rq|dq)", '"'), (r"\\\(bu", "*"),
    (r"\\\(..", ""), (r"\\\[[^\]]*\]", ""), (r"\\[-]", "-"), (r"\\e", "\\\\"), (r"\\[&|^%:,/c]", ""),
    (r"\\ ", " "), (r'\\".*', ""))]
_ALTERNATING = {"BI", "IB", "BR", "RB", "IR", "RI"}  # fonts alternate between arguments, written without spaces
_TEXT_MACROS = _ALTERNATING | {"B", "I", "SM", "SB", "IP", "SH", "SS", "Nm", "Nd"}


def man_text(source: str) -> str:
    """Plain text of a man page's troff source: macro lines become breaks or their text, escapes go.
    Rough (tables and conditionals are dropped), but every word it keeps is the page's own."""
    lines = []
    for line in source.splitlines():
        if line.startswith((".", "'")):
            m = re.match(r"[.']\s*(\w+)\s*(.*)", line)
            if m is None:
                continue
            macro, args = m.groups()
            if macro == "so":
                return ""  # a redirect to another page
            if macro in ("SH", "SS", "PP", "LP", "P", "TP", "IP", "sp", "Sh", "Pp"):
                lines.append("")
            if macro in _TEXT_MACROS and args:
                words = [a.strip('"') for a in re.findall(r'"[^"]*"|\S+', args)]
                lines.append(words[0] if macro == "IP" else ("" if macro in _ALTERNATING else " ").join(words))
        elif not line.startswith(("\\{", "\\}")):  # the braces of troff conditionals
            lines.append(line)
    text = "\n".join(lines)
    for pattern, repl in _ESCAPES:
        text = pattern.sub(repl, text)
    return text


def paragraphs(text: str) -> list[str]:
    """Blank-line separated paragraphs, whitespace collapsed: one line each."""
    return [p for p in (" ".join(b.split()) for b in re.split(r"\n\s*\n", text)) if p]


def _read(path: Path) -> str | None:
    try:
        raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
        return raw.decode("utf-8")
    except (OSError, UnicodeDecodeError, EOFError, gzip.BadGzipFile):
        return None


def _man_text(path: Path) -> str:
    src = _read(path)
    return man_text(src)[:FILE_CHARS] if src else ""


def _sources():
    """(kind, path, group, cap on the group's characters, reader) in the order the corpus takes them;
    reader() gives the text, so nothing past a cap is read. Each man section has its own cap, so that
    the alphabetically first pages of one section (man7: dozens of OpenSSL pages) are not all of it."""
    yield "cpython-docs", "pydoc_data.topics", "cpython-docs", None, pydoc_text
    for path in sorted(LICENSES.glob("*")):
        if path.is_file() and not path.is_symlink():
            yield "license", str(path), "license", None, lambda p=path: _read(p) or ""
    for section in MAN_SECTIONS:
        for path in sorted((MAN / section).glob("*")):
            if path.is_file() and not path.is_symlink():
                yield "man", str(path), section, MAN_CHARS // len(MAN_SECTIONS), lambda p=path: _man_text(p)
    for path in sorted(DOC.glob("*/*")):
        if path.is_file() and not path.is_symlink() and DOC_NAMES.search(path.name):
            yield "doc", str(path), "doc", DOC_CHARS, lambda p=path: (_read(p) or "")[:FILE_CHARS]


def build_corpus() -> list[dict]:
    """The corpus from what this machine has (deterministic for one set of installed files)."""
    seen, used, docs = set(), Counter(), []
    for kind, source, group, cap, reader in _sources():
        if cap is not None and used[group] >= cap:
            continue
        kept = []
        for p in paragraphs(reader()):
            if len(p) >= 60 and p in seen:
                continue
            seen.add(p)
            kept.append(p)
        text = "\n\n".join(kept)
        if len(text) >= MIN_DOC_CHARS:
            docs.append({"source": source, "kind": kind, "text": text})
            used[group] += len(text)
    if not docs:
        raise RuntimeError("no corpus text found (pydoc_data missing?); pass --corpus FILE written on another machine")
    return docs


def corpus_sha256(docs: list[dict]) -> str:
    return hashlib.sha256(json.dumps(docs, ensure_ascii=False, sort_keys=True).encode()).hexdigest()


def load_corpus(path: str | None) -> list[dict]:
    """--corpus FILE: read it when it exists, else build the corpus and write it there; no FILE: build."""
    if path and Path(path).is_file():
        docs = json.loads(Path(path).read_text(encoding="utf-8"))
        if not isinstance(docs, list) or not all({"source", "kind", "text"} <= set(d) for d in docs):
            raise RuntimeError(f"{path} is not a corpus file written by bench/longctx.py --corpus")
        return docs
    docs = build_corpus()
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(docs, ensure_ascii=False, sort_keys=True), encoding="utf-8")
    return docs


def summary(docs: list[dict]) -> dict:
    """What the results record about the corpus: its sha256, characters per kind, every source."""
    chars = Counter()
    for d in docs:
        chars[d["kind"]] += len(d["text"])
    return {"sha256": corpus_sha256(docs), "documents": len(docs), "chars_by_kind": dict(chars),
            "sources": [d["source"] for d in docs]}


def corpus_paragraphs(docs: list[dict]) -> list[str]:
    return [p for d in docs for p in d["text"].split("\n\n")]


def vocabulary(docs: list[dict], min_count: int = 3) -> list[str]:
    """Lower-case words of 4-10 letters that occur at least min_count times: real words for keys and
    for the common-words list, sorted so that a seeded draw is the same everywhere."""
    counts = Counter(re.findall(r"(?<![\w-])[a-z]{4,10}(?![\w-])", "\n".join(d["text"] for d in docs)))
    return sorted(w for w, c in counts.items() if c >= min_count)


if __name__ == "__main__":  # python bench/longctx_corpus.py FILE: write the corpus once, for another machine
    import sys

    if len(sys.argv) != 2:
        sys.exit("usage: python bench/longctx_corpus.py FILE")
    docs = load_corpus(sys.argv[1])
    print(f"{sys.argv[1]}: {len(docs)} documents, sha256 {corpus_sha256(docs)}")
