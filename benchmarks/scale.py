"""`sterling bench scale`: build and serve catalogs of growing size on one host, planner next to every figure.

Per catalog size N (``--items 1M,10M,100M``):

1. **catalog**: a clustered synthetic catalog (like ``sterling.model.synthetic``:
   unit vectors around N/250 centers, Zipf attributes) generated to disk in
   chunks, each seeded from (seed, chunk), resumable (``catalog.json``
   records the chunks written). Embeddings ``embeddings.npy`` fp32 [N, D],
   attributes ``attributes.npy`` int16 [N, 7] (−1 = none), ids
   ``id_offset + row``.
2. **build** in a child process with ``sterling.model.build_chunked`` (bounded
   memory, resumable): wall time and the child's peak RSS (VmHWM), next to the
   planner's arithmetic (assign + k-means FLOPs at its measured CPU sgemm
   rate) and the builder's own memory bound.
3. **bytes**: artifact bytes per item, split into the scan path (codes +
   scales + ids + Bloom) and the rest (exact attributes, alive bits, lists),
   next to the planner's inventory for the same catalog.
4. **exact**: fp32 top-k of a query sample, computed chunk by chunk over the
   on-disk catalog (``evaluation.exact_topk``, merged across chunks); its
   QPS is the brute-force peer's, measured in the same run.
5. **serve** in a child process: load the artifact (memory-mapped), apply the
   planner's tier split for a ``--host-dram-gb`` host, then QPS and
   recall@k at each fixed nprobe; RSS before loading, after loading and after
   the queries, next to the planner's resident bytes and predicted QPS.

JSON lines on stdout (one per size, then a summary), progress on stderr.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from sterling.benchmarks.evaluation import commit, exact_topk, machine, recall
from sterling.model.errors import InvalidInputError

__all__ = ["ScaleConfig", "CatalogDir", "write_catalog", "scale_queries", "exact_truth", "run_scale",
           "default_nlist", "rss_bytes", "plot_scale", "write_records", "read_records"]

ATTR_WIDTH = 7  # six features + an optional second category (sterling.model.synthetic)
GEN_CHUNK = 262_144  # rows per generated chunk (the unit of the catalog's resumability)


def log(msg: str) -> None:
    print(f"[scale] {msg}", file=sys.stderr, flush=True)


def rss_bytes(field_name: str = "VmRSS") -> int:
    """This process's resident set (``VmRSS``) or its peak (``VmHWM``), in bytes, from /proc."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field_name + ":"):
            return int(line.split()[1]) * 1024
    return 0


def default_nlist(n: int) -> int:
    """A power of two near √N (1M → 1,024, 10M → 4,096, 100M → 8,192): the build's assignment costs
    N·nlist·D multiply-adds, so 4·√N lists would make a 100M build on 2 cores take hours."""
    return max(1, min(n, 2 ** round(math.log2(max(1.0, math.sqrt(n))))))


# ------------------------------------------------------------------ catalog on disk
def _seed(seed: int, chunk: int) -> int:
    return (seed * 1_000_003 + chunk * 7_919 + 17) % (2**63)


