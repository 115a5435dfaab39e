"""Requests decoding together: the server's sessions stepped as one batch (engine.batch).

A session is an LLM over the server's one Decoder with its own KV cache; the first is the LLM the
server was started with (its served documents already prefilled), more are made when requests wait
and none is free, up to `sessions`, until one cannot be made for want of memory (then requests
queue). One thread owns every session: between batched decode steps it admits waiting requests,
each into the free session whose cache shares the longest start with its prompt (a document asked
about again is not prefilled again; a saved one is reopened from the document cache), prefills its
prompt there a slice at a time between the others' steps (PREFILL_SLICE), and joins it to the
batch; after each step it hands every request its text, and a request that ends, or whose client
went away, leaves. The next step goes on with the others. Every request's Future is answered, also
when the server stops or the thread meets an error it did not expect (then every request gets it).
"""
from __future__ import annotations

import queue
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Callable

import torch

from ..config import SamplingParams
from ..doc_cache import shared_prefix
from ..engine.batch import Batch, Row
from ..engine.sampling import Sampler
from ..errors import ResourceError
from ..llm import GenerationResult, LLM
from ..textout import TextOut


# Prompt tokens a request prefills between two decode steps of the requests already running: a long
# prompt then holds them for a slice at a time, not for its whole prefill (vLLM's chunked prefill).
PREFILL_SLICE = 2048


class _Cancelled(Exception):
    pass


@dataclass(eq=False)
class Job:
    ids: list[int]
    params: SamplingParams
    emit: Callable[[str], None]
    cancelled: threading.Event
    done: Future = field(default_factory=Future)


@dataclass(eq=False)
class _Prefilling:
    """A request in its session, its prompt prefilled up to `upto` so far."""
    job: Job
    session: LLM
    upto: int = 0
    reused: int | None = None
    t0: float = field(default_factory=time.perf_counter)


@dataclass(eq=False)
class _Running:
    job: Job
    session: LLM
    row: Row
    text: TextOut
    reused: int
    prefill_s: float
    step_ms: list[float] = field(default_factory=list)
    seen: int = 0           # row ids already given to text


