"""One batched decode step of several sequences (engine/batch.py's Batch runs them).

A step runs every row's token through the model at once (Decoder.decode_rows): the projections and
the MLP read each weight once for all rows, which is what a decode step is bound by; attention runs
per row against the row's own cache. A step is a transaction for every row, as Engine.step is for
one: if it fails (Ctrl-C included), every row's cache is rolled back to before it.

On CUDA (StepRunner) each row's attention runs on its own stream, and a step whose rows and shapes
repeat (the same engines, each with the same graph key) replays a CUDA graph of it: an eager step of
the 8B shape launches some 30 small kernels per row and layer, and the host, not the GPU, set its
pace (bench/results/batch_decode_h200_32k_c51cedd.md: 79 ms a step for one row or two, eager).
Where every row is a retrieval backend of one configuration, the rows' sparse attention is one launch
a layer (kernels.sparse_decode_rows over each row's own pool and tables, kernels/rows.py), and so is
their block scoring where the index is low-rank (kernels.lowrank_block_scores_rows, _mass_rows); where
every row also selects afresh the same number of blocks, one top-k picks them all and one launch looks
them up in each row's block pool (kernels.lru_lookup_rows). Each row's token-level rest, fetch and
merges still run on its own stream; at 8 rows of the 1.5B at 32K the rests, each filling the GPU, ran
one after another, 166 us of a ~500 us layer (bench/results/batch_decode_15b_32k_s35_trace_overlap.md).
"""
from __future__ import annotations

from contextlib import ExitStack
from dataclasses import dataclass, replace

import torch

from ..kernels.rows import (DECODE, LOWRANK, LRU, MASS, StepRows, decode_rows, lowrank_rows, lru_rows, mass_rows,
                            mismatch)
from .engine import Engine


@torch.inference_mode()
def decode_step(engines: list[Engine], tokens: torch.Tensor, streams: list | None = None,
                one_launch: bool = True) -> torch.Tensor:
    """Append tokens[b] (a [B] int64 device tensor) to engines[b]'s cache for every b at once; returns
    the logits [B, V] (fp32) that follow them. The engines share one model; on CUDA, streams (one per
    row) run the rows' attention side by side. one_launch=False attends each row by itself (to measure
    what the one launch buys)."""
    _check(engines)
    with ExitStack() as passes:
        starts = [passes.enter_context(e._pass(1)) for e in engines]
        positions = torch.tensor(starts, dtype=torch.long, device=engines[0].model.device)
        rows = _step_rows(_operands(engines)) if one_launch else None
        return _forward(engines, tokens, positions, streams, rows)


def _check(engines: list[Engine]) -> None:
    model = engines[0].model
    if any(e.model is not model for e in engines):
        raise ValueError("decode_step: every engine of a batch must run the same Decoder")
    if len({id(e) for e in engines}) != len(engines):
        raise ValueError("decode_step: an engine appears twice in the batch (one sequence, one row)")


def _operands(engines: list[Engine]) -> tuple | None:
    """Every row's sparse_operands() and, where every row has them, score_operands() and
    lookup_operands() (else None in their place); None when a row has no sparse operands (then each
    row attends by itself), or for one row: there the one-launch variants cost more than its own
    kernels (H100, 8B shape at 32K: scoring 372 against 291 us a step, attention 168 against 126;
    bench/results/batch_decode_8b_32k_launch.json)."""
    if len(engines) < 2:
        return None
    ops = [e.backend.sparse_operands() for e in engines]
    if any(o is None for o in ops):
        return None
    scoring = [e.backend.score_operands() for e in engines]
    if any(s is None for s in scoring):
        return ops, None, None
    lookups = [e.backend.lookup_operands() for e in engines]
    return ops, scoring, None if any(x is None for x in lookups) else lookups


def _step_rows(ops: tuple | None) -> StepRows | None:
    """The one-launch kernels' operands for these rows (_operands), or None where the rows differ (other
    configurations attend one by one); scoring in one launch where the rows' indexes also agree."""
    if ops is None:
        return None
    decode, scoring, lookups = ops
    tensors, scales = [o[:4] for o in decode], {o[4] for o in decode}
    if mismatch(DECODE, tensors) or len(scales) > 1:
        return None
    rows = StepRows(decode_rows(tensors), scales.pop())
    if scoring is None or len({(s.kind, s.block_size) for s in scoring}) > 1:
        return rows
    mass, tensors, widths = scoring[0].kind == "mass", [s.tensors for s in scoring], {s.n_blocks for s in scoring}
    # Mass scores are shares of a normaliser over the blocks scored: rows scoring as many only.
    if mismatch(MASS if mass else LOWRANK, tensors) or (mass and len(widths) > 1):
        return rows
    ks = {s.select_k for s in scoring}
    rows = replace(rows, scoring=(mass_rows if mass else lowrank_rows)(tensors), mass=mass, n_blocks=max(widths),
                   block_size=scoring[0].block_size, select_k=ks.pop() if len(ks) == 1 else 0)
    if not rows.select_k or lookups is None or len({lru0 for _, lru0 in lookups}) > 1 \
            or mismatch(LRU, [t for t, _ in lookups]):
        return rows
    return replace(rows, lookup=lru_rows([t for t, _ in lookups]), lru0=lookups[0][1])


