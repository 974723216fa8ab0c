"""Per-list tier split: which IVF lists a device keeps in its fast tier, from real list statistics.

The config-only planner assumes every list is as hot as any other and splits
a tensor by bytes. With an artifact (``sterling plan --model``) it knows each
list's bytes and how often a query probes it (measured at build time on a
query sample), so the fast tier takes the lists with the most probes per
query first — every byte of a list is read when it is probed, so a list's
density (bytes touched per query per byte stored) is its probe frequency.
All per-item tensors of a list (codes, scales, Bloom words, and the
gathered tail: ids, exact attributes) follow the list's tier.

On a CPU host the fast tier is resident DRAM and the slow tier is the
memory-mapped artifact (``MemoryTier.MMAP``); on a GPU they would be HBM
and pinned host DRAM.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from sterling.planner import errors
from sterling.planner.types import MemoryTier, Placement

__all__ = [
    "COLD_WINDOW_BYTES",
    "PAGE_BYTES",
    "ListStats",
    "ListRange",
    "TierSplit",
    "pick_fast",
    "scan_scratch_bytes",
    "slow_reads_per_batch",
    "split_lists",
]

# Slow-tier bytes a tiered index scans between two releases of their pages: the
# part of the slow tier resident at any time (same as sterling.model.index.DEFAULT_COLD_WINDOW).
COLD_WINDOW_BYTES: int = 32 << 20
# Scores one search chunk may hold (same as sterling.model.search.CHUNK_BUDGET): the CPU scan's
# score buffer for a batch is at most this many fp32 values.
SEARCH_CHUNK_SCORES: int = 1 << 26
# Largest scratch buffer the scan keeps between searches (sterling.kernels.cpu_scan._ScratchPool).
SCRATCH_MAX_BYTES: int = 1 << 28
# Residency is decided per 4 KiB page (x86-64 Linux base page).
PAGE_BYTES: int = 4096
# Tensors read for every item of a probed list; the rest of a list's bytes are read only
# for the K0 survivors (ids, exact attributes).
SCANNED: frozenset[str] = frozenset({"codes", "scales"})


@dataclass(frozen=True, kw_only=True)
class ListStats:
    """An artifact's real IVF lists.

    ``bytes_by_tensor[name]`` [nlist] bytes each list owns in a per-item
    tensor; ``probe_freq`` [nlist] expected probes per query (sums to the
    nprobe it was measured at); ``always`` bytes of the tensors every query
    reads whole (centroids, list offsets, alive bitmask), which stay fast.
    ``file_starts[name]`` [nlist] (optional) the artifact file offset of each
    list's first byte in that tensor, and ``file_bytes`` the file's size: the
    cold-read model (``planner/cpu_cost.py``) needs where the lists lie in
    the file, since the kernel reads the file around a fault, not a list.
    """

    bytes_by_tensor: Mapping[str, np.ndarray]
    probe_freq: np.ndarray
    nprobe: int
    always: int = 0
    file_starts: Mapping[str, np.ndarray] | None = None
    file_bytes: int = 0

    @classmethod
    def from_artifact(cls, d: Mapping) -> ListStats:
        """From ``sterling.model.tiers.artifact_list_stats``' dict."""
        return cls(bytes_by_tensor=d["bytes_by_tensor"], probe_freq=d["probe_freq"], nprobe=d["nprobe"],
                   always=d["always"], file_starts=d.get("file_starts"), file_bytes=int(d.get("file_bytes", 0)))

    def __post_init__(self) -> None:
        n = self.probe_freq.shape[0]
        if n == 0 or not np.isfinite(self.probe_freq).all() or (self.probe_freq < 0).any():
            raise errors.InvalidPlanConfigError("probe_freq must be a non-empty, finite, non-negative [nlist] array")
        for name, b in self.bytes_by_tensor.items():
            if b.shape != (n,):
                raise errors.InvalidPlanConfigError(f"list bytes of {name!r} have shape {b.shape}, expected ({n},)")

    @property
    def nlist(self) -> int:
        return int(self.probe_freq.shape[0])

    @property
    def list_bytes(self) -> np.ndarray:
        return sum(self.bytes_by_tensor.values(), np.zeros(self.nlist, dtype=np.int64))

    def subset(self, start: int, end: int) -> ListStats:
        """The lists ``[start, end)`` (a document shard)."""
        starts = None if self.file_starts is None else {n: b[start:end] for n, b in self.file_starts.items()}
        return ListStats(bytes_by_tensor={n: b[start:end] for n, b in self.bytes_by_tensor.items()},
                         probe_freq=self.probe_freq[start:end], nprobe=self.nprobe, always=self.always,
                         file_starts=starts, file_bytes=self.file_bytes)


@dataclass(frozen=True, kw_only=True, slots=True)
class ListRange:
    """Lists ``[start, end)`` in one tier: their bytes and expected probes per query."""

    start: int
    end: int
    tier: MemoryTier
    nbytes: int
    probes_per_query: float

    def to_dict(self) -> dict:
        return {"start": self.start, "end": self.end, "tier": self.tier.value, "nbytes": self.nbytes,
                "probes_per_query": round(self.probes_per_query, 6)}


