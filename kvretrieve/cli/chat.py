"""`kvretrieve chat`: prefill documents once, then answer questions about them turn after turn.

The documents open the first user message. They are prefilled before the first question is known
(or reopened: a saved prefill from the document cache or --resume, cli/saved.py), and every later
turn re-renders the whole conversation with the chat template: the prefix cache of LLM.stream finds
the documents (and earlier turns) already in the KV cache and prefills only the new tokens.
"""
from __future__ import annotations

import sys

import click

from ..errors import InputError
from ..models.tokenizer import check_utf8
from .conversation import Conversation, documents_block
from .options import (PrefillProgress, as_flags, format_stats, load_from_options, model_options,
                      require_stdin, require_stdout, retrieval_options, sampling_from_options, sampling_options)
from .saved import cache_options, document_cache, prefill_documents, resumed_conversation

HELP = "commands: /reset (forget the conversation, keep the documents), /stats, /exit"


@click.command(name="chat")
@click.option("--document", "-d", "documents", multiple=True, metavar="FILE",
              help="A UTF-8 text file to chat about (repeatable). Prefilled once, reused by every turn.")
@click.option("--system", default=None, help="System message.")
@click.option("--resume", metavar="FILE.kvr",
              help="Reopen documents saved by `kvretrieve prefill` (with the same model options) instead of "
                   "--document: no prefill.")
@cache_options
@model_options
@retrieval_options
@sampling_options(1.1, "On by default here (1.1 over 64 tokens, llama.cpp's long-time default): without it "
                       "small models fall into loops, repeating a line until --max-new-tokens.")
def chat(documents, system, resume, **opts):
    """Chat about documents. Questions come from the terminal, or one per line from piped stdin.

    \b
    In the terminal: /reset forgets the conversation (the documents stay), /stats shows timings,
    /exit or Ctrl-D quits, Ctrl-C stops an answer.
    """
    require_stdout()
    require_stdin("question", "run chat in a terminal, or pipe questions in, one per line")
    if system is not None:
        check_utf8(system, "the --system message")
    if resume and (documents or system is not None):
        raise click.UsageError("--resume brings its documents and system message; pass --resume alone, or "
                               "--document/--system without it")
    sampling = sampling_from_options(opts)
    cache = document_cache(opts)
    llm = load_from_options(opts)
    if not llm.tokenizer.chat_template:
        raise InputError("this model has no chat template; use `kvretrieve generate --raw` instead")
    layers = llm.model.cfg.num_layers
    progress = lambda n: PrefillProgress(n, layers)  # noqa: E731
    if resume:
        conv = resumed_conversation(llm, resume)
    else:
        conv = Conversation(llm, documents_block(list(documents), llm) if documents else "", system)
        if conv.documents:
            prefill_documents(conv, cache, progress)
    interactive = sys.stdin.isatty()
    if interactive:
        click.echo(HELP, err=True)
    while (line := _read_line(interactive)) is not None:
        try:
            question = check_utf8(line, "a question").strip()
            if question in ("/exit", "/quit"):
                return
            if question and not _run_command(question, conv):
                _answer(conv.ask(question, sampling, progress), interactive)
        except InputError as e:
            if not interactive:
                raise
            click.echo(f"error: {as_flags(str(e))}", err=True)  # in the terminal the conversation goes on


def _read_line(interactive: bool) -> str | None:
    """The next line of questions; None at the end (Ctrl-D or Ctrl-C at the prompt, the end of piped input)."""
    try:
        line = input(">>> ") if interactive else sys.stdin.readline()
    except (EOFError, KeyboardInterrupt):
        click.echo(err=True)
        return None
    except UnicodeDecodeError as e:
        raise InputError(f"a question on stdin is not UTF-8 text (invalid byte {e.object[e.start:e.start + 1]!r});"
                         " send UTF-8, e.g. through `iconv -t utf-8`") from None
    return None if not interactive and line == "" else line


def _run_command(question: str, conv: Conversation) -> bool:
    """Runs a /command (but /exit) and returns True; False when `question` is a question."""
    if question == "/reset":
        conv.turns = []
        click.echo("conversation cleared (documents kept)", err=True)
    elif question == "/stats":
        click.echo(format_stats(conv.llm), err=True)
    elif question.startswith("/"):
        click.echo(f"unknown command {question}; {HELP}", err=True)
    else:
        return False
    return True


def _answer(pieces, interactive: bool) -> None:
    try:
        for piece in pieces:
            click.echo(piece, nl=False)
            sys.stdout.flush()
        click.echo()
    except KeyboardInterrupt:
        # The turn is not recorded; a forward pass cut short is rolled back by the engine and LLM
        # keeps its token list in step with the KV cache, so the next question reuses what is
        # valid and prefills the rest.
        pieces.close()
        click.echo("\n[answer interrupted]", err=True)
        if not interactive:  # piped questions: Ctrl-C stops the whole run (exit 130)
            raise