def _where(ops: tuple | None) -> tuple | None:
    """Where the rows' pools, tables and indexes are, and how many blocks they score: a graph that
    read them replays only while these stay."""
    if ops is None:
        return None
    decode, scoring, lookups = ops
    return (tuple(t.data_ptr() for o in decode for t in o[:4]),
            None if scoring is None else tuple((tuple(t.data_ptr() for t in s.tensors), s.n_blocks, s.select_k)
                                               for s in scoring),
            None if lookups is None else tuple(t.data_ptr() for ts, _ in lookups for t in ts))


def _forward(engines: list[Engine], tokens: torch.Tensor, positions: torch.Tensor, streams,
             rows: StepRows | None) -> torch.Tensor:
    """The device work of a batched step (what a graph of it records)."""
    for e in engines:
        e.backend.prologue()
    if rows is not None and rows.select_k:  # each row's non-candidates, as wide as the scores
        rows = replace(rows, outside=torch.stack([
            torch.nn.functional.pad(o, (0, rows.n_blocks - o.shape[0]), value=True)
            for o in (e.backend.outside_blocks() for e in engines)]))
    model = engines[0].model
    return model.logits(model.decode_rows(tokens, positions, [e.backend for e in engines], streams, rows))


@dataclass(eq=False)
class _Captured:
    engines: list[Engine]  # held, so that no other engine can take an id in the key while it lives
    graph: "torch.cuda.CUDAGraph"
    rows: StepRows | None  # held: the graph reads its table of addresses
    tokens: torch.Tensor
    positions: torch.Tensor
    logits: torch.Tensor


class StepRunner:
    """Runs a Batch's steps: decode_step, on CUDA with a stream per row and, once a step's rows and
    their graph keys repeat, as the replay of a CUDA graph captured from that step (as Engine.step
    does for one sequence). Graphs of rows that left are dropped (forget)."""

    MAX_GRAPHS = 8  # compositions kept; each holds its activations (a few MiB for 8 rows of the 8B shape)

    def __init__(self, one_launch: bool = True):
        self.one_launch = one_launch  # the rows' sparse attention in one launch (decode_step)
        self.streams: list = []
        self.graphs: dict = {}  # key -> _Captured
        self._pool = None       # the memory pool all captured graphs share
        self.replays = 0

    @torch.inference_mode()
    def step(self, engines: list[Engine], tokens: torch.Tensor) -> torch.Tensor:
        dev = engines[0].model.device
        if dev.type != "cuda":
            return decode_step(engines, tokens, one_launch=self.one_launch)
        while len(self.streams) < len(engines):
            self.streams.append(torch.cuda.Stream(dev))
        _check(engines)
        with ExitStack() as passes:
            starts = torch.tensor([passes.enter_context(e._pass(1)) for e in engines], dtype=torch.long)
            keys = [e.backend.graph_key() if e.graphs else None for e in engines]
            ops = _operands(engines) if self.one_launch else None
            key = None if None in keys else (tuple(zip(map(id, engines), keys)), _where(ops))
            got = self.graphs.get(key) if key is not None else None
            if got is not None:
                got.tokens.copy_(tokens)
                got.positions.copy_(starts, non_blocking=True)
                got.graph.replay()
                self.replays += 1
                return got.logits.clone()  # the graph's output buffer is overwritten by the next replay
            tokens, positions, rows = tokens.clone(), starts.to(dev), _step_rows(ops)
            logits = _forward(engines, tokens, positions, self.streams, rows)
            if key is not None:
                self._capture(key, engines, tokens, positions, rows)
            return logits

    def _capture(self, key, engines: list[Engine], tokens: torch.Tensor, positions: torch.Tensor,
                 rows: StepRows | None) -> None:
        """Record the step just run (every kernel compiled, the allocator warm); capture only records."""
        while len(self.graphs) >= self.MAX_GRAPHS:  # others remain, so the shared pool lives on
            del self.graphs[next(iter(self.graphs))]
        graph = torch.cuda.CUDAGraph()
        torch.cuda.synchronize(tokens.device)
        with torch.cuda.graph(graph, pool=self._pool):
            logits = _forward(engines, tokens, positions, self.streams, rows)
        self._pool = graph.pool()
        self.graphs[key] = _Captured(list(engines), graph, rows, tokens, positions, logits)

    def forget(self, engines) -> None:
        """Drop the graphs of steps that any of these engines took part in (they left the batch)."""
        gone = {id(e) for e in engines}
        self.graphs = {k: g for k, g in self.graphs.items() if not gone & {id(e) for e in g.engines}}
        if not self.graphs:
            # The pool dies with its last graph; capturing into it again trips torch's allocator
            # (an internal assert, seen on the H200 with torch 2.11): the next capture starts a new one.
            self._pool = None
