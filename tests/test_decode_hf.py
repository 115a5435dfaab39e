"""bench/decode_hf.py, the transformers baseline rows of bench/decode.py, on a tiny Llama shape on the CPU:
the rows carry every column with sane numbers, and the offloaded cache decodes the same greedy tokens as
the dense one."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parent.parent / "bench"
sys.path.insert(0, str(BENCH))
from decode_hf import build_hf_model, hf_row  # noqa: E402

TINY = dict(layers=2, hidden=64, heads=4, kv_heads=2, head_dim=16, ffn=128, vocab=256)
CONTEXT, STEPS = 256, 4
KEYS = {"system", "index", "context", "prefill_s", "decode_ms_p50", "decode_ms_p90", "peak_gpu_gib", "gpu_cap_gib",
        "pinned_host_gib", "h2d_mb_per_token", "cache_hit", "steps", "error", "tokens", "derived"}


class _NoStream:
    """Stands in for a stream on the CPU: waits are no-ops and `with` does nothing."""

    def wait_stream(self, other):
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


@pytest.fixture(scope="module")
def rows():
    # transformers' offloaded DynamicCache orders its copies with torch.cuda.default_stream(...).wait_stream(...)
    # unconditionally, which asserts on a CPU-only torch. Stub the streams so its prefetch/offload path runs;
    # the "offload" is then CPU to CPU, so this checks the row logic and the cache's bookkeeping, and the
    # GPU run checks the real transfers (its hf-dense and hf-offload rows must decode the same tokens too).
    mp = pytest.MonkeyPatch()
    mp.setattr(torch, "Stream", _NoStream)
    mp.setattr(torch.cuda, "default_stream", lambda device=None: _NoStream())
    try:
        model = build_hf_model(TINY, "cpu", dtype=torch.float32)
        return {off: hf_row(model, CONTEXT, offload=off, steps=STEPS, chunk=64) for off in (False, True)}
    finally:
        mp.undo()


@pytest.mark.parametrize("offload", [False, True])
def test_row_columns_and_numbers(rows, offload):
    row = rows[offload]
    assert (row["derived"] is not None) == offload  # the offloaded H2D figure is a formula, and says so
    assert set(row) == KEYS
    assert row["error"] is None
    assert row["system"] == ("hf-offload" if offload else "hf-dense")
    assert row["context"] == CONTEXT and row["index"] is None and row["cache_hit"] is None
    assert row["peak_gpu_gib"] is None and row["gpu_cap_gib"] is None  # CPU run
    assert row["steps"] == STEPS - 1  # first decode step is the warm-up
    assert row["prefill_s"] > 0 and 0 < row["decode_ms_p50"] <= row["decode_ms_p90"]
    kv_bytes = 2 * TINY["layers"] * TINY["kv_heads"] * TINY["head_dim"] * CONTEXT * 4  # fp32 here
    assert row["pinned_host_gib"] == (kv_bytes / 2**30 if offload else 0.0)
    assert row["h2d_mb_per_token"] == (kv_bytes / 1e6 if offload else 0.0)
    assert len(row["tokens"]) == STEPS + 1 and all(isinstance(t, int) for t in row["tokens"])


def test_offloaded_cache_decodes_the_same_tokens(rows):
    assert rows[True]["tokens"] == rows[False]["tokens"]
