"""Memory tiers of an ``ItemIndex`` on a CPU host: resident lists and memory-mapped lists.

An index loaded from its artifact is a copy-on-write memory map of the file
(``sterling.model.artifact``). Tiering keeps that single mapping — one
contiguous array per tensor, so the fused scan reads every list block the
same way, whichever tier it lives in — and changes only which pages are
resident:

* **fast** lists: their pages of every per-item tensor (codes, scales, Bloom
  words, ids, exact attributes) are made private resident copies when the
  tier is applied (one byte per page is rewritten with its own value, which
  makes the kernel copy the page out of the page cache into the process);
  they stay in RAM like any in-memory tensor.
* **slow** lists: their pages stay file-backed and are not pre-faulted. A
  scan faults them in from the page cache (or the disk when the cache was
  dropped); ``madvise(MADV_DONTNEED)`` gives them back once the slow bytes
  scanned since the last release exceed ``cold_window`` bytes, so the
  process's resident set stays bounded by the fast tier plus that window.
  By default a cold fault reads the file around it (the kernel's mmap
  read-around: the device's read-ahead window); with ``slow_advice="random"``
  (``madvise(MADV_RANDOM)``, which the planner picks where it predicts it
  cheaper) a fault reads only its own page.
  The page cache may keep the file's pages (kernel memory, reclaimable,
  not counted in the process RSS).

Centroids, list offsets, the alive bitmask and the version always stay
resident (they are small and read by every query). Since the data is never
copied to a different place, a search over any mix of tiers returns exactly
the untiered index's answer.

A tensor changed in place after loading (streaming upserts write the codes)
holds private pages that differ from the file; it is never released, so no
update is lost (its pages simply stay resident).

Probe statistics: ``probe_freq[l]`` is the expected number of times list
``l`` is probed per query (it sums to nprobe), measured on a query sample at
build time and stored in the artifact with the tier of each list.
"""

from __future__ import annotations

import ctypes
import errno
import os
import sys
import threading
from dataclasses import dataclass, field

import numpy as np
import torch

from sterling.model.errors import InvalidInputError

__all__ = [
    "PAGE_BYTES",
    "PER_ITEM_TENSORS",
    "SLOW_ADVICE",
    "TierLayout",
    "TieredStorage",
    "artifact_list_stats",
    "list_bytes",
    "measure_probe_freq",
    "pick_fast",
    "retier_artifact",
]

PAGE_BYTES: int = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
# Tensors whose rows follow the item order, so each IVF list owns a contiguous byte range.
PER_ITEM_TENSORS: tuple[str, ...] = ("codes", "scales", "bloom", "item_ids", "attr_offsets", "attr_ids")
_MADV_NORMAL = 0
_MADV_RANDOM = 1
_MADV_DONTNEED = 4
_MADV_WILLNEED = 3
# How the kernel reads the slow tier's pages on a fault (``TieredStorage.advise``): "normal" lets a
# fault read the file around it (mmap read-around: the device's read-ahead window), "random"
# (``MADV_RANDOM``) reads only the faulting page.
SLOW_ADVICE: tuple[str, ...] = ("normal", "random")


def _libc():
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        libc.madvise.restype = ctypes.c_int
        libc.syscall.restype = ctypes.c_long
        return libc
    except (OSError, AttributeError):  # pragma: no cover - non-glibc platforms
        return None


_LIBC = _libc()


def madvise(addr: int, length: int, advice: int) -> bool:
    """``madvise`` on a page-aligned range; False where the platform has none or refuses."""
    if _LIBC is None or length <= 0:
        return False
    return _LIBC.madvise(ctypes.c_void_p(addr), length, advice) == 0


class _IoVec(ctypes.Structure):
    _fields_ = [("iov_base", ctypes.c_void_p), ("iov_len", ctypes.c_size_t)]


# process_madvise(2): the same number in the x86-64 and the generic (arm64) syscall tables.
_SYS_PROCESS_MADVISE = {"x86_64": 440, "aarch64": 440}.get(os.uname().machine if hasattr(os, "uname") else "")
_IOV_MAX = 1024  # ranges per process_madvise call (the kernel's UIO_MAXIOV)
_batched = {"ok": _SYS_PROCESS_MADVISE is not None and hasattr(os, "pidfd_open"), "pid": -1, "fd": -1}


