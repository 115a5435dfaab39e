"""The engine: runs token segments through the model against an attention backend.

A backend (backends.base.AttentionBackend) stores K,V and computes attention. The engine tells it
which positions a forward pass writes (begin), runs its prologue, lets the model call it once per
layer, and records the new length only when every layer has run (commit), so an interrupted pass
leaves the cache as it was before.

On CUDA a decode step whose backend names a graph key (what the step's shapes depend on) runs as a
CUDA graph: the first step with a new key runs eagerly (warm-up) and is then captured; later steps
only replay it. Everything a step reads that changes between steps (token, position, backend
state) lives in tensors written in place before the replay, so the graph never goes stale.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator

import torch

from ..backends.base import AttentionBackend
from ..backends.prefill_attention import PREFIX_PIECE
from ..errors import NumericsError, ResourceError
from ..models.llama import Decoder
from .interrupts import interrupts_deferred


class Engine:
    def __init__(self, model: Decoder, backend: AttentionBackend, prefill_chunk: int, graphs: bool = True):
        self.model, self.backend, self.chunk = model, backend, prefill_chunk
        dev = model.device
        # Dynamic-NTK RoPE changes its frequencies with the length, which a graph would freeze.
        self.graphs = graphs and dev.type == "cuda" and model.cfg.rope.kind != "dynamic"
        # decode() launches a step before the host reads the token it appends where launches are
        # asynchronous (CUDA); on the CPU that would only delay each token's display by a step.
        self.ahead = dev.type == "cuda"
        self._token = torch.zeros(1, dtype=torch.long, device=dev)
        self._position = torch.zeros(1, dtype=torch.long, device=dev)
        self._captured: dict = {}     # graph key -> (CUDAGraph, its output logits)
        self._pool = None             # the memory pool all captured graphs share

    @property
    def length(self) -> int:
        return self.backend.length

    @torch.inference_mode()
    def truncate(self, length: int) -> None:
        """Forget every token from position `length` on."""
        with interrupts_deferred():
            self.backend.truncate(length)

    @torch.inference_mode()
    def load_state(self, state, length: int) -> None:
        """The backend takes a saved state of `length` tokens (AttentionBackend.load_state)."""
        self.backend.load_state(state, length)
        if self.model.device.type == "cuda":
            torch.cuda.synchronize(self.model.device)

    @contextmanager
    def _pass(self, n: int):
        """A forward pass of n tokens from the committed length: begin, the body, commit. Any exception
        (Ctrl-C included) rolls back what the pass wrote, also after its commit, since the caller
        never got its result."""
        start = self.backend.length
        if start + n > self.backend.capacity:
            raise ValueError(f"{n} tokens at position {start} exceed the capacity {self.backend.capacity}")
        try:
            self.backend.begin(start, n)
            yield start
            with interrupts_deferred():
                self.backend.commit(start + n)
        except BaseException:
            self.truncate(start)
            raise

    @torch.inference_mode()
    def forward(self, ids: torch.Tensor, on_layer: Callable[[int], None] | None = None,
                last_logits: bool = False) -> torch.Tensor:
        """Append a segment of token ids; returns the hidden rows [T, hidden] after the last layer, or
        with last_logits the logits [V] (fp32) that follow the last token."""
        try:
            with self._pass(ids.shape[0]) as start:
                self.backend.prologue()
                x = self.model.forward(ids, start, self.backend, self.chunk, on_layer)
                out = self.model.logits(x[-1:])[0] if last_logits else x
                # One sync a prompt, where the caller waits for the first token next anyway.
                if last_logits and not torch.isfinite(out.sum()):
                    raise NumericsError(self._nonfinite(start + ids.shape[0]))
        except torch.OutOfMemoryError:
            # Activations grow with the context (a layer's keys and values so far come back for
            # attention): a capacity whose caches fit at load may still not prefill. The pass was
            # rolled back, so the session goes on.
            raise ResourceError(
                f"out of GPU memory while running {ids.shape[0]:,} tokens after {self.length:,} (the cache is "
                "as it was before them); lower max_context or the prompt, raise gpu_mem_gb, or use "
                "retrieval (RetrievalConfig(index='auto') picks an index that leaves room)") from None
        return out

    @torch.inference_mode()
    def warm_up(self) -> None:
        """On CUDA, with an empty cache: pay the costs a process pays once, on a throwaway prompt, so
        a user's first prompt does not (8B shape, a fresh process's first 128K prefill: 17.6 s
        without, 15.0 s with; bench/NOTES.md). They are Triton compiles, cuDNN plans for each
        attention shape, and cuBLAS/cuSOLVER set-up. One full prefix piece plus a chunk
        makes every shape a long prompt attends with: a chunk against 0-3 chunks and a whole
        piece. Two eager decode steps compile the decode kernels. The cache is left empty."""
        if self.model.device.type != "cuda" or self.length:
            return
        n = min(PREFIX_PIECE + self.chunk, self.backend.capacity - 3)
        if n < 1:
            return
        ids = torch.arange(n, device=self.model.device) % self.model.cfg.vocab_size
        token = self.forward(ids, last_logits=True).argmax()
        # Eager steps: a graph captured at this context would not be the prompt's (its key follows
        # the context) and would only hold memory.
        graphs, self.graphs = self.graphs, False
        try:
            for _ in range(2):
                token = self.step(token).argmax()
        finally:
            self.graphs = graphs
        torch.cuda.synchronize(self.model.device)
        self.truncate(0)
        self.backend.drop_decode_memory()  # what the steps added, not held through a prefill

    def prefill(self, ids: list[int], on_layer: Callable[[int], None] | None = None) -> torch.Tensor:
        """Append tokens; returns the logits [V] (fp32) that follow the last one."""
        return self.forward(torch.tensor(ids, dtype=torch.long, device=self.model.device), on_layer, last_logits=True)

    @torch.inference_mode()
    def step(self, token: torch.Tensor) -> torch.Tensor:
        """Append one token (a 0-d device tensor, so no host sync is needed); returns next logits [V]."""
        with self._pass(1) as start:
            self._token.copy_(token.view(1))
            self._position.fill_(start)
            key = self.backend.graph_key() if self.graphs else None
            if key is not None and key in self._captured:
                graph, out = self._captured[key]
                graph.replay()
                logits = out.clone()  # the graph's output buffer is overwritten by the next replay
            else:
                logits = self._decode(start)
                if key is not None:
                    self._capture(key, start)
        return logits

    def decode(self, token: torch.Tensor, next_token: Callable[[torch.Tensor], torch.Tensor],
               steps: int) -> Iterator[int]:
        """The generation loop: yields the id of `token` (a 0-d device tensor), then of each token that
        next_token(logits) picks, steps + 1 ids in all. Asking for the next id appends the last one
        to the cache; a consumer that stops at an id (closes the generator: use contextlib.closing)
        leaves that id out of the cache.

        With self.ahead the step that appends an id is launched before the host reads the id, so the
        device never idles while the host reads a token, decides whether to go on and prepares the
        next step (1-2 ms per token on an H100 host). The price: when the consumer stops, that
        launched step is rolled back."""
        ahead = self.ahead
        reader = HostTokens(self.model.device)
        pending, launched_at = reader.send(token), None
        try:
            for i in range(steps + 1):
                # The first id is read at once: it ends the prefill, and its step may capture a graph.
                early, nxt = ahead and 0 < i < steps, None
                if early:
                    launched_at = self.length
                    token, nxt = self._next(token, next_token, reader)
                token_id = reader.read(pending)
                if token_id < 0:
                    # The step that gave non-finite logits appended the id read last: roll it back
                    # too, so the cache keeps only what ran clean and its NaN never reaches a later turn.
                    bad = (launched_at if launched_at is not None else self.length) - 1
                    launched_at = None
                    self.truncate(bad)
                    raise NumericsError(self._nonfinite(bad + 1))
                yield token_id
                launched_at = None  # the consumer goes on: the launched step stands
                if not early and i < steps:
                    token, nxt = self._next(token, next_token, reader)
                pending = nxt
        finally:
            if launched_at is not None:
                self.truncate(launched_at)

    def _next(self, token: torch.Tensor, next_token, reader: "HostTokens"):
        """One decode step and its token; the host gets -1 instead of the id when the logits are not all
        finite. The host reads every id anyway, so the check costs two small kernels a step and no sync
        (checking the logits on the host would add one, and every N tokens would let garbage through)."""
        logits = self.step(token)
        token = next_token(logits)
        return token, reader.send(torch.where(torch.isfinite(logits.sum()), token, -1))

    def _nonfinite(self, position: int) -> str:
        dtype = str(self.model.dtype).removeprefix("torch.")
        cause = (f"activations likely overflowed {dtype}: use dtype='bfloat16' or dtype='float32'"
                 if dtype == "float16" else "the weights are likely damaged (re-download the checkpoint), or "
                 "activations overflowed: try dtype='float32'")
        return f"the model produced NaN or infinite logits at position {position:,} (dtype {dtype}); {cause}"

    def _decode(self, start: int) -> torch.Tensor:
        self.backend.prologue()
        x = self.model.forward(self._token, start, self.backend, self.chunk, position=self._position)
        return self.model.logits(x)[0]

    def _capture(self, key, start: int) -> None:
        """Record the step just run (so every kernel is compiled and the allocator warm) as a graph.
        Capture only records: the cache is not written twice."""
        graph = torch.cuda.CUDAGraph()
        torch.cuda.synchronize(self.model.device)
        with torch.cuda.graph(graph, pool=self._pool):
            logits = self._decode(start)
        self._pool = graph.pool()
        self._captured[key] = (graph, logits)


class HostTokens:
    """Brings token ids to the host without waiting for work queued after them: each send (one id, or
    a batch's [B]) is copied into its own pinned slot, two in turn, and an event marks the copy
    (.item() would wait for the whole stream, including a step launched after the tokens)."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.slots = [torch.zeros(8, dtype=torch.long, pin_memory=self.cuda) for _ in range(2)]
        self.events = [torch.cuda.Event() for _ in range(2)] if self.cuda else None
        self.n = 0

    def send(self, tokens: torch.Tensor):
        if not self.cuda:
            return tokens
        i, self.n, n = self.n % 2, self.n + 1, tokens.numel()
        if self.slots[i].numel() < n:  # the old slot is not read again: its last copy was read before
            self.slots[i] = torch.zeros(2 * n, dtype=torch.long, pin_memory=True)
        self.slots[i][:n].copy_(tokens.view(-1), non_blocking=True)
        self.events[i].record()
        return i, n

    def read(self, handle) -> int:
        return self.read_all(handle)[0]

    def read_all(self, handle) -> list[int]:
        if not self.cuda:
            return handle.view(-1).tolist()
        i, n = handle
        self.events[i].synchronize()
        return self.slots[i][:n].tolist()
