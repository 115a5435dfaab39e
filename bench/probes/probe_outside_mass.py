"""How much of what a block selection leaves out an estimate could give back (issue 14's LSE lever).

On real weights and text, at every sampled decode step and layer of a retrieval backend, with the
layer's full K,V at hand: the attention output over what the backend attended (sinks, selected
blocks, window) against exact attention, and the same output merged (by log-sum-exp) with an
estimate of every candidate block it did not attend, each counted as block_size keys at its mean key
with its mean value (RetroInfer's estimation zone, here over all the left-out blocks). Since exp is
convex, the mean key underestimates a block's mass; "scaled" also tries a per-block correction
exp(var/2) from the keys' spread along q (the second-order term of the log-mean-exp), which an index
could keep as one number per block and head. Bounds on what an estimate of the left-out blocks can
give: "exact_mass" (each block's true mass, its mean value) and "exact_block" (its true attention:
no error); "sketch_spread" corrects the mass by the lowrank sketches' spread inside the block.

    python bench/probes/probe_outside_mass.py --model 0.5b --context 8K --steps 24 --config oracle:budget=736:window=256
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent)]
import eval_models  # noqa: E402
import longctx_corpus as corpus  # noqa: E402
from accuracy_metrics import batched_step, replay  # noqa: E402
from common import RESULTS, provenance  # noqa: E402
from longctx import parse_config, tokens_of  # noqa: E402

import kvretrieve  # noqa: E402
from kvretrieve.api import backend_for  # noqa: E402


def errors(b, layer, q, ids, lo, hi, n) -> dict:
    """Relative output errors of the attended set alone and with the left-out blocks estimated."""
    H, bs, d = b.H, b.bs, q.shape[-1]
    k, v = (t.float().transpose(0, 1) for t in b.layer_kv(layer, n))            # [H, n, d]
    qg = q.float().view(H, -1, d)                                                  # [H, G, d]
    s = torch.einsum("hgd,hnd->hgn", qg, k) * b.scale
    exact = torch.einsum("hgn,hnd->hgd", s.softmax(-1), v)
    keep = torch.zeros(H, n, dtype=torch.bool)
    keep[:, :lo * bs], keep[:, hi * bs:] = True, True
    if ids.numel():
        keep.scatter_(1, (ids.cpu()[:, :, None] * bs + torch.arange(bs)).reshape(H, -1), True)
    sa = s.masked_fill(~keep[:, None], float("-inf"))
    lse_a, out_a = sa.logsumexp(-1), torch.einsum("hgn,hnd->hgd", sa.softmax(-1), v)
    out = {"attended": out_a}
    left = ~keep[:, lo * bs:hi * bs].view(H, -1, bs).any(-1)                        # [H, blocks] not attended
    kb, vb = (t[:, lo * bs:hi * bs].reshape(H, -1, bs, d) for t in (k, v))
    sb = torch.einsum("hgd,hbtd->hgbt", qg, kb) * b.scale                           # per-key scores of every block
    log_bs = torch.log(torch.tensor(float(bs)))
    exact_mass = sb.logsumexp(-1) - log_bs                                          # log-mean-exp per block
    wv = torch.einsum("hgbt,hbtd->hgbd", sb.softmax(-1), vb)                        # exact in-block values
    ests = {"centroid": (sb.mean(-1), None), "scaled": (sb.mean(-1) + sb.var(-1, unbiased=False) / 2, None),
            "exact_mass": (exact_mass, None), "exact_block": (exact_mass, wv)}
    if hasattr(b.index, "sketch"):  # the sketches' own spread around their block mean, per query head
        ix, G = b.index, qg.shape[1]
        qr = torch.einsum("hgd,hdr->hgr", qg, ix.proj[layer].float())
        sk = ix.sketch[layer, :, lo * bs:hi * bs].float().view(H, -1, bs, ix.rank)
        st = torch.einsum("hgr,hbtr->hgbt", qr, sk) * b.scale
        spread = st.logsumexp(-1) - log_bs - st.mean(-1)
        ests["sketch_spread"] = (sb.mean(-1) + spread, None)
        ests["sketch_spread_half"] = (sb.mean(-1) + spread / 2, None)
        # Token-level weights from the sketches (each token: its block's mean score plus its sketch's
        # deviation), over the exact values and over the values' own rank-r PCA (a value sketch).
        tok = sb.mean(-1, keepdim=True) + st - st.mean(-1, keepdim=True)            # [H, G, b, bs]
        ests["token_sketch_exact_v"] = (tok.logsumexp(-1) - log_bs, torch.einsum("hgbt,hbtd->hgbd", tok.softmax(-1), vb))
        vm = v.mean(1, keepdim=True)                                                  # [H, 1, d]
        _, _, vecs = torch.linalg.svd(v - vm, full_matrices=False)                    # [H, d, d] rows: components
        for r in (8, 16, 32):
            U = vecs[:, :r]                                                           # [H, r, d]
            vr = vm[:, None] + torch.einsum("hbtr,hrd->hbtd", torch.einsum("hbtd,hrd->hbtr", vb - vm[:, None], U), U)
            ests[f"token_sketch_v{r}"] = (tok.logsumexp(-1) - log_bs, torch.einsum("hgbt,hbtd->hgbd", tok.softmax(-1), vr))
            vbr = vb.mean(2, keepdim=True) + vr - vr.mean(2, keepdim=True)            # exact block mean + spread
            ests[f"token_sketch_vb{r}"] = (tok.logsumexp(-1) - log_bs, torch.einsum("hgbt,hbtd->hgbd", tok.softmax(-1), vbr))
        ests["exact_weights_v16"] = (exact_mass, torch.einsum("hgbt,hbtd->hgbd", sb.softmax(-1), vm[:, None] + torch.einsum(
            "hbtr,hrd->hbtd", torch.einsum("hbtd,hrd->hbtr", vb - vm[:, None], vecs[:, :16]), vecs[:, :16])))
    for name, (est, val) in ests.items():
        lse_b = (est + log_bs).masked_fill(~left[:, None], float("-inf"))
        w = lse_b.softmax(-1).nan_to_num()
        vals = vb.mean(2)[:, None].expand(-1, qg.shape[1], -1, -1) if val is None else val
        out_b, lse_bt = torch.einsum("hgb,hgbd->hgd", w, vals), lse_b.logsumexp(-1)
        m = torch.maximum(lse_a, lse_bt)
        wa, wb = torch.exp(lse_a - m), torch.exp(lse_bt - m).nan_to_num()
        out[name] = (wa[..., None] * out_a + wb[..., None] * out_b) / (wa + wb)[..., None]
    return {k_: ((o - exact).norm() / exact.norm()).item() for k_, o in out.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="0.5b")
    ap.add_argument("--context", default="8K")
    ap.add_argument("--steps", type=int, default=24)
    ap.add_argument("--config", default="oracle:budget=736:window=256")
    ap.add_argument("--out", default=os.environ.get("OUT", str(RESULTS)))
    args = ap.parse_args()
    n = tokens_of(args.context)
    path = eval_models.model_path(args.model) or args.model
    llm = kvretrieve.load(str(path), device="cpu", dtype="float32", max_context=n + args.steps + 64, retrieval=None)
    ids = llm.tokenizer.encode("\n\n".join(d["text"] for d in corpus.load_corpus(None)))[:n + args.steps]
    llm.engine.forward(torch.tensor(ids))
    b = backend_for(llm.model, n + args.steps + 64, parse_config(args.config))[0]
    replay(b, llm.engine.backend, n - 1)
    per_layer: dict[int, list[dict]] = {}
    b.observer = lambda layer, q, sel, lo, hi, m, out: per_layer.setdefault(layer, []).append(
        errors(b, layer, q, sel, lo, hi, m))
    for i in range(args.steps):
        batched_step(llm.model, [b], torch.tensor([ids[n - 1 + i]]), n - 1 + i)
    mean = {layer: {k: sum(e[k] for e in es) / len(es) for k in es[0]} for layer, es in sorted(per_layer.items())}
    overall = {k: sum(m[k] for m in mean.values()) / len(mean) for k in next(iter(mean.values()))}
    out = provenance("cpu") | {"model": str(path), "context": n, "steps": args.steps, "config": args.config,
                               "mean_rel_err": overall, "by_layer": mean}
    dest = Path(args.out) / f"probe_outside_mass_{args.model}_{args.context}.json"
    dest.write_text(json.dumps(out, indent=1))
    print("mean relative attention-output error:", {k: round(x, 4) for k, x in overall.items()})
    for layer, m in mean.items():
        print(f"  layer {layer:2d}: " + " ".join(f"{k} {x:.3f}" for k, x in m.items()))
    print(f"wrote {dest}")


if __name__ == "__main__":
    main()
