"""Attention-aware clusters of keys (RetrievalAttention / RetroInfer style), as blocks.

Each segment of tokens outside sinks and window is clustered per layer and KV head with k-means on
mean-centred keys (inner product), then stored cluster after cluster: tokens are sorted by cluster
(clusters ordered along the keys' leading direction, so neighbours are alike) and cut into blocks.
A block is then ~one cluster of block_size keys, fetched as one contiguous copy, and the block's
mean key is its centroid. Scoring a block = q . centroid (max over the GQA group), the ranking of
the estimated attention mass size * exp(q . centroid) since every block has the same size.

Estimates of blocks left out of a selection (index.summary) are tighter on these blocks than on
natural-order ones: a block's keys are alike.
"""
from __future__ import annotations

import importlib.util

import numpy as np
import torch

from .. import kernels
from ..errors import ConfigError
from ..config import KVGeometry
from .base import BlockIndex, restore_prefix
from ..memory import check_allocation

KMEANS_KINDS = ("auto", "torch", "faiss", "faiss-gpu")


def _faiss():
    try:
        import faiss
    except ImportError:
        raise ConfigError("faiss is not installed: `pip install faiss-cpu` (or kvretrieve[gpu] for faiss-gpu)") from None
    return faiss


def resolve_kmeans(kind: str, device: torch.device) -> str:
    """auto: faiss-gpu when installed on a GPU, else torch on the GPU; faiss-cpu on a CPU-only machine
    (torch where faiss is missing)."""
    if kind not in KMEANS_KINDS:
        raise ConfigError(f"RetrievalConfig.kmeans must be one of {', '.join(KMEANS_KINDS)}, got {kind!r}")
    gpu_faiss = device.type == "cuda" and _has_faiss_gpu()
    if kind == "faiss-gpu" and not gpu_faiss:
        raise ConfigError("RetrievalConfig.kmeans 'faiss-gpu' needs a CUDA device and faiss built with GPU support: "
                          "`pip install kvretrieve[gpu]`, or use kmeans='torch'")
    if kind == "auto":
        return "faiss-gpu" if gpu_faiss else "torch" if device.type == "cuda" or not _has_faiss() else "faiss"
    if kind == "faiss":
        _faiss()  # fail now, not halfway through a prefill
    return kind


def _has_faiss() -> bool:
    return importlib.util.find_spec("faiss") is not None


def _has_faiss_gpu() -> bool:
    if not _has_faiss():
        return False
    import faiss

    return hasattr(faiss, "StandardGpuResources")


def kmeans_torch(x: torch.Tensor, clusters: int, iters: int, seed: int) -> torch.Tensor:
    """Spherical k-means for a batch of point sets at once: x [B, n, d] fp32 -> centroids [B, C, d].
    One batched matmul per iteration assigns every point of every set (inner product to unit
    centroids); on a GPU it runs in bf16, which only has to get the argmax right."""
    B, n, d = x.shape
    gen = torch.Generator(device="cpu").manual_seed(seed)
    start = torch.stack([torch.randperm(n, generator=gen)[:clusters] for _ in range(B)]).to(x.device)
    cent = torch.nn.functional.normalize(torch.gather(x, 1, start[..., None].expand(-1, -1, d)), dim=-1)
    fast = x.to(torch.bfloat16) if x.is_cuda else x
    for _ in range(iters):
        assign = (fast @ cent.to(fast.dtype).transpose(1, 2)).argmax(-1)         # [B, n]
        sums = torch.zeros_like(cent).scatter_add_(1, assign[..., None].expand(-1, -1, d), x)
        empty = sums.norm(dim=-1, keepdim=True) == 0
        cent = torch.where(empty, cent, torch.nn.functional.normalize(sums, dim=-1))  # empty: keep the old one
    return cent


