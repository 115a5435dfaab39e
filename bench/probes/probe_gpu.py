"""Feasibility probes for the next speed steps (one device call; results in $OUT/probe.json).

1. flash attention that returns its log-sum-exp, with GQA-shaped K/V (query-chunked prefill merges
   a prefix part and a causal diagonal part by LSE);
2. a Triton kernel reading pinned host memory directly (zero-copy gather of missed KV blocks, so
   a decode step needs no host sync);
3. bandwidth of such a gather vs cudaMemcpy of the same bytes.
"""
from __future__ import annotations

import json
import os
import time

import torch
import triton
import triton.language as tl

out = {}
dev = "cuda"
torch.manual_seed(0)


def rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


# 1. flash with LSE and GQA
H, HKV, D = 32, 8, 128
for Tq, Tk, causal in ((256, 256, True), (256, 4096, False)):
    q = torch.randn(1, H, Tq, D, device=dev, dtype=torch.bfloat16)
    k = torch.randn(1, HKV, Tk, D, device=dev, dtype=torch.bfloat16)
    v = torch.randn_like(k)
    kr, vr = k.repeat_interleave(H // HKV, 1), v.repeat_interleave(H // HKV, 1)
    s = (q.float() @ kr.float().transpose(-1, -2)) * D ** -0.5
    if causal:
        s = s.masked_fill(torch.ones(Tq, Tk, device=dev, dtype=torch.bool).triu(1), float("-inf"))
    ref_lse, ref = s.logsumexp(-1), s.softmax(-1) @ vr.float()
    key = f"flash_lse_gqa_{Tq}x{Tk}_{'causal' if causal else 'full'}"
    try:
        r = torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, 0.0, causal, False, scale=D ** -0.5)
        out[key] = {"out_rel_err": rel(r[0], ref), "lse_max_err": (r[1] - ref_lse).abs().max().item()}
    except Exception as e:  # noqa: BLE001 - a probe reports what fails
        out[key] = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
    try:
        r = torch.ops.aten._scaled_dot_product_flash_attention(q, kr, vr, 0.0, causal, False, scale=D ** -0.5)
        out[key + "_expanded"] = {"out_rel_err": rel(r[0], ref), "lse_max_err": (r[1] - ref_lse).abs().max().item()}
    except Exception as e:  # noqa: BLE001
        out[key + "_expanded"] = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
print(json.dumps(out, indent=1), flush=True)


# 2. zero-copy gather from pinned host memory
@triton.jit
def gather_rows(src, idx, dst, width: tl.constexpr):
    i = tl.program_id(0)
    row = tl.load(idx + i).to(tl.int64)
    cols = tl.arange(0, width)
    tl.store(dst + i * width + cols, tl.load(src + row * width + cols))


class HostPointer:
    """Presents a pinned host tensor to Triton by its device-visible (UVA) address."""

    def __init__(self, t: torch.Tensor):
        self.t, self.dtype = t, t.dtype

    def data_ptr(self):
        return self.t.data_ptr()


rows, width = 1 << 18, 2048  # 4 KiB bf16 rows (one K block of 16 x 128), 1 GiB in all
host = torch.randn(rows, width, dtype=torch.bfloat16).pin_memory()
for m in (1024, 8192):
    idx = torch.randint(0, rows, (m,), device=dev)
    dst = torch.empty(m, width, device=dev, dtype=torch.bfloat16)
    key = f"zero_copy_gather_{m}_rows"
    try:
        gather_rows[(m,)](HostPointer(host), idx, dst, width=width)
        torch.cuda.synchronize()
        ok = torch.equal(dst.cpu(), host[idx.cpu()])
        t0 = time.perf_counter()
        for _ in range(20):
            gather_rows[(m,)](HostPointer(host), idx, dst, width=width)
        torch.cuda.synchronize()
        dt = (time.perf_counter() - t0) / 20
        out[key] = {"correct": ok, "ms": dt * 1e3, "GBps": m * width * 2 / dt / 1e9}
    except Exception as e:  # noqa: BLE001
        out[key] = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
    staged = torch.empty(m, width, dtype=torch.bfloat16).pin_memory()
    t0 = time.perf_counter()
    for _ in range(20):
        torch.index_select(host, 0, idx.cpu(), out=staged)
        dst.copy_(staged, non_blocking=True)
    torch.cuda.synchronize()
    dt = (time.perf_counter() - t0) / 20
    out[f"host_gather_then_copy_{m}_rows"] = {"ms": dt * 1e3, "GBps": m * width * 2 / dt / 1e9}

print(json.dumps(out, indent=1), flush=True)
if os.environ.get("OUT"):
    open(os.path.join(os.environ["OUT"], "probe.json"), "w").write(json.dumps(out, indent=1))
