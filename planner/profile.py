"""Machine profile: the CPU scan and memory-mapped read costs measured on this host.

``sterling plan --calibrate --profile p.json`` (then ``--profile p.json``)
measures the rates of the planner's mechanism model (``planner/cpu_cost.py``)
on this host, at the thread count it serves with, on its own synthetic
catalog (never the one being planned):

* **scan**: the fused scan alone (``cpu_scan.fused_topk`` on precomputed
  probes) over uniform and Zipf-skewed query streams at batches around the
  planned one and nprobe 8–64, best of rounds; each timing is regressed
  (non-negative least squares) on the batch's exact ``ScanTerms`` — a
  constant, distinct lists, pair-items scored from codes, items
  dequantized, pair-items scored from a dequantized list — giving
  ``list_s``, ``direct_s``, ``dequant_s``, ``group_s``. ``probe_s``: the
  numpy probe timed alone. ``overhead_s``: what a whole ``search`` at the
  planned batch takes beyond probe and scan work (per point the mean over
  all its batches, served back to back; the median over the points) —
  Python, and the hand-off between the probe's BLAS threads and the scan's
  thread team.
* **cold reads**: the kernel's read-around window (``readaround_before`` /
  ``readaround_after``), read with ``mincore`` once one cold fault on a
  scratch file has settled; then the calibration index is saved as an
  artifact and served with a memory-mapped tier (four tier masks, two
  nprobe, both streams), the page cache evicted before each batch, against
  the same batches in memory (each averaged over three interleaved rounds);
  the simulation's bytes read are priced at ``mmap_cold_bw``, the cold
  sequential bandwidth of the scratch file, and the rest of the extra
  seconds is regressed on the read-around simulation's faults and slow
  bytes scanned for the same lists: ``fault_s``, ``mmap_touch_bw``. The
  same with ``MADV_RANDOM`` (one page a fault): ``random_fault_s``.
  ``page_cache_bw``: a warm sequential read through a fresh mapping.

Profiles written before the mechanism model (``model`` 1) hold the older
terms (``scan_bytes_per_s``, ``int8_ops_per_s``, ``mmap_readaround_bytes``)
and are priced as before. The profile is a JSON file (written atomically)
naming the host's CPU and the thread count; a profile measured under load
predicts that load.
"""

from __future__ import annotations

import json
import os
import platform
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from sterling.planner import errors

__all__ = ["MachineProfile", "fit_cold", "measure_profile"]