def leading_direction(x: torch.Tensor, iters: int = 8) -> torch.Tensor:
    """x [B, n, d] centred -> [B, d], the top principal direction by power iteration on x^T x (a
    batched SVD costs milliseconds per call on a GPU; this is a few tiny matmuls)."""
    cov = x.transpose(1, 2) @ x                                                    # [B, d, d]
    v = torch.ones(x.shape[0], x.shape[2], 1, device=x.device, dtype=x.dtype)
    for _ in range(iters):
        v = torch.nn.functional.normalize(cov @ v, dim=1)
    return v[..., 0]


def kmeans_faiss(x: torch.Tensor, clusters: int, iters: int, seed: int, gpu: bool) -> torch.Tensor:
    faiss = _faiss()
    out = []
    for h in range(x.shape[0]):
        pts = np.ascontiguousarray(x[h].cpu().numpy(), dtype=np.float32)
        km = faiss.Kmeans(pts.shape[1], clusters, niter=iters, spherical=True, seed=seed + h, gpu=gpu,
                          min_points_per_centroid=1, verbose=False)
        km.train(pts)
        out.append(torch.from_numpy(km.centroids))
    return torch.stack(out).to(x.device)


class IVFIndex(BlockIndex):
    kind = "ivf"
    reorders = True  # the backend stores clustered segments in the order cluster_order() returns

    def __init__(self, geo: KVGeometry, kmeans: str, iters: int = 10, seed: int = 0):
        """kmeans: a concrete kind (torch, faiss, faiss-gpu; resolve_kmeans makes 'auto' one)."""
        if kmeans not in KMEANS_KINDS[1:]:
            raise ConfigError(f"IVFIndex needs a resolved kmeans kind, got {kmeans!r} (see resolve_kmeans)")
        self.bs, self.iters, self.seed, self.kmeans = geo.block_size, iters, seed, kmeans
        shape = (geo.layers, geo.kv_heads, geo.max_blocks, geo.head_dim)
        check_allocation(geo.nbytes(*shape), geo.device, "the cluster centroids", "lower max_context")
        self.means = torch.zeros(shape, device=geo.device, dtype=geo.dtype)

    def add(self, layer: int | slice, first_block: int, keys: torch.Tensor, values: torch.Tensor) -> None:
        nb = keys.shape[-3]
        self.means[layer, :, first_block:first_block + nb] = keys.float().mean(-2).to(self.means.dtype)

    def scores(self, layer: int, q: torch.Tensor, n_blocks: int) -> torch.Tensor:
        return kernels.max_dot_block_scores(q, self.means[layer], n_blocks, 1)  # a centroid per block

    def cluster_order(self, keys: torch.Tensor) -> torch.Tensor:
        """keys [B, n, d]: B point sets (KV heads x segments), n a multiple of block_size -> perm
        [B, n]: storage slot i of set b holds its token perm[b, i]."""
        B, n, d = keys.shape
        x = keys.float()
        x = x - x.mean(1, keepdim=True)  # centred: the shared mean would dominate every inner product
        clusters = max(1, n // self.bs)
        if self.kmeans == "torch":
            cent = kmeans_torch(x, clusters, self.iters, self.seed)
        else:
            cent = kmeans_faiss(x, clusters, self.iters, self.seed, gpu=self.kmeans == "faiss-gpu")
        fast = x.to(torch.bfloat16) if x.is_cuda else x  # the argmax is all that is needed
        assign = (fast @ cent.to(fast.dtype).transpose(1, 2)).argmax(-1)          # [B, n]
        # Order clusters along the leading principal direction of the keys, so the clusters that a
        # block boundary mixes are similar ones.
        rank = (cent @ leading_direction(x)[..., None])[..., 0].argsort(1).argsort(1)  # [B, C]
        key = torch.gather(rank, 1, assign) * n + torch.arange(n, device=x.device)
        return key.argsort(1)

    def state(self, n_blocks: int) -> dict[str, torch.Tensor]:
        return {"means": self.means[:, :, :n_blocks]}

    def load_state(self, state: dict[str, torch.Tensor]) -> None:
        restore_prefix(self.means, state["means"], "cluster centroids")

    def nbytes(self) -> int:
        return self.means.numel() * self.means.element_size()
