"""CPU batch cost from the mechanism: what the fused scan does per list and per item, and what
the kernel reads from the disk when a batch faults the memory-mapped tier.

**Scan** (``sterling.kernels.cpu_scan``): a batch probes a set of distinct
lists; a list probed by fewer than ``GROUP_MIN`` of the batch's queries is
scored straight from its int8 codes once per query, one probed by more is
dequantized once and scored four queries at a time. So a batch costs

    overhead + probe + lists · t_list + direct pair-items · t_direct
             + dequantized items · t_dequant + grouped pair-items · t_group

where a *pair-item* is one (query, item) score. With the real lists
(``ListStats``) the planner takes the expectation of each count over a
batch of independent queries: list l is probed by Binomial(batch, f_l)
queries (f_l: its probes per query). The rates are fitted by
``planner.profile.measure_profile`` on its own catalog over uniform and
skewed query streams (so both scoring paths are exercised).

**Cold mapped reads**: a fault on a file page that is not in the page cache
makes the kernel read the file *around* it (``mmap read-around``: a window
of the device's read-ahead size, half before the page) — on a device with a
large read-ahead this reads far more than the list, and also the file pages
of lists in the fast tier. The planner simulates it: for sampled batches,
the slow lists' code and scale ranges (and the id ranges results come from)
are touched in scan order; each touch of an uncached page is a fault that
reads the uncached part of the window around it. Its cost is the fault's
latency plus the bytes it read at the cold sequential bandwidth, plus
mapping the pages the scan touches. The constants are fitted by the
calibration on cold batches of its own artifact.

With ``MADV_RANDOM`` on the slow tier (``advice="random"``,
``model/tiers.py``) a fault reads only its own page: the same simulation
with a one-page window, each fault priced at the single-page fault cost the
calibration measures (``random_fault_s``). The planner prices both and
records the cheaper (``TierSplit.slow_advice``): read-around wins while a
window holds much of what the batch scans (a small artifact, or dense slow
lists), one page a fault once the windows are mostly bytes no query asked for.

A batch that scans fewer than ``SERIAL_ITEMS`` pair-items runs on one
thread: its per-list and per-item terms are charged ``threads`` times (the
fit is done in the parallel regime).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = [
    "ADVICE",
    "GROUP_MIN",
    "SERIAL_ITEMS",
    "ColdTerms",
    "ScanTerms",
    "cold_terms",
    "readaround",
    "scan_terms",
    "scan_terms_of_probe",
]

# Queries of one list from which the fused scan dequantizes it once (``cpu_scan.GROUP_MIN``).
GROUP_MIN: int = 4
# Pair-items below which the fused scan runs on the calling thread only (``cpu_scan.SERIAL_ITEMS``).
SERIAL_ITEMS: int = 32_768
# Page granularity of the read-around simulation (x86-64 base page).
SIM_PAGE: int = 4096
# Pages a fault maps around it when they are cached: Linux's default fault_around_bytes (64 KiB).
FAULT_AROUND_BYTES: int = 64 << 10
# How a cold fault on the slow tier reads the file (``model.tiers.SLOW_ADVICE``): the read-ahead
# window around it, or its own page only (MADV_RANDOM).
ADVICE: tuple[str, ...] = ("normal", "random")


@dataclass(frozen=True, kw_only=True, slots=True)
class ScanTerms:
    """Expected work of one batch's fused scan (counts per batch)."""

    batch: int
    lists: float  # distinct lists probed
    direct: float  # pair-items scored straight from codes (lists with < GROUP_MIN queries)
    dequant: float  # items dequantized (lists with ≥ GROUP_MIN queries)
    group: float  # pair-items scored from a dequantized list
    probe: float  # query × centroid scores (batch · nlist)

    @property
    def pair_items(self) -> float:
        return self.direct + self.group

    def features(self) -> np.ndarray:
        """[5] the regression features: constant, lists, direct, dequant, group."""
        return np.array([1.0, self.lists, self.direct, self.dequant, self.group])


def scan_terms(list_items: np.ndarray, probe_freq: np.ndarray, batch: int) -> ScanTerms:
    """Expected scan work of a batch of ``batch`` independent queries.

    Args:
        list_items: [nlist] items per list.
        probe_freq: [nlist] probes per query of each list (≤ 1 each; sums to nprobe).
    """
    n = np.asarray(list_items, dtype=np.float64)
    f = np.clip(np.asarray(probe_freq, dtype=np.float64), 0.0, 1.0)
    b = max(1, int(batch))
    import math

    p0 = (1.0 - f) ** b  # P(no query of the batch probes list l)
    lists = float((1.0 - p0).sum())
    direct, small = 0.0, p0.copy()  # small: P(c < GROUP_MIN)
    for c in range(1, min(GROUP_MIN, b + 1)):
        pc = math.comb(b, c) * f**c * (1.0 - f) ** (b - c)
        direct += float((c * pc * n).sum())
        small += pc
    mean = b * f  # E[c]
    group = float((mean * n).sum()) - direct
    dequant = float(((1.0 - np.minimum(small, 1.0)) * n).sum())
    return ScanTerms(batch=b, lists=lists, direct=direct, dequant=dequant, group=max(group, 0.0),
                     probe=float(b * n.shape[0]))


