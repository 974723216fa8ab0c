"""Index configuration."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from enum import StrEnum

from sterling.model.errors import InvalidInputError

__all__ = ["Metric", "IndexConfig", "auto_nlist", "MAX_ABS_VALUE"]

# Largest |value| in an embedding or query: a product of two is ≤ 1e30, a D-term sum stays far below
# fp32's 3.4e38 for any D ≤ 10^8, so scores never overflow to inf (which would make the top-k arbitrary).
MAX_ABS_VALUE: float = 1e15


class Metric(StrEnum):
    """Similarity used for scoring; larger is better for both.

    ``ip`` scores raw inner products; ``cosine`` L2-normalises items at build
    time and queries at search time, then scores inner products.
    """

    IP = "ip"
    COSINE = "cosine"


def auto_nlist(num_items: int) -> int:
    """A power of two near 4·sqrt(N), at most N, at least 1 (Faiss's usual rule of thumb)."""
    if num_items <= 1:
        return 1
    target = 4 * math.sqrt(num_items)
    return max(1, min(num_items, 2 ** round(math.log2(target))))


@dataclass(kw_only=True, slots=True)
class IndexConfig:
    """How an ``ItemIndex`` is built and searched by default.

    Args:
        nlist: IVF lists; ``None`` picks ``auto_nlist(N)``.
        metric: ``"ip"`` or ``"cosine"``.
        nprobe: default lists probed per query; ``None`` = max(1, nlist // 8).
        kmeans_iters: spherical k-means iterations on the training sample.
        kmeans_points_per_list: training sample size per list (capped by
            ``max_kmeans_points`` and N).
        chunk_size: items per chunk while streaming over the catalog.
        list_slack: spare slots per list, as a fraction of its size, kept
            empty for in-place upserts.
        target_fpr: Bloom false-positive rate per term the signature size is
            chosen for.
        bloom_bits, bloom_hashes: explicit signature size (a multiple of 64)
            and hashes per term, overriding the sizing from ``target_fpr``.
        max_filter_terms: terms allowed in one filter expression.
        max_k: largest k a search may ask for (2^18 by default: the largest
            the kernels are tested at); results cost B × k × 12 bytes plus
            the selection buffers, so this bounds search memory per query.
        max_attributes_per_item: most ``feature:value`` terms one catalog item
            may carry (a build refuses more with ``TooManyAttributesError``).
        adaptive_filter: widen the probe for selective filters (about
            nprobe / selectivity lists), and score the verified eligible set
            directly when that would exceed half the lists.
        seed: seed for sampling and k-means initialisation.
    """

    nlist: int | None = None
    metric: Metric | str = Metric.IP
    nprobe: int | None = None
    kmeans_iters: int = 12
    kmeans_points_per_list: int = 64
    max_kmeans_points: int = 262_144
    chunk_size: int = 65_536
    list_slack: float = 0.0
    target_fpr: float = 1e-3
    bloom_bits: int | None = None
    bloom_hashes: int | None = None
    max_filter_terms: int = 256
    max_k: int = 262_144
    max_attributes_per_item: int = 1024
    adaptive_filter: bool = True
    seed: int = 0

    def __post_init__(self) -> None:
        try:
            self.metric = Metric(self.metric)
        except ValueError as e:
            raise InvalidInputError(
                f"metric {self.metric!r} is not supported; use one of {[m.value for m in Metric]}"
            ) from e
        if self.nlist is not None and self.nlist < 1:
            raise InvalidInputError(f"nlist ({self.nlist}) must be ≥ 1, or None to choose from N")
        if self.nprobe is not None and self.nprobe < 1:
            raise InvalidInputError(f"nprobe ({self.nprobe}) must be ≥ 1")
        if self.nlist is not None and self.nprobe is not None and self.nprobe > self.nlist:
            raise InvalidInputError(f"nprobe ({self.nprobe}) must be ≤ nlist ({self.nlist})")
        if self.kmeans_iters < 1:
            raise InvalidInputError(f"kmeans_iters ({self.kmeans_iters}) must be ≥ 1")
        if self.chunk_size < 1:
            raise InvalidInputError(f"chunk_size ({self.chunk_size}) must be ≥ 1")
        if not 0.0 <= self.list_slack <= 10.0:
            raise InvalidInputError(f"list_slack ({self.list_slack}) must be in [0, 10]")
        if not 0.0 < self.target_fpr < 1.0:
            raise InvalidInputError(f"target_fpr ({self.target_fpr}) must be in (0, 1), e.g. 1e-3")
        if self.bloom_bits is not None and (self.bloom_bits < 64 or self.bloom_bits % 64):
            raise InvalidInputError(f"bloom_bits ({self.bloom_bits}) must be a positive multiple of 64")
        if self.bloom_hashes is not None and not 1 <= self.bloom_hashes <= 16:
            raise InvalidInputError(f"bloom_hashes ({self.bloom_hashes}) must be in 1..16")
        if self.max_k < 1:
            raise InvalidInputError(f"max_k ({self.max_k}) must be ≥ 1")
        if self.max_attributes_per_item < 1:
            raise InvalidInputError(f"max_attributes_per_item ({self.max_attributes_per_item}) must be ≥ 1")
        if self.max_filter_terms < 1:
            raise InvalidInputError(f"max_filter_terms ({self.max_filter_terms}) must be ≥ 1")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["metric"] = str(Metric(self.metric).value)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> IndexConfig:
        return cls(**d)
