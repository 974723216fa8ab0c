"""Machine profile: the CPU scan and memory-mapped read costs measured on this host.

The planner's CPU cost model is ``overhead + resident bytes / bandwidth +
int8 ops / rate + slow bytes / cold bandwidth + slow reads × cost per read``.
Without a profile those rates are the dev box's constants
(``planner/devices.py``, ``planner/cost.py``); with one
(``sterling plan --calibrate --profile p.json``, then ``--profile p.json``)
they are fitted on this host, at the thread count it serves with:

* **scan**: an in-memory index of a synthetic catalog (its own data, not the
  one being planned) is searched at several (batch, nprobe) points around
  the planned batch (on the same search path), best of interleaved rounds; each
  timing is regressed (non-negative least squares) on the same features the
  planner computes — list bytes read per batch (each probed list once per
  batch), int8 ops (2 · query-item pairs · D), and a constant — giving
  ``overhead_s``, ``scan_bytes_per_s`` and ``int8_ops_per_s``.
* **cold reads**: a scratch file is evicted from the page cache
  (``posix_fadvise(DONTNEED)``) and read through a fresh memory map:
  sequentially (``mmap_cold_bw``), and one page at a time far apart — an
  isolated fault costs the kernel's read-around, not one page, so its time
  × the sequential bandwidth is ``mmap_readaround_bytes``. The planner then
  charges a batch's slow tier ``min(slow tier bytes, max(slow bytes read,
  slow reads × read-around))`` at ``mmap_cold_bw`` (reads of nearby lists
  share their read-around). ``page_cache_bw``: the same sequential read,
  warm.

The profile is a JSON file (written atomically) naming the host's CPU and
the thread count; a profile measured under load predicts that load.
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

__all__ = ["MachineProfile", "measure_profile"]


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


def _scan_points(threads: int, items: int, dim: int, nlist: int, repeat: int, batch: int):
    import torch

    from sterling.kernels import probe_lists
    from sterling.model import IndexConfig, build_index
    from sterling.model.search import SMALL_BATCH
    from sterling.model.synthetic import synthetic_catalog, synthetic_queries

    torch.set_num_threads(threads)
    cat = synthetic_catalog(items, dim, seed=97, with_attributes=False)
    index = build_index(cat.embeddings, ids=cat.ids, config=IndexConfig(nlist=nlist))
    xq = synthetic_queries(cat, 1024, seed=98)
    sizes = (index.list_offsets[1:] - index.list_offsets[:-1]).numpy()
    row = dim + 4  # codes + scale: the bytes the scan reads per item
    # batches around the planned one, on the same search path (small batches take the lean path)
    top = SMALL_BATCH if batch <= SMALL_BATCH else 4 * batch
    batches = sorted({max(1, batch // 2), batch, min(batch + batch // 2, top)})
    points = [(b, p) for b in batches for p in (8, 16, 32, 64) if p <= nlist]
    feats, best = [], np.full(len(points), np.inf)
    rounds = 6  # distinct batches per point and round: a served stream, not one batch again from cache
    for b, nprobe in points:
        probe = probe_lists(xq[: b * rounds], index.centroids, nprobe).numpy().reshape(rounds, b, nprobe)
        feats.append((1.0, float(np.mean([sizes[np.unique(p)].sum() for p in probe])) * row,
                      2.0 * float(np.mean([sizes[p].sum() for p in probe])) * dim))
    for _ in range(repeat):  # interleaved rounds; per point the mean over its batches, best round kept
        for i, (b, nprobe) in enumerate(points):
            t = time.perf_counter()
            for r in range(rounds):
                index.search(xq[r * b : (r + 1) * b], k=10, nprobe=nprobe)
            best[i] = min(best[i], (time.perf_counter() - t) / rounds)
    return np.array(feats), best


def _mmap_points(size: int, repeat: int) -> tuple[float, float, float]:
    """(cold sequential bytes/s, seconds per isolated cold fault, warm sequential bytes/s) of a
    scratch file read through a fresh memory map (one byte a page: the faults are the cost)."""
    fd, name = tempfile.mkstemp(prefix="sterling-calibrate-")
    page = 4096
    try:
        with os.fdopen(fd, "wb") as f:
            rng = np.random.default_rng(5)
            for _ in range(max(1, size // (8 << 20))):
                f.write(rng.integers(0, 255, 8 << 20, dtype=np.uint8).tobytes())
            f.flush()
            os.fsync(f.fileno())
        size = os.path.getsize(name)
        rfd = os.open(name, os.O_RDONLY)
        far = np.random.default_rng(6).choice(size // (1 << 20), min(64, size // (1 << 20)), replace=False)
        seq_c = seq_w = one = float("inf")
        try:
            for _ in range(repeat):
                os.posix_fadvise(rfd, 0, 0, os.POSIX_FADV_DONTNEED)  # pages a mapping holds would stay
                arr = np.memmap(name, dtype=np.uint8, mode="r")
                t = time.perf_counter()
                int(arr[::page].max())
                seq_c = min(seq_c, time.perf_counter() - t)
                del arr
                arr = np.memmap(name, dtype=np.uint8, mode="r")  # warm: in the page cache, not mapped
                t = time.perf_counter()
                int(arr[::page].max())
                seq_w = min(seq_w, time.perf_counter() - t)
                del arr
                os.posix_fadvise(rfd, 0, 0, os.POSIX_FADV_DONTNEED)
                arr = np.memmap(name, dtype=np.uint8, mode="r")
                t = time.perf_counter()
                for mb in np.sort(far).tolist():  # one page each, 1 MiB apart or more: isolated faults
                    int(arr[mb << 20])
                one = min(one, (time.perf_counter() - t) / far.size)
                del arr
        finally:
            os.close(rfd)
        return size / seq_c, one, size / seq_w
    finally:
        os.unlink(name)


def measure_profile(*, threads: int = 2, batch: int = 16, items: int = 500_000, dim: int = 64, nlist: int = 1024,
                    repeat: int = 4, mmap_bytes: int = 128 << 20) -> MachineProfile:
    """Measure this host (about a minute): the scan fit at batches around ``batch``, and the
    cold / warm mapped reads."""
    try:
        import numba

        numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))
    except ImportError:
        pass
    a, t = _scan_points(threads, items, dim, nlist, repeat, batch)
    o, per_byte, per_op = _nnls(a, t)
    pred = a @ np.array([o, per_byte, per_op])
    fit_error = float(np.sqrt(np.mean(((pred - t) / t) ** 2)))
    cold_bw, fault_s, warm_bw = _mmap_points(mmap_bytes, 2)
    inf = float("inf")
    return MachineProfile(
        threads=int(threads), batch=int(batch), overhead_s=float(o),
        scan_bytes_per_s=1.0 / per_byte if per_byte > 0 else inf,
        int8_ops_per_s=1.0 / per_op if per_op > 0 else inf,
        mmap_cold_bw=float(cold_bw), mmap_read_s=0.0, mmap_readaround_bytes=float(fault_s * cold_bw),
        page_cache_bw=float(warm_bw),
        cpu=_cpu_name(), measured_at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), fit_error=fit_error,
    )
