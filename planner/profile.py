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
  (``posix_fadvise(DONTNEED)``) and read through a memory map in runs of
  several sizes (IVF-list-sized runs, a share of them in file order, as a
  scan visits lists); the timings fit ``mmap_read_s`` per separate read and
  ``mmap_cold_bw`` bytes/s. ``page_cache_bw`` is the same reads, warm.

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
    xq = synthetic_queries(cat, 512, seed=98)
    sizes = (index.list_offsets[1:] - index.list_offsets[:-1]).numpy()
    row = dim + 4  # codes + scale: the bytes the scan reads per item
    # batches around the planned one, on the same search path (small batches take the lean path)
    top = SMALL_BATCH if batch <= SMALL_BATCH else 4 * batch
    batches = sorted({max(1, batch // 2), batch, min(batch + batch // 2, top)})
    points = [(b, p) for b in batches for p in (8, 16, 32, 64) if p <= nlist]
    feats, best = [], np.full(len(points), np.inf)
    for i, (b, nprobe) in enumerate(points):
        q = xq[i * 8 % 256 : i * 8 % 256 + b]
        probe = probe_lists(q, index.centroids, nprobe).numpy()
        feats.append((1.0, float(sizes[np.unique(probe)].sum() * row), 2.0 * float(sizes[probe].sum()) * dim))
    for _ in range(repeat):  # interleaved rounds, best of each point
        for i, (b, nprobe) in enumerate(points):
            q = xq[i * 8 % 256 : i * 8 % 256 + b]
            t = time.perf_counter()
            index.search(q, k=10, nprobe=nprobe)
            best[i] = min(best[i], time.perf_counter() - t)
    return np.array(feats), best


def _mmap_points(size: int, repeat: int):
    fd, name = tempfile.mkstemp(prefix="sterling-calibrate-")
    try:
        with os.fdopen(fd, "wb") as f:
            rng = np.random.default_rng(5)
            for _ in range(size // (8 << 20)):
                f.write(rng.integers(0, 255, 8 << 20, dtype=np.uint8).tobytes())
            f.flush()
            os.fsync(f.fileno())
        rfd = os.open(name, os.O_RDONLY)
        rows, cold, warm = [], [], []
        rng = np.random.default_rng(6)
        page = 4096
        try:
            # runs the size of IVF lists, a share of them read in file order (as a scan visits lists)
            for run, share in ((16 << 10, 0.05), (16 << 10, 0.3), (64 << 10, 0.1), (64 << 10, 0.4),
                               (256 << 10, 0.1), (256 << 10, 0.5)):
                total = size // run
                starts = np.sort(rng.choice(total, max(1, int(share * total)), replace=False)) * run
                best_c = best_w = float("inf")
                for _ in range(repeat):
                    for timer in ("cold", "warm"):
                        if timer == "cold":  # pages a mapping holds cannot be evicted: drop them unmapped
                            os.posix_fadvise(rfd, 0, 0, os.POSIX_FADV_DONTNEED)
                        arr = np.memmap(name, dtype=np.uint8, mode="r")  # a fresh mapping each pass
                        t = time.perf_counter()
                        for s in starts.tolist():
                            int(arr[s : s + run : page].max())  # one byte a page: the fault is the cost
                        dt = time.perf_counter() - t
                        del arr
                        if timer == "cold":
                            best_c = min(best_c, dt)
                        else:
                            best_w = min(best_w, dt)
                rows.append((float(starts.size), float(starts.size * run)))
                cold.append(best_c)
                warm.append(best_w)
        finally:
            os.close(rfd)
        return np.array(rows), np.array(cold), np.array(warm)
    finally:
        os.unlink(name)


def measure_profile(*, threads: int = 2, batch: int = 16, items: int = 200_000, dim: int = 64, nlist: int = 512,
                    repeat: int = 7, mmap_bytes: int = 128 << 20) -> MachineProfile:
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
    m, cold, warm = _mmap_points(mmap_bytes, 2)
    read_s, per_cold = _nnls(m, cold)
    _, per_warm = _nnls(m, warm)
    inf = float("inf")
    return MachineProfile(
        threads=int(threads), batch=int(batch), overhead_s=float(o),
        scan_bytes_per_s=1.0 / per_byte if per_byte > 0 else inf,
        int8_ops_per_s=1.0 / per_op if per_op > 0 else inf,
        mmap_cold_bw=1.0 / per_cold if per_cold > 0 else inf, mmap_read_s=float(read_s),
        page_cache_bw=1.0 / per_warm if per_warm > 0 else inf,
        cpu=_cpu_name(), measured_at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), fit_error=fit_error,
    )