def _self_pidfd() -> int:
    """A pidfd of this process, reopened after a fork (a child must never advise its parent)."""
    pid = os.getpid()
    if _batched["pid"] != pid:
        _batched["fd"], _batched["pid"] = os.pidfd_open(pid), pid
    return _batched["fd"]


def madvise_many(runs: list[tuple[int, int]], advice: int) -> int:
    """``madvise`` over many page-aligned (address, length) ranges; returns the bytes advised.

    One ``process_madvise`` call per 1,024 ranges on this process where the
    kernel takes any advice that way (Linux 6.13 and later): the releases of a
    split tier are hundreds of runs, and one call per run (each a page-table
    walk and a TLB flush on every CPU the process runs on) cost the scan
    several ms a batch. Elsewhere, or when the call is refused, one
    ``madvise`` per range.
    """
    if _LIBC is None:
        return 0
    done = 0
    for s in range(0, len(runs), _IOV_MAX):
        part = [(a, n) for a, n in runs[s : s + _IOV_MAX] if n > 0]
        want = sum(n for _, n in part)
        if not part:
            continue
        if _batched["ok"]:
            try:
                pidfd = _self_pidfd()
            except OSError:  # no pidfd here (old kernel, sandbox): one call per range from now on
                _batched["ok"] = False
            else:
                iov = (_IoVec * len(part))(*[_IoVec(a, n) for a, n in part])
                got = _LIBC.syscall(ctypes.c_long(_SYS_PROCESS_MADVISE), ctypes.c_int(pidfd), iov,
                                    ctypes.c_size_t(len(part)), ctypes.c_int(advice), ctypes.c_uint(0))
                if got == want:
                    done += want
                    continue
                if got < 0 and ctypes.get_errno() in (errno.ENOSYS, errno.EINVAL, errno.EPERM):
                    _batched["ok"] = False  # this kernel does not take it: one call per range from now on
        done += sum(n for a, n in part if madvise(a, n, advice))  # idempotent: a partial call is redone
    return done


def measure_probe_freq(xq: torch.Tensor, centroids: torch.Tensor, nprobe: int, *, chunk: int = 4096) -> np.ndarray:
    """Expected probes per query of each list: [nlist] float64 summing to ``nprobe``.

    Args:
        xq: [Q, D] fp32 query sample (normalised like the index's queries).
        centroids: [nlist, D].
    """
    from sterling.kernels import probe_lists

    nlist = int(centroids.shape[0])
    nprobe = max(1, min(int(nprobe), nlist))
    counts = np.zeros(nlist, dtype=np.int64)
    for s in range(0, xq.shape[0], chunk):
        probe = probe_lists(xq[s : s + chunk].float(), centroids.float(), nprobe)
        counts += np.bincount(probe.reshape(-1).numpy(), minlength=nlist)
    return counts / max(1, int(xq.shape[0]))


