"""Where a block selection loses attention mass, layer by layer, on real long-context weights (issue 14).

One dense prefill of real text (the longctx corpus); its K,V are handed to each retrieval configuration
(accuracy_metrics.replay), which then decode the next tokens teacher-forced as one batch; a probe
recomputes dense attention on sampled steps and measures, per layer, the share of the softmax mass
the attended set keeps (recall) and the attention-output error. Low-recall layers are where dense
layers or larger per-layer budgets would pay; a recall gap that the oracle shares says no ranking of
blocks can close it at that budget.

    python bench/probes/probe_layer_recall.py --model 0.5b --context 8K --steps 48 \
        --configs oracle:budget=768:window=256,lowrank:budget=768:window=256
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent)]
import eval_models  # noqa: E402
import longctx_corpus as corpus  # noqa: E402
from accuracy_metrics import Probe, batched_step, replay, token_metrics  # noqa: E402
from common import RESULTS, provenance  # noqa: E402
from longctx import parse_config, tokens_of  # noqa: E402

import kvretrieve  # noqa: E402
from kvretrieve.api import backend_for  # noqa: E402
from kvretrieve.backends.decode_plan import DecodePlan  # noqa: E402


class LayerBudgetPlan(DecodePlan):
    """An experiment: a DecodePlan whose retrieved blocks differ per layer (layer_k), within the
    configured budget (the pool and the table are sized for it). The selector names the layer."""

    layer_k: list[int]
    layer = 0

    @property
    def k(self) -> int:
        _, lo, hi = self.candidates()
        return min(self.layer_k[self.layer], hi - lo)


def per_layer(backend, layer_k: list[int]) -> None:
    """Make `backend` retrieve layer_k[l] blocks at layer l."""
    plan, select = backend.plan, backend.selector.select
    plan.__class__, plan.layer_k = LayerBudgetPlan, layer_k

    def select_at(layer, q):
        plan.layer = layer
        return select(layer, q)
    backend.selector.select = select_at


def reallocate(recall: list[float], mean_blocks: int, cap: int, power: float) -> list[int]:
    """Blocks per layer with the same mean: in proportion to (1 - recall) ** power, within [1, cap]."""
    need = [max(1e-3, 1 - r) ** power for r in recall]
    ks = [max(1, min(cap, round(mean_blocks * len(need) * x / sum(need)))) for x in need]
    return ks


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="0.5b")
    ap.add_argument("--context", default="8K")
    ap.add_argument("--steps", type=int, default=48, help="teacher-forced tokens (a probe on every 4th)")
    ap.add_argument("--configs", default="oracle:budget=768:window=256,lowrank:budget=768:window=256")
    ap.add_argument("--corpus", default=None)
    ap.add_argument("--reallocate", type=float, default=0.0, metavar="POWER",
                    help="then run each config again with its blocks spread over the layers in proportion to "
                         "(1 - recall) ** POWER, the same mean (the per-layer budget lever)")
    ap.add_argument("--out", default=os.environ.get("OUT", str(RESULTS)))
    args = ap.parse_args()
    t0, n = time.perf_counter(), tokens_of(args.context)
    path = eval_models.model_path(args.model) or args.model
    llm = kvretrieve.load(str(path), device="cpu", dtype="float32", max_context=n + args.steps + 64, retrieval=None)
    ids = llm.tokenizer.encode("\n\n".join(d["text"] for d in corpus.load_corpus(args.corpus)))[:n + args.steps + 1]
    hidden = llm.engine.forward(torch.tensor(ids[:n + args.steps]))  # dense: the reference and the K,V source
    with torch.inference_mode():
        dense_logits = llm.model.logits(hidden[n - 1:n + args.steps - 1])
    names = args.configs.split(",")
    targets = torch.tensor(ids[n:n + args.steps])

    def measure(cfgs, layer_ks=None) -> list[dict]:
        backends = [backend_for(llm.model, n + args.steps + 64, c)[0] for c in cfgs]
        for j, b in enumerate(backends):
            replay(b, llm.engine.backend, n - 1)
            if layer_ks:
                per_layer(b, layer_ks[j])
        probes = [Probe(b) for b in backends]
        logits = torch.empty(len(cfgs), args.steps, dense_logits.shape[-1])
        for i in range(args.steps):
            for p in probes:
                p.active = i % 4 == 2
            logits[:, i] = batched_step(llm.model, backends, torch.tensor([ids[n - 1 + i]] * len(cfgs)), n - 1 + i)
        return [token_metrics(dense_logits, logits[j], targets) | probes[j].summary() for j in range(len(cfgs))]

    cfgs = [parse_config(c) for c in names]
    rows = [{"config": c} | m for c, m in zip(names, measure(cfgs))]
    if args.reallocate:
        from dataclasses import replace

        blocks = [c.budget_tokens // c.block_size for c in cfgs]
        layer_ks = [reallocate(r["attn_recall_layers"], b, 3 * b, args.reallocate) for r, b in zip(rows, blocks)]
        wide = [replace(c, budget_tokens=3 * c.budget_tokens) for c in cfgs]
        rows += [{"config": f"{c}, per-layer {args.reallocate:g}", "layer_blocks": ks} | m
                 for c, ks, m in zip(names, layer_ks, measure(wide, layer_ks))]
    out = provenance("cpu") | {"model": str(path), "context": n, "steps": args.steps, "rows": rows,
                               "seconds": round(time.perf_counter() - t0, 1)}
    dest = Path(args.out) / f"probe_layer_recall_{args.model}_{args.context}.json"
    dest.write_text(json.dumps(out, indent=1))
    for r in rows:
        print(f"{r['config']}: top1 {r['top1_agree']:.3f} kl {r['kl']:.4f} recall {r['attn_recall']:.3f} "
              f"(worst layer {r['attn_recall_min_layer']:.3f}) attended {r['attended_tokens']:.0f}")
        print("  recall by layer:", " ".join(f"{x:.2f}" for x in r["attn_recall_layers"]))
    print(f"wrote {dest} in {out['seconds']} s")


if __name__ == "__main__":
    main()
