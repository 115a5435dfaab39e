"""Several sequences decoding together (continuous batching): a Batch of Rows.

Each sequence keeps its own Engine (its backend: KV store, index, block pool) over one shared Decoder;
engine/batch_step.py runs a step of all of them at once. A sequence joins after its own prefill and
leaves when it ends; both happen between steps.

The host reads every row's new token id after a step (it decides whether the row goes on). With ahead
(what serve does on CUDA: 8 sessions of the 1.5B at 32K 14.0 -> 13.4 ms a step on an H100,
bench/results/batch_decode_15b_32k_s35_ahead.md), the next step is launched before those ids are read,
as Engine.decode does for one sequence, so the device does not idle while the host reads ids and plans
the next step; a row found finished then has one token too many in its cache, which is rolled back, so
each row's cache and ids are those of a step taken in turn.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

from .batch_step import StepRunner
from .engine import Engine, HostTokens


@dataclass(eq=False)  # rows are compared by identity (their fields hold tensors)
class Row:
    """One sequence of a Batch: `token` is sampled and not yet in its cache."""
    engine: Engine
    next_token: Callable[[torch.Tensor], torch.Tensor]   # logits [V] -> a 0-d token id on the device
    token: torch.Tensor
    left: int                                            # tokens it may still generate
    stop_ids: frozenset[int]
    base: int = 0                                        # its cache's length when it joined (the prompt)
    ids: list[int] = field(default_factory=list)         # generated so far (a stop id is not kept)
    finish: str | None = None                            # "eos", "length" or "left" once it has left
    unread: bool = False                                 # (ahead) token is sampled but its id not read yet

    def _take(self, token: torch.Tensor) -> None:
        self.token = token
        self._accept(int(token))  # the host reads every id anyway: it decides whether the row goes on

    def _accept(self, token_id: int) -> None:
        self.unread = False
        if token_id in self.stop_ids:
            self.finish = "eos"
            return
        self.ids.append(token_id)
        self.left -= 1
        if self.left <= 0:
            self.finish = "length"

    def _settle(self) -> None:
        """Once it has left, its cache holds what a batch taken in turn leaves: the prompt and every id,
        but the last unless it ended on a stop id (a step taken ahead may have appended one more)."""
        keep = self.base + len(self.ids) - (self.finish != "eos" and len(self.ids) > 0)
        if self.engine.length > keep:
            self.engine.truncate(keep)


class Batch:
    """Sequences that decode together; join() and step() are called between steps by one thread."""

    def __init__(self, one_launch: bool = True, ahead: bool = False):
        self.rows: list[Row] = []
        self.runner = StepRunner(one_launch)
        self.ahead = ahead
        self._host: HostTokens | None = None
        self._unread = None  # (ahead) the ids the last step sampled, unread: (host handle, their rows in order)

    def join(self, engine: Engine, logits: torch.Tensor, next_token: Callable[[torch.Tensor], torch.Tensor],
             max_new_tokens: int, stop_ids=()) -> Row:
        """Add a sequence whose prompt `engine` has just prefilled (logits [V] follow it); its first
        token is taken now. Returns its row (ids grow with each step; finish is set when it leaves)."""
        if any(r.engine is engine for r in self.rows):
            raise ValueError("this engine's sequence is already in the batch")
        row = Row(engine, next_token, logits.new_zeros((), dtype=torch.long), max_new_tokens, frozenset(stop_ids),
                  engine.length)
        if max_new_tokens <= 0:
            row.finish = "length"
            return row
        row._take(next_token(logits))
        if row.finish is None:
            self.rows.append(row)
        return row

    def leave(self, row: Row) -> None:
        """Take a row out between steps (its answer ended on a stop string, or its reader went away)."""
        self.rows = [r for r in self.rows if r is not row]
        row.finish = row.finish or "left"
        row._settle()
        self.runner.forget([row.engine])

    def step(self) -> list[Row]:
        """Every row appends its token and takes the next; returns the rows that left (finished)."""
        if not self.rows:
            return []
        if self.ahead:
            self._step_ahead()
        else:
            for r in self.rows:  # a row whose cache is full leaves before the step that would overflow it
                if r.engine.length >= r.engine.backend.capacity:
                    r.finish = "length"
            rows = [r for r in self.rows if r.finish is None]
            if rows:
                logits = self.runner.step([r.engine for r in rows], torch.stack([r.token for r in rows]))
                for r, row_logits in zip(rows, logits):
                    r._take(r.next_token(row_logits))
        left = [r for r in self.rows if r.finish is not None]
        self.rows = [r for r in self.rows if r.finish is None]
        for r in left:
            r._settle()
        self.runner.forget([r.engine for r in left])
        return left

    def _step_ahead(self) -> None:
        """Launch the step of every row that may append the token it holds (room in its cache, and not
        its last token still unread), then read the ids the step before sampled: a row whose id was a
        stop, or its last, leaves (step() rolls back what was appended past its ids)."""
        if self._host is None:
            self._host = HostTokens(self.rows[0].engine.model.device)
        go = [r for r in self.rows if r.engine.length < r.engine.backend.capacity and not (r.unread and r.left <= 1)]
        sent = None
        if go:
            logits = self.runner.step([r.engine for r in go], torch.stack([r.token for r in go]))
            tokens = torch.stack([r.next_token(row_logits) for r, row_logits in zip(go, logits)])
            sent = self._host.send(tokens)
        if self._unread is not None:
            handle, rows = self._unread
            for r, token_id in zip(rows, self._host.read_all(handle)):
                if r.finish is None and r.unread:
                    r._accept(token_id)
        for r in self.rows:
            if r.finish is None and r not in go:
                r.finish = "length"  # no room for another token
        self._unread = (sent, go) if go else None
        for i, r in enumerate(go):
            if r.finish is None:
                r.token, r.unread = tokens[i], True
