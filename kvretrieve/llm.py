"""The Python API: load a model once, then generate or stream text.

The KV cache persists between calls: a new prompt reuses the longest token prefix it shares with
what is already cached (the documents of a chat, earlier turns) and only the rest is prefilled.
"""
from __future__ import annotations

import time
from contextlib import closing
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Generator, Union

import torch

from .config import RetrievalConfig, SamplingParams
from .doc_cache import DocumentCache, shared_prefix
from .engine.engine import Engine
from .engine.sampling import Sampler
from .errors import InputError, SavedPrefillError
from .models.llama import Decoder
from .models.tokenizer import Tokenizer
from .resolve import AttentionChoice
from .textout import TextOut
from .turns import Turns

if TYPE_CHECKING:
    from .persist import SaveInfo
    from .store.saved import SavedPrefill

Prompt = Union[str, list[dict]]
# A prompt reopens a saved prefill it starts with (LLM.document_cache) when that gives at least this
# many tokens more than the live cache shares with it: below, prefilling them costs about as much.
REOPEN_MIN_GAIN = 256


@dataclass(slots=True)
class GenerationResult:
    text: str
    token_ids: list[int]
    prompt_tokens: int
    reused_tokens: int            # prompt tokens found already in the KV cache
    finish_reason: str            # "eos", "stop", "length" (max_new_tokens) or "context" (cache full)
    prefill_s: float
    decode_s: float
    token_ms: list[float] = field(default_factory=list)  # wall time of each decode step

    @property
    def decode_ms_per_token(self) -> float:
        return 1e3 * self.decode_s / max(1, len(self.token_ms))


