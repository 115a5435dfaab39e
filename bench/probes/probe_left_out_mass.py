"""How much true attention mass does a decode step leave to the rest estimate, head by head?

The token-level rest (kernels.lowrank_rest) costs ~30 us a row and layer on an H100 at 32K, ~4 ms of
an 8-session step of the 1.5B (bench/NOTES.md stop 36), whatever the heads' attention looks like. Its
kernel runs one program group per KV head; a program could return at once where the selection
already holds nearly all of the group's attention, so the rest would cost only where it matters. This
measures how often that is: real weights on real text, teacher-forced decode steps with the default
layout, and on every step of every layer the dense attention recomputed (accuracy_metrics.Probe) to
get each query head's mass outside the attended set (sinks, window, selected blocks). Reported: the
share of (step, layer, KV head) whose largest group member leaves less than eps, for a few eps, and
by layer. Dense truth, not the mass kernel's estimate: an upper bound of what a kernel deciding from
its estimate could skip.

    python bench/probes/probe_left_out_mass.py [--model 0.5b] [--context 16K] [--budget 1536] [--steps 48]

--budget 1536 at 16K attends ~1/8 of the context, as the default does at 32K (3,456 retrieved).
Writes probe_left_out_mass.json and .md to $OUT (or bench/results).
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

sys.path[:0] = [str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parents[1])]
import longctx_corpus as corpus  # noqa: E402
from accuracy_metrics import Probe  # noqa: E402
from common import RESULTS, provenance, write_results  # noqa: E402
from longctx import attended, forced_logits, resolve_model, tokens_of  # noqa: E402

import kvretrieve  # noqa: E402
from kvretrieve import RetrievalConfig  # noqa: E402

EPS = (0.001, 0.003, 0.01, 0.03, 0.1)


def shares(heads: list, n_layers: int) -> tuple[list[dict], list[dict]]:
    """(rows by eps, rows by layer) from the probe's (layer, kept [Hkv, G]) records."""
    left = [(layer, (1 - kept).amax(-1)) for layer, kept in heads]  # per KV head: its group's worst member
    every = torch.cat([x for _, x in left])
    by_eps = [{"eps": e, "kv_heads_below": (every < e).float().mean().item()} for e in EPS]
    by_eps.append({"eps": "mean left-out mass (group's worst)", "kv_heads_below": every.mean().item()})
    by_layer = []
    for layer in range(n_layers):
        x = torch.cat([worst for at, worst in left if at == layer])
        by_layer.append({"layer": layer, "mean_left_out": x.mean().item(), "median_left_out": x.median().item(),
                         "below_0.01": (x < 0.01).float().mean().item(), "max_left_out": x.max().item()})
    return by_eps, by_layer


@torch.inference_mode()
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="0.5b")
    ap.add_argument("--context", default="16K")
    ap.add_argument("--budget", type=int, default=1536, help="retrieved tokens (1,536: ~1/8 of 16K attended)")
    ap.add_argument("--steps", type=int, default=48)
    ap.add_argument("--corpus", default=None)
    args = ap.parse_args()
    t0, length = time.perf_counter(), tokens_of(args.context)
    path, _, description = resolve_model(args.model)
    cfg = RetrievalConfig(index="lowrank", budget_tokens=args.budget)
    llm = kvretrieve.load(str(path), device="cpu", dtype="float32", max_context=length + 16, retrieval=cfg)
    ids = llm.tokenizer.encode("\n\n".join(d["text"] for d in corpus.load_corpus(args.corpus)))[:length]
    probe = Probe(llm.engine.backend, heads=[])
    probe.active = True
    forced_logits(llm, ids, length - args.steps, args.steps)
    by_eps, by_layer = shares(probe.heads, probe.backend.L)
    meta = provenance("cpu") | {
        "command": "bench/probes/probe_left_out_mass.py " + " ".join(sys.argv[1:]), "model": description,
        "context": length, "steps": args.steps, "attended": attended(llm.retrieval, length),
        "seconds": round(time.perf_counter() - t0)}
    notes = (f"{description}, {length:,} tokens of the corpus (bench/longctx_corpus.py), the default layout with "
             f"budget_tokens={args.budget} ({100 * meta['attended']:.1f}% attended), {args.steps} teacher-forced "
             "decode steps; per step, layer and KV head the largest mass any of its query heads has outside the attended set "
             "(dense attention recomputed from the layer's keys). kv_heads_below: the share of those below eps. "
             "Layers:\n\n" + "\n".join(
                 f"- layer {r['layer']}: mean {r['mean_left_out']:.4f}, median {r['median_left_out']:.4f}, "
                 f"below 0.01 {r['below_0.01']:.2f}, max {r['max_left_out']:.3f}" for r in by_layer))
    out = Path(os.environ.get("OUT", RESULTS))
    write_results("probe_left_out_mass", meta | {"layers": by_layer}, by_eps, ["eps", "kv_heads_below"], notes, out)
    print(out / "probe_left_out_mass.md")


if __name__ == "__main__":
    main()
