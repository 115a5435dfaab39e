"""Saved prefills on the command line: `kvretrieve prefill` (documents -> FILE.kvr), `kvretrieve cache
list|clear` (the document cache), and what chat does with them (--resume, the document cache)."""
from __future__ import annotations

import json
import time
from pathlib import Path

import click

from ..doc_cache import DocumentCache, age
from ..errors import InputError, SavedPrefillError
from ..models.tokenizer import check_utf8
from .conversation import Conversation, documents_block
from .options import PrefillProgress, load_from_options, model_options, retrieval_options

CHAT_RECORD = "chat.json"  # the extra file of a saved prefill that holds the conversation's documents


def _mb(n: int) -> str:
    return f"{n / 1e6:,.0f} MB" if n < 1e9 else f"{n / 1e9:.1f} GB"


def say(message: str) -> None:
    click.echo(f"documents: {message}", err=True)


def cache_options(f):
    f = click.option("--doc-cache-gb", type=float, default=None, metavar="GIB",
                     help="Most disk the document cache may take; the least recently used saves go first "
                          "(default: a quarter of the free disk, at most 64).")(f)
    return click.option("--doc-cache/--no-doc-cache", default=True, show_default=True,
                        help="Reopen the saved prefill of the same documents (same model, dtype and retrieval "
                             "options) instead of prefilling them, and save new ones (`kvretrieve cache`).")(f)


def document_cache(opts: dict) -> DocumentCache | None:
    """The cache the options ask for (checked before the model loads)."""
    if opts["doc_cache_gb"] is not None and not opts["doc_cache"]:
        raise click.UsageError("--doc-cache-gb sizes the document cache, which --no-doc-cache turns off; drop one")
    return DocumentCache(cap_gb=opts["doc_cache_gb"]) if opts["doc_cache"] else None


def prefill_documents(conv: Conversation, cache: DocumentCache | None, progress) -> None:
    """Reopen the documents' saved prefill from the cache, or prefill them (and save them there)."""
    llm, ids = conv.llm, conv.document_ids()
    if cache is None:
        conv.prefill_documents(progress, ids)
        return
    from ..persist import document_key

    path = cache.path_for(document_key(llm, ids))
    if path.exists():
        t0 = time.perf_counter()
        try:
            llm.resume(path)
            cache.touch(path)
            say(f"reopened their saved prefill ({len(ids):,} tokens) in {time.perf_counter() - t0:.2f} s")
            return
        except SavedPrefillError as e:
            say(f"the saved prefill could not be reopened ({e}); prefilling again")
    t0 = time.perf_counter()
    conv.prefill_documents(progress, ids)
    prefill_s = time.perf_counter() - t0
    try:
        info = llm.save(path, extra={CHAT_RECORD: conv.chat_record()})
    except SavedPrefillError as e:
        say(f"prefilled in {prefill_s:.1f} s; not saved for next time ({e})")
        return
    cache.evict(keep=path)  # older saves go first, least recently used first
    if info.bytes > cache.cap_bytes():  # this one alone is over the cap: it goes too
        cache.evict()
        say(f"prefilled in {prefill_s:.1f} s; not kept: {_mb(info.bytes)} is over the document cache's cap of "
            f"{_mb(cache.cap_bytes())} (--doc-cache-gb)")
        return
    say(f"prefilled {len(ids):,} tokens in {prefill_s:.1f} s; saved for next time in {info.seconds:.1f} s "
        f"({_mb(info.bytes)}; `kvretrieve cache list`)")


def resumed_conversation(llm, path: str) -> Conversation:
    """The conversation a `kvretrieve prefill` save holds, its KV cache reopened into llm."""
    t0 = time.perf_counter()
    saved = llm.resume(path)
    record = saved.extra(CHAT_RECORD)
    if record is None:
        llm.reset()
        raise SavedPrefillError(f"{path} holds no chat documents (it was saved by llm.save, not `kvretrieve "
                                "prefill`); reopen it from Python with kvretrieve.load(..., resume=PATH)")
    chat = json.loads(record)
    say(f"reopened {path} ({llm.cached_tokens:,} tokens) in {time.perf_counter() - t0:.2f} s")
    return Conversation(llm, chat["documents"], chat["system"])


@click.command(name="prefill")
@click.option("--document", "-d", "documents", multiple=True, required=True, metavar="FILE",
              help="A UTF-8 text file to prefill (repeatable), as `kvretrieve chat --document` would.")
@click.option("--system", default=None, help="System message (saved with the documents).")
@click.option("--output", "-o", metavar="FILE.kvr",
              help="Where to save (a folder; default: the first document's name + .kvr).")
@model_options
@retrieval_options
def prefill(documents, system, output, **opts):
    """Prefill documents once and save the KV cache, to chat about them later with `kvretrieve chat
    --resume FILE.kvr` (the same model and options) without prefilling again."""
    if system is not None:
        check_utf8(system, "the --system message")
    out = Path(output or Path(documents[0]).name + ".kvr")
    llm = load_from_options(opts)
    if not llm.tokenizer.chat_template:
        raise InputError("this model has no chat template, which chat needs; save from Python with llm.save(path)")
    conv = Conversation(llm, documents_block(list(documents), llm), system)
    t0 = time.perf_counter()
    n = conv.prefill_documents(lambda k: PrefillProgress(k, llm.model.cfg.num_layers))
    prefill_s = time.perf_counter() - t0
    info = llm.save(out, extra={CHAT_RECORD: conv.chat_record()})
    click.echo(f"saved {n:,} tokens ({_mb(info.bytes)}) to {out}: prefill {prefill_s:.1f} s, save {info.seconds:.1f} s; "
               f"chat with `kvretrieve chat --resume {out}` and the same model options")


@click.group(name="cache")
def cache():
    """The document cache: saved prefills that `kvretrieve chat --document` reopens."""


@cache.command(name="list")
def cache_list():
    """Show the saved prefills, most recently used first."""
    c = DocumentCache()
    entries = c.entries()
    for e in entries:
        click.echo(f"{e.path.name}  {e.tokens:>9,} tokens  {_mb(e.bytes):>9}  used {age(e.last_used)} ago  {e.source}")
    click.echo(f"{len(entries)} saved, {_mb(sum(e.bytes for e in entries))} of a {_mb(c.cap_bytes())} cap, in {c.root}",
               err=True)


@cache.command(name="clear")
def cache_clear():
    """Remove every saved prefill."""
    n, size = DocumentCache().clear()
    click.echo(f"removed {n} saved prefills ({_mb(size)})", err=True)