@dataclass(frozen=True, kw_only=True)
class MachineProfile:
    """Measured CPU costs (seconds, bytes/s, ops/s) at ``threads`` threads."""

    threads: int
    batch: int  # the batch size the scan was fitted around
    overhead_s: float
    scan_bytes_per_s: float
    int8_ops_per_s: float
    mmap_cold_bw: float
    mmap_read_s: float
    page_cache_bw: float
    mmap_readaround_bytes: float = 0.0  # bytes one isolated cold fault costs (the kernel's read-around)
    cpu: str = ""
    measured_at: str = ""
    fit_error: float = 0.0  # relative RMS error of the scan fit on its own points
    # the mechanism model (planner/cpu_cost.py), model = 2; profiles written before it have model = 1
    model: int = 1
    list_s: float = 0.0  # seconds per distinct list a batch probes
    direct_s: float = 0.0  # seconds per (query, item) scored straight from the int8 codes
    dequant_s: float = 0.0  # seconds per item dequantized (a list probed by >= GROUP_MIN queries)
    group_s: float = 0.0  # seconds per (query, item) scored from a dequantized list
    probe_s: float = 0.0  # seconds per query x centroid score of the probe step
    readaround_before: int = 0  # bytes the kernel reads before a faulting page of a cold mapping
    readaround_after: int = 0  # bytes it reads from the faulting page on
    fault_s: float = 0.0  # seconds per cold fault on top of its bytes at mmap_cold_bw
    mmap_touch_bw: float = 0.0  # slow-tier bytes/s the scan maps and reads once the disk has them (cold)
    cold_fit_error: float = 0.0  # RMS error of the cold-read fit on its own points / their mean
    random_fault_s: float = 0.0  # seconds per cold fault with MADV_RANDOM (one page read); 0 = not measured

    def save(self, path: str | Path) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(asdict(self), indent=1) + "\n", encoding="utf-8")
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: str | Path) -> MachineProfile:
        try:
            d = json.loads(Path(path).read_text(encoding="utf-8"))
            return cls(**d)
        except (OSError, ValueError, TypeError) as e:
            raise errors.InvalidPlanConfigError(
                f"cannot read the machine profile {path}: {e}; write one with "
                "`sterling plan --calibrate --profile PATH`") from e


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _nnls(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    from scipy.optimize import nnls

    scale = a.max(axis=0)
    scale[scale == 0] = 1.0
    x, _ = nnls(a / scale, b)
    return x / scale


def _skewed(cat, nq: int, zipf: float, seed: int):
    """Queries around the catalog's clusters, cluster popularity Zipf(``zipf``): lists are shared."""
    import torch
    import torch.nn.functional as F

    g = torch.Generator().manual_seed(seed)
    C, dim = cat.centers.shape
    perm = torch.randperm(C, generator=torch.Generator().manual_seed(seed + 1))
    p = 1.0 / torch.arange(1, C + 1, dtype=torch.float64) ** zipf
    c = perm[torch.multinomial(p / p.sum(), nq, replacement=True, generator=g)]
    return F.normalize(cat.centers[c] + 0.8 * torch.randn(nq, dim, generator=g) / dim**0.5, dim=1)


def _mechanism_scan_points(threads: int, items: int, dim: int, nlist: int, repeat: int, batch: int) -> dict:
    """Timings of the fused scan alone (``cpu_scan.fused_topk`` on precomputed probes) and of the
    whole search, with their ``cpu_cost.ScanTerms`` features, over uniform and skewed streams; and
    the probe step's seconds per query x centroid (numpy, timed on its own)."""
    import torch

    from sterling.kernels import cpu_scan, probe_lists
    from sterling.model import IndexConfig, build_index
    from sterling.model.search import SMALL_BATCH
    from sterling.model.synthetic import synthetic_catalog, synthetic_queries
    from sterling.planner.cpu_cost import scan_terms_of_probe

    torch.set_num_threads(threads)
    cat = synthetic_catalog(items, dim, seed=97, with_attributes=False)
    index = build_index(cat.embeddings, ids=cat.ids, config=IndexConfig(nlist=nlist))
    streams = {"uniform": synthetic_queries(cat, 1024, seed=98), "zipf": _skewed(cat, 1024, 1.1, seed=99)}
    sizes = (index.list_offsets[1:] - index.list_offsets[:-1]).numpy().astype(np.float64)
    views = index.numpy_views() if cpu_scan.HAVE_NUMBA else None
    top = SMALL_BATCH if batch <= SMALL_BATCH else 4 * batch
    batches = sorted({max(1, batch // 2), batch, min(2 * batch, top)})
    points = [(w, b, p) for w in streams for b in batches for p in (8, 16, 32, 64) if p <= nlist]
    rounds = 6  # distinct batches per point: a served stream, not one batch again from cache
    feats, probes = [], []
    for w, b, nprobe in points:
        probe = probe_lists(streams[w][: b * rounds], index.centroids, nprobe).numpy().reshape(rounds, b, nprobe)
        probes.append(np.ascontiguousarray(probe, dtype=np.int64))
        feats.append(np.mean([scan_terms_of_probe(p, sizes).features() for p in probe], axis=0))
    xs = {w: np.ascontiguousarray(q.numpy()) for w, q in streams.items()}

    def scan_only(i: int, r: int) -> None:
        w, b, nprobe = points[i]
        if views is None:  # no numba: the torch scan of the index
            index.scan_topk(streams[w][r * b : (r + 1) * b], torch.from_numpy(probes[i][r]), 10, with_ids=True)
            return
        cpu_scan.fused_topk(xs[w][r * b : (r + 1) * b], probes[i][r], views["codes"], views["scales"],
                            views["list_offsets"], views["alive"], 10, item_ids=views["item_ids"])

    for i, (w, b, nprobe) in enumerate(points):  # warm-up: compiled code loaded, scratch buffers sized
        index.search(streams[w][:b], k=10, nprobe=nprobe)
        scan_only(i, 0)
    scan_t = np.full(len(points), np.inf)
    search_t = np.zeros(len(points))
    # rounds over all points; the scan alone: per point its best round (the work's rate); the whole
    # search: per point the mean over all its batches — what a served stream of batches averages,
    # hiccups included (the best of short blocks of the same batches ran ~35 % under that here)
    for _ in range(repeat):
        # the scan alone first, after a pause: threads a BLAS call left spinning would slow it
        time.sleep(0.1)
        for i in range(len(points)):
            t = time.perf_counter()
            for r in range(rounds):
                scan_only(i, r)
            scan_t[i] = min(scan_t[i], (time.perf_counter() - t) / rounds)
        for i, (w, b, nprobe) in enumerate(points):
            t = time.perf_counter()
            for r in range(rounds):
                index.search(streams[w][r * b : (r + 1) * b], k=10, nprobe=nprobe)
            search_t[i] += (time.perf_counter() - t) / rounds / repeat
    x = streams["uniform"][:batch]
    probe_t = np.inf
    for _ in range(max(3, repeat)):
        time.sleep(0.05)  # alone: no thread team left spinning by the searches above
        t = time.perf_counter()
        for _ in range(20):
            probe_lists(x, index.centroids, 8)
        probe_t = min(probe_t, (time.perf_counter() - t) / 20)
    per_score = probe_t / (x.shape[0] * nlist)
    return {"index": index, "streams": streams, "feats": np.array(feats), "scan_s": scan_t, "search_s": search_t,
            "probe_s": per_score, "at_batch": np.array([b == batch for _, b, _ in points]),
            "probe_cost": np.array([b * nlist * per_score for _, b, _ in points])}


def _mmap_mechanism(size: int, repeat: int) -> dict:
    """The kernel's read-around window around a cold fault (mincore after it settles) and the
    cold-read fit: time = faults x fault_s + bytes read / cold bandwidth, over touch patterns whose
    faults and bytes come from the same read-around simulation the planner runs."""
    import ctypes

    from sterling.planner.cpu_cost import SIM_PAGE

    fd, name = tempfile.mkstemp(prefix="sterling-calibrate-")
    try:
        with os.fdopen(fd, "wb") as f:
            rng = np.random.default_rng(5)
            for _ in range(max(1, size // (8 << 20))):
                f.write(rng.integers(0, 255, 8 << 20, dtype=np.uint8).tobytes())
            f.flush()
            os.fsync(f.fileno())
        size = os.path.getsize(name)
        rfd = os.open(name, os.O_RDONLY)
        try:
            before = after = 0
            libc = ctypes.CDLL(None, use_errno=True)
            vec = (ctypes.c_ubyte * (size // SIM_PAGE + 1))()
            for _ in range(2):  # the window: pages resident once the fault's read has settled
                os.posix_fadvise(rfd, 0, 0, os.POSIX_FADV_DONTNEED)
                arr = np.memmap(name, dtype=np.uint8, mode="r")
                mid = size // 2 // SIM_PAGE * SIM_PAGE
                int(arr[mid])
                time.sleep(0.05)
                libc.mincore(ctypes.c_void_p(arr.ctypes.data), ctypes.c_size_t(size), vec)
                res = np.flatnonzero(np.frombuffer(vec, dtype=np.uint8)[: -(-size // SIM_PAGE)] & 1)
                if res.size:
                    before = max(before, mid - int(res[0]) * SIM_PAGE)
                    after = max(after, (int(res[-1]) + 1) * SIM_PAGE - mid)
                del arr
            after = max(after, SIM_PAGE)
            seq = 0.0
            for _ in range(repeat):  # the whole file in order, cold: the kernel's readahead streams it (mean)
                os.posix_fadvise(rfd, 0, 0, os.POSIX_FADV_DONTNEED)
                arr = np.memmap(name, dtype=np.uint8, mode="r")
                t = time.perf_counter()
                int(arr[::SIM_PAGE].max())
                seq += (time.perf_counter() - t) / repeat
                del arr
            warm = np.inf
            for _ in range(repeat):  # warm: in the page cache, not mapped
                arr = np.memmap(name, dtype=np.uint8, mode="r")
                int(arr[::SIM_PAGE].max())
                del arr
                arr = np.memmap(name, dtype=np.uint8, mode="r")
                t = time.perf_counter()
                int(arr[::SIM_PAGE].max())
                warm = min(warm, time.perf_counter() - t)
                del arr
        finally:
            os.close(rfd)
    finally:
        os.unlink(name)
    return {"readaround_before": int(before), "readaround_after": int(after), "mmap_cold_bw": float(size / seq),
            "page_cache_bw": float(size / warm)}


def _cold_batches(index, streams: dict, *, batch: int, before: int, after: int, repeat: int, seq_bw: float,
                  cold_window: int = 8 << 20) -> dict:
    """Cold batches on the serving path, on the calibration's own index saved as an artifact: per
    (stream, nprobe, tier mask, fault advice) the extra seconds of a batch over the memory-mapped
    tier with the page cache evicted before it, against the same batches in memory; regressed on
    the read-around simulation's faults and bytes (``cpu_cost.cold_terms``) for the same lists.

    Rounds go over all points in turn (``repeat`` of them), so a spell of slow disk hits every
    point alike; per point the in-memory and the cold batches are each averaged over all rounds
    (the planner predicts a mean batch; the best of short blocks runs well under it).
    Read-around (the default advice): all slow, the hottest quarter fast, and only the first
    quarter / eighth of the lists slow, nprobe 8 and 32, both streams — the simulated bytes
    priced at ``seq_bw``, the rest fitted to ``fault_s`` and ``per_touched``. ``MADV_RANDOM``
    (one page a fault): all slow and the hottest quarter fast at nprobe 8, both streams —
    ``random_fault_s``, seconds a fault."""
    import dataclasses

    from sterling.model import ItemIndex
    from sterling.model.tiers import artifact_list_stats, measure_probe_freq
    from sterling.planner.cpu_cost import cold_terms
    from sterling.planner.tiers import ListStats, pick_fast

    rounds = 12
    points = []  # (stream, nprobe, mask, advice, ColdTerms)
    with tempfile.TemporaryDirectory(prefix="sterling-calibrate-") as d:
        path = Path(d) / "calibrate.st"
        index.save(path)
        st0 = ListStats.from_artifact(artifact_list_stats(path))
        ids = np.arange(index.nlist)
        for w, xq in streams.items():
            for nprobe in sorted({min(8, index.nlist), min(32, index.nlist)}):
                freq = measure_probe_freq(xq, index.centroids, nprobe)
                st = dataclasses.replace(st0, probe_freq=freq, nprobe=nprobe)
                hot = pick_fast(freq, st.list_bytes, int(0.25 * st.list_bytes.sum()))
                # all slow, the hottest quarter fast, and only the first quarter / eighth of the lists
                # slow (a smaller part of the file read: the faults and bytes vary)
                masks = [np.zeros(index.nlist, dtype=bool), hot, ids >= index.nlist // 4, ids >= index.nlist // 8]
                for j, mask in enumerate(masks):
                    for advice in ("normal", "random"):
                        if advice == "random" and (j > 1 or nprobe != min(8, index.nlist)):
                            continue  # one page a fault: a few points fix its one rate
                        ct = cold_terms(st, mask, batch=batch, k=10, before=before, after=after,
                                        cold_window=cold_window, advice=advice)
                        points.append((w, nprobe, mask, advice, ct))
        fd = os.open(path, os.O_RDONLY)
        served = {}
        try:
            for _, _, mask, advice, _ in points:
                key = (mask.tobytes(), advice)
                if key not in served:
                    ix = ItemIndex.load(path, verify=False, tiers=False)
                    ix.apply_tiers(mask, cold_window=cold_window, slow_advice=advice)
                    served[key] = ix
            warm = np.zeros(len(points))
            cold = np.zeros(len(points))
            n_rounds = max(1, repeat)
            for _ in range(n_rounds):
                for i, (w, nprobe, mask, advice, _) in enumerate(points):
                    xq, ix = streams[w], served[(mask.tobytes(), advice)]
                    t0 = time.perf_counter()  # a block in memory, then the same batches cold, in a row
                    for r in range(rounds):
                        index.search(xq[r * batch : (r + 1) * batch], k=10, nprobe=nprobe)
                    warm[i] += (time.perf_counter() - t0) / rounds / n_rounds
                    total = 0.0
                    for r in range(rounds):
                        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                        t = time.perf_counter()
                        ix.search(xq[r * batch : (r + 1) * batch], k=10, nprobe=nprobe)
                        total += time.perf_counter() - t
                    cold[i] += total / rounds / n_rounds
                    # its window unmapped: pages another index maps would survive the next point's eviction
                    ix.tiering.release(ix.tier_tensors())
        finally:
            os.close(fd)
            served.clear()
    extra = np.maximum(cold - warm, 0.0)
    normal = np.array([p[3] == "normal" for p in points])
    a = np.array([[p[4].faults, p[4].bytes_read, p[4].bytes_touched] for p in points])
    fault_s, per_touched, err = fit_cold(a[normal], extra[normal], seq_bw)
    faults_r, y_r = a[~normal, 0], extra[~normal]
    random_fault_s = float(faults_r @ y_r / max(float(faults_r @ faults_r), 1e-300)) if faults_r.size else 0.0
    return {"fault_s": fault_s, "per_byte": 1.0 / seq_bw, "per_touched": per_touched, "cold_fit_error": err,
            "random_fault_s": random_fault_s, "points": (a, extra, np.array([p[3] for p in points]))}


def fit_cold(feats: np.ndarray, extra: np.ndarray, seq_bw: float) -> tuple[float, float, float]:
    """The cold-read fit: ``feats`` [P, 3] (faults, bytes read, slow bytes scanned — the simulation's
    ``ColdTerms``), ``extra`` [P] seconds a batch over the same batches in memory. The bytes are
    priced at the disk's sequential cold bandwidth ``seq_bw`` (measured apart); what the batches
    cost beyond that is regressed (non-negative) on the faults and the slow bytes scanned — faults
    and bytes rise together (each fault reads about a window), so a free fit of both would split
    them at random. Returns (fault_s, seconds per byte scanned, RMS error / mean)."""
    feats, extra = np.asarray(feats, dtype=np.float64), np.asarray(extra, dtype=np.float64)
    fault_s, per_touched = _nnls(feats[:, [0, 2]], extra - feats[:, 1] / seq_bw)
    pred = feats @ np.array([fault_s, 1.0 / seq_bw, per_touched])
    err = float(np.sqrt(np.mean((pred - extra) ** 2)) / max(float(np.mean(extra)), 1e-9))
    return float(fault_s), float(per_touched), err


def fit_scan(feats: np.ndarray, seconds: np.ndarray) -> tuple[np.ndarray, float]:
    """NNLS of batch seconds on the ``ScanTerms.features`` [P, 5]: (the five rates, relative RMS error)."""
    coef = _nnls(feats, seconds)
    pred = feats @ coef
    return coef, float(np.sqrt(np.mean(((pred - seconds) / seconds) ** 2)))


def measure_profile(*, threads: int = 2, batch: int = 16, items: int = 500_000, dim: int = 64, nlist: int = 1024,
                    repeat: int = 4, mmap_bytes: int = 128 << 20) -> MachineProfile:
    """Measure this host (about two minutes): the scan fit at batches around ``batch``, the
    read-around window, and the cold-batch fit."""
    try:
        import numba

        numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))
    except ImportError:
        pass
    pts = _mechanism_scan_points(threads, items, dim, nlist, repeat, batch)
    coef, fit_error = fit_scan(pts["feats"], pts["scan_s"])
    call_s, list_s, direct_s, dequant_s, group_s = coef
    # the serving path's fixed cost per batch at the planned batch: whole search − probe − scan work
    work = pts["feats"][:, 1:] @ coef[1:]
    o = max(0.0, float(np.median((pts["search_s"] - pts["probe_cost"] - work)[pts["at_batch"]])))
    probe_s = pts["probe_s"]
    cold = _mmap_mechanism(mmap_bytes, 2)
    fit = _cold_batches(pts["index"], pts["streams"], batch=batch, before=cold["readaround_before"],
                        after=cold["readaround_after"], repeat=3, seq_bw=cold["mmap_cold_bw"])
    cold.update(fault_s=fit["fault_s"], cold_fit_error=fit["cold_fit_error"], random_fault_s=fit["random_fault_s"],
                mmap_touch_bw=1.0 / fit["per_touched"] if fit["per_touched"] > 0 else cold["page_cache_bw"])
    if os.environ.get("STERLING_CALIBRATE_DEBUG"):  # the fit's points, for a look at the mechanism
        print(json.dumps({"scan": np.column_stack([pts["feats"], pts["scan_s"], pts["search_s"]]).tolist(),
                          "cold": np.column_stack(fit["points"][:2]).tolist(),
                          "cold_advice": fit["points"][2].tolist()}))
    # the old terms stay filled (their closest reading of the same fit) for tools that print them
    pair = (direct_s + group_s) / 2
    return MachineProfile(
        threads=int(threads), batch=int(batch), overhead_s=float(o),
        scan_bytes_per_s=float("inf"), int8_ops_per_s=float(2 * dim / pair) if pair > 0 else float("inf"),
        mmap_read_s=0.0, mmap_readaround_bytes=0.0,
        cpu=_cpu_name(), measured_at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), fit_error=fit_error,
        model=2, list_s=float(list_s), direct_s=float(direct_s), dequant_s=float(dequant_s),
        group_s=float(group_s), probe_s=float(probe_s), **cold,
    )