def _centers(n: int, dim: int, seed: int):
    import torch
    import torch.nn.functional as F

    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(max(8, n // 250), dim, generator=g), dim=1)


def _padded(attrs, width: int) -> np.ndarray:
    """CSR ``Attributes`` → int16 [n, width] term ids, −1 = none."""
    offs = attrs.offsets.numpy()
    lengths = offs[1:] - offs[:-1]
    ids = attrs.ids.numpy()
    out = np.full((lengths.size, width), -1, dtype=np.int16)
    for j in range(int(lengths.max(initial=0))):
        rows = np.flatnonzero(lengths > j)
        out[rows, j] = ids[offs[rows] + j]
    return out


def write_catalog(path: str | Path, n: int, dim: int, *, seed: int = 0, noise: float = 0.8,
                  id_offset: int = 1_000_000_000) -> CatalogDir:
    """Generate (or finish generating) the synthetic catalog in ``path``; chunks already written are kept."""
    import torch
    import torch.nn.functional as F

    from sterling.model.synthetic import FEATURES, _attributes, _values

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    vocab = [f"{f}:{v}" for f in FEATURES for v in _values(f)]
    params = {"kind": "sterling.benchmarks.scale synthetic", "num_items": n, "dim": dim, "seed": seed,
              "noise": noise, "id_offset": id_offset, "chunk_rows": GEN_CHUNK, "attr_width": ATTR_WIDTH}
    meta_path = path / "catalog.json"
    meta = json.loads(meta_path.read_text()) if meta_path.exists() else None
    if meta is not None and meta["params"] != params:
        raise InvalidInputError(f"{path} holds another catalog ({meta['params']}); give another --work-dir")
    emb_path, attr_path = path / "embeddings.npy", path / "attributes.npy"
    if meta is None:
        for p, dtype, shape in ((emb_path, np.float32, (n, dim)), (attr_path, np.int16, (n, ATTR_WIDTH))):
            m = np.lib.format.open_memmap(p, mode="w+", dtype=dtype, shape=shape)  # header + a sparse body
            m.flush()
            del m
        meta = {"params": params, "vocab": vocab, "chunks_done": 0}
        _write_json(meta_path, meta)
    n_chunks = math.ceil(n / GEN_CHUNK)
    if meta["chunks_done"] < n_chunks:
        centers = _centers(n, dim, seed)
        e_off = np.load(emb_path, mmap_mode="r").offset
        a_off = np.load(attr_path, mmap_mode="r").offset
        t0 = time.perf_counter()
        with open(emb_path, "r+b") as fe, open(attr_path, "r+b") as fa:
            for c in range(meta["chunks_done"], n_chunks):
                s = c * GEN_CHUNK
                m = min(GEN_CHUNK, n - s)
                g = torch.Generator().manual_seed(_seed(seed, c))
                k = torch.randint(0, centers.shape[0], (m,), generator=g)
                x = F.normalize(centers[k] + noise * torch.randn(m, dim, generator=g) / dim**0.5, dim=1)
                a = _attributes(m, g)
                assert a.vocab == vocab
                os.pwrite(fe.fileno(), x.numpy().tobytes(), e_off + s * dim * 4)
                os.pwrite(fa.fileno(), _padded(a, ATTR_WIDTH).tobytes(), a_off + s * ATTR_WIDTH * 2)
                os.fsync(fe.fileno())
                os.fsync(fa.fileno())
                meta["chunks_done"] = c + 1
                _write_json(meta_path, meta)
                if c % 16 == 15 or c == n_chunks - 1:
                    log(f"catalog: {min(n, s + m):,} / {n:,} rows ({time.perf_counter() - t0:.1f} s)")
    return CatalogDir(path)


def _write_json(path: Path, obj) -> None:
    from sterling.model.build_chunked import write_durably

    write_durably(path, lambda f: json.dump(obj, f), binary=False)


class CatalogDir:
    """A catalog written by ``write_catalog``, read with ``pread`` (no mapping stays resident).

    Implements ``sterling.model.build_chunked.ChunkedCatalog``.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        meta = json.loads((self.path / "catalog.json").read_text())
        p = meta["params"]
        if meta["chunks_done"] < math.ceil(p["num_items"] / p["chunk_rows"]):
            raise InvalidInputError(f"catalog {self.path} is only partly written; rerun write_catalog to finish it")
        self.params = p
        self.num_items, self.dim, self.attr_width = p["num_items"], p["dim"], p["attr_width"]
        self.vocab = meta["vocab"]
        self.attr_dtype = np.dtype(np.int16)
        self.id_offset = p["id_offset"]
        self._e_off = np.load(self.path / "embeddings.npy", mmap_mode="r").offset
        self._a_off = np.load(self.path / "attributes.npy", mmap_mode="r").offset
        self._fe = os.open(self.path / "embeddings.npy", os.O_RDONLY)
        self._fa = os.open(self.path / "attributes.npy", os.O_RDONLY)

    def _read(self, fd: int, offset: int, nbytes: int) -> bytearray:
        buf = bytearray(nbytes)
        view, got = memoryview(buf), 0
        while got < nbytes:
            n = os.preadv(fd, [view[got:]], offset + got)
            if n <= 0:
                raise InvalidInputError(f"catalog {self.path} is truncated")
            got += n
        return buf

    def embeddings(self, start: int, end: int):
        import torch

        b = self._read(self._fe, self._e_off + start * self.dim * 4, (end - start) * self.dim * 4)
        return torch.frombuffer(b, dtype=torch.float32).reshape(end - start, self.dim)

    def read(self, start: int, end: int):
        x = self.embeddings(start, end)
        a = np.frombuffer(self._read(self._fa, self._a_off + start * self.attr_width * 2,
                                     (end - start) * self.attr_width * 2), dtype=np.int16)
        ids = np.arange(start, end, dtype=np.int64) + self.id_offset
        return x, ids, a.reshape(end - start, self.attr_width)

    def read_rows(self, rows: np.ndarray):
        import torch

        row_bytes = self.dim * 4
        out = torch.empty(len(rows), self.dim)
        view = memoryview(out.numpy()).cast("B")
        for j, r in enumerate(rows.tolist()):
            os.preadv(self._fe, [view[j * row_bytes : (j + 1) * row_bytes]], self._e_off + r * row_bytes)
        return out

    def fingerprint(self) -> dict:
        return dict(self.params)

    def attributes(self):
        """The whole catalog's attributes as a CSR ``Attributes`` (small catalogs: tests, ``build_index``)."""
        import torch

        from sterling.model.attributes import Attributes

        _, _, a = self.read(0, self.num_items)
        lengths = (a >= 0).sum(axis=1)
        offsets = np.zeros(self.num_items + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        return Attributes(list(self.vocab), torch.from_numpy(a[a >= 0].astype(np.int32)), torch.from_numpy(offsets))


def scale_queries(cat: CatalogDir, nq: int, *, seed: int = 1):
    """Queries around the catalog's cluster centers (not copies of items), fp32 [nq, D] unit norm."""
    import torch
    import torch.nn.functional as F

    p = cat.params
    centers = _centers(p["num_items"], p["dim"], p["seed"])
    g = torch.Generator().manual_seed(seed)
    c = torch.randint(0, centers.shape[0], (nq,), generator=g)
    return F.normalize(centers[c] + p["noise"] * torch.randn(nq, p["dim"], generator=g) / p["dim"] ** 0.5, dim=1)


def exact_truth(cat: CatalogDir, xq, k: int, *, rows_per_read: int = 1 << 20):
    """fp32 exact top-k ids [Q, k] over the on-disk catalog, a chunk of rows at a time (memory: one chunk +
    64 × chunk scores), merged with ``exact_topk`` per chunk. Returns (scores, ids, seconds)."""
    import torch

    t0 = time.perf_counter()
    best_s = torch.full((xq.shape[0], 0), float("-inf"))
    best_i = torch.zeros((xq.shape[0], 0), dtype=torch.int64)
    for s in range(0, cat.num_items, rows_per_read):
        e = min(cat.num_items, s + rows_per_read)
        sc, rows = exact_topk(xq, cat.embeddings(s, e), k)
        sc = torch.cat([best_s, sc], dim=1)
        ids = torch.cat([best_i, rows + s + cat.id_offset], dim=1)
        top = sc.topk(min(k, sc.shape[1]), dim=1)
        best_s, best_i = top.values, ids.gather(1, top.indices)
    return best_s, best_i, time.perf_counter() - t0


# ------------------------------------------------------------------ the run
@dataclass(kw_only=True, slots=True)
class ScaleConfig:
    """One `sterling bench scale` run (the CLI flags, one to one)."""

    items: tuple[int, ...] = (1_000_000, 10_000_000)
    dim: int = 64
    nlist: int | None = None  # default: ``default_nlist(N)``
    nprobes: tuple[int, ...] = (16, 64, 256)
    k: int = 100
    queries: int = 1000
    batch: int = 16
    host_dram_gb: float = 24.0
    threads: int = 2
    work_dir: str = "bench-scale"
    keep: bool = False
    seed: int = 0
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.items or min(self.items) < 1 or self.dim < 1 or self.k < 1 or self.queries < 1 or self.batch < 1:
            raise InvalidInputError(f"items ({self.items}), dim ({self.dim}), k ({self.k}), queries "
                                    f"({self.queries}) and batch ({self.batch}) must all be ≥ 1")
        if not self.nprobes or min(self.nprobes) < 1:
            raise InvalidInputError(f"nprobes ({self.nprobes}) must be ≥ 1")


def _child(mode: str, spec: dict, work: Path) -> dict:
    """Run ``python -m sterling.benchmarks.scale MODE spec.json`` and return its last JSON line."""
    spec_path = work / f"{mode}.json"
    spec_path.write_text(json.dumps(spec))
    env = {**os.environ, "OMP_NUM_THREADS": str(spec["threads"]), "NUMBA_NUM_THREADS": str(spec["threads"])}
    proc = subprocess.run([sys.executable, "-m", "sterling.benchmarks.scale", mode, str(spec_path)],
                          stdout=subprocess.PIPE, stderr=None, text=True, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"`{mode}` child failed with exit code {proc.returncode}")
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    return json.loads(lines[-1])


def _predicted_build(n: int, dim: int, nlist: int, config) -> dict:
    """The build's arithmetic at the planner's CPU sgemm rate, and the builder's memory bound."""
    from sterling.model.build_chunked import BUCKET_BYTES
    from sterling.planner.devices import CPU_FP32_FLOPS

    n_train = min(n, max(nlist, min(config.max_kmeans_points, nlist * config.kmeans_points_per_list)))
    flops = 2.0 * dim * nlist * (n + n_train * (config.kmeans_iters + 1))
    rec = 4 + dim + 4 + 8 + 2 * ATTR_WIDTH
    mem = max(
        16 * n + 3 * n_train * dim * 4 + 16_384 * nlist * 4,  # randperm + sort, sample copies, one score block
        (1 << 20) * (rec * 2 + dim * 4 * 2) + config.chunk_size * nlist * 4,  # a commit of records + scores
        3 * BUCKET_BYTES,  # one bucket read, sorted, and its output slots
    )
    return {"build_s": flops / CPU_FP32_FLOPS, "build_flops": flops, "build_memory_bound_bytes": int(mem)}


def _plan(artifact: Path, *, nprobe: int, k: int, batch: int, host_dram_gb: float):
    from sterling.launch.plan_cmd import _at_nprobe
    from sterling.model.artifact import read_header
    from sterling.model.tiers import artifact_list_stats
    from sterling.planner import PlanTargets, make_topology, plan
    from sterling.planner.inventory import inventory_from_header
    from sterling.planner.tiers import ListStats

    d = artifact_list_stats(artifact)
    stats = _at_nprobe(ListStats.from_artifact(d), nprobe)
    cfg, inventory = inventory_from_header(read_header(artifact), nprobe=nprobe, k0=k, batch=batch)
    topo = make_topology("cpu", host_dram_bytes=int(host_dram_gb * 2**30))
    return plan(cfg, topo, PlanTargets(p99_ms=None), inventory=inventory, list_stats=stats)


def _planned_bytes(n: int, dim: int, nlist: int, attrs_per_item: float) -> dict:
    from sterling.planner.inventory import IndexModelConfig, inventory_from_config

    cfg = IndexModelConfig(items=n, dim=dim, nlist=nlist, nprobe=1, attrs_per_item=round(attrs_per_item),
                           cache_dim=0, tower_params=0)
    return {t.name: t.nbytes for t in inventory_from_config(cfg)}


SCAN_PATH = ("codes", "scales", "item_ids", "bloom")


def run_size(cfg: ScaleConfig, n: int) -> dict:
    """Generate, build, measure and serve one catalog size; returns its JSON record."""
    import torch

    from sterling.model.artifact import read_header
    from sterling.model.config import IndexConfig

    torch.set_num_threads(cfg.threads)
    work = Path(cfg.work_dir) / f"n{n}-d{cfg.dim}-s{cfg.seed}"
    work.mkdir(parents=True, exist_ok=True)
    nlist = cfg.nlist or default_nlist(n)
    nprobes = tuple(p for p in cfg.nprobes if p <= nlist) or (nlist,)
    t0 = time.perf_counter()
    cat = write_catalog(work / "catalog", n, cfg.dim, seed=cfg.seed)
    gen_s = time.perf_counter() - t0
    artifact = work / "index.st"
    index_cfg = IndexConfig(nlist=nlist, nprobe=nprobes[len(nprobes) // 2], seed=cfg.seed,
                            **cfg.extra.get("index", {}))
    log(f"N={n:,}: build (nlist {nlist:,})")
    if artifact.exists():
        artifact.unlink()  # a fresh, timed build (its work dir state is cleared too)
        import shutil

        shutil.rmtree(work / "build", ignore_errors=True)
    built = _child("build", {"catalog": str(cat.path), "out": str(artifact), "work_dir": str(work / "build"),
                             "config": index_cfg.to_dict(), "threads": cfg.threads}, work)
    header = read_header(artifact)
    nbytes = {t["name"]: t["nbytes"] for t in header["tensors"]}
    size = artifact.stat().st_size
    attrs_per_item = nbytes["attr_ids"] / 4 / n
    planned = _planned_bytes(n, cfg.dim, nlist, attrs_per_item)
    scan = sum(nbytes[t] for t in SCAN_PATH)
    pred = _predicted_build(n, cfg.dim, nlist, index_cfg)

    xq = scale_queries(cat, cfg.queries, seed=cfg.seed + 1)
    log(f"N={n:,}: exact top-{cfg.k} of {cfg.queries} queries over the on-disk catalog")
    _, truth, exact_s = exact_truth(cat, xq, cfg.k)
    np.save(work / "queries.npy", xq.numpy())
    np.save(work / "truth.npy", truth.numpy())

    plans = {p: _plan(artifact, nprobe=p, k=cfg.k, batch=cfg.batch, host_dram_gb=cfg.host_dram_gb) for p in nprobes}
    tiers = plans[nprobes[0]].devices[0].tiers
    log(f"N={n:,}: serve at nprobe {list(nprobes)}")
    served = _child("serve", {"artifact": str(artifact), "queries": str(work / "queries.npy"),
                              "truth": str(work / "truth.npy"), "nprobes": list(nprobes), "k": cfg.k,
                              "batch": cfg.batch, "threads": cfg.threads, "fast": tiers["fast"] if tiers else None,
                              "cold_window": tiers["cold_window_bytes"] if tiers else 0}, work)
    last = plans[nprobes[-1]].devices[0].tiers  # served last: its scan scratch is what the pool keeps at the end
    resident = tiers["resident_bytes"] - tiers["scan_scratch_bytes"] + last["scan_scratch_bytes"] if tiers else None
    rss_index = served["rss_after_queries"] - served["rss_before_load"]
    rec = {
        "bench": "scale", "items": n, "dim": cfg.dim, "nlist": nlist, "k": cfg.k, "queries": cfg.queries,
        "batch": cfg.batch, "threads": cfg.threads, "generate_s": gen_s,
        "build_s": built["build_s"], "build_stage_s": built["stage_s"],
        "build_peak_rss_bytes": built["peak_rss"],
        "predicted": {**pred, "note": "build_s: assign + k-means FLOPs at planner.devices.CPU_FP32_FLOPS; "
                      "build_memory_bound_bytes: the chunked builder's own estimate of its working memory, without the "
                      "Python/PyTorch runtime (≈ 0.5 GB of RSS here; the planner has no build model)"},
        "artifact_bytes": size, "artifact_bytes_per_item": size / n,
        "scan_path_bytes_per_item": scan / n,
        "bytes_per_item": {t: nbytes[t] / n for t in nbytes},
        "planned_bytes_per_item": {t: v / n for t, v in planned.items()},
        "planned_scan_path_bytes_per_item": sum(planned.get(t, 0) for t in SCAN_PATH) / n,
        "bloom": {"words": built["bloom_words"], "hashes": built["bloom_hashes"]},
        "attrs_per_item": attrs_per_item,
        "exact_qps_peer": cfg.queries / exact_s,
        "rss_before_load": served["rss_before_load"], "rss_after_load": served["rss_after_load"],
        "rss_serving": served["rss_after_queries"], "rss_serving_untrimmed": served["rss_after_queries_untrimmed"],
        "rss_serving_peak": served["peak_rss"], "rss_serving_anon": served["rss_anon"],
        "rss_serving_file": served["rss_file"],
        "rss_index": rss_index, "planned_resident_bytes": resident,
        "rss_index_error": None if resident is None else (resident - rss_index) / rss_index,
        "planned_fast_lists": None if tiers is None else tiers["fast_lists"],
        "serve": [],
    }
    for p in nprobes:
        s = served["nprobe"][str(p)]
        pc = plans[p].cost
        tp = plans[p].devices[0].tiers
        planned_p = None if tiers is None else \
            tiers["resident_bytes"] - tiers["scan_scratch_bytes"] + tp["scan_scratch_bytes"]
        rss_p = s["rss_after"] - served["rss_before_load"]
        rec["serve"].append({"nprobe": p, "qps": s["qps"], f"recall@{cfg.k}": s["recall"],
                             "predicted_qps": pc.qps_per_replica, "predicted_batch_ms": pc.latency_ms,
                             "batch_ms": s["batch_ms"], "qps_vs_exact_peer": s["qps"] / rec["exact_qps_peer"],
                             "rss_index": rss_p, "scan_scratch_kept": s["scan_scratch_kept"],
                             "planned_scan_scratch": None if tp is None else tp["scan_scratch_bytes"],
                             "planned_resident_bytes": planned_p,
                             "rss_index_error": None if planned_p is None else (planned_p - rss_p) / rss_p})
    if not cfg.keep:
        import shutil

        shutil.rmtree(work, ignore_errors=True)
    return rec


def run_scale(cfg: ScaleConfig) -> list[dict]:
    """Every size of ``cfg.items``, smallest first; prints one JSON line per size and a summary."""
    recs = []
    for n in sorted(cfg.items):
        rec = run_size(cfg, n)
        rec.update({"commit": commit(), "machine": machine()})
        print(json.dumps(rec), flush=True)
        recs.append(rec)
    summary = {"bench": "scale", "summary": True, "items": [r["items"] for r in recs],
               "build_s": [r["build_s"] for r in recs],
               "build_s_per_million_items": [r["build_s"] / r["items"] * 1e6 for r in recs],
               "scan_path_bytes_per_item": [r["scan_path_bytes_per_item"] for r in recs],
               "config": asdict(cfg)}
    print(json.dumps(summary), flush=True)
    return recs


def write_records(recs: list[dict], path: str | Path) -> Path:
    """The run's per-size records as one JSON list at ``path`` (temp + fsync + rename: whole or absent)."""
    from sterling.model.build_chunked import write_durably

    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_durably(out, lambda f: json.dump(recs, f, indent=1), binary=False)
    return out


def read_records(path: str | Path) -> list[dict]:
    """Records written by ``write_records`` (or the JSON lines a run printed); typed error if neither."""
    p = Path(path)
    try:
        text = p.read_text()
    except OSError as e:
        raise InvalidInputError(f"cannot read scale records {str(p)!r}: {e.strerror}; pass the file that "
                                "`sterling bench scale --json FILE` wrote") from None
    try:
        data = json.loads(text)
        recs = data if isinstance(data, list) else [data]
    except json.JSONDecodeError:
        try:
            recs = [json.loads(ln) for ln in text.splitlines() if ln.strip().startswith("{")]
        except json.JSONDecodeError as e:
            raise InvalidInputError(f"{str(p)!r} line {e.lineno}: not JSON; pass the file that "
                                    "`sterling bench scale --json FILE` wrote") from None
    recs = [r for r in recs if isinstance(r, dict) and r.get("bench") == "scale" and not r.get("summary")]
    if not recs or any("items" not in r or "serve" not in r for r in recs):
        raise InvalidInputError(f"{str(p)!r} holds no per-size `bench scale` records; pass the file that "
                                "`sterling bench scale --json FILE` wrote")
    return sorted(recs, key=lambda r: r["items"])


def plot_scale(recs: list[dict], path: str | Path) -> Path | None:
    """Scale curves, measured next to the planner's prediction, as one PNG at ``path``.

    Four panels over catalog size (log x): build time (measured vs the
    planner's FLOP estimate), bytes per item (artifact, scan path, planned
    scan path), serving RSS of the index vs the planner's resident bytes, and
    QPS per fixed nprobe (measured solid, predicted dashed) with recall@k in
    the legend. Returns None (and says so on stderr) without matplotlib.
    """
    from sterling.benchmarks.plots import pyplot, save

    plt = pyplot("scale")
    if plt is None:
        return None
    recs = sorted(recs, key=lambda r: r["items"])
    n = [r["items"] for r in recs]
    fig, axes = plt.subplots(2, 2, figsize=(10, 7.2))
    ax = axes[0][0]
    ax.plot(n, [r["build_s"] for r in recs], marker="o", label="measured")
    ax.plot(n, [r["predicted"]["build_s"] for r in recs], marker="x", linestyle="--", label="planner (FLOPs)")
    ax.set_ylabel("build time, s")
    ax.set_yscale("log")
    ax.set_title("build (chunked, resumable)", fontsize=9)
    ax.legend(fontsize=8)
    ax = axes[0][1]
    ax.plot(n, [r["artifact_bytes_per_item"] for r in recs], marker="o", label="artifact")
    ax.plot(n, [r["scan_path_bytes_per_item"] for r in recs], marker="o", label="scan path (codes+scales+ids+Bloom)")
    ax.plot(n, [r["planned_scan_path_bytes_per_item"] for r in recs], marker="x", linestyle="--",
            label="planner: scan path")
    ax.set_ylabel("bytes per item")
    ax.set_ylim(bottom=0)
    ax.set_title("bytes per item", fontsize=9)
    ax.legend(fontsize=8)
    ax = axes[1][0]
    ax.plot(n, [r["rss_index"] / 2**20 for r in recs], marker="o", label="measured (RSS after queries − before load)")
    planned = [(x, r["planned_resident_bytes"] / 2**20) for x, r in zip(n, recs) if r.get("planned_resident_bytes")]
    if planned:
        ax.plot(*zip(*planned), marker="x", linestyle="--", label="planner: resident bytes")
    ax.set_ylabel("serving RSS of the index, MiB")
    ax.set_yscale("log")
    ax.set_title("memory while serving", fontsize=9)
    ax.legend(fontsize=8)
    ax = axes[1][1]
    k = recs[0]["k"]
    for p in sorted({s["nprobe"] for r in recs for s in r["serve"]}):
        pts = [(x, s) for x, r in zip(n, recs) for s in r["serve"] if s["nprobe"] == p]
        xs = [x for x, _ in pts]
        line, = ax.plot(xs, [s["qps"] for _, s in pts], marker="o",
                        label=f"nprobe {p}: recall@{k} " + " / ".join(f"{s[f'recall@{k}']:.3f}" for _, s in pts))
        ax.plot(xs, [s["predicted_qps"] for _, s in pts], marker="x", linestyle="--", color=line.get_color())
    ax.set_ylabel("QPS (solid measured, dashed planner)")
    ax.set_yscale("log")
    ax.set_title("serving at fixed nprobe", fontsize=9)
    ax.legend(fontsize=7)
    for row in axes:
        for a in row:
            a.set_xscale("log")
            a.set_xlabel("catalog items")
            a.grid(True, which="both", linewidth=0.3)
    where = recs[-1].get("machine")
    fig.suptitle(f"sterling bench scale, dim {recs[0]['dim']}, {recs[0]['threads']} threads"
                 + (f" — {where}" if where else ""), fontsize=9)
    fig.tight_layout()
    return save(fig, path, dpi=110)


# ------------------------------------------------------------------ children
def _build_child(spec: dict) -> dict:
    import torch

    from sterling.model.build_chunked import build_chunked
    from sterling.model.config import IndexConfig

    torch.set_num_threads(spec["threads"])
    cat = CatalogDir(spec["catalog"])
    t0 = time.perf_counter()
    out = build_chunked(cat, spec["out"], config=IndexConfig.from_dict(spec["config"]), work_dir=spec["work_dir"],
                        progress=True)
    out["build_s"] = time.perf_counter() - t0
    out["peak_rss"] = rss_bytes("VmHWM")
    return out


def _malloc_trim() -> None:
    """Hand freed heap back to the OS (glibc keeps the high-water mark of every arena otherwise), so the
    RSS read next is what the process holds, not what a search once allocated and freed."""
    import ctypes

    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _warm_up(dim: int, k: int, batch: int, nprobes) -> None:
    """Serve a tiny artifact the way the real one is served (loaded, tiered, searched at each nprobe), so the
    baseline RSS holds the runtime (JIT-compiled scan, thread pool, library pages of every path taken) and
    the serving RSS minus the baseline is what the index itself keeps resident."""
    import tempfile

    import torch

    from sterling.model import IndexConfig, build_index
    from sterling.model.index import ItemIndex

    g = torch.Generator().manual_seed(0)
    nlist = 64
    tiny = build_index(torch.randn(max(4 * k, 64 * nlist), dim, generator=g), config=IndexConfig(nlist=nlist))
    with tempfile.TemporaryDirectory() as d:
        tiny.save(f"{d}/tiny.st")
        tiny = ItemIndex.load(f"{d}/tiny.st", tiers=False)
        tiny.apply_tiers(np.ones(nlist, dtype=bool))
        xq = torch.randn(batch, dim, generator=g)
        for p in nprobes:
            for _ in range(3):
                tiny.search(xq, k=k, nprobe=min(p, nlist))
        del tiny
    _malloc_trim()


def _serve_child(spec: dict) -> dict:
    import torch

    from sterling.kernels import cpu_scan
    from sterling.model.index import ItemIndex

    torch.set_num_threads(spec["threads"])
    xq = torch.from_numpy(np.load(spec["queries"]))
    truth = np.load(spec["truth"])
    _warm_up(xq.shape[1], spec["k"], spec["batch"], spec["nprobes"])
    before = rss_bytes()
    index = ItemIndex.load(spec["artifact"], tiers=False)
    if spec["fast"] is not None:
        fast = np.frombuffer(spec["fast"].encode(), dtype=np.uint8) == ord("1")
        index.apply_tiers(fast, cold_window=int(spec["cold_window"]))
    loaded = rss_bytes()
    out = {"rss_before_load": before, "rss_after_load": loaded, "nprobe": {}}
    B, k = spec["batch"], spec["k"]
    for p in spec["nprobes"]:
        index.search(xq[:B], k=k, nprobe=p)  # warm-up (numba compile on first use)
        best, ids = float("inf"), None
        for _ in range(2):
            t = time.perf_counter()
            got = [index.search(xq[s : s + B], k=k, nprobe=p)[1] for s in range(0, xq.shape[0], B)]
            best = min(best, time.perf_counter() - t)
            ids = torch.cat(got).numpy()
        nb = math.ceil(xq.shape[0] / B)
        _malloc_trim()
        out["nprobe"][str(p)] = {"qps": xq.shape[0] / best, "recall": recall(ids, truth), "batch_ms": 1e3 * best / nb,
                                 "rss_after": rss_bytes(), "scan_scratch_kept": cpu_scan.scratch_bytes()}
    out["rss_after_queries_untrimmed"] = rss_bytes()
    _malloc_trim()
    out["rss_after_queries"] = rss_bytes()
    out["rss_anon"], out["rss_file"] = rss_bytes("RssAnon"), rss_bytes("RssFile")
    out["peak_rss"] = rss_bytes("VmHWM")
    return out


def main(argv: list[str]) -> int:
    mode, spec_path = argv
    spec = json.loads(Path(spec_path).read_text())
    out = {"build": _build_child, "serve": _serve_child}[mode](spec)
    print(json.dumps(out), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