@dataclass(kw_only=True, slots=True)
class TierLayout:
    """Probe statistics and the tier of each IVF list, as stored in the artifact.

    ``probe_freq`` [nlist] expected probes per query (from ``queries`` sample
    queries at ``nprobe``); ``fast`` [nlist] bool: True = resident tier, or
    ``None`` when no split was chosen (every list is handled as before).
    """

    probe_freq: np.ndarray
    nprobe: int
    queries: int
    source: str = "items"
    fast: np.ndarray | None = None
    cold_window: int | None = None  # slow-tier bytes mapped at a time, as planned (None = the default)
    slow_advice: str | None = None  # how a cold fault reads the slow tier, as planned (None = "normal")

    def __post_init__(self) -> None:
        self.probe_freq = np.asarray(self.probe_freq, dtype=np.float64)
        if self.probe_freq.ndim != 1 or not np.isfinite(self.probe_freq).all() or (self.probe_freq < 0).any():
            raise InvalidInputError("probe_freq must be a finite, non-negative [nlist] array")
        if self.slow_advice is not None and self.slow_advice not in SLOW_ADVICE:
            raise InvalidInputError(f"slow-tier advice {self.slow_advice!r} is not one of {SLOW_ADVICE}")
        if self.fast is not None:
            self.fast = np.asarray(self.fast, dtype=bool)
            if self.fast.shape != self.probe_freq.shape:
                raise InvalidInputError(
                    f"tier mask has {self.fast.shape[0]} lists but probe_freq has {self.probe_freq.shape[0]}"
                )

    @property
    def nlist(self) -> int:
        return int(self.probe_freq.shape[0])

    def with_fast(self, fast: np.ndarray | None, cold_window: int | None = None,
                  slow_advice: str | None = None) -> TierLayout:
        return TierLayout(probe_freq=self.probe_freq, nprobe=self.nprobe, queries=self.queries,
                          source=self.source, fast=fast,
                          cold_window=self.cold_window if cold_window is None else int(cold_window),
                          slow_advice=self.slow_advice if slow_advice is None else slow_advice)

    def to_meta(self) -> dict:
        d = {
            "probe_freq": [float(f"{x:.6g}") for x in self.probe_freq.tolist()],
            "nprobe": int(self.nprobe),
            "queries": int(self.queries),
            "source": self.source,
        }
        if self.fast is not None:
            d["fast"] = "".join("1" if f else "0" for f in self.fast.tolist())
        if self.cold_window is not None:
            d["cold_window"] = int(self.cold_window)
        if self.slow_advice is not None:
            d["slow_advice"] = self.slow_advice
        return d

    @classmethod
    def from_meta(cls, d: dict | None, nlist: int) -> TierLayout | None:
        """The layout stored in an artifact, or None (old artifacts, or a layout of another list set)."""
        if not d or len(d.get("probe_freq", ())) != nlist:
            return None
        fast = d.get("fast")
        mask = None if fast is None else np.frombuffer(fast.encode(), dtype=np.uint8) == ord("1")
        if mask is not None and mask.shape[0] != nlist:
            mask = None
        return cls(probe_freq=np.asarray(d["probe_freq"]), nprobe=int(d.get("nprobe", 1)),
                   queries=int(d.get("queries", 0)), source=str(d.get("source", "items")), fast=mask,
                   cold_window=None if d.get("cold_window") is None else int(d["cold_window"]),
                   slow_advice=d.get("slow_advice") if d.get("slow_advice") in SLOW_ADVICE else None)


def list_bytes(tensors: dict[str, torch.Tensor], list_offsets: np.ndarray) -> np.ndarray:
    """Bytes each list owns over the per-item tensors: [nlist] int64."""
    off = np.asarray(list_offsets, dtype=np.int64)
    return sum(_partition_bytes(tensors, off).values(), np.zeros(off.shape[0] - 1, dtype=np.int64))


def _partition_bytes(tensors: dict[str, torch.Tensor], off: np.ndarray) -> dict[str, np.ndarray]:
    """Per tensor, the bytes each list owns ([nlist] each, summing to the tensor's bytes)."""
    out = {}
    for name, (s, e) in _byte_ranges(tensors, off).items():
        b = (e - s).astype(np.int64)
        if name == "attr_offsets" and b.size:
            b[:-1] -= tensors[name].element_size()  # a boundary offset belongs to the next list
        out[name] = b
    return out


