"""Several sequences decoding together (continuous batching, first step).

Each sequence keeps its own Engine (its backend: KV store, index, block pool) over one shared Decoder.
A step runs every row's token through the model at once (Decoder.decode_rows): the projections and
the MLP read each weight once for all rows, which is what a decode step is bound by; attention runs
per row against the row's own cache. A sequence joins after its own prefill and leaves when it ends;
both happen between steps. A step is a transaction for every row, as Engine.step is for one: if it
fails (Ctrl-C included), every row's cache is rolled back to before it.

Not yet: CUDA graphs of a batched step (it runs eagerly) and kernels that take the batch in one launch.
"""
from __future__ import annotations

from contextlib import ExitStack
from dataclasses import dataclass, field
from typing import Callable

import torch

from .engine import Engine


@torch.inference_mode()
def decode_step(engines: list[Engine], tokens: torch.Tensor) -> torch.Tensor:
    """Append tokens[b] (a [B] int64 device tensor) to engines[b]'s cache for every b at once; returns
    the logits [B, V] (fp32) that follow them. The engines share one model."""
    model = engines[0].model
    if any(e.model is not model for e in engines):
        raise ValueError("decode_step: every engine of a batch must run the same Decoder")
    if len({id(e) for e in engines}) != len(engines):
        raise ValueError("decode_step: an engine appears twice in the batch (one sequence, one row)")
    with ExitStack() as passes:
        starts = [passes.enter_context(e._pass(1)) for e in engines]
        for e in engines:
            e.backend.prologue()
        positions = torch.tensor(starts, dtype=torch.long, device=model.device)
        return model.logits(model.decode_rows(tokens, positions, [e.backend for e in engines]))


@dataclass(eq=False)  # rows are compared by identity (their fields hold tensors)
class Row:
    """One sequence of a Batch: `token` is sampled and not yet in its cache."""
    engine: Engine
    next_token: Callable[[torch.Tensor], torch.Tensor]   # logits [V] -> a 0-d token id on the device
    token: torch.Tensor
    left: int                                            # tokens it may still generate
    stop_ids: frozenset[int]
    ids: list[int] = field(default_factory=list)         # generated so far (a stop id is not kept)
    finish: str | None = None                            # "eos" or "length" once it has left

    def _take(self, token: torch.Tensor) -> None:
        token_id = int(token)  # the host reads every id anyway: it decides whether the row goes on
        if token_id in self.stop_ids:
            self.finish = "eos"
            return
        self.token = token
        self.ids.append(token_id)
        self.left -= 1
        if self.left <= 0:
            self.finish = "length"


class Batch:
    """Sequences that decode together; join() and step() are called between steps by one thread."""

    def __init__(self):
        self.rows: list[Row] = []

    def join(self, engine: Engine, logits: torch.Tensor, next_token: Callable[[torch.Tensor], torch.Tensor],
             max_new_tokens: int, stop_ids=()) -> Row:
        """Add a sequence whose prompt `engine` has just prefilled (logits [V] follow it); its first
        token is taken now. Returns its row (ids grow with each step; finish is set when it leaves)."""
        if any(r.engine is engine for r in self.rows):
            raise ValueError("this engine's sequence is already in the batch")
        row = Row(engine, next_token, logits.new_zeros((), dtype=torch.long), max_new_tokens, frozenset(stop_ids))
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

    def step(self) -> list[Row]:
        """Every row appends its token and takes the next; returns the rows that left (finished)."""
        if not self.rows:
            return []
        for r in self.rows:  # a row whose cache is full leaves before the step that would overflow it
            if r.engine.length >= r.engine.backend.capacity:
                r.finish = "length"
        rows = [r for r in self.rows if r.finish is None]
        if rows:
            logits = decode_step([r.engine for r in rows], torch.stack([r.token for r in rows]))
            for r, row_logits in zip(rows, logits):
                r._take(r.next_token(row_logits))
        left = [r for r in self.rows if r.finish is not None]
        self.rows = [r for r in self.rows if r.finish is None]
        return left