class Batcher:
    def __init__(self, first: LLM, sessions: int, make_session: Callable[[], LLM] | None,
                 prefill_slice: int = PREFILL_SLICE, ahead: bool | None = None):
        """prefill_slice: prompt tokens a new request prefills between two steps of the others. ahead:
        launch each step before reading the ids of the one before (engine.batch); None: on CUDA, where
        8 sessions of the 1.5B at 32K went 14.0 -> 13.4 ms a step (H100,
        bench/results/batch_decode_15b_32k_s35_ahead.md)."""
        self.free, self.made, self.make = [first], 1, make_session
        self.limit = sessions if make_session is not None else 1
        self.slice, self.prefilling = prefill_slice, []
        self.inbox: queue.Queue[Job | None] = queue.Queue()
        ahead = first.engine.model.device.type == "cuda" if ahead is None else ahead
        self.batch, self.running = Batch(ahead=ahead), []
        self.waiting: list[Job] = []
        self.most_rows = 0      # the most requests one step has decoded (/metrics)
        self.stopping, self._lock, self._closed = threading.Event(), threading.Lock(), False
        self.thread = threading.Thread(target=self._loop, name="kvretrieve-batcher", daemon=True)
        self.thread.start()

    def submit(self, ids: list[int], params: SamplingParams, emit: Callable[[str], None],
               cancelled: threading.Event) -> Future:
        """Queue a request; its Future gives the GenerationResult (None when cancelled first)."""
        job = Job(ids, params, emit, cancelled)
        with self._lock:
            if self._closed:
                job.done.set_result(None)
            else:
                self.inbox.put(job)
        return job.done

    def close(self) -> None:
        """Stop: running answers end after the step in flight, waiting ones get None."""
        with self._lock:
            self._closed = True
            self.stopping.set()
            self.inbox.put(None)
        self.thread.join()
        self._collect(block=False)  # what came after the thread's last look
        for job in self.waiting:
            job.done.set_result(None)
        self.waiting = []

    # ---- the thread -----------------------------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            self._collect(block=not self.running and not self.waiting and not self.prefilling)
            if self.stopping.is_set():
                self._end_all()
                return
            try:
                self._admit()
                self._prefill_slice()
                if self.running:
                    self._step()
            except BaseException as e:  # noqa: BLE001 - a thread that died would leave every request waiting
                self._end_all(e)

    def _end_all(self, error: BaseException | None = None) -> None:
        """Every request ends: with `error`, or None (stopping); every session is free again."""
        for r in list(self.running):
            self._leave(r, error)  # a running answer is unfinished: None, or the error
        for p in self.prefilling:
            self.free.append(p.session)
            self._answer(p.job, error)
        for job in self.waiting:
            self._answer(job, error)
        self.prefilling, self.waiting = [], []

    @staticmethod
    def _answer(job: Job, error: BaseException | None) -> None:
        if not job.done.done():
            job.done.set_exception(error) if error is not None else job.done.set_result(None)

    def _collect(self, block: bool) -> None:
        """Move the inbox's requests to the waiting list; with block, wait for one (None wakes it to stop)."""
        try:
            job = self.inbox.get() if block else self.inbox.get_nowait()
            while True:
                if job is not None:
                    self.waiting.append(job)
                job = self.inbox.get_nowait()
        except queue.Empty:
            pass

    def _admit(self) -> None:
        for job in [j for j in self.waiting if j.cancelled.is_set()]:
            self.waiting.remove(job)
            job.done.set_result(None)
        while self.waiting:
            session = self._session_for(self.waiting[0].ids)
            if session is None:
                return
            self.prefilling.append(_Prefilling(self.waiting.pop(0), session))

    def _session_for(self, ids: list[int]) -> LLM | None:
        if not self.free and self.made < self.limit:
            try:
                self.free.append(self.make())
                self.made += 1
            except (ResourceError, torch.OutOfMemoryError):
                self.limit = self.made  # no memory for another cache: requests wait for a free session
        if not self.free:
            return None
        best = max(self.free, key=lambda s: shared_prefix(s.cached_ids, ids))
        self.free.remove(best)
        return best

    def _prefill_slice(self) -> None:
        """The first prefilling request's next slice of prompt; once all of it is in, its first token
        and a row in the batch. With no row running, the whole prompt goes at once."""
        if not self.prefilling:
            return
        p = self.prefilling[0]
        job, session = p.job, p.session
        end = len(job.ids) if not self.running else min(len(job.ids), p.upto + self.slice)
        try:
            if job.cancelled.is_set():
                raise _Cancelled
            reused, logits = session.prefill_for_batch(job.ids[:end])  # reuses what earlier slices put in
            p.reused = reused if p.reused is None else p.reused
            p.upto = end
            if end < len(job.ids):
                return
            room = session.max_context - session.engine.length
            row = self.batch.join(session.engine, logits, Sampler(job.params, session.device, job.ids),
                                  min(job.params.max_new_tokens, room + 1) if job.params.max_new_tokens else 0)
        except BaseException as e:  # noqa: BLE001 - the request's error; the session goes back as it is
            self.prefilling.remove(p)
            self.free.append(session)
            job.done.set_result(None) if isinstance(e, _Cancelled) else job.done.set_exception(e)
            return
        self.prefilling.remove(p)
        r = _Running(job, session, row, TextOut(session.tokenizer, job.params), p.reused, time.perf_counter() - p.t0)
        if job.params.max_new_tokens == 0:
            r.text.finish = "length"
        self.running.append(r)
        self._hand_over(r)

    def _step(self) -> None:
        self.most_rows = max(self.most_rows, len(self.batch.rows))
        t = time.perf_counter()
        try:
            self.batch.step()
        except BaseException as e:  # noqa: BLE001 - every row was rolled back: each request gets the error
            for r in list(self.running):
                self._leave(r, error=e)
            return
        ms = 1e3 * (time.perf_counter() - t)
        for r in list(self.running):
            r.step_ms.append(ms)
            self._hand_over(r)

    def _hand_over(self, r: _Running) -> None:
        """Give the row's new ids to its text, send what may be sent, and end it if it is over."""
        while r.seen < len(r.row.ids) and r.text.finish is None:
            piece = r.text.push(r.row.ids[r.seen])
            r.seen += 1
            if piece:
                r.job.emit(piece)
        if r.text.finish is None and r.row.finish is not None:
            r.text.finish = "context"  # the row ran out of cache (its token budget ends the text first)
        if r.text.finish is not None or r.job.cancelled.is_set():
            self._leave(r)

    def _leave(self, r: _Running, error: BaseException | None = None) -> None:
        self.batch.leave(r.row)
        self.running.remove(r)
        r.session.record_decoded(r.row.ids)
        self.free.append(r.session)
        if error is not None:
            r.job.done.set_exception(error)
            return
        if r.job.cancelled.is_set() or r.text.finish is None:
            r.job.done.set_result(None)
            return
        if piece := r.text.close():
            r.job.emit(piece)
        r.job.done.set_result(GenerationResult(
            text=r.text.text, token_ids=r.text.ids, prompt_tokens=len(r.job.ids), reused_tokens=r.reused,
            finish_reason=r.text.finish, prefill_s=r.prefill_s, decode_s=sum(r.step_ms) / 1e3, token_ms=r.step_ms))

