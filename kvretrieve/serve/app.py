"""An OpenAI-compatible HTTP server over one LLM (Starlette on uvicorn).

With served documents (`kvretrieve serve -d FILE` or `--resume F.kvr`) every chat request gets them
in front of its first user message, as `kvretrieve chat` does. Each request waits in a worker
thread while the batcher (batcher.py) decodes it together with the others, each in its own session
(KV cache); a request whose prompt starts with what a session's cache holds (a document asked about
again) prefills only the rest, and `usage.prompt_tokens_details.cached_tokens` says how much was
reused. At most max_waiting requests wait or run; more get 429. A streamed answer whose client goes
away leaves the batch after the step in flight.
"""
from __future__ import annotations

import asyncio
import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace

from starlette.applications import Starlette
from starlette.requests import Request as HttpRequest
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route

from ..documents import with_documents
from ..errors import BusyError, InputError, KVRetrieveError, NumericsError, ResourceError
from .batcher import Batcher
from .protocol import FINISH, ApiError, Request, chunk, new_id, parse, response

MAX_BODY = 64 << 20  # bytes of JSON a request may send (a 128K-token prompt is ~0.5 MB of text)


class Metrics:
    def __init__(self):
        self.requests: dict[tuple[str, int], int] = {}
        self.tokens = {"prompt": 0, "completion": 0, "cached": 0}
        self.lock = threading.Lock()

    def count(self, endpoint: str, status: int, result=None) -> None:
        with self.lock:
            self.requests[(endpoint, status)] = self.requests.get((endpoint, status), 0) + 1
            if result is not None:
                self.tokens["prompt"] += result.prompt_tokens
                self.tokens["completion"] += len(result.token_ids)
                self.tokens["cached"] += result.reused_tokens


