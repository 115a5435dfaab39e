"""An answer's text from its token ids, piece by piece: what LLM.stream and the server's batched
sessions both send to a reader."""
from __future__ import annotations

from .config import SamplingParams
from .models.tokenizer import StreamDecoder, Tokenizer


def held_back(text: str, stops: tuple[str, ...]) -> int:
    """Length of the longest end of `text` that could be the start of a stop string."""
    return max((k for s in stops for k in range(1, len(s)) if text.endswith(s[:k])), default=0)


class TextOut:
    """Token ids in, text pieces out: detokenized without splitting a character, cut at the first stop
    string (which is not sent), an end that could start one held back until it is decided. `finish`
    becomes "eos", "stop" or "length" when the answer ends; `ids` are the answer's ids (an end of
    sequence id is not one)."""

    def __init__(self, tokenizer: Tokenizer, params: SamplingParams):
        self.decoder, self.params, self.eos = StreamDecoder(tokenizer), params, tokenizer.eos_ids
        self.text, self.sent, self.ids, self._closed = "", 0, [], False
        self.finish: str | None = None

    def push(self, token_id: int) -> str:
        """Take the next id; returns the text that may be sent now ('' if none)."""
        if token_id in self.eos:
            self.finish = "eos"
            return self.close()
        self.ids.append(token_id)
        self.text += self.decoder.push(token_id)
        stops = self.params.stop
        cut = min((i for i in (self.text.find(s, max(0, self.sent - len(s))) for s in stops) if i >= 0), default=-1)
        if cut >= 0:
            piece, self.text, self.finish = self.text[self.sent:cut], self.text[:cut], "stop"
            self.sent = cut
            return piece
        piece = ""
        safe = len(self.text) - held_back(self.text, stops)
        if safe > self.sent:
            piece, self.sent = self.text[self.sent:safe], safe
        if len(self.ids) == self.params.max_new_tokens:
            self.finish = "length"
            piece += self.close()
        return piece

    def close(self) -> str:
        """The answer ends (whatever the reason): the rest of its text, held-back ends included."""
        if self.finish != "stop" and not self._closed:
            self.text += self.decoder.flush()
        self._closed = True
        piece, self.sent = self.text[self.sent:], len(self.text)
        return piece