@dataclass(frozen=True, kw_only=True)
class TierSplit:
    """The split of one device's lists: mask, ranges, per-tensor bytes per tier, resident bytes."""

    fast_tier: MemoryTier
    slow_tier: MemoryTier
    fast: np.ndarray  # [nlist] bool
    ranges: tuple[ListRange, ...]
    bytes_by_tensor: dict[str, dict[str, int]]  # tensor → tier → bytes
    fast_pages_bytes: int  # page-rounded bytes the fast lists keep resident
    cold_window: int
    always: int
    probe_freq: np.ndarray | None = None  # [nlist], for the plot
    list_bytes: np.ndarray | None = None  # [nlist]
    batch_slow_bytes: int = 0  # slow-tier bytes one batch scans (mapped until the batch ends)
    scan_scratch: int = 0  # the CPU scan's score buffer and block maxima, kept between batches
    slow_advice: str = "normal"  # how a cold fault reads the slow tier: "normal" (read-around) or "random"

    @property
    def resident_bytes(self) -> int:
        """What a serving process keeps resident for the index: fast pages + small tensors + the slow
        window, or one batch's slow scan when that is larger (a batch's pages stay mapped while it runs),
        + the scan's scratch (``scan_scratch_bytes``)."""
        slow = max(self.cold_window, self.batch_slow_bytes) if (~self.fast).any() else 0
        return self.fast_pages_bytes + self.always + slow + self.scan_scratch

    def to_dict(self) -> dict:
        return {
            "fast_tier": self.fast_tier.value,
            "slow_tier": self.slow_tier.value,
            "fast_lists": int(self.fast.sum()),
            "slow_lists": int((~self.fast).sum()),
            "fast": "".join("1" if f else "0" for f in self.fast.tolist()),
            "resident_bytes": self.resident_bytes,
            "fast_pages_bytes": self.fast_pages_bytes,
            "cold_window_bytes": self.cold_window,
            "slow_advice": self.slow_advice,
            "batch_slow_bytes": self.batch_slow_bytes,
            "scan_scratch_bytes": self.scan_scratch,
            "always_resident_bytes": self.always,
            "tensors": self.bytes_by_tensor,
            "ranges": [r.to_dict() for r in self.ranges],
            "probe_freq": [] if self.probe_freq is None else [float(f"{x:.4g}") for x in self.probe_freq.tolist()],
            "list_bytes": [] if self.list_bytes is None else [int(x) for x in self.list_bytes.tolist()],
        }