def _byte_ranges(tensors: dict[str, torch.Tensor], off: np.ndarray) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Per tensor, the [start, end) byte range of each list within the tensor ([nlist] each)."""
    out = {}
    for name in PER_ITEM_TENSORS:
        t = tensors.get(name)
        if t is None or t.numel() == 0:
            continue
        if name == "attr_ids":
            ao = tensors["attr_offsets"].numpy()
            start, end = ao[off[:-1]], ao[off[1:]]
            row = t.element_size()
        else:
            row = t.element_size() * (int(np.prod(t.shape[1:])) if t.ndim > 1 else 1)
            start, end = off[:-1], off[1:]
            if name == "attr_offsets":
                end = end + 1  # the closing offset of a list's last item
        out[name] = (start.astype(np.int64) * row, end.astype(np.int64) * row)
    return out


@dataclass(kw_only=True, slots=True)
class _Region:
    """One per-item tensor as mapped at load time: its pages and which lists own each."""

    name: str
    base: int  # data_ptr at load
    nbytes: int
    version: int  # tensor._version at load: a later in-place write makes it dirty
    first_page: np.ndarray  # [nlist] absolute page of each list's first byte
    last_page: np.ndarray  # [nlist] absolute page of its last byte (first_page - 1 when empty)


@dataclass(kw_only=True)
class TieredStorage:
    """Runtime state of a tiered index: fast mask, observed probe counts, slow-tier window.

    Built by ``ItemIndex.apply_tiers``; thread-safe for concurrent searches
    (``observe``) and one re-tiering at a time.
    """

    fast: np.ndarray  # [nlist] bool
    cold_window: int  # slow-tier bytes scanned between two releases
    regions: list[_Region]
    list_bytes: np.ndarray  # [nlist] int64, over the per-item tensors
    observed: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    queries_observed: int = 0
    cold_scanned: int = 0
    releases: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _runs_cache: dict = field(default_factory=dict)
    _mask_key: bytes = b""
    _cold_bytes: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    advice: str = "normal"  # the fault advice on the per-item tensors' pages (SLOW_ADVICE)

    def _set_mask(self, fast: np.ndarray) -> None:
        self.fast = np.asarray(fast, dtype=bool).copy()
        self._mask_key = np.packbits(self.fast).tobytes()
        self._runs_cache = {}
        self._cold_bytes = np.where(self.fast, 0, self.list_bytes)

    @classmethod
    def build(cls, tensors: dict[str, torch.Tensor], fast: np.ndarray, cold_window: int) -> TieredStorage:
        off = tensors["list_offsets"].numpy().astype(np.int64)
        regions = []
        for name, (s, e) in _byte_ranges(tensors, off).items():
            t = tensors[name]
            base = t.data_ptr()
            first = (base + s) // PAGE_BYTES
            last = np.where(e > s, (base + e - 1) // PAGE_BYTES, first - 1)
            regions.append(_Region(name=name, base=base, nbytes=t.numel() * t.element_size(),
                                   version=t._version, first_page=first, last_page=last))
        st = cls(fast=np.zeros(off.shape[0] - 1, dtype=bool), cold_window=int(cold_window), regions=regions,
                 list_bytes=list_bytes(tensors, off))
        st.observed = np.zeros(off.shape[0] - 1, dtype=np.int64)
        st._set_mask(fast)
        return st

    # ------------------------------------------------------------- pages
    def _page_masks(self, region: _Region, fast: np.ndarray) -> tuple[int, np.ndarray]:
        """(first page of the region, bool per page: owned by at least one fast list)."""
        p0 = region.base // PAGE_BYTES
        npages = (region.base + region.nbytes - 1) // PAGE_BYTES - p0 + 1
        diff = np.zeros(npages + 1, dtype=np.int64)
        keep = fast & (region.last_page >= region.first_page)
        np.add.at(diff, region.first_page[keep] - p0, 1)
        np.add.at(diff, region.last_page[keep] - p0 + 1, -1)
        return p0, np.cumsum(diff[:-1]) > 0

    def fast_resident_bytes(self) -> int:
        """Bytes of the pages the fast tier keeps resident (page-rounded, per tensor)."""
        total = 0
        for r in self.regions:
            _, mask = self._page_masks(r, self.fast)
            total += int(mask.sum()) * PAGE_BYTES
        return total

    def _clean(self, region: _Region, tensors: dict[str, torch.Tensor]) -> bool:
        """Whether the tensor is still the mapped one and unchanged since load (safe to release)."""
        t = tensors.get(region.name)
        return t is not None and t.data_ptr() == region.base and t._version == region.version

    def promote(self, tensors: dict[str, torch.Tensor], lists: np.ndarray | None = None) -> None:
        """Make the pages of the fast lists (or of ``lists``) private resident copies."""
        fast = self.fast if lists is None else lists
        for r in self.regions:
            t = tensors.get(r.name)
            if t is None or t.data_ptr() != r.base:
                continue  # replaced by an in-memory tensor: resident already
            p0, mask = self._page_masks(r, fast)
            pages = np.flatnonzero(mask) + p0
            if not pages.size:
                continue
            if self.advice == "random":  # one read for all of them, not one synchronous page per write fault
                edges = np.flatnonzero(np.diff(np.concatenate(([0], mask.astype(np.int8), [0]))))
                madvise_many([((p0 + int(a)) * PAGE_BYTES, int(b - a) * PAGE_BYTES)
                              for a, b in zip(edges[::2], edges[1::2])], _MADV_WILLNEED)
            flat = t.reshape(-1).view(torch.uint8).numpy()
            idx = np.clip(pages * PAGE_BYTES - r.base, 0, r.nbytes - 1)
            flat[idx] = flat[idx]  # a write of the same byte: the kernel copies the page in

    def _cold_runs(self, region: _Region) -> list[tuple[int, int]]:
        """(address, length) of the page runs only slow lists own, wholly inside the tensor (cached per mask)."""
        key = (region.name, self._mask_key)
        hit = self._runs_cache.get(key)
        if hit is not None:
            return hit
        p0, mask = self._page_masks(region, self.fast)
        # only pages wholly inside this tensor: an edge page is shared with its neighbour
        lo = -(-region.base // PAGE_BYTES) - p0
        hi = (region.base + region.nbytes) // PAGE_BYTES - p0
        cold = ~mask
        cold[: max(lo, 0)] = False
        cold[max(hi, 0) :] = False
        edges = np.flatnonzero(np.diff(np.concatenate(([0], cold.astype(np.int8), [0]))))
        runs = [((p0 + int(a)) * PAGE_BYTES, int(b - a) * PAGE_BYTES) for a, b in zip(edges[::2], edges[1::2])]
        self._runs_cache[key] = runs
        return runs

    def release(self, tensors: dict[str, torch.Tensor]) -> int:
        """Drop the slow lists' pages from this process (they re-fault from the file). Returns bytes advised."""
        runs = [run for r in self.regions if self._clean(r, tensors) for run in self._cold_runs(r)]
        done = madvise_many(runs, _MADV_DONTNEED)
        self.cold_scanned = 0
        self.releases += 1
        return done

    def advise(self, tensors: dict[str, torch.Tensor], advice: str) -> int:
        """Set how a fault on the per-item tensors' pages reads the file (``SLOW_ADVICE``).

        The advice covers each per-item tensor's whole page range, not only the
        slow lists' runs: a fast page is a private resident copy, which never
        faults again, so only the slow tier's faults change — and the mapping
        splits into a few areas per tensor instead of one per run of slow lists
        (a fine split of a large nlist would pass the kernel's
        ``vm.max_map_count``). Returns the bytes advised.
        """
        if advice not in SLOW_ADVICE:
            raise InvalidInputError(f"slow-tier advice {advice!r} is not one of {SLOW_ADVICE}")
        code = _MADV_RANDOM if advice == "random" else _MADV_NORMAL
        done = 0
        for r in self.regions:
            if not self._clean(r, tensors):
                continue  # replaced or written in place: not the file's mapping any more
            a = r.base // PAGE_BYTES * PAGE_BYTES
            length = r.base + r.nbytes - a
            if madvise(a, length, code):
                done += length
        self.advice = advice
        return done

    # ------------------------------------------------------------ serving
    def observe(self, probe: np.ndarray, tensors: dict[str, torch.Tensor]) -> None:
        """Count one batch's probes [B, nprobe]; release the slow tier when its window is spent."""
        probe = np.asarray(probe)
        counts = np.bincount(probe.reshape(-1), minlength=self.fast.shape[0])
        self.observed += counts
        self.queries_observed += int(probe.shape[0])
        cold = int(np.minimum(counts, 1) @ self._cold_bytes)  # a list shared by the batch is read once
        if cold:
            self.cold_scanned += cold
            if self.cold_scanned > self.cold_window and self._lock.acquire(blocking=False):
                try:
                    self.release(tensors)
                finally:
                    self._lock.release()

    def observe_all(self, tensors: dict[str, torch.Tensor]) -> None:
        """A scan of every list (pre-filtered search): counts toward the window, not the probe stats."""
        self.cold_scanned += int(self.list_bytes[~self.fast].sum())
        if self.cold_scanned > self.cold_window and self._lock.acquire(blocking=False):
            try:
                self.release(tensors)
            finally:
                self._lock.release()

    def set_fast(self, fast: np.ndarray, tensors: dict[str, torch.Tensor]) -> None:
        """Move lists between tiers while searches run: promote first, then release the demoted."""
        fast = np.asarray(fast, dtype=bool)
        if fast.shape != self.fast.shape:
            raise InvalidInputError(f"tier mask has {fast.shape[0]} lists; the index has {self.fast.shape[0]}")
        with self._lock:
            self.promote(tensors, fast & ~self.fast)
            self._set_mask(fast)
            self.release(tensors)


