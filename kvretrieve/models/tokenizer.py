"""Tokenizer and chat template from an HF directory, without importing transformers.

tokenizer.json is read with the `tokenizers` library and the chat template rendered with jinja2 in a
sandbox, the way transformers does it; importing transformers would add seconds to every start.
"""
from __future__ import annotations

import hashlib
import json
from datetime import datetime
from pathlib import Path

from ..errors import InputError, ModelLoadError


def _token_text(value) -> str | None:
    if isinstance(value, dict):
        return value.get("content")
    return value


def _load_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise ModelLoadError(f"{path} is not valid JSON ({e}); re-download it") from None
    if not isinstance(data, dict):
        raise ModelLoadError(f"{path} does not hold a JSON object; re-download it")
    return data


class Tokenizer:
    def __init__(self, model_dir: Path, model_config: dict):
        from tokenizers import Tokenizer as FastTokenizer

        path = model_dir / "tokenizer.json"
        if not path.is_file():
            raise ModelLoadError(
                f"missing tokenizer: {path} not found; kvretrieve needs the fast tokenizer file (create it with "
                f"transformers: AutoTokenizer.from_pretrained(DIR).save_pretrained(DIR))")
        try:
            self._tok = FastTokenizer.from_file(str(path))
        except Exception as e:
            raise ModelLoadError(f"cannot read {path} ({e}); the file is corrupt: re-download it") from None
        cfg = _load_json(model_dir / "tokenizer_config.json")
        self.bos_token = _token_text(cfg.get("bos_token"))
        self.eos_token = _token_text(cfg.get("eos_token"))
        self.chat_template = self._find_template(model_dir, cfg)
        self._compiled = None  # the chat template, compiled on first use (jinja2 costs ~0.1 s to import)
        self.eos_ids = self._eos_ids(model_dir, model_config)
        vocab = model_config.get("vocab_size")
        self._model_vocab = vocab if isinstance(vocab, int) else None  # ids at or above it have no embedding

    def fingerprint(self) -> str:
        """sha256 of what turns text into ids and messages into text: the tokenizer's own JSON, the chat
        template and the end-of-sequence ids (a saved prefill's tokens mean nothing under another)."""
        h = hashlib.sha256(self._tok.to_str().encode())
        h.update(b"\0" + (self.chat_template or "").encode() + b"\0" + repr(sorted(self.eos_ids)).encode())
        return h.hexdigest()

    @staticmethod
    def _find_template(model_dir: Path, cfg: dict) -> str | None:
        jinja = model_dir / "chat_template.jinja"
        if jinja.is_file():
            try:
                return jinja.read_text(encoding="utf-8")
            except UnicodeDecodeError as e:
                raise ModelLoadError(f"{jinja} is not UTF-8 text ({e}); re-download it") from None
        template = cfg.get("chat_template")
        if isinstance(template, list):  # named templates: take the default one
            named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
            template = named.get("default") or next(iter(named.values()), None)
        if template is None and (model_dir / "chat_template.json").is_file():
            template = _load_json(model_dir / "chat_template.json").get("chat_template")
        if template is not None and not isinstance(template, str):
            raise ModelLoadError(f"the chat template in {model_dir} is a {type(template).__name__}, not text; "
                                 "re-download tokenizer_config.json")
        return template

    def _eos_ids(self, model_dir: Path, model_config: dict) -> frozenset[int]:
        ids: set[int] = set()
        for source in (model_config, _load_json(model_dir / "generation_config.json")):
            value = source.get("eos_token_id")
            value = value if isinstance(value, list) else [] if value is None else [value]
            if not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in value):
                raise ModelLoadError(f"eos_token_id in {model_dir} must be a token id or a list of them, got "
                                     f"{source.get('eos_token_id')!r}; re-download config.json and "
                                     "generation_config.json")
            ids.update(value)
        if self.eos_token is not None and self._tok.token_to_id(self.eos_token) is not None:
            ids.add(self._tok.token_to_id(self.eos_token))
        return frozenset(int(i) for i in ids)

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    @property
    def base_vocab_size(self) -> int:
        """Tokens of the model vocabulary proper (without added special tokens)."""
        return self._tok.get_vocab_size(with_added_tokens=False)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        try:
            ids = self._tok.encode(text, add_special_tokens=add_special_tokens).ids
        except TypeError:  # the Rust tokenizer takes only valid Unicode
            if isinstance(text, str):
                check_utf8(text, "the text")
            raise
        if self._model_vocab is not None and ids and max(ids) >= self._model_vocab:
            raise ModelLoadError(f"the tokenizer gave token id {max(ids)} but the model embeds only "
                                 f"{self._model_vocab:,} tokens: tokenizer.json belongs to another model; use the "
                                 "checkpoint's own tokenizer files")
        return ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self._tok.decode(ids, skip_special_tokens=skip_special_tokens)

    def render_chat(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        """Apply the model's chat template to [{"role": ..., "content": ...}, ...]."""
        if not self.chat_template:
            raise InputError("this model has no chat template; pass a plain string prompt instead of messages")
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
                raise InputError(f"message {i} must be a dict with string 'role' and 'content'")
        from jinja2.exceptions import TemplateError

        try:
            if self._compiled is None:
                self._compiled = _compile(self.chat_template)
            return self._compiled.render(
                messages=messages, add_generation_prompt=add_generation_prompt,
                bos_token=self.bos_token or "", eos_token=self.eos_token or "")
        except (TemplateError, TypeError, ValueError, LookupError, AttributeError) as e:
            if isinstance(e, InputError):  # raise_exception() in the template: its own message
                raise
            raise InputError(f"the model's chat template fails on these messages ({type(e).__name__}: {e}); fix "
                             "the template (chat_template.jinja or tokenizer_config.json), or send plain text "
                             "(`kvretrieve generate --raw`)") from None

    def encode_chat(self, messages: list[dict], add_generation_prompt: bool = True) -> list[int]:
        # The template already writes BOS where the model wants it, so no special tokens are added.
        return self.encode(self.render_chat(messages, add_generation_prompt), add_special_tokens=False)


def _compile(source: str):
    """A chat template in a sandbox with the globals HF templates use (as transformers renders them)."""
    from jinja2.exceptions import TemplateError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise InputError(f"chat template refused the messages: {message}")

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    try:
        return env.from_string(source)
    except TemplateError as e:
        raise ModelLoadError(f"the model's chat template does not parse ({e})") from None


class StreamDecoder:
    """Turns a growing list of token ids into text pieces, never splitting a multi-byte character.

    Decodes a short window of recent ids twice (with and without the newest) and emits the difference
    once it no longer ends in an incomplete UTF-8 sequence (shown by the decoder as U+FFFD).
    """

    def __init__(self, tokenizer: Tokenizer):
        self.tok, self.ids, self.prefix, self.read = tokenizer, [], 0, 0

    def push(self, token: int) -> str:
        self.ids.append(token)
        before = self.tok.decode(self.ids[self.prefix:self.read])
        after = self.tok.decode(self.ids[self.prefix:])
        if len(after) > len(before) and not after.endswith("\ufffd"):
            self.prefix, self.read = self.read, len(self.ids)
            return after[len(before):]
        return ""

    def flush(self) -> str:
        """Whatever is still held back (an incomplete character at the very end)."""
        before = self.tok.decode(self.ids[self.prefix:self.read])
        after = self.tok.decode(self.ids[self.prefix:])
        self.prefix = self.read = len(self.ids)
        return after[len(before):]


def check_utf8(text: str, what: str) -> str:
    """Python decodes argv and stdin with surrogateescape, so bytes that are not UTF-8 arrive as lone
    surrogates, which the tokenizer rejects. They are refused, not replaced with U+FFFD: the documents
    and a strictly decoded stdin are refused too, and a prompt silently changed gives a worse answer
    with no hint why (a Latin-1 'café' would lose its 'é')."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        code = ord(text[e.start])
        bad = f"byte {bytes([code - 0xDC00])!r}" if 0xDC80 <= code <= 0xDCFF else f"character U+{code:04X}"
        raise InputError(f"{what} is not UTF-8 text (invalid {bad} at character {e.start}); convert it to UTF-8, "
                         "e.g. with `iconv -f latin1 -t utf-8`") from None
    return text
