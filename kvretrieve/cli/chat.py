"""`kvretrieve chat`: prefill documents once, then answer questions about them turn after turn.

The documents open the first user message. They are prefilled before the first question is known,
and every later turn re-renders the whole conversation with the chat template: the prefix cache of
LLM.stream finds the documents (and earlier turns) already in the KV cache and prefills only the
new tokens.
"""
from __future__ import annotations

import sys
from pathlib import Path

import click

from ..documents import ReadProgress, read_document as read_measured
from ..errors import InputError
from ..models.tokenizer import check_utf8
from .options import (PrefillProgress, as_flags, format_stats, load_from_options, model_options,
                      require_stdin, require_stdout, retrieval_options, sampling_from_options, sampling_options)

_MARK = "\x00question\x00"  # stands for the first question while the documents are prefilled
HELP = "commands: /reset (forget the conversation, keep the documents), /stats, /exit"


def read_document(path: str, llm, used: int):
    """The document, measured against what is left of the context as it is read (with a progress line
    on stderr when reading takes a while)."""
    with ReadProgress(path) as progress:
        return read_measured(path, llm.tokenizer, llm.max_context, used=used, progress=progress)


def documents_block(paths: list[str], llm) -> str:
    parts, used = [], 0
    for p in paths:
        doc = read_document(p, llm, used)
        used += len(doc.ids)
        parts.append(f"<document name=\"{Path(p).name}\">\n{doc.text.strip()}\n</document>")
    return "Answer questions using these documents.\n\n" + "\n\n".join(parts)


class Conversation:
    def __init__(self, llm, documents: str, system: str | None):
        self.llm, self.documents, self.system = llm, documents, system
        self.turns: list[dict] = []

    def messages(self, question: str) -> list[dict]:
        msgs = [{"role": "system", "content": self.system}] if self.system else []
        turns = self.turns + [{"role": "user", "content": question}]
        if self.documents:
            turns[0] = {"role": "user", "content": f"{self.documents}\n\n{turns[0]['content']}"}
        return msgs + turns

    def prefill_documents(self, progress_factory) -> int:
        """Prefill everything that comes before the first question; returns its token count."""
        text = self.llm.tokenizer.render_chat(self.messages(_MARK))
        ids = self.llm.tokenizer.encode(text[:text.index(_MARK)], add_special_tokens=False)
        if len(ids) > self.llm.max_context:
            raise InputError(f"the documents take {len(ids):,} tokens but the context holds "
                             f"{self.llm.max_context:,}; raise --max-context or pass fewer documents")
        self.llm.prefill(ids, progress_factory(len(ids)))
        return len(ids)

    def ask(self, question: str, sampling, progress_factory):
        msgs = self.messages(question)
        n_tokens = len(self.llm.tokenizer.encode_chat(msgs))
        if n_tokens > self.llm.max_context:
            raise InputError(f"this turn needs {n_tokens:,} tokens (documents, earlier turns and the question) but "
                             f"the context holds {self.llm.max_context:,}; /reset to forget earlier turns, ask a "
                             "shorter question, or raise --max-context")
        ids_estimate = n_tokens - self.llm.cached_tokens
        answer = []
        # If interrupted, the turn is never recorded; the KV cache may hold part of the answer, which
        # the next turn's prefix match simply overwrites.
        for piece in self.llm.stream(msgs, sampling=sampling,
                                     on_layer=progress_factory(ids_estimate) if ids_estimate > 2048 else None):
            answer.append(piece)
            yield piece
        self.turns += [{"role": "user", "content": question}, {"role": "assistant", "content": "".join(answer)}]


@click.command(name="chat")
@click.option("--document", "-d", "documents", multiple=True, metavar="FILE",
              help="A UTF-8 text file to chat about (repeatable). Prefilled once, reused by every turn.")
@click.option("--system", default=None, help="System message.")
@model_options
@retrieval_options
@sampling_options(1.1, "On by default here (1.1 over 64 tokens, llama.cpp's long-time default): without it "
                       "small models fall into loops, repeating a line until --max-new-tokens.")
def chat(documents, system, **opts):
    """Chat about documents. Questions come from the terminal, or one per line from piped stdin.

    \b
    In the terminal: /reset forgets the conversation (the documents stay), /stats shows timings,
    /exit or Ctrl-D quits, Ctrl-C stops an answer.
    """
    require_stdout()
    require_stdin("question", "run chat in a terminal, or pipe questions in, one per line")
    if system is not None:
        check_utf8(system, "the --system message")
    sampling = sampling_from_options(opts)
    llm = load_from_options(opts)
    if not llm.tokenizer.chat_template:
        raise InputError("this model has no chat template; use `kvretrieve generate --raw` instead")
    layers = llm.model.cfg.num_layers
    progress = lambda n: PrefillProgress(n, layers)  # noqa: E731
    block = documents_block(list(documents), llm) if documents else ""
    conv = Conversation(llm, block, system)
    if block:
        conv.prefill_documents(progress)
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