def scan_terms_of_probe(probe: np.ndarray, list_items: np.ndarray) -> ScanTerms:
    """The exact scan work of one batch given its probes [B, nprobe] (the calibration's features)."""
    probe = np.asarray(probe)
    n = np.asarray(list_items, dtype=np.float64)
    c = np.bincount(probe.reshape(-1), minlength=n.shape[0]).astype(np.float64)
    hit = c > 0
    small = hit & (c < GROUP_MIN)
    big = c >= GROUP_MIN
    return ScanTerms(batch=int(probe.shape[0]), lists=float(hit.sum()), direct=float((c * n)[small].sum()),
                     dequant=float(n[big].sum()), group=float((c * n)[big].sum()),
                     probe=float(probe.shape[0] * n.shape[0]))


@dataclass(frozen=True, kw_only=True, slots=True)
class ColdTerms:
    """Expected cold-tier work of one batch: disk faults, bytes they read, slow bytes the scan maps."""

    faults: float
    bytes_read: float
    bytes_touched: float
    advice: str = "normal"  # "random": one page a fault (MADV_RANDOM), priced per fault


_SCANNED = ("codes", "scales")


def cold_terms(stats, fast: np.ndarray, *, batch: int, k: int, before: int, after: int,
               cold_window: int = 8 << 20, batches: int = 32, seed: int = 0,
               advice: str = "normal") -> ColdTerms | None:
    """Simulate the kernel's read-around for ``batches`` consecutive sampled batches, the page
    cache evicted before each (what a cold server sees).

    Pages the process still maps survive the eviction: the slow pages scanned
    since the tier's last release (``model/tiers.py``: it releases once the
    slow bytes scanned pass ``cold_window``), each with its fault-around
    block (``FAULT_AROUND_BYTES``).

    ``stats``: a ``planner.tiers.ListStats`` with ``file_starts`` (None without).
    ``before`` / ``after``: bytes the kernel reads before / from a faulting
    page (measured by the calibration). Lists are touched in ascending order
    split in two halves scanned side by side (the parallel scan's two
    threads), codes then scales per list; then the id ranges of slow lists
    that hold a result (each of the list's queries takes one with
    probability k / nprobe).

    ``advice="random"`` (MADV_RANDOM on the slow tier): a fault reads its
    own page only (``before`` / ``after`` are ignored), and the pages the
    process maps are only those the scan touched (no neighbours are cached).
    """
    if advice not in ADVICE:
        from sterling.planner import errors

        raise errors.InvalidPlanConfigError(f"slow-tier advice {advice!r} is not one of {ADVICE}; pass one of them")
    if stats.file_starts is None or not stats.file_bytes:
        return None
    fast = np.asarray(fast, dtype=bool)
    if fast.all():
        return ColdTerms(faults=0.0, bytes_read=0.0, bytes_touched=0.0, advice=advice)
    around = FAULT_AROUND_BYTES
    if advice == "random":
        before, after, around = 0, SIM_PAGE, SIM_PAGE
    rng = np.random.default_rng(seed)
    f = np.clip(stats.probe_freq, 0.0, 1.0)
    b = max(1, int(batch))
    take = min(1.0, k / max(1, stats.nprobe))
    ranges = {n: (np.asarray(stats.file_starts[n], dtype=np.int64),
                  np.asarray(stats.bytes_by_tensor[n], dtype=np.int64))
              for n in stats.file_starts if n in stats.bytes_by_tensor}
    scanned = [n for n in _SCANNED if n in ranges]
    faults = read = touched = 0.0
    slow_bytes = np.where(fast, 0, stats.list_bytes)
    mapped: list[tuple[int, int]] = []  # (offset, bytes) the process maps since the last release
    scanned_since = 0
    for _ in range(max(1, int(batches))):
        c = rng.binomial(b, f)
        lists = np.flatnonzero((c > 0) & ~fast)
        half = (np.flatnonzero(c > 0).size + 1) // 2
        cut = np.flatnonzero(c > 0)[half - 1] if half else -1
        lo, hi = lists[lists <= cut], lists[lists > cut]
        order = np.empty(lists.size, dtype=np.int64)
        m = min(lo.size, hi.size)
        order[: 2 * m : 2], order[1 : 2 * m : 2] = lo[:m], hi[:m]
        order[2 * m :] = lo[m:] if lo.size > m else hi[m:]
        touches = [(ranges[n][0][lst], ranges[n][1][lst]) for lst in order.tolist() for n in scanned]
        if "item_ids" in ranges:
            hold = rng.random(lists.size) < 1.0 - (1.0 - take) ** c[lists]
            touches += [(ranges["item_ids"][0][lst], ranges["item_ids"][1][lst]) for lst in lists[hold].tolist()]
        touched += float(sum(nb for _, nb in touches if nb > 0))
        fl, rd = readaround(touches, stats.file_bytes, before=before, after=after, cached=mapped, around=around,
                            readahead=advice == "normal")
        faults += fl
        read += rd
        mapped += touches
        scanned_since += int(slow_bytes[lists].sum())
        if scanned_since > cold_window:  # the tier releases its pages after this batch
            mapped, scanned_since = [], 0
    n = max(1, int(batches))
    return ColdTerms(faults=faults / n, bytes_read=min(read / n, float(stats.file_bytes)), bytes_touched=touched / n,
                     advice=advice)