def pick_fast(probe_freq: np.ndarray, nbytes: np.ndarray, budget: int) -> np.ndarray:
    """The planner's choice (``sterling.planner.tiers.pick_fast``): hottest lists that fit ``budget``."""
    from sterling.planner.tiers import pick_fast as planner_pick

    return planner_pick(probe_freq, nbytes, budget)


_ALWAYS = ("centroids", "list_offsets", "alive", "version")


def _index_tensors(h: dict, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    prefix = "" if h["kind"] == "item_index" else "index."
    return {n[len(prefix):]: t for n, t in tensors.items() if n.startswith(prefix)}


def artifact_list_stats(path) -> dict:
    """An artifact's real lists without loading it: bytes per list of each per-item tensor,
    probe statistics and the bytes of the always-resident tensors.

    Returns ``{"bytes_by_tensor": {name: [nlist] int64}, "probe_freq": [nlist], "nprobe",
    "measured": bool, "always": int, "fast": [nlist] bool | None, "file_starts": {name: [nlist]
    int64}, "file_bytes": int}`` (``file_starts``: the file offset of each list's first byte in
    each tensor, which the planner's cold-read model needs: the kernel reads the file around a
    fault, not the list); an artifact
    without probe statistics (built before they were recorded) gets a uniform
    frequency and ``measured=False``.
    """
    from pathlib import Path

    from sterling.model.artifact import read_artifact
    from sterling.model.errors import ArtifactError

    h, tensors = read_artifact(path, verify=False)
    if "index" not in h["meta"]:
        raise ArtifactError(f"{path} holds a {h['kind']!r}, which has no item index")
    own = _index_tensors(h, tensors)
    off = own["list_offsets"].numpy().astype(np.int64)
    nlist = off.shape[0] - 1
    bytes_by_tensor = _partition_bytes(own, off)
    file_bytes = Path(path).stat().st_size
    prefix = "" if h["kind"] == "item_index" else "index."
    tensor_at = {e["name"][len(prefix):]: int(e["offset"]) for e in h["tensors"] if e["name"].startswith(prefix)}
    data_start = file_bytes - int(h["data_len"])  # the data section ends the file
    file_starts = {name: data_start + tensor_at[name] + s for name, (s, _) in _byte_ranges(own, off).items()
                   if name in tensor_at}
    layout = TierLayout.from_meta(h["meta"]["index"].get("tiers"), nlist)
    cfg = h["meta"]["index"].get("config", {})
    if layout is None:
        nprobe = int(cfg.get("nprobe") or max(1, nlist // 8))
        freq, measured, fast = np.full(nlist, nprobe / nlist), False, None
    else:
        nprobe, freq, measured, fast = layout.nprobe, layout.probe_freq, layout.queries > 0, layout.fast
    always = sum(own[n].numel() * own[n].element_size() for n in _ALWAYS if n in own)
    return {"bytes_by_tensor": bytes_by_tensor, "probe_freq": freq, "nprobe": nprobe, "measured": measured,
            "always": int(always), "fast": fast, "file_starts": file_starts, "file_bytes": int(file_bytes)}


def retier_artifact(path, fast: np.ndarray, out=None, *, cold_window: int | None = None,
                    slow_advice: str | None = None) -> None:
    """Rewrite an artifact with a tier per list (atomic: temp file + rename; the data is unchanged);
    ``cold_window`` / ``slow_advice``: the plan's, recorded for ``ItemIndex.load``."""
    if slow_advice is not None and slow_advice not in SLOW_ADVICE:
        raise InvalidInputError(f"slow-tier advice {slow_advice!r} is not one of {SLOW_ADVICE}")
    from sterling.model.artifact import read_artifact, write_artifact
    from sterling.model.errors import ArtifactError

    h, tensors = read_artifact(path, verify=True)
    if "index" not in h["meta"]:
        raise ArtifactError(f"{path} holds a {h['kind']!r}, which has no item index")
    own = _index_tensors(h, tensors)
    nlist = int(own["centroids"].shape[0])
    fast = np.asarray(fast, dtype=bool)
    if fast.shape != (nlist,):
        raise InvalidInputError(
            f"the tier mask covers {fast.shape[0] if fast.ndim else 0} lists but {path} has {nlist}; "
            "plan with `sterling plan --model` on this artifact"
        )
    meta = dict(h["meta"])
    index_meta = dict(meta["index"])
    layout = TierLayout.from_meta(index_meta.get("tiers"), nlist) or TierLayout(
        probe_freq=np.zeros(nlist), nprobe=0, queries=0, source="none")
    index_meta["tiers"] = layout.with_fast(fast, cold_window, slow_advice).to_meta()
    meta["index"] = index_meta
    write_artifact(path if out is None else out, kind=h["kind"], meta=meta, tensors=tensors)


def readvise_willneed(t: torch.Tensor) -> None:  # pragma: no cover - hint only
    """Ask the kernel to read a tensor ahead (used for the always-resident small tensors)."""
    base = t.data_ptr() // PAGE_BYTES * PAGE_BYTES
    madvise(base, t.data_ptr() + t.numel() * t.element_size() - base, _MADV_WILLNEED)
