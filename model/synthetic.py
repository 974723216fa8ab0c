"""Deterministic synthetic catalogs: clustered embeddings, Zipf-skewed attributes.

Hard enough to index that recall means something (many overlapping
clusters, noise comparable to the cluster spread), with attribute values
whose frequencies follow a Zipf law like real ones (a few huge values, a
long tail), so filters span from very selective to almost everything.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from sterling.model.attributes import Attributes

__all__ = ["SyntheticCatalog", "synthetic_catalog", "synthetic_queries", "FEATURES"]

# feature → (head values, number of values, Zipf exponent)
FEATURES: dict[str, tuple[tuple[str, ...], int, float]] = {
    "lang": (("en", "es", "pt", "fr", "de", "ja", "ko", "it", "ru", "ar"), 30, 1.2),
    "country": (("US", "BR", "IN", "MX", "GB", "CA", "DE", "FR", "JP", "ES"), 100, 1.1),
    "category": (("music", "sports", "news", "gaming", "food", "travel", "tech", "fashion"), 500, 1.0),
    "policy": (("ok", "blocked", "sensitive", "minor_safe"), 4, 2.5),
    "device": (("android", "ios", "web", "tv"), 4, 1.0),
    "tier": (("free", "premium", "creator"), 3, 1.5),
}


@dataclass(slots=True)
class SyntheticCatalog:
    embeddings: torch.Tensor  # [N, D] fp32, unit norm
    ids: torch.Tensor  # [N] int64
    attributes: Attributes
    centers: torch.Tensor  # [C, D]


def _values(feature: str) -> list[str]:
    head, n, _ = FEATURES[feature]
    return list(head) + [f"{feature[:3]}{i}" for i in range(len(head), n)]


def _zipf(n: int, s: float) -> torch.Tensor:
    p = 1.0 / torch.arange(1, n + 1, dtype=torch.float64) ** s
    return p / p.sum()


def synthetic_catalog(
    n: int,
    dim: int = 64,
    *,
    n_clusters: int | None = None,
    noise: float = 0.8,
    seed: int = 0,
    id_offset: int = 1_000_000_000,
    with_attributes: bool = True,
) -> SyntheticCatalog:
    """``n`` unit vectors around ``n_clusters`` centers, ids ``id_offset + i``."""
    g = torch.Generator().manual_seed(seed)
    C = n_clusters or max(8, n // 250)
    centers = F.normalize(torch.randn(C, dim, generator=g), dim=1)
    emb = torch.empty(n, dim)
    step = 262_144
    for s in range(0, n, step):
        m = min(step, n - s)
        c = torch.randint(0, C, (m,), generator=g)
        x = centers[c] + noise * torch.randn(m, dim, generator=g) / dim**0.5
        emb[s : s + m] = F.normalize(x, dim=1)
    ids = torch.arange(n, dtype=torch.int64) + id_offset
    attrs = _attributes(n, g) if with_attributes else Attributes.empty(n)
    return SyntheticCatalog(emb, ids, attrs, centers)


def _attributes(n: int, g: torch.Generator) -> Attributes:
    vocab: list[str] = []
    columns = []
    for feature, (_, _, s) in FEATURES.items():
        values = _values(feature)
        base = len(vocab)
        vocab += [f"{feature}:{v}" for v in values]
        columns.append(torch.multinomial(_zipf(len(values), s), n, replacement=True, generator=g) + base)
    # a second category for about a third of the items
    cat_vals = _values("category")
    cat_base = vocab.index(f"category:{cat_vals[0]}")
    second = torch.multinomial(_zipf(len(cat_vals), 1.0), n, replacement=True, generator=g) + cat_base
    has_second = (torch.rand(n, generator=g) < 0.33) & (second != columns[2])
    ids = torch.stack(columns, dim=1)  # [n, F]
    lengths = torch.full((n,), ids.shape[1], dtype=torch.int64) + has_second.long()
    offsets = torch.zeros(n + 1, dtype=torch.int64)
    torch.cumsum(lengths, 0, out=offsets[1:])
    flat = torch.empty(int(offsets[-1]), dtype=torch.int32)
    for j in range(ids.shape[1]):
        flat[offsets[:-1] + j] = ids[:, j].to(torch.int32)
    rows = has_second.nonzero().squeeze(1)
    flat[offsets[rows] + ids.shape[1]] = second[rows].to(torch.int32)
    return Attributes(vocab, flat, offsets)


def synthetic_queries(catalog: SyntheticCatalog, nq: int, *, noise: float = 0.8, seed: int = 1) -> torch.Tensor:
    """Queries drawn around the catalog's cluster centers (not copies of items)."""
    g = torch.Generator().manual_seed(seed)
    C, dim = catalog.centers.shape
    c = torch.randint(0, C, (nq,), generator=g)
    x = catalog.centers[c] + noise * torch.randn(nq, dim, generator=g) / dim**0.5
    return F.normalize(x, dim=1)
