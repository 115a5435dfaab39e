"""A chat's conversation: documents first, then turns, re-rendered whole through the chat template
at every turn (the prefix cache of LLM.stream finds what is already in the KV cache)."""
from __future__ import annotations

import json
from pathlib import Path

from ..documents import ReadProgress, read_document as read_measured, with_documents
from ..errors import InputError

_MARK = "\x00question\x00"  # stands for the first question while the documents are prefilled


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
        return with_documents(self.turns + [{"role": "user", "content": question}], self.documents, self.system)

    def document_ids(self) -> list[int]:
        """The tokens of everything that comes before the first question."""
        text = self.llm.tokenizer.render_chat(self.messages(_MARK))
        ids = self.llm.tokenizer.encode(text[:text.index(_MARK)], add_special_tokens=False)
        if len(ids) > self.llm.max_context:
            raise InputError(f"the documents take {len(ids):,} tokens but the context holds "
                             f"{self.llm.max_context:,}; raise --max-context or pass fewer documents")
        return ids

    def prefill_documents(self, progress_factory, ids: list[int] | None = None) -> int:
        """Prefill everything that comes before the first question; returns its token count."""
        ids = ids if ids is not None else self.document_ids()
        self.llm.prefill(ids, progress_factory(len(ids)))
        return len(ids)

    def chat_record(self) -> bytes:
        """What a saved prefill keeps to rebuild this conversation (cli/saved.py): documents and system."""
        return json.dumps({"documents": self.documents, "system": self.system}).encode()

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