def scan_scratch_bytes(items_per_query: float, *, batch: int, nprobe: int) -> int:
    """Bytes the CPU scan keeps between batches of ``batch`` queries that scan ``items_per_query`` items each.

    The fused scan scores a search chunk into one fp32 buffer (one value per
    scanned item of the chunk; a chunk holds at most ``SEARCH_CHUNK_SCORES``)
    plus block maxima (one per 16 items of each probed list, rounded up per
    list: ≈ nprobe / 2 more per query), and keeps each for the next batch
    when it is at most ``SCRATCH_MAX_BYTES`` (``sterling.kernels.cpu_scan._ScratchPool``,
    which allocates 1/8 more than asked): those stay resident. A single query scanning more than a chunk is a
    chunk of its own, and its buffer is freed after it.
    """
    per_query = max(0.0, float(items_per_query))
    if per_query <= 0:
        return 0
    q = min(int(batch), max(1, int(SEARCH_CHUNK_SCORES // per_query)))  # queries in one chunk
    kept = 0
    for floats in (q * per_query, q * (per_query / 16.0 + nprobe / 2.0)):  # score buffer, block maxima
        if 4 * floats <= SCRATCH_MAX_BYTES:  # a larger buffer is freed after its search
            grown = floats * 1.125 if 4 * floats * 1.125 <= SCRATCH_MAX_BYTES else floats  # the pool's headroom
            kept += -(-4 * int(math.ceil(grown)) // PAGE_BYTES) * PAGE_BYTES
    return int(kept)


def pick_fast(probe_freq: np.ndarray, nbytes: np.ndarray, budget: int) -> np.ndarray:
    """Hottest lists first (probes per query; ties by list id) while their bytes fit ``budget``.

    A list that does not fit is skipped and smaller, colder ones may still be
    taken (greedy knapsack by density). Returns [nlist] bool.
    """
    probe_freq = np.asarray(probe_freq, dtype=np.float64)
    order = np.lexsort((np.arange(probe_freq.shape[0]), -probe_freq))
    fast = np.zeros(probe_freq.shape[0], dtype=bool)
    left = int(budget)
    sizes = np.asarray(nbytes, dtype=np.int64)
    for lst in order.tolist():
        b = int(sizes[lst])
        if b <= left:
            fast[lst] = True
            left -= b
    return fast


def _runs(mask: np.ndarray) -> list[tuple[int, int, bool]]:
    """Maximal runs [a, b) of equal values."""
    if mask.size == 0:
        return []
    cut = np.flatnonzero(mask[1:] != mask[:-1]) + 1
    starts = np.concatenate(([0], cut))
    ends = np.concatenate((cut, [mask.size]))
    return [(int(a), int(b), bool(mask[a])) for a, b in zip(starts, ends)]


def split_lists(
    stats: ListStats,
    fast_budget: int,
    *,
    fast_tier: MemoryTier = MemoryTier.DRAM,
    slow_tier: MemoryTier = MemoryTier.MMAP,
    cold_window: int = COLD_WINDOW_BYTES,
    fast: np.ndarray | None = None,
) -> TierSplit:
    """Split ``stats``' lists: the hottest that fit ``fast_budget`` bytes (pages included) go fast.

    ``fast_budget`` is what the fast tier may hold for the per-item tensors
    (the always-resident tensors and the slow-tier window are not in it).
    ``fast`` forces a mask instead of choosing one.
    """
    lb = stats.list_bytes
    if fast is None:
        n_tensors = max(1, len(stats.bytes_by_tensor))
        # each list run may add a partly used page per tensor at each end: keep that room
        fast = pick_fast(stats.probe_freq, lb + 2 * PAGE_BYTES * n_tensors, max(0, int(fast_budget)))
    fast = np.asarray(fast, dtype=bool)
    if fast.shape != (stats.nlist,):
        raise errors.InvalidPlanConfigError(f"fast mask has shape {fast.shape}, expected ({stats.nlist},)")
    ranges = []
    for a, b, f in _runs(fast):
        ranges.append(ListRange(start=a, end=b, tier=fast_tier if f else slow_tier, nbytes=int(lb[a:b].sum()),
                                probes_per_query=float(stats.probe_freq[a:b].sum())))
    by_tensor: dict[str, dict[str, int]] = {}
    pages = 0
    for name, b in stats.bytes_by_tensor.items():
        f_bytes = int(b[fast].sum())
        by_tensor[name] = {fast_tier.value: f_bytes, slow_tier.value: int(b.sum()) - f_bytes}
        for r in ranges:
            if r.tier is fast_tier:
                run = int(b[r.start : r.end].sum())
                pages += (-(-run // PAGE_BYTES) + 1) * PAGE_BYTES if run else 0
    return TierSplit(fast_tier=fast_tier, slow_tier=slow_tier, fast=fast, ranges=tuple(ranges),
                     bytes_by_tensor=by_tensor, fast_pages_bytes=pages, cold_window=int(cold_window),
                     always=int(stats.always), probe_freq=stats.probe_freq, list_bytes=lb)


def split_placements(split: TierSplit, stats: ListStats, *, k0: int, batch: int = 1, filtered: bool = False,
                     other: Sequence[Placement] = ()) -> tuple[Placement, ...]:
    """Placements of the per-item tensors under ``split`` (bytes per query weighted by probe frequency).

    Scanned tensors (codes, scales) are read whole once per batch for each
    list at least one of the batch's ``batch`` queries probes (the scan reads
    a list shared by several queries once): list l with per-query probe
    probability f_l is read with probability 1 − (1 − f_l)^batch. The
    gathered tail (ids, exact attributes) for the K0 survivors, which come
    from the fast tier in proportion to the probes that land there. ``other``
    (the always-resident tensors) is passed through. With ``filtered`` the
    Bloom words of probed lists are scanned too.
    """
    scanned = SCANNED | {"bloom"} if filtered else SCANNED
    freq = stats.probe_freq
    total_probes = float(freq.sum()) or 1.0
    fast_share = float(freq[split.fast].sum()) / total_probes
    out = list(other)
    sizes = {n: b for n, b in stats.bytes_by_tensor.items()}
    items = sizes["scales"] / 4.0 if "scales" in sizes else None
    for name, b in sizes.items():
        for tier, mask in ((split.fast_tier, split.fast), (split.slow_tier, ~split.fast)):
            nbytes = int(b[mask].sum())
            if not nbytes:
                continue
            if name in scanned:
                read = 1.0 - (1.0 - np.minimum(freq[mask], 1.0)) ** max(1, int(batch))
                bpq = float((read * b[mask]).sum()) / max(1, int(batch))
            else:
                share = fast_share if tier is split.fast_tier else 1.0 - fast_share
                per_item = float(b.sum()) / max(1.0, float(items.sum()) if items is not None else 1.0)
                bpq = k0 * share * max(per_item, 8.0)
            out.append(Placement(name=name, tier=tier, nbytes=nbytes, bytes_per_query=bpq))
    return tuple(out)


def slow_reads_per_batch(split: TierSplit, stats: ListStats, *, batch: int, k: int, filtered: bool = False) -> float:
    """Expected separate reads from the slow tier per batch: one per (slow list read, scanned tensor),
    plus one per result row gathered from a slow list (its id page)."""
    freq = np.minimum(stats.probe_freq, 1.0)
    slow = ~split.fast
    lists = float((1.0 - (1.0 - freq[slow]) ** max(1, int(batch))).sum())
    scanned = len((SCANNED | {"bloom"} if filtered else SCANNED) & set(stats.bytes_by_tensor))
    total = float(freq.sum()) or 1.0
    slow_share = float(freq[slow].sum()) / total
    return lists * scanned + max(1, int(batch)) * k * slow_share