class Server:
    def __init__(self, llm, model_name: str, max_waiting: int = 16, documents: str = "", system: str | None = None,
                 sessions: int = 1, make_session=None):
        """documents, system: put in front of every chat request as `kvretrieve chat` does (served
        documents: their prefill, done or reopened at start, is a prefix of every such request).
        sessions: requests that decode together (batcher.Batcher), each in its own KV cache:
        `llm`'s, then ones make_session() makes as requests come."""
        self.llm, self.name, self.max_waiting = llm, model_name, max_waiting
        self.batcher = Batcher(llm, sessions if make_session else 1, make_session)
        self.documents, self.system = documents, system
        self.waiting = 0
        self.metrics = Metrics()
        self.pool = ThreadPoolExecutor(max_workers=max_waiting, thread_name_prefix="kvretrieve-request")
        self.started = time.time()
        self.stopping = threading.Event()

    def close(self) -> None:
        """Stop: generations still running end after their current step; returns when they have."""
        self.stopping.set()
        self.batcher.close()
        self.pool.shutdown(wait=True, cancel_futures=True)

    # ---- one generation, in a worker thread ------------------------------------------------------------
    def _run(self, req: Request, emit, cancelled: threading.Event):
        """Run the generation, emit(piece) for each piece (from the batcher's thread); returns the
        GenerationResult (None when the client went away first)."""
        ids = self.llm.tokenize(req.prompt)
        return self.batcher.submit(ids, req.sampling, emit, cancelled).result()

    def _admit(self) -> None:
        if self.waiting >= self.max_waiting:
            raise ApiError(429, f"{self.waiting} requests are already waiting or running (--max-waiting "
                                f"{self.max_waiting}); retry later", kind="rate_limit_error", code="rate_limit_exceeded")

    # ---- endpoints -----------------------------------------------------------------------------------
    async def completions(self, http: HttpRequest) -> Response:
        return await self._generate(http, "completion")

    async def chat(self, http: HttpRequest) -> Response:
        return await self._generate(http, "chat")

    async def _generate(self, http: HttpRequest, kind: str) -> Response:
        endpoint = "/v1/chat/completions" if kind == "chat" else "/v1/completions"
        try:
            body = await self._json(http)
            req = parse(body, kind, self.llm.max_context)
            if kind == "chat" and (self.documents or self.system):
                req = replace(req, prompt=with_documents(req.prompt, self.documents, self.system))
            model = body.get("model")
            if model not in (None, self.name):
                raise ApiError(404, f"the model '{model}' does not exist; this server runs '{self.name}'",
                               param="model", code="model_not_found")
            self._admit()
        except ApiError as e:
            self.metrics.count(endpoint, e.status)
            return error_response(e)
        if req.stream:  # counted once its body starts: a body never started (the client gone) runs no cleanup
            return StreamingResponse(self._events(req, endpoint), media_type="text/event-stream")
        loop, cancelled = asyncio.get_running_loop(), threading.Event()
        self.waiting += 1
        try:
            result = await loop.run_in_executor(self.pool, self._run, req, lambda piece: None, cancelled)
        except BaseException as e:
            err = api_error(e)
            self.metrics.count(endpoint, err.status)
            if isinstance(e, asyncio.CancelledError):
                cancelled.set()
                raise
            return error_response(err)
        finally:
            self.waiting -= 1
        self.metrics.count(endpoint, 200, result)
        return JSONResponse(response(req, new_id(kind), self.name, result))

    async def _events(self, req: Request, endpoint: str):
        """Server-sent events of one streamed answer; the worker thread hands pieces over a queue."""
        loop, queue, cancelled = asyncio.get_running_loop(), asyncio.Queue(), threading.Event()
        rid, done = new_id(req.kind), object()

        def emit(piece: str) -> None:
            loop.call_soon_threadsafe(queue.put_nowait, piece)

        def work():
            try:
                return self._run(req, emit, cancelled)
            finally:
                loop.call_soon_threadsafe(queue.put_nowait, done)

        status = 200
        self.waiting += 1
        try:
            task = loop.run_in_executor(self.pool, work)
            yield _sse(chunk(req, rid, self.name, first=True))
            while (piece := await queue.get()) is not done:
                yield _sse(chunk(req, rid, self.name, text=piece))
            try:
                result = await task
            except Exception as e:  # noqa: BLE001 - told to the client in the stream, as OpenAI's servers do
                err = api_error(e)
                status = err.status
                yield _sse(err.body())
                return
            yield _sse(chunk(req, rid, self.name, finish=FINISH[result.finish_reason]))
            if req.include_usage:
                yield _sse(chunk(req, rid, self.name, result=result))
            yield "data: [DONE]\n\n"
            self.metrics.count(endpoint, status, result)
        finally:  # also when the client went away (the response task is cancelled here)
            cancelled.set()
            self.waiting -= 1
            if status != 200:
                self.metrics.count(endpoint, status)

    async def models(self, http: HttpRequest) -> Response:
        return JSONResponse({"object": "list", "data": [{"id": self.name, "object": "model",
                                                         "created": int(self.started), "owned_by": "kvretrieve"}]})

    async def health(self, http: HttpRequest) -> Response:
        return JSONResponse({"status": "ok", "model": self.name, "mode": self.llm.mode, "waiting": self.waiting})

    async def prometheus(self, http: HttpRequest) -> Response:
        m, backend = self.metrics, self.llm.engine.backend
        lines = ["# TYPE kvretrieve_requests_total counter"]
        with m.lock:
            lines += [f'kvretrieve_requests_total{{endpoint="{e}",status="{s}"}} {n}' for (e, s), n in
                      sorted(m.requests.items())]
            lines += ["# TYPE kvretrieve_tokens_total counter"]
            lines += [f'kvretrieve_tokens_total{{kind="{k}"}} {n}' for k, n in m.tokens.items()]
        lines += ["# TYPE kvretrieve_waiting_requests gauge", f"kvretrieve_waiting_requests {self.waiting}",
                  "# TYPE kvretrieve_kv_bytes gauge"]
        lines += [f'kvretrieve_kv_bytes{{part="{k}"}} {v}' for k, v in backend.memory().items()]
        lines += ["# TYPE kvretrieve_cached_tokens gauge", f"kvretrieve_cached_tokens {self.llm.cached_tokens}",
                  "# TYPE kvretrieve_sessions gauge", f"kvretrieve_sessions {self.batcher.made}",
                  "# TYPE kvretrieve_batch_rows_max gauge", f"kvretrieve_batch_rows_max {self.batcher.most_rows}"]
        counters = backend.counters()
        if counters:
            lines += ["# TYPE kvretrieve_block_cache_total counter",
                      f'kvretrieve_block_cache_total{{result="hit"}} {int(counters["hits"])}',
                      f'kvretrieve_block_cache_total{{result="miss"}} {int(counters["misses"])}']
        return PlainTextResponse("\n".join(lines) + "\n", media_type="text/plain; version=0.0.4")

    @staticmethod
    async def _json(http: HttpRequest):
        raw = await http.body()
        if len(raw) > MAX_BODY:
            raise ApiError(413, f"the request body has {len(raw):,} bytes, more than {MAX_BODY:,}")
        try:
            return json.loads(raw)
        except (ValueError, UnicodeDecodeError) as e:
            raise ApiError(400, f"the request body is not valid JSON ({e})") from None

    def app(self) -> Starlette:
        routes = [Route("/v1/chat/completions", self.chat, methods=["POST"]),
                  Route("/v1/completions", self.completions, methods=["POST"]),
                  Route("/v1/models", self.models, methods=["GET"]), Route("/health", self.health, methods=["GET"]),
                  Route("/metrics", self.prometheus, methods=["GET"])]

        async def not_found(http, exc):
            return error_response(ApiError(exc.status_code, f"{http.method} {http.url.path}: {exc.detail}",
                                           code="not_found" if exc.status_code == 404 else None))
        return Starlette(routes=routes, exception_handlers={404: not_found, 405: not_found})


def api_error(e: BaseException) -> ApiError:
    """A generation's exception as the HTTP error it answers with."""
    if isinstance(e, ApiError):
        return e
    if isinstance(e, InputError) and "context holds" in str(e):
        return ApiError(413, str(e), code="context_length_exceeded")
    if isinstance(e, (InputError, BusyError)):
        return ApiError(400, str(e))
    if isinstance(e, (ResourceError, NumericsError)):
        return ApiError(503, str(e), kind="server_error")
    if isinstance(e, KVRetrieveError):
        return ApiError(400, str(e))
    return ApiError(500, f"internal error: {type(e).__name__}: {e}", kind="server_error")


def error_response(e: ApiError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status)


def _sse(obj: dict) -> str:
    return f"data: {json.dumps(obj)}\n\n"
