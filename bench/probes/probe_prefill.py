"""Where a 128K retrieval prefill spends its time (8B shape, random weights, H100): a diagnostic, not
a benchmark. Stages are timed with a device sync around each (so overlap is lost on purpose), plus
two micro-probes: pinned host allocation speed, and cuDNN attention against flash attention for the
shapes the two-pass prefill uses (GQA, a 4K query chunk against the prefix, and the causal chunk).

    KVRETRIEVE_FREE_RAM_GB=110 python bench/probe_prefill.py [--context 128K]  -> $OUT/probe_prefill.json
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch

sys.path[:0] = [str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parents[1])]
from decode import tokens  # noqa: E402

from kvretrieve.config import RetrievalConfig  # noqa: E402
from kvretrieve.models.llama import Decoder  # noqa: E402
from kvretrieve.models.shapes import random_weights  # noqa: E402
from kvretrieve.models.shapes import shape_config  # noqa: E402
from kvretrieve.api import backend_for  # noqa: E402
from kvretrieve.engine.engine import Engine  # noqa: E402


def timed(fn, reps=3):
    torch.cuda.synchronize()
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        ts.append(time.perf_counter() - t)
    return sorted(ts)[len(ts) // 2]


def attention_probe(out: dict, prefix: int) -> None:
    dev, dt = "cuda", torch.bfloat16
    q = torch.randn(1, 32, 4096, 128, device=dev, dtype=dt)
    k = torch.randn(1, 8, prefix, 128, device=dev, dtype=dt)
    v = torch.randn_like(k)
    flops = 4 * 32 * 4096 * prefix * 128
    flash = torch.ops.aten._scaled_dot_product_flash_attention
    t = timed(lambda: flash(q, k, v, 0.0, False, False, scale=0.088))
    out["flash_prefix_tflops"] = flops / t / 1e12
    kd, vd = k[:, :, :4096], v[:, :, :4096]
    t = timed(lambda: flash(q, kd, vd, 0.0, True, False, scale=0.088))
    out["flash_causal_chunk_tflops"] = flops * 4096 / prefix / 2 / t / 1e12
    cudnn = getattr(torch.ops.aten, "_scaled_dot_product_cudnn_attention", None)
    for name, kk, vv in (("gqa", k, v), ("expanded", k.repeat_interleave(4, 1), v.repeat_interleave(4, 1))):
        try:
            r = cudnn(q, kk, vv, None, True, 0.0, False, False, scale=0.088)
            ref = flash(q, k, v, 0.0, False, False, scale=0.088)
            out[f"cudnn_{name}_out_err"] = (r[0].float() - ref[0].float()).abs().max().item()
            out[f"cudnn_{name}_lse_err"] = (r[1].float().reshape(ref[1].shape) - ref[1].float()).abs().max().item()
            t = timed(lambda: cudnn(q, kk, vv, None, True, 0.0, False, False, scale=0.088))
            out[f"cudnn_{name}_prefix_tflops"] = flops / t / 1e12
        except Exception as e:  # noqa: BLE001 - the probe reports what the op refuses
            out[f"cudnn_{name}_error"] = repr(e)[:300]


def stage_probe(out: dict, context: int) -> None:
    """Wrap the backend's prefill methods with synchronised timers."""
    dev = torch.device("cuda")
    cfg = shape_config("llama3-8b")
    decoder = Decoder(cfg, random_weights(cfg, dev, torch.bfloat16, 0))
    t = time.perf_counter()
    backend, _ = backend_for(decoder, context + 64, RetrievalConfig(index="lowrank"))
    out["backend_init_s"] = time.perf_counter() - t
    backend.store.join()  # the store is pinned from backend creation on: not part of the prefill
    out["store_reserve_s"] = time.perf_counter() - t
    engine = Engine(decoder, backend, 4096)
    ids = torch.randint(0, cfg.vocab_size, (context,), device=dev)
    torch.cuda.synchronize()
    t = time.perf_counter()
    engine.prefill(ids.tolist())
    torch.cuda.synchronize()
    out["prefill_unsynced_s"] = time.perf_counter() - t  # as bench/decode.py sees it (warm pinned store)
    engine.truncate(0)
    spent = defaultdict(float)
    # inside begin_layer / end_layer: the PCA fit, the index update, the store write (incl. its D2H)
    parts = [(backend, n) for n in ("begin", "begin_layer", "attend", "end_layer", "commit")]
    parts += [(backend.index, "fit"), (backend.index, "add"), (backend.store, "write")]
    for owner, name in parts:
        fn = getattr(owner, name)

        def wrap(*a, _fn=fn, _name=name, **kw):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            r = _fn(*a, **kw)
            torch.cuda.synchronize()
            spent[_name] += time.perf_counter() - t0
            return r
        setattr(owner, name, wrap)
    torch.cuda.synchronize()
    t = time.perf_counter()
    engine.prefill(ids.tolist())
    torch.cuda.synchronize()
    out["prefill_s"] = time.perf_counter() - t
    out["stages_s"] = dict(spent)
    top = ("begin", "begin_layer", "attend", "end_layer", "commit")
    out["rest_s"] = out["prefill_s"] - sum(spent[k] for k in top)   # projections, MLP, norms, RoPE


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--context", default="128K")
    args = ap.parse_args()
    out: dict = {}
    t = time.perf_counter()
    seg = torch.empty(1 << 30, dtype=torch.uint8, pin_memory=True)
    out["pinned_alloc_gib_per_s"] = 1 / (time.perf_counter() - t)
    del seg
    attention_probe(out, tokens(args.context))
    torch.cuda.empty_cache()
    print(json.dumps(out), flush=True)
    stage_probe(out, tokens(args.context))
    print(json.dumps(out, indent=1), flush=True)
    if os.environ.get("OUT"):
        (Path(os.environ["OUT"]) / "probe_prefill.json").write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
