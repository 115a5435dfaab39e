"""The accuracy benchmark (bench/accuracy.py): its measuring shortcuts are faithful to the engine, and
the default retrieval configuration keeps top-1 agreement with dense on the quick grid.

Not marked slow on purpose: CI must run the quick grid (about 1.5 minutes on 2 CPU cores).
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import torch

import kvretrieve
from kvretrieve import RetrievalConfig
from kvretrieve.api import backend_for
from kvretrieve.engine.engine import Engine

BENCH = Path(__file__).resolve().parent.parent / "bench"
sys.path.insert(0, str(BENCH))
from accuracy_metrics import Probe, batched_step, pydoc_text, replay  # noqa: E402

KINDS = ("lowrank", "bounds", "exact")


def test_replay_and_batched_steps_equal_prefill_and_engine_steps(smol_dir):
    """The bench gives retrieval backends the dense prefill's K,V (replay) and decodes several of them
    as one batch; each must still produce what its own prefill and Engine.step produce. A budget
    covering the whole context must show recall 1 and no output error."""
    llm = kvretrieve.load(smol_dir, device="cpu", dtype="float32", max_context=700, retrieval=None)
    model, P, steps = llm.engine.model, 600, 12
    ids = llm.tokenizer.encode(pydoc_text())[:P + steps]
    cfgs = [RetrievalConfig(index=k, block_size=16, budget_tokens=64, sink_tokens=32, window_tokens=64, rank=16)
            for k in KINDS] + [RetrievalConfig(index="exact", block_size=16, budget_tokens=1024)]
    llm.engine.forward(torch.tensor(ids[:P]))
    batch = [backend_for(model, 700, c)[0] for c in cfgs]
    for b in batch:
        replay(b, llm.engine.backend, P)
    probes = [Probe(b, active=True) for b in batch]
    engines = [Engine(model, backend_for(model, 700, c)[0], 4096) for c in cfgs]
    for e in engines:
        e.forward(torch.tensor(ids[:P]))
    for i in range(steps):
        got = batched_step(model, batch, torch.tensor([ids[P + i]] * len(cfgs)), P + i)
        for j, e in enumerate(engines):
            want = e.step(torch.tensor(ids[P + i]))
            assert torch.allclose(got[j], want, atol=2e-3, rtol=1e-4), (cfgs[j].index, i, (got[j] - want).abs().max())
    sparse = [p.summary() for p in probes]
    for s in sparse[:3]:
        assert 0.3 < s["attn_recall"] < 1 and 0 < s["out_rel_err"] < 1
        assert s["attended_tokens"] <= 32 + 64 + 64 + 16
    assert sparse[2]["attn_recall"] >= max(sparse[0]["attn_recall"], sparse[1]["attn_recall"]) - 0.02  # the oracle
    assert sparse[3]["attn_recall"] > 1 - 1e-5 and sparse[3]["out_rel_err"] < 1e-4


def test_quick_grid_default_keeps_top1_agreement(tmp_path):
    out = tmp_path / "results"
    proc = subprocess.run([sys.executable, str(BENCH / "accuracy.py"), "--quick", "--out", str(out), "--allow-dirty"],
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = json.loads((out / "accuracy.json").read_text())
    assert (out / "accuracy.md").read_text().startswith("# accuracy")
    for key in ("command", "commit", "date", "model", "default", "rows"):
        assert key in data
    fields = ("index", "context", "density", "budget_tokens", "block_size", "sink_tokens", "window_tokens",
              "attn_recall", "out_rel_err", "top1_agree", "kl", "ppl_dense", "ppl", "needle_dense",
              "needle_sparse", "needle_same")
    for row in data["rows"]:
        assert all(f in row for f in fields), row
        assert row["positions"] >= 256 and 0 < row["density"] <= 1
    default = [r for r in data["rows"] if r["default"]]
    assert len(default) == 1 and default[0]["index"] == data["default"]["index"]
    assert default[0]["top1_agree"] >= 0.97, default[0]
    assert default[0]["needle_same"] is not None
