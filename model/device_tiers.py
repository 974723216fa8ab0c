"""Two-tier item index on an accelerator: hot lists in device memory, the cold tail on the host.

``TieredIndex`` serves an ``ItemIndex`` whose IVF lists are split in two
parts, each a packed copy of its lists' per-item tensors (codes, scales,
Bloom words, ids) at *local* positions:

* the **hot part** lives on the scan device (HBM on a GPU);
* the **cold part** lives in host memory — pinned (page-locked) when the
  device is CUDA, so the GPU can read it.

Centroids, the global list offsets, the alive bitmask and the exact
attribute store stay on the device (every query reads the first three; the
attribute store is only read for the K0 survivors).

A search probes on the device, scans the hot part where it lies, and reaches
the cold lists the batch probes in one of two ways (``TierMode``, an
explicit argument):

* ``stream`` — the cold lists the batch probes are copied, in chunks, into a
  bounded staging buffer on the device (two slots of ``staging_bytes / 2``:
  one is scanned while the next is filled). On CUDA the copies are
  ``non_blocking`` from pinned memory on a side stream, so the first chunks
  arrive while the hot part is scanned; each chunk is then scanned by the
  same kernel. On CPU the copy is a plain copy (the same orchestration,
  which the CPU tests exercise). Memory is bounded by ``staging_bytes``
  whatever the batch probes.
* ``zero-copy`` — the kernel reads the cold part in place. On CUDA the
  Triton scan gets the pinned host tensors' addresses, which unified virtual
  addressing maps into the device's address space, so its loads cross PCIe
  (checked once when the index is built; a platform without it raises
  ``TierModeError`` naming ``stream``). On CPU the cold part is scanned in
  place.

Every part returns its top-k with local positions, which are mapped back to
global positions and merged by (score desc, position asc) — the order of the
single-tier index. The scores of an item do not depend on where its list
lies (same kernel, same list length, same queries probing it), so ids and
scores equal the single-tier index's, up to which of several equal scores at
the k-th place is kept (unspecified for the single-tier index too).

A ``TieredIndex`` is a read-only snapshot of its source index: streaming
updates go to the source, and a new ``TieredIndex`` is built from it.

Example:
    >>> tiered = index.to_tiers(fast_mask, device="cuda", mode="stream", staging_bytes=256 << 20)
    >>> scores, ids = tiered.search(xq, k=10, nprobe=32, where="lang:en")
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from enum import StrEnum

import numpy as np
import torch

from sterling.kernels.ivf import ListStats, ScanFilter, _order_full, ivf_topk
from sterling.model.errors import InvalidInputError, SterlingError

__all__ = ["DEFAULT_STAGING_BYTES", "StageStats", "TierMode", "TierModeError", "TieredIndex"]

DEFAULT_STAGING_BYTES = 64 << 20
_SLOTS = 2  # staging slots: one scanned while the next is filled


class TierMode(StrEnum):
    """How a search reaches the cold part: ``stream`` (chunked copies into a bounded staging
    buffer) or ``zero-copy`` (the kernel reads the host memory in place)."""

    STREAM = "stream"
    ZERO_COPY = "zero-copy"


class TierModeError(SterlingError, RuntimeError):
    """The tier mode cannot run on this device or platform (the message names the fix)."""


@dataclass(kw_only=True, slots=True)
class StageStats:
    """What the cold tier cost so far (counters over every search of a ``TieredIndex``).

    ``chunks``: staged chunks scanned; ``rows_staged``: cold items copied;
    ``bytes_staged``: bytes copied; ``peak_rows``: most rows one staging slot
    held; ``slot_rows``: rows a slot can hold (the bound).
    """

    chunks: int = 0
    rows_staged: int = 0
    bytes_staged: int = 0
    peak_rows: int = 0
    slot_rows: int = 0


@dataclass(kw_only=True)
class _Part:
    """One tier's lists packed at local positions.

    ``offsets`` [nlist + 1] int64 local CSR (lists outside the part are
    empty), on the scan device; ``shift`` [nlist] int64 global − local
    position of each list's first item (device); ``host_offsets`` numpy copy.
    """

    codes: torch.Tensor
    scales: torch.Tensor
    bloom: torch.Tensor
    item_ids: torch.Tensor
    alive: torch.Tensor  # packed bits over local positions
    offsets: torch.Tensor
    shift: torch.Tensor
    host_offsets: np.ndarray
    list_stats: ListStats | None

    @property
    def rows(self) -> int:
        return int(self.codes.shape[0])


def _pack(bits: np.ndarray) -> np.ndarray:
    return np.packbits(bits.astype(np.uint8), bitorder="little")


def _ranges(offsets: np.ndarray, lists: np.ndarray) -> np.ndarray:
    """Concatenated positions ``offsets[l]..offsets[l+1]`` of ``lists`` (in order): int64."""
    sizes = offsets[lists + 1] - offsets[lists]
    total = int(sizes.sum())
    if not total:
        return np.zeros(0, dtype=np.int64)
    starts = np.repeat(offsets[lists], sizes)
    within = np.arange(total, dtype=np.int64) - np.repeat(np.cumsum(sizes) - sizes, sizes)
    return starts + within


class TieredIndex:
    """An ``ItemIndex`` split into a device-resident hot part and a host-resident cold part.

    Built by ``ItemIndex.to_tiers``; ``search`` has ``ItemIndex.search``'s
    signature and answers.

    Args:
        source: the untiered index (any device; its tensors are copied).
        fast: [nlist] bool, True = hot (device memory).
        device: the scan device (``cuda``, ``cuda:1``, or ``cpu``).
        mode: ``TierMode`` (``stream`` or ``zero-copy``).
        staging_bytes: device bytes of the staging buffer (``stream``),
            both slots together; must hold the largest cold list twice.
        pin: page-lock the cold part (default: on CUDA).
    """

    partitioned = True
    tiering = None  # no memory-mapped tier state (that is the CPU ``ItemIndex.apply_tiers``)

    def __init__(self, source, fast, *, device="cuda", mode: TierMode | str = TierMode.STREAM,
                 staging_bytes: int = DEFAULT_STAGING_BYTES, pin: bool | None = None) -> None:
        try:
            self.mode = TierMode(mode)
        except ValueError as e:
            raise InvalidInputError(f"tier mode {mode!r} is not one of {[m.value for m in TierMode]}") from e
        dev = torch.device(device)
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise TierModeError(f"device {device!r} needs CUDA, which this process has not; use device='cpu'")
        fast = np.asarray(fast, dtype=bool)
        if fast.shape != (source.nlist,):
            raise InvalidInputError(f"fast has shape {fast.shape}; the index has nlist = {source.nlist} lists")
        if isinstance(staging_bytes, bool) or not isinstance(staging_bytes, (int, np.integer)) or staging_bytes < 0:
            raise InvalidInputError(f"staging_bytes ({staging_bytes!r}) must be a byte count ≥ 0")
        _borrow()
        self.device = dev
        self.config = source.config
        self.vocab = source.vocab
        self.vocab_index = source.vocab_index
        self.bloom_spec = source.bloom_spec
        self.selectivity_sample = source.selectivity_sample  # sizes first scans as the untiered index does
        self.fast = fast.copy()
        pin = dev.type == "cuda" if pin is None else bool(pin)
        go = source.list_offsets.cpu().numpy().astype(np.int64)
        if int(go[-1]) != source.capacity:
            raise InvalidInputError(f"list offsets end at {int(go[-1])}, not at the capacity {source.capacity}")
        self._go = go
        self._sizes = go[1:] - go[:-1]
        self.capacity = source.capacity
        self.nlist = source.nlist
        self.dim = source.dim
        self.metric = source.metric
        to = lambda t: t.to(dev)  # noqa: E731
        self.centroids = to(source.centroids)
        self.list_offsets = to(source.list_offsets)
        self.alive = to(source.alive)
        self.attr_ids = to(source.attr_ids)
        self.attr_offsets = to(source.attr_offsets)
        self.version = source.version.clone()
        self.bloom = None  # per part; see scan_topk
        self._live = source.live_per_list().clone()
        alive_bits = np.unpackbits(source.alive.cpu().numpy(), bitorder="little")[: source.capacity].astype(bool)
        self._fast_dev = torch.from_numpy(fast).to(dev)
        self._go_dev = to(source.list_offsets)
        hot_lists = np.flatnonzero(fast)
        cold_lists = np.flatnonzero(~fast)
        self.hot = self._make_part(source, hot_lists, alive_bits, dev, pin=False)
        cold_dev = dev if self.mode is TierMode.ZERO_COPY else torch.device("cpu")
        self.cold = self._make_part(source, cold_lists, alive_bits, dev, pin=pin, host=True, meta_dev=cold_dev)
        self._cold_alive_bits = alive_bits[_ranges(go, cold_lists)]  # host, for the staged chunks
        self._cold_lo = self.cold.host_offsets
        self.row_bytes = self.dim + 4 + 8 * int(source.bloom.shape[1])
        largest = int(self._sizes[~fast].max()) if cold_lists.size else 0
        # a staging row: its code, scale and Bloom words, plus one alive bit; slots hold multiples of 8 rows
        slot_rows = int(staging_bytes) // _SLOTS * 8 // (8 * self.row_bytes + 1) // 8 * 8
        if self.mode is TierMode.STREAM and largest > slot_rows:
            need = _SLOTS * (-(-largest // 8)) * (8 * self.row_bytes + 1)
            raise InvalidInputError(
                f"staging_bytes ({staging_bytes}) gives {slot_rows} rows per staging slot, but the largest cold "
                f"list has {largest} items; pass staging_bytes ≥ {need}, or keep that list hot")
        self.stage_stats = StageStats(slot_rows=slot_rows if self.mode is TierMode.STREAM else 0)
        self._slots: list[dict] = []
        if self.mode is TierMode.STREAM and cold_lists.size:
            self._slots = [self._make_slot(slot_rows, source) for _ in range(_SLOTS)]
        self._side = torch.cuda.Stream(device=dev) if dev.type == "cuda" else None
        if self.mode is TierMode.ZERO_COPY and dev.type == "cuda" and cold_lists.size:
            self._check_zero_copy()

    # -------------------------------------------------------------- layout
    def _make_part(self, source, lists: np.ndarray, alive_bits: np.ndarray, dev: torch.device, *, pin: bool,
                   host: bool = False, meta_dev: torch.device | None = None) -> _Part:
        go, nlist = self._go, self.nlist
        member = np.zeros(nlist, dtype=bool)
        member[lists] = True
        local = np.where(member, self._sizes, 0)
        lo = np.concatenate(([0], np.cumsum(local))).astype(np.int64)
        idx = torch.from_numpy(_ranges(go, lists))
        place = (lambda t: t.pin_memory() if pin else t) if host else (lambda t: t.to(dev))
        src = {n: getattr(source, n).cpu() for n in ("codes", "scales", "bloom", "item_ids")}
        tensors = {n: place(t.index_select(0, idx).contiguous()) for n, t in src.items()}
        mdev = dev if meta_dev is None else meta_dev
        offsets = torch.from_numpy(lo)
        return _Part(
            **tensors,
            alive=torch.from_numpy(_pack(alive_bits[idx.numpy()])).to(mdev),
            offsets=offsets.to(mdev),
            shift=torch.from_numpy(go[:-1] - lo[:-1]).to(dev),
            host_offsets=lo,
            list_stats=ListStats.of(offsets) if mdev.type == "cuda" else None,
        )

    def _make_slot(self, rows: int, source) -> dict:
        dev, W = self.device, int(source.bloom.shape[1])
        slot = {
            "codes": torch.zeros(rows, self.dim, dtype=torch.int8, device=dev),
            "scales": torch.zeros(rows, dtype=torch.float32, device=dev),
            "bloom": torch.zeros(rows, W, dtype=torch.int64, device=dev),
            "alive": torch.zeros((rows + 7) // 8, dtype=torch.uint8, device=dev),
            "offsets": torch.zeros(self.nlist + 1, dtype=torch.int64, device=dev),
            "shift": torch.zeros(self.nlist, dtype=torch.int64, device=dev),
            "ready": None,  # event: this slot's copies are done
            "free": None,  # event: the scan of this slot's last chunk is done
        }
        pin = dev.type == "cuda"
        for n, like in (("alive", slot["alive"]), ("offsets", slot["offsets"]), ("shift", slot["shift"])):
            slot["h_" + n] = torch.zeros(like.shape, dtype=like.dtype, pin_memory=pin)
        return slot

    def _check_zero_copy(self) -> None:
        """Scan one cold list in place and from a device copy; both must agree, else zero-copy is unusable."""
        lst = int(np.flatnonzero(~self.fast & (self._sizes > 0))[0])
        xq = torch.nn.functional.normalize(torch.ones(1, self.dim, device=self.device), dim=1)
        probe = torch.full((1, 1), lst, dtype=torch.int64, device=self.device)
        c = self.cold
        try:
            a = ivf_topk(xq, probe, c.codes, c.scales, c.offsets, c.alive, 4, list_stats=c.list_stats)
            b = ivf_topk(xq, probe, c.codes.to(self.device), c.scales.to(self.device), c.offsets, c.alive, 4,
                         list_stats=c.list_stats)
            torch.cuda.synchronize(self.device)
        except Exception as e:  # noqa: BLE001 - any launch failure means the mode is unusable here
            raise TierModeError(
                f"zero-copy: the Triton scan could not read pinned host memory on {self.device} ({e}); "
                "use mode='stream'") from e
        if not (torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])):
            raise TierModeError(f"zero-copy: reads of pinned host memory on {self.device} disagree with a device "
                                "copy; use mode='stream'")

    # ------------------------------------------------------ search surface
    @property
    def scan_device(self) -> torch.device:
        return self.device

    def numpy_views(self):
        return None  # no single-array lean path: every search goes through scan_topk

    def live_per_list(self) -> torch.Tensor:
        return self._live

    def hot_bytes(self) -> int:
        """Device bytes of the hot part's per-item tensors."""
        h = self.hot
        return sum(t.numel() * t.element_size() for t in (h.codes, h.scales, h.bloom, h.item_ids))

    def cold_bytes(self) -> int:
        """Host bytes of the cold part's per-item tensors."""
        c = self.cold
        return sum(t.numel() * t.element_size() for t in (c.codes, c.scales, c.bloom, c.item_ids))

    def staging_bytes(self) -> int:
        """Device bytes of the staging slots (0 in zero-copy mode)."""
        return sum(s["codes"].numel() + 4 * s["scales"].numel() + 8 * s["bloom"].numel() + s["alive"].numel()
                   for s in self._slots)

    def _scan_part(self, xq, probe, k, part_tensors: dict, scan_filter, counts, list_stats):
        sf = None if scan_filter is None else dataclasses.replace(scan_filter, bloom=part_tensors["bloom"],
                                                                  masks=None, exact=None)
        s, p = ivf_topk(xq, probe, part_tensors["codes"], part_tensors["scales"], part_tensors["offsets"],
                        part_tensors["alive"], k, scan_filter=sf, counts=counts, list_stats=list_stats)
        offs = part_tensors["offsets"].to(p.device)
        lst = (torch.searchsorted(offs, p.clamp(min=0), right=True) - 1).clamp(0, self.nlist - 1)
        shift = part_tensors["shift"].to(p.device)
        return s, torch.where(p >= 0, p + shift[lst], torch.full_like(p, -1))

    def scan_topk(self, xq, probe, k, *, scan_filter: ScanFilter | None = None, counts=None, fused=None,
                  with_ids: bool = False):
        """``ivf_topk`` over both tiers: (scores [B, k], global positions [B, k]) (+ ids with ``with_ids``)."""
        probe_h = probe.cpu().numpy()  # which cold lists to bring: the one read-back of a tiered search
        lists = np.unique(probe_h)
        lists = lists[self._sizes[lists] > 0]
        hot_any = bool(self.fast[lists].any())
        cold = lists[~self.fast[lists]]
        results = []
        chunks = self._plan_chunks(cold) if self.mode is TierMode.STREAM and cold.size else []
        filtered = scan_filter is not None
        for i in range(min(_SLOTS, len(chunks))):
            self._stage(chunks[i], self._slots[i], filtered)
        h = self.hot
        if hot_any:
            results.append(self._scan_part(xq, probe, k, vars(h), scan_filter, counts, h.list_stats))
        if self.mode is TierMode.ZERO_COPY and cold.size:
            c = self.cold
            results.append(self._scan_part(xq, probe, k, vars(c), scan_filter, counts, c.list_stats))
        for i in range(len(chunks)):
            slot = self._slots[i % _SLOTS]
            if slot["ready"] is not None:
                torch.cuda.current_stream(self.device).wait_event(slot["ready"])
            results.append(self._scan_part(xq, probe, k, slot, scan_filter, counts, slot["list_stats"]))
            if self._side is not None:
                slot["free"] = torch.cuda.Event()
                slot["free"].record(torch.cuda.current_stream(self.device))
            if i + _SLOTS < len(chunks):
                self._stage(chunks[i + _SLOTS], slot, filtered)
        if not results:
            B = xq.shape[0]
            s = torch.full((B, k), float("-inf"), device=self.device)
            p = torch.full((B, k), -1, dtype=torch.int64, device=self.device)
        elif len(results) == 1:
            s, p = results[0]
        else:
            s, p = _order_full(torch.cat([r[0] for r in results], 1), torch.cat([r[1] for r in results], 1))
            s, p = s[:, :k].contiguous(), p[:, :k].contiguous()
        return (s, p, self.positions_to_ids(p)) if with_ids else (s, p)

    def _plan_chunks(self, cold: np.ndarray) -> list[np.ndarray]:
        """Cut the sorted cold lists a batch probes into chunks that fit one staging slot."""
        cap = self.stage_stats.slot_rows
        sizes = self._sizes[cold]
        chunks, start, used = [], 0, 0
        for j, n in enumerate(sizes.tolist()):
            if used + n > cap:
                chunks.append(cold[start:j])
                start, used = j, 0
            used += n
        chunks.append(cold[start:])
        return [c for c in chunks if c.size]

    def _stage(self, lists: np.ndarray, slot: dict, filtered: bool) -> None:
        """Copy ``lists`` of the cold part into ``slot`` (side stream on CUDA, after the slot's last scan)."""
        lo, n_items = self._cold_lo, self._sizes[lists]
        src_a = lo[lists]
        dst = np.concatenate(([0], np.cumsum(n_items))).astype(np.int64)
        rows = int(dst[-1])
        st = self.stage_stats
        st.chunks += 1
        st.rows_staged += rows
        st.bytes_staged += rows * (self.row_bytes if filtered else self.dim + 4)
        st.peak_rows = max(st.peak_rows, rows)
        local = np.zeros(self.nlist, dtype=np.int64)
        local[lists] = n_items
        offsets = np.concatenate(([0], np.cumsum(local))).astype(np.int64)
        shift = self._go[:-1] - offsets[:-1]
        alive = _pack(self._cold_alive_bits[_ranges(lo, lists)])
        # runs of lists adjacent in the cold part are one copy
        brk = np.flatnonzero(src_a[1:] != src_a[:-1] + n_items[:-1]) + 1
        starts = np.concatenate(([0], brk))
        ends = np.concatenate((brk, [lists.size]))
        names = ("codes", "scales", "bloom") if filtered else ("codes", "scales")
        cuda = self._side is not None
        if cuda and slot["ready"] is not None:
            slot["ready"].synchronize()  # the pinned host staging of this slot is free again
        slot["h_alive"][: alive.size].copy_(torch.from_numpy(alive))
        slot["h_offsets"].copy_(torch.from_numpy(offsets))
        slot["h_shift"].copy_(torch.from_numpy(shift))
        slot["list_stats"] = ListStats.of(torch.from_numpy(offsets)) if cuda else None
        ctx = torch.cuda.stream(self._side) if cuda else _Null()
        with ctx:
            if cuda and slot["free"] is not None:
                self._side.wait_event(slot["free"])
            for a, b in zip(starts.tolist(), ends.tolist()):
                s0, d0 = int(src_a[a]), int(dst[a])
                m = int(dst[b] - dst[a])
                for name in names:
                    slot[name][d0 : d0 + m].copy_(getattr(self.cold, name)[s0 : s0 + m], non_blocking=cuda)
            slot["alive"][: alive.size].copy_(slot["h_alive"][: alive.size], non_blocking=cuda)
            slot["offsets"].copy_(slot["h_offsets"], non_blocking=cuda)
            slot["shift"].copy_(slot["h_shift"], non_blocking=cuda)
            if cuda:
                slot["ready"] = torch.cuda.Event()
                slot["ready"].record(self._side)

    # ------------------------------------------------------- row access
    def rows_at(self, name: str, pos: torch.Tensor) -> torch.Tensor:
        """Rows of per-item tensor ``name`` at global positions ``pos`` [M] (≥ 0), on the device."""
        pos = pos.to(self.device).reshape(-1)
        hot_t, cold_t = getattr(self.hot, name), getattr(self.cold, name)
        lst = (torch.searchsorted(self._go_dev, pos, right=True) - 1).clamp(0, self.nlist - 1)
        is_hot = self._fast_dev[lst]
        out = torch.empty((pos.numel(), *hot_t.shape[1:]), dtype=hot_t.dtype, device=self.device)
        hi = is_hot.nonzero().squeeze(1)
        if hi.numel():
            out[hi] = hot_t[pos[hi] - self.hot.shift[lst[hi]]]
        ci = (~is_hot).nonzero().squeeze(1)
        if ci.numel():
            rows = (pos[ci] - self.cold.shift[lst[ci]]).cpu()
            out[ci] = cold_t[rows].to(self.device)
        return out

    def item_rows(self, name: str, start: int, end: int) -> torch.Tensor:
        """Rows ``start..end-1`` of per-item tensor ``name`` (gathered from both tiers)."""
        return self.rows_at(name, torch.arange(start, end, device=self.device))

    def positions_to_ids(self, pos: torch.Tensor) -> torch.Tensor:
        """Index positions → item ids; −1 stays −1."""
        ids = self.rows_at("item_ids", pos.clamp(min=0)).view(pos.shape)
        return torch.where(pos >= 0, ids, torch.full_like(ids, -1))


class _Null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def _borrow() -> None:
    """``TieredIndex`` answers with ``ItemIndex``'s request handling (validation, filters, search)."""
    if "search" in TieredIndex.__dict__:
        return
    from sterling.model.index import ItemIndex

    for name in ("search", "_search", "_search_eager", "_check_k_nprobe", "default_nprobe", "compile_filters",
                 "verify"):
        setattr(TieredIndex, name, ItemIndex.__dict__[name])

