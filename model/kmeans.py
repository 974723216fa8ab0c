"""Spherical k-means on a training sample (torch, chunked)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["spherical_kmeans", "assign"]


def assign(x: torch.Tensor, centroids: torch.Tensor, chunk: int = 16_384) -> torch.Tensor:
    """[n, D] × [nlist, D] → [n] int64 list of the largest inner product."""
    out = torch.empty(x.shape[0], dtype=torch.int64)
    for s in range(0, x.shape[0], chunk):
        out[s : s + chunk] = (x[s : s + chunk] @ centroids.T).argmax(dim=1)
    return out


def spherical_kmeans(
    sample: torch.Tensor, nlist: int, *, iters: int, seed: int
) -> torch.Tensor:
    """Unit-norm centroids [nlist, D] for inner-product IVF.

    Empty clusters are re-seeded from the points worst served by their
    current centroid, so every list gets used.
    """
    x = F.normalize(sample.float(), dim=1)
    n = x.shape[0]
    g = torch.Generator().manual_seed(seed)
    centroids = x[torch.randperm(n, generator=g)[:nlist]].clone()
    for _ in range(iters):
        a = assign(x, centroids)
        sums = torch.zeros_like(centroids).index_add_(0, a, x)
        counts = torch.bincount(a, minlength=nlist)
        empty = (counts == 0).nonzero().squeeze(1)
        if empty.numel():
            fit = (x * centroids[a]).sum(1)  # cosine to own centroid
            worst = fit.argsort()[: empty.numel()]
            sums[empty] = x[worst]
        centroids = F.normalize(sums, dim=1)
    return centroids
