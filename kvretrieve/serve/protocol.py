"""The OpenAI wire format: requests checked into (prompt, SamplingParams), results into response
bodies and stream chunks, errors into OpenAI's error shape. No server code here (app.py is that)."""
from __future__ import annotations

import time
import uuid
from dataclasses import dataclass

from ..config import SamplingParams
from ..errors import ConfigError


class ApiError(Exception):
    """An error to answer with: HTTP status and OpenAI's error body."""

    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.kind, self.param, self.code = status, kind, param, code

    def body(self) -> dict:
        return {"error": {"message": str(self), "type": self.kind, "param": self.param, "code": self.code}}


FINISH = {"eos": "stop", "stop": "stop", "length": "length", "context": "length"}
_UNSUPPORTED = ("tools", "functions", "tool_choice", "logprobs", "response_format", "logit_bias")


@dataclass(frozen=True)
class Request:
    kind: str                     # "chat" or "completion"
    prompt: str | list[dict]      # text, or chat messages
    sampling: SamplingParams
    stream: bool
    include_usage: bool


def _number(body: dict, name: str, kind, default, low=None, high=None):
    value = body.get(name, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, kind):
        raise ApiError(400, f"'{name}' must be a {'number' if kind is not int else 'whole number'}, got {value!r}",
                       param=name)
    if (low is not None and value < low) or (high is not None and value > high):
        raise ApiError(400, f"'{name}' must be within [{low}, {high}], got {value}", param=name)
    return value


def _messages(body: dict) -> list[dict]:
    msgs = body.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise ApiError(400, "'messages' must be a non-empty list of {role, content}", param="messages")
    out = []
    for i, m in enumerate(msgs):
        if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant"):
            raise ApiError(400, f"messages[{i}] needs a role of system, user or assistant", param="messages")
        content = m.get("content")
        if isinstance(content, list):  # content parts: text only
            if not all(isinstance(p, dict) and p.get("type") == "text" for p in content):
                raise ApiError(400, f"messages[{i}]: only text content parts are supported", param="messages")
            content = "".join(str(p.get("text", "")) for p in content)
        if not isinstance(content, str):
            raise ApiError(400, f"messages[{i}].content must be text", param="messages")
        out.append({"role": m["role"], "content": content})
    return out


def parse(body, kind: str, max_tokens_cap: int) -> Request:
    """A request body (already JSON-decoded) -> Request, or ApiError 400 naming the field."""
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
    for name in _UNSUPPORTED:
        if body.get(name) not in (None, [], False):
            raise ApiError(400, f"'{name}' is not supported by this server", param=name)
    for name in ("frequency_penalty", "presence_penalty"):
        if _number(body, name, (int, float), 0, -2, 2) != 0:
            raise ApiError(400, f"'{name}' is not supported by this server (0 only)", param=name)
    if _number(body, "n", int, 1, 1, 1) != 1:
        raise ApiError(400, "'n' must be 1", param="n")
    if kind == "chat":
        prompt: str | list[dict] = _messages(body)
    else:
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
            prompt = prompt[0]
        if not isinstance(prompt, str) or not prompt:
            raise ApiError(400, "'prompt' must be a non-empty string", param="prompt")
    stop = body.get("stop")
    stop = [stop] if isinstance(stop, str) else stop or []
    if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop) or len(stop) > 4:
        raise ApiError(400, "'stop' must be a string or a list of up to 4 non-empty strings", param="stop")
    max_tokens = _number(body, "max_completion_tokens", int, None, 1) or _number(body, "max_tokens", int, 256, 1)
    if max_tokens > max_tokens_cap:
        raise ApiError(400, f"'max_tokens' is {max_tokens:,}, more than this server's context of {max_tokens_cap:,} "
                            "tokens; ask for fewer", param="max_tokens")
    try:
        sampling = SamplingParams(
            max_new_tokens=max_tokens, temperature=float(_number(body, "temperature", (int, float), 1.0, 0, 2)),
            top_p=float(_number(body, "top_p", (int, float), 1.0, 0, 1)), seed=_number(body, "seed", int, None, 0),
            stop=tuple(stop))
    except ConfigError as e:
        raise ApiError(400, str(e)) from None
    options = body.get("stream_options") or {}
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise ApiError(400, "'stream' must be true or false", param="stream")
    return Request(kind, prompt, sampling, stream, bool(isinstance(options, dict) and options.get("include_usage")))


def new_id(kind: str) -> str:
    return ("chatcmpl-" if kind == "chat" else "cmpl-") + uuid.uuid4().hex[:24]


def usage(result) -> dict:
    n = len(result.token_ids)
    return {"prompt_tokens": result.prompt_tokens, "completion_tokens": n, "total_tokens": result.prompt_tokens + n,
            "prompt_tokens_details": {"cached_tokens": result.reused_tokens}}


def response(req: Request, rid: str, model: str, result) -> dict:
    finish = FINISH[result.finish_reason]
    if req.kind == "chat":
        choice = {"index": 0, "message": {"role": "assistant", "content": result.text}, "finish_reason": finish,
                  "logprobs": None}
        obj = "chat.completion"
    else:
        choice, obj = {"index": 0, "text": result.text, "finish_reason": finish, "logprobs": None}, "text_completion"
    return {"id": rid, "object": obj, "created": int(time.time()), "model": model, "choices": [choice],
            "usage": usage(result)}


def chunk(req: Request, rid: str, model: str, text: str | None = None, finish: str | None = None,
          first: bool = False, result=None) -> dict:
    """One stream chunk: a piece of text, the end (finish), or with result the usage chunk."""
    if result is not None:
        return {"id": rid, "object": "chat.completion.chunk" if req.kind == "chat" else "text_completion",
                "created": int(time.time()), "model": model, "choices": [], "usage": usage(result)}
    if req.kind == "chat":
        delta = ({"role": "assistant", "content": ""} if first else {}) | ({"content": text} if text else {})
        choice = {"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}
        obj = "chat.completion.chunk"
    else:
        choice, obj = {"index": 0, "text": text or "", "finish_reason": finish, "logprobs": None}, "text_completion"
    return {"id": rid, "object": obj, "created": int(time.time()), "model": model, "choices": [choice]}