class LLM:
    """A loaded model and its KV cache (kvretrieve.load makes one). One LLM may be shared by threads:
    each call (a whole stream() generator included) has the cache to itself, the others wait."""

    def __init__(self, model: Decoder, tokenizer: Tokenizer, engine: Engine, attention: AttentionChoice,
                 source: Path | str):
        self.model, self.tokenizer, self.engine, self.source = model, tokenizer, engine, source
        self._attention = attention
        self._ids: list[int] = []  # the tokens whose K,V the cache holds, in order
        self._turn = Turns()
        self.last: GenerationResult | None = None
        # Saved prefills (doc_cache.DocumentCache) a prompt may start with: reopened instead of
        # prefilled (serve sets it; None: only the live cache's prefix is reused).
        self.document_cache: DocumentCache | None = None
        self._identity: dict | None = None

    @property
    def mode(self) -> str:
        """"dense" (the whole KV on the device) or "retrieval" (KV in CPU memory, blocks selected)."""
        return self._attention.mode

    @property
    def mode_reason(self) -> str:
        """One line: how attention runs and why (what load() decided for retrieval="auto")."""
        return self._attention.reason

    @property
    def retrieval(self) -> RetrievalConfig | None:
        """The resolved retrieval configuration (every "auto" made concrete), or None when dense."""
        return self._attention.retrieval

    @property
    def device(self) -> torch.device:
        return self.model.device

    @property
    def max_context(self) -> int:
        return self.engine.backend.capacity

    @property
    def cached_tokens(self) -> int:
        return len(self._ids)

    @property
    def cached_ids(self) -> list[int]:
        """The token ids whose K,V the cache holds, in order."""
        return list(self._ids[:self.engine.length])

    def save(self, path: str | Path, extra: dict[str, bytes] | None = None) -> "SaveInfo":
        """Write the KV cache and the tokens it holds to the folder `path` (made atomically: an
        interruption leaves nothing under that name), to reopen later with resume() or
        kvretrieve.load(..., resume=path) instead of prefilling again. extra: small files to keep beside
        it (name -> bytes). Returns where, how many tokens and bytes, and the seconds it took."""
        from .persist import save
        with self._turn("save()"):
            return save(self, path, extra)

    def resume(self, path: str | Path, verify: bool = True) -> "SavedPrefill":
        """Replace the KV cache with the one saved at `path` by save(): decoding then goes on as it would
        have after that prefill. The saved state must come from the same model, tokenizer, dtype and KV
        layout (retrieval options) and fit max_context; SavedPrefillError names what differs, or a
        damaged file (verify: check every file's checksum first). Returns the opened save (its
        manifest, its extra files)."""
        with self._turn("resume()"):
            return self._resume(path, verify)

    def _resume(self, path: str | Path, verify: bool) -> "SavedPrefill":
        from .persist import open_checked
        from .store.saved import under

        saved, ids = open_checked(self, path, verify)  # refused here: the cache stays as it was
        self._reset()
        try:
            self.engine.load_state(under(saved.tensors(), "kv"), len(ids))
        except BaseException:  # Ctrl-C or a damaged part: empty, not half loaded
            self._reset()
            raise
        self._ids = ids
        return saved

    def _reopen_saved_start(self, ids: list[int]) -> None:
        """Reopen the document cache's longest save that `ids` start with, where it gives more than
        the live cache does; a save that cannot be reopened is passed over (the prompt is prefilled)."""
        from .persist import identity

        if self.document_cache is None:
            return
        have = min(shared_prefix(self._ids, ids), self.engine.length)
        if self._identity is None:
            self._identity = identity(self)
        hit = self.document_cache.longest_prefix(self._identity, ids, have + REOPEN_MIN_GAIN)
        if hit is not None:
            try:
                self._resume(hit[0].path, verify=True)  # the prefill after cuts it back to what ids share
                self.document_cache.touch(hit[0].path)
            except SavedPrefillError:
                pass

    def tokenize(self, prompt: Prompt) -> list[int]:
        """A string is encoded as is; a list of {"role", "content"} messages goes through the chat template."""
        if isinstance(prompt, str):
            ids = self.tokenizer.encode(prompt)
        elif isinstance(prompt, list):
            ids = self.tokenizer.encode_chat(prompt)
        else:
            raise InputError(f"prompt must be a string or a list of messages, not {type(prompt).__name__}")
        if not ids:
            raise InputError("the prompt is empty; give it some text")
        if len(ids) > self.max_context:
            raise InputError(f"the prompt has {len(ids):,} tokens but the context holds {self.max_context:,}; "
                             f"shorten it or raise max_context (the model was trained for "
                             f"{self.model.cfg.max_position:,})")
        return ids

    def reset(self) -> None:
        """Empty the KV cache."""
        with self._turn("reset()"):
            self._reset()

    def _reset(self) -> None:
        self.engine.truncate(0)
        self._ids = []

    def prefill(self, ids: list[int], on_layer: Callable[[int], None] | None = None) -> torch.Tensor:
        """Make the cache hold exactly `ids`, reusing the shared prefix; returns the next-token logits."""
        with self._turn("prefill()"):
            self._reopen_saved_start(ids)
            return self._prefill(ids, on_layer)

    def _reusable(self, ids: list[int]) -> int:
        """Tokens of `ids` the cache already holds and a prefill keeps: never the last (its logits are
        needed), never past what the cache holds (a Ctrl-C may have left it shorter than the token list)."""
        return min(shared_prefix(self._ids, ids), len(ids) - 1, self.engine.length)

    def _prefill(self, ids: list[int], on_layer: Callable[[int], None] | None = None) -> torch.Tensor:
        keep = self._reusable(ids)
        self._ids = self._ids[:keep]
        self.engine.truncate(keep)
        logits = self.engine.prefill(ids[keep:], on_layer)
        self._ids = list(ids)
        return logits

    def stream(self, prompt: Prompt, max_new_tokens: int | None = None, *, sampling: SamplingParams | None = None,
               on_layer: Callable[[int], None] | None = None, **kwargs) -> Generator[str, None, GenerationResult]:
        """Yield the answer as text pieces while it is generated. Keyword arguments are SamplingParams
        fields (temperature, top_k, top_p, seed, stop, repeat_penalty, repeat_last_n). The full result
        (a GenerationResult) is the generator's return value (StopIteration.value; with threads sharing
        this LLM, the one that is surely this call's) and lands in `self.last`."""
        params, ids = self._request(prompt, max_new_tokens, sampling, kwargs)
        with self._turn("stream()"):
            return (yield from self._stream(ids, params, on_layer))

    def _request(self, prompt: Prompt, max_new_tokens: int | None, sampling: SamplingParams | None,
                 kwargs: dict) -> tuple[SamplingParams, list[int]]:
        """Checked before the turn is taken: a bad request never waits for one."""
        if max_new_tokens is not None:
            kwargs["max_new_tokens"] = max_new_tokens
        return (sampling if sampling is not None else SamplingParams(**kwargs)), self.tokenize(prompt)

    def prefill_for_batch(self, ids: list[int]) -> tuple[int, torch.Tensor]:
        """prefill() for a decode that engine.batch runs (serve's sessions): returns the prompt tokens
        reused (from the cache or a saved prefill) and the next-token logits."""
        with self._turn("prefill()"):
            self._reopen_saved_start(ids)
            reused = self._reusable(ids)
            return reused, self._prefill(ids, None)

    def record_decoded(self, ids: list[int]) -> None:
        """A batched decode appended the first of `ids` to the cache after the prompt (not the last one
        sampled, which no step has run): the token list follows the cache."""
        with self._turn("record_decoded()"):
            self._ids += ids[:max(0, self.engine.length - len(self._ids))]

    def _stream(self, ids: list[int], params: SamplingParams, on_layer) -> Generator[str, None, GenerationResult]:
        self._reopen_saved_start(ids)
        reused = self._reusable(ids)
        t0 = time.perf_counter()
        logits = self._prefill(ids, on_layer)
        sampler = Sampler(params, self.device, ids)  # the penalty counts the prompt's tail, as in llama.cpp
        room = self.max_context - self.engine.length  # decode steps the cache can still take
        steps = max(0, min(params.max_new_tokens - 1, room))
        text, step_ms, prefill_s = TextOut(self.tokenizer, params), [], time.perf_counter() - t0
        if params.max_new_tokens == 0:
            text.finish, tokens = "length", (t for t in ())
        else:
            tokens = self.engine.decode(sampler(logits), sampler, steps)
        with closing(tokens):
            while text.finish is None:
                t = time.perf_counter()
                token_id = next(tokens, None)  # the one host sync per token
                if token_id is None:
                    text.finish = "context"
                    break
                if not text.ids and not step_ms:
                    prefill_s = time.perf_counter() - t0
                else:
                    step_ms.append(1e3 * (time.perf_counter() - t))
                if text.ids:
                    self._ids.append(text.ids[-1])  # asking for this id appended the previous one to the cache
                piece = text.push(token_id)
                if piece:
                    yield piece
        if piece := text.close():
            yield piece
        out, new_ids, finish = text.text, text.ids, text.finish
        self.last = GenerationResult(text=out, token_ids=new_ids, prompt_tokens=len(ids), reused_tokens=reused,
                                     finish_reason=finish, prefill_s=prefill_s,
                                     decode_s=sum(step_ms) / 1e3, token_ms=step_ms)
        return self.last

    def generate(self, prompt: Prompt, max_new_tokens: int | None = None, *, return_details: bool = False,
                 sampling: SamplingParams | None = None, on_layer: Callable[[int], None] | None = None,
                 **kwargs) -> str | GenerationResult:
        """Generate a completion. Returns the text, or a GenerationResult (text, token ids, timings)
        with return_details=True. Takes stream()'s arguments."""
        params, ids = self._request(prompt, max_new_tokens, sampling, kwargs)
        with self._turn("generate()"):
            stream = self._stream(ids, params, on_layer)
            while True:
                try:
                    next(stream)
                except StopIteration as done:
                    result = done.value
                    break
        return result if return_details else result.text
