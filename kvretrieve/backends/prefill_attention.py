"""Prefill attention: a segment of queries attends causally to every key so far, on fused kernels.

Both backends prefill this way (dense attention is exact, and retrieval only starts at decode). A
segment's keys split into the earlier tokens, which every query sees (no mask), in pieces of
PREFIX_PIECE keys, and the segment itself, a square causal block; partial results merge by their
log-sum-exp in fp32, so no mask is ever materialised and the fused kernels run.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import kernels

# Keys per call against the earlier tokens of a segment. cuDNN builds an execution plan per shape
# (bench/results/probe_prefill_h100.json: a first 128K prefill 20.4 s, a second 14.5 s): with the
# prefix in pieces of one length, a prompt needs a handful of plans instead of one per chunk.
PREFIX_PIECE = 16384


def attention_lse_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool,
                            scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """q [T, Hq, d], k, v [S, Hkv, d] -> (out [T, Hq, d] in q.dtype, lse [T, Hq] fp32). causal means
    the square case (T == S, query i sees keys 0..i). The math, for fp32 on CUDA and as the oracle."""
    T, Hq, d = q.shape
    G = Hq // k.shape[1]
    s = torch.einsum("thgd,shd->hgts", q.float().view(T, -1, G, d), k.float()) * scale
    if causal:
        s = s.masked_fill(torch.ones(T, k.shape[0], dtype=torch.bool, device=q.device).triu(1), float("-inf"))
    lse = torch.logsumexp(s, -1)
    out = torch.einsum("hgts,shd->thgd", torch.exp(s - lse[..., None]), v.float())
    return out.reshape(T, Hq, d).to(q.dtype), lse.reshape(Hq, T).transpose(0, 1)


class PrefillAttention:
    """Causal attention with a fixed scale. On CUDA it prefers cuDNN's fused attention (GQA shapes,
    returns the LSE; ~1.9x flash attention's throughput on an H100 for the prefill's shapes,
    bench/results/probe_prefill_h100.json) and remembers the first refusal, after which flash
    attention serves this object."""

    def __init__(self, scale: float, piece: int = PREFIX_PIECE):
        self.scale, self.piece, self.cudnn_ok = scale, piece, True

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_start: int) -> torch.Tensor:
        """q [T, Hq, d] at positions q_start.. attends to k, v [q_start + T, Hkv, d] causally -> [T, Hq, d].

        Decode (T = 1) folds the G query heads of a KV head into query rows ([Hkv, G, d]): SDPA then
        sees plain attention and never repeats K,V."""
        T, Hq, d = q.shape
        Hkv = k.shape[1]
        if T == 1:
            qf = q.view(Hkv, Hq // Hkv, d)
            out = F.scaled_dot_product_attention(qf[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None],
                                                 scale=self.scale)
            return out[0].reshape(1, Hq, d)
        out, lse = self.lse(q, k[q_start:], v[q_start:], True)
        if q_start == 0:
            return out
        out, lse = out.reshape(T * Hq, d).float(), lse.reshape(-1).float().contiguous()
        for a in range(0, q_start, self.piece):
            b = min(q_start, a + self.piece)
            out_p, lse_p = self.lse(q, k[a:b], v[a:b], False)
            out, lse = kernels.merge_attention(out, lse, out_p.reshape(T * Hq, d).float(),
                                               lse_p.reshape(-1).float().contiguous())
        return out.to(q.dtype).view(T, Hq, d)

    def lse(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """Fused attention that also returns the log-sum-exp, so partial results over disjoint key sets
        can be merged; the contract of attention_lse_reference. On CUDA: cuDNN's kernel, else the
        flash kernel SDPA itself dispatches to (both take GQA-shaped K/V and return the LSE; the
        public SDPA drops it)."""
        args = q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None]
        if q.is_cuda and q.dtype in (torch.float16, torch.bfloat16):
            r = self._cudnn(*args, causal) if self.cudnn_ok else None
            if r is None:
                r = torch.ops.aten._scaled_dot_product_flash_attention(*args, 0.0, causal, False, scale=self.scale)
        elif not q.is_cuda:
            r = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(*args, 0.0, causal, scale=self.scale)
        else:
            return attention_lse_reference(q, k, v, causal, self.scale)
        return r[0][0].transpose(0, 1), r[1][0].transpose(0, 1)

    def _cudnn(self, q, k, v, causal: bool):
        op = getattr(torch.ops.aten, "_scaled_dot_product_cudnn_attention", None)
        try:
            out, lse = op(q, k, v, None, True, 0.0, causal, False, scale=self.scale)[:2]
        except (RuntimeError, TypeError, AttributeError):
            self.cudnn_ok = False
            return None
        return out, lse.reshape(q.shape[:3])
