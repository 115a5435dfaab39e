"""`kvretrieve serve`: the OpenAI-compatible server (kvretrieve.serve) on uvicorn."""
from __future__ import annotations

import re
import signal
import socket
from pathlib import Path

import click

from ..errors import KVRetrieveError
from ..models.tokenizer import check_utf8
from .conversation import Conversation, documents_block
from .options import PrefillProgress, load_from_options, model_options, retrieval_options
from .saved import cache_options, document_cache, prefill_documents, resumed_conversation


class ServeError(KVRetrieveError):
    """The server cannot start (a port in use, a missing package)."""


@click.command(name="serve")
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to listen on (0.0.0.0: every interface; there is no authentication).")
@click.option("--port", type=click.IntRange(0, 65535), default=8000, show_default=True,
              help="Port to listen on (0: a free one, printed at start).")
@click.option("--model-name", default=None, help="The model id clients send and /v1/models lists (default: the "
                                                 "checkpoint's folder name).")
@click.option("--max-waiting", type=click.IntRange(1, 1024), default=16, show_default=True,
              help="Requests that may wait or run at once; more get HTTP 429.")
@click.option("--sessions", type=click.IntRange(1, 256), default=4, show_default=True,
              help="Requests that decode together, each in its own KV cache (made as requests come, while "
                   "memory allows); more wait their turn.")
@click.option("--document", "-d", "documents", multiple=True, metavar="FILE",
              help="Serve documents (repeatable): every chat request gets them in front of its first user "
                   "message, as `kvretrieve chat` does; prefilled (or reopened from the document cache) once, at start.")
@click.option("--system", default=None, help="System message for chat requests that bring none (with --document).")
@click.option("--resume", metavar="FILE.kvr", help="Serve the documents of a `kvretrieve prefill` save instead of "
                                                    "--document: no prefill at start.")
@cache_options
@model_options
@retrieval_options
def serve(host, port, model_name, max_waiting, sessions, documents, system, resume, **opts):
    """Serve the model over an OpenAI-compatible HTTP API: POST /v1/chat/completions and /v1/completions
    (streamed or not), GET /v1/models, /health and /metrics (Prometheus). Up to --sessions requests
    decode together, each in its own KV cache, one batched step for all; a prompt that starts with what
    an earlier request left in a cache (the same document, asked again), or with a document whose
    prefill the document cache holds (saved by chat, prefill or serve --document), prefills only the
    rest. Ctrl-C or SIGTERM: in-flight answers finish, then it exits."""
    try:
        import uvicorn

        from ..serve import Server
    except ImportError as e:
        raise ServeError(f"serve needs {e.name}: `pip install starlette uvicorn` (or kvretrieve[serve])") from None
    if resume and (documents or system is not None):
        raise click.UsageError("--resume brings its documents and system message; pass --resume alone, or "
                               "--document/--system without it")
    if system is not None:
        check_utf8(system, "the --system message")
    cache = document_cache(opts)
    sock = _listen(host, port)
    llm = load_from_options(opts)
    conv = served_documents(llm, documents, system, resume, cache)
    llm.document_cache = cache  # any request that starts with a saved document reopens it
    def make_session():
        from ..api import build  # not at the top: `kvretrieve --help` must not import torch

        session = build(llm.model, llm.tokenizer, llm.source, llm.max_context, llm.engine.chunk, llm.retrieval)
        session.document_cache = cache
        return session

    server = Server(llm, model_name or default_name(llm.source), max_waiting, conv.documents, conv.system,
                    sessions, make_session)
    config = uvicorn.Config(server.app(), log_level="warning", timeout_graceful_shutdown=60)
    uv = uvicorn.Server(config)
    click.echo(f"serving {server.name} on http://{host}:{sock.getsockname()[1]}/v1 (OpenAI API); Ctrl-C stops",
               err=True)
    # uvicorn raises the signal that stopped it again once it has shut down; with these handlers that
    # ends here, so a requested stop exits 0 instead of dying of the signal.
    previous = {s: signal.signal(s, lambda *_: None) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        uv.run(sockets=[sock])
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        server.close()
    click.echo("stopped", err=True)


def served_documents(llm, documents, system, resume, cache) -> Conversation:
    """The documents every chat request gets, their prefill done (or reopened) now."""
    if resume:
        return resumed_conversation(llm, resume)
    conv = Conversation(llm, documents_block(list(documents), llm) if documents else "", system)
    if conv.documents:
        prefill_documents(conv, cache, lambda n: PrefillProgress(n, llm.model.cfg.num_layers))
    return conv


def default_name(source) -> str:
    """The checkpoint folder's name, without the content hash of a converted GGUF's cache folder."""
    return re.sub(r"-[0-9a-f]{12}$", "", Path(str(source)).name)


def _listen(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise ServeError(f"cannot listen on {host}:{port} ({e.strerror}); pick another --port or --host") from None
    sock.listen(128)
    return sock