def readaround(touches, file_bytes: int, *, before: int, after: int, cached=(),
               around: int = FAULT_AROUND_BYTES, readahead: bool = True) -> tuple[int, int]:
    """(faults, bytes read) when ``touches`` — (file offset, bytes) ranges, in touch order — are
    read through a mapping of a file whose only cached pages are the ``cached`` ranges (with
    their fault-around blocks of ``around`` bytes).

    Each touched page not yet cached is a fault (the toucher waits for the disk): the kernel
    reads the uncached pages of ``[page − before, page + after)``, shifted to start at the
    file's start (mmap read-around), and marks the page a quarter of the window before its end
    (``async_size``). With ``readahead``, a later touch of a marked page is no fault: it starts
    the kernel's asynchronous readahead, which reads on from the first uncached page after it —
    a whole window when the mark is that of the file's latest read (the sequential case), else
    about twice the distance to that page — and marks the first page of what it read, so a scan
    that goes on in order keeps the disk reading ahead of it. The bytes it reads count; the
    faults it saves do not."""
    pages = int(file_bytes) // SIM_PAGE + 1
    bpg, apg = max(0, int(before)) // SIM_PAGE, max(1, int(after) // SIM_PAGE)
    window = bpg + apg  # the device's read-ahead, in pages
    resident = np.zeros(pages, dtype=bool)
    blk = max(1, int(around) // SIM_PAGE)
    for s, nb in cached:
        if nb > 0:
            end = -(-(int(s) + int(nb)) // SIM_PAGE)  # one past the last page touched
            resident[int(s) // SIM_PAGE // blk * blk : -(-end // blk) * blk] = True
    cached = resident
    marked = np.zeros(pages, dtype=bool)
    ra_mark, ra_end = -1, -1  # the file's readahead state: the mark and the end of its latest read
    faults = read = 0

    def fill(a: int, e: int, mark: int) -> None:
        nonlocal read, ra_mark, ra_end
        new = ~cached[a:e]
        read += int(new.sum()) * SIM_PAGE
        cached[a:e] = True
        if readahead and a <= mark < e and new[mark - a]:  # only a page this read brought in is marked
            marked[mark] = True
        ra_mark, ra_end = mark, e

    for s, nb in touches:
        if nb <= 0:
            continue
        p0, p1 = int(s) // SIM_PAGE, (int(s) + int(nb) - 1) // SIM_PAGE + 1
        while p0 < p1:
            hit = np.flatnonzero(~cached[p0:p1] | marked[p0:p1])
            if not hit.size:
                break
            p = p0 + int(hit[0])
            if cached[p]:  # a marked page: asynchronous readahead, the toucher goes on
                marked[p] = False
                if p == ra_mark:
                    a, size = ra_end, window
                else:
                    rest = np.flatnonzero(~cached[p + 1 : min(pages, p + 1 + window)])
                    if not rest.size:
                        p0 = p + 1
                        continue
                    a = p + 1 + int(rest[0])
                    size = min(window, 2 * (a - p + 1))
                if a < pages:
                    fill(a, min(pages, a + size), a)
                p0 = p + 1
                continue
            faults += 1
            a = max(0, p - bpg)
            e = min(pages, a + window)
            fill(a, e, e - window // 4 if window >= 4 else -1)  # async_size = window / 4 (none when 0)
    return faults, read
