"""``build_chunked``: a catalog on disk → one artifact, in bounded memory, resumable.

``build_index`` keeps the int8 codes of the whole catalog in memory twice
(input order, then cluster order); at 100M × 64 that is 13 GB before the
attributes. This builder runs the same algorithm with every per-item array
on disk, so memory is a few chunks whatever N is:

1. ``sample``: the same k-means sample and probe statistics as
   ``build_index`` (same seed, same rows, same ``spherical_kmeans``);
2. ``assign``: stream the catalog in super-chunks of ``rows_per_commit``
   rows; inside, assign + quantize every ``config.chunk_size`` rows exactly as
   ``build_index`` does; append each item's record (list, int8 codes, scale,
   id, padded attribute ids) to the bucket file of its list range; count
   items per list and terms per item (the counting pass);
3. ``layout``: list offsets (CSR), Bloom size from the terms histogram, the
   artifact header; the artifact file is preallocated with room for it;
4. ``write``: per bucket (a contiguous range of lists), read its records,
   stable-sort them by list, and write the bucket's slots of every per-item
   tensor sequentially (codes, scales, ids, Bloom words, exact attributes);
5. ``finalize``: alive bitmask, data checksum, header, fsync, rename.

Every completed stage, super-chunk and bucket is recorded in
``work_dir/manifest.json`` (temp file + rename). A restarted build skips
them: bucket files are truncated back to their recorded lengths and the
interrupted super-chunk or bucket is redone; all writes are deterministic,
so a resumed build writes the same bytes as an uninterrupted one. The
result equals ``build_index`` on the same data (same tensors, same header
metadata); only the header's JSON carries trailing spaces (room reserved for
the checksum).
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
import torch.nn.functional as F

from sterling.kernels import pack_bits, quantize_int8
from sterling.model import bloom as bloom_mod
from sterling.model.artifact import _PRE, FORMAT_VERSION, MAGIC, _pad, _umask_mode
from sterling.model.build import _check_finite, _probe_stats
from sterling.model.config import IndexConfig, Metric, auto_nlist
from sterling.model.errors import (
    ArtifactError,
    DimensionMismatchError,
    DuplicateIdError,
    EmptyCatalogError,
    InvalidInputError,
    TooManyAttributesError,
)
from sterling.model.kmeans import assign, spherical_kmeans
from sterling.model.selectivity import SelectivitySample, sample_rows

__all__ = ["ChunkedCatalog", "NpyCatalog", "build_chunked", "ResumeMismatchError", "MANIFEST", "BUFFER_ORDER"]

MANIFEST = "manifest.json"
# Tensor order of an item-index artifact (``ItemIndex.tensors()``).
BUFFER_ORDER = ("centroids", "list_offsets", "codes", "scales", "item_ids", "bloom", "attr_ids", "attr_offsets",
                "alive", "version")
# Bytes of records one bucket holds at most (read whole, sorted, written in pass 4).
BUCKET_BYTES = 256 << 20
# Space reserved in the header for the checksum's digits (crc32 < 2^32: at most 10).
_CRC_MAX = 2**32 - 1


class ResumeMismatchError(InvalidInputError):
    """A work directory holds the state of a different build (other catalog, config or output)."""


class ChunkedCatalog(Protocol):
    """A catalog read in row ranges (``benchmarks/scale.py`` writes one to disk).

    ``attr_width`` terms per item at most; ``read`` returns them padded with −1.
    """

    num_items: int
    dim: int
    vocab: list[str]
    attr_width: int
    attr_dtype: np.dtype

    def read(self, start: int, end: int) -> tuple[torch.Tensor, np.ndarray, np.ndarray]:
        """(fp32 [n, D] embeddings, int64 [n] ids, [n, attr_width] term ids, −1 = none) of rows start..end-1."""

    def read_rows(self, rows: np.ndarray) -> torch.Tensor:
        """fp32 [len(rows), D] for sorted row numbers."""

    def fingerprint(self) -> dict:
        """What identifies the catalog's content (a resumed build must see the same)."""


class NpyCatalog:
    """``.npy`` embeddings [N, D] (and optional int64 ids [N]) read with ``pread``: no attributes.

    What ``sterling build --catalog x.npy --work-dir DIR`` streams from.
    """

    attr_width = 0
    attr_dtype = np.dtype(np.int16)

    def __init__(self, path: str | Path, ids_path: str | Path | None = None) -> None:
        from sterling.model.catalog import load_npy

        self.path = Path(path)
        emb = load_npy(self.path, what="catalog", mmap=True)
        if emb.ndim != 2:
            raise InvalidInputError(f"catalog {self.path} has shape {emb.shape}; give [N, D] embeddings")
        if not np.issubdtype(emb.dtype, np.floating) or not emb.flags.c_contiguous:
            raise InvalidInputError(f"catalog {self.path} holds {emb.dtype}; save C-ordered float32 [N, D] with np.save")
        self.num_items, self.dim = (int(v) for v in emb.shape)
        self._dtype, self._offset = emb.dtype, int(emb.offset)
        self.vocab: list[str] = []
        self._ids = None
        if ids_path is not None:
            ids = load_npy(ids_path, what="ids file", mmap=True)
            if ids.shape != (self.num_items,) or not np.issubdtype(ids.dtype, np.integer):
                raise InvalidInputError(
                    f"ids file {ids_path} holds {ids.dtype} {ids.shape}; give int64 [{self.num_items}], one per item"
                )
            self._ids = ids
        self._fd = os.open(self.path, os.O_RDONLY)
        st = os.stat(self.path)
        self._print = {"kind": "npy", "path": str(self.path.resolve()), "shape": [self.num_items, self.dim],
                       "dtype": str(self._dtype), "bytes": st.st_size, "mtime_ns": st.st_mtime_ns,
                       "ids": None if ids_path is None else str(Path(ids_path).resolve())}

    def _rows(self, start: int, end: int) -> np.ndarray:
        row = self.dim * self._dtype.itemsize
        b = _pread(self._fd, self._offset + start * row, (end - start) * row)
        return np.frombuffer(b, dtype=self._dtype).reshape(end - start, self.dim)

    def read(self, start: int, end: int):
        x = torch.from_numpy(self._rows(start, end).astype(np.float32))
        ids = np.arange(start, end, dtype=np.int64) if self._ids is None else np.array(self._ids[start:end], np.int64)
        return x, ids, np.zeros((end - start, 0), dtype=np.int16)

    def read_rows(self, rows: np.ndarray) -> torch.Tensor:
        out = np.empty((len(rows), self.dim), dtype=np.float32)
        for j, r in enumerate(rows.tolist()):
            out[j] = self._rows(r, r + 1)[0]
        return torch.from_numpy(out)

    def fingerprint(self) -> dict:
        return dict(self._print)


# ------------------------------------------------------------------ manifest
class _Manifest:
    def __init__(self, path: Path, params: dict) -> None:
        self.path = path
        if path.exists():
            state = json.loads(path.read_text())
            if state.get("params") != params:
                raise ResumeMismatchError(
                    f"{path.parent} holds the state of another build (params {state.get('params')} vs {params}); "
                    "give a fresh --work-dir or delete that one"
                )
            self.state = state
        else:
            self.state = {"params": params, "stages": {}}

    def done(self, stage: str) -> bool:
        return bool(self.state["stages"].get(stage, {}).get("done"))

    def get(self, stage: str) -> dict:
        return self.state["stages"].setdefault(stage, {})

    def commit(self, stage: str, **fields) -> None:
        self.state["stages"].setdefault(stage, {}).update(fields)
        write_durably(self.path, lambda f: json.dump(self.state, f), binary=False)


def write_durably(path: Path, fill, *, binary: bool = True) -> None:
    """Write ``path`` whole or not at all: ``fill(f)`` into ``path.tmp``, fsync, rename over ``path``."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb" if binary else "w") as f:
        fill(f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _save_npy(path: Path, a: np.ndarray) -> None:
    write_durably(path, lambda f: np.save(f, a))


def _log(progress: bool, msg: str) -> None:
    if progress:
        print(f"[build] {msg}", file=sys.stderr, flush=True)


def _record_dtype(dim: int, attr_width: int, attr_dtype) -> np.dtype:
    fields = [("list", "<i4"), ("code", "i1", (dim,)), ("scale", "<f4"), ("id", "<i8")]
    if attr_width:
        fields.append(("attr", np.dtype(attr_dtype).newbyteorder("<"), (attr_width,)))
    return np.dtype(fields)


def _pwrite(fd: int, offset: int, a: np.ndarray) -> None:
    view = memoryview(np.ascontiguousarray(a)).cast("B")
    while view:
        n = os.pwrite(fd, view, offset)
        view, offset = view[n:], offset + n


def _pread(fd: int, offset: int, nbytes: int) -> bytes:
    parts, left = [], nbytes
    while left:
        b = os.pread(fd, min(left, 1 << 28), offset)
        if not b:
            raise ArtifactError(f"unexpected end of file at byte {offset} ({left} bytes missing)")
        parts.append(b)
        offset, left = offset + len(b), left - len(b)
    return b"".join(parts)


# ------------------------------------------------------------------ build
def build_chunked(
    catalog: ChunkedCatalog,
    out: str | Path,
    *,
    config: IndexConfig | None = None,
    work_dir: str | Path,
    rows_per_commit: int = 1 << 20,
    progress: bool = False,
    hook: Callable[[str, int], None] | None = None,
) -> dict:
    """Build the item-index artifact ``out`` from ``catalog`` (resumable; see the module docstring).

    Args:
        catalog: a ``ChunkedCatalog``.
        out: artifact path (written by rename at the very end).
        config: ``IndexConfig`` (default: auto nlist, inner product).
        work_dir: where the manifest, bucket files and partial artifact live;
            rerun with the same one to resume.
        rows_per_commit: rows between two manifest commits in the assign pass
            (a multiple of ``config.chunk_size``; the unit of redone work).
        progress: progress lines on stderr.
        hook: ``hook(point, i)`` called at ``"<stage>:done"`` and, mid-work,
            ``"assign:chunk"`` / ``"write:bucket"`` with the chunk / bucket
            number, ``"assign:commit"`` (a super-chunk on disk, not yet
            committed) and ``"finalize:renamed"`` (tests interrupt builds there).
    Returns:
        a summary dict (items, nlist, capacity, bloom spec, bytes per tensor, seconds per stage).
    """
    config = config or IndexConfig()
    hook = hook or (lambda point, i: None)
    out = Path(out)
    work = Path(work_dir)
    work.mkdir(parents=True, exist_ok=True)
    N, D, A = int(catalog.num_items), int(catalog.dim), int(catalog.attr_width)
    if N == 0:
        raise EmptyCatalogError("the catalog has no items; nothing to index")
    if D < 1:
        raise DimensionMismatchError(f"embeddings have dimension {D}; need at least 1")
    if A > config.max_attributes_per_item:
        raise TooManyAttributesError(
            f"the catalog allows {A} attributes per item, above max_attributes_per_item "
            f"({config.max_attributes_per_item}); raise the limit (IndexConfig.max_attributes_per_item)",
            name="attributes per item", value=A, limit=config.max_attributes_per_item,
        )
    nlist = config.nlist or auto_nlist(N)
    if nlist > N:
        raise InvalidInputError(f"nlist ({nlist}) exceeds the number of items ({N}); use nlist ≤ {N}")
    if rows_per_commit < 1 or rows_per_commit % config.chunk_size:
        raise InvalidInputError(
            f"rows_per_commit ({rows_per_commit}) must be a positive multiple of chunk_size ({config.chunk_size})"
        )
    metric = Metric(config.metric)
    cfg = IndexConfig.from_dict({**config.to_dict(), "nlist": nlist})
    rec_dtype = _record_dtype(D, A, catalog.attr_dtype)
    n_buckets = max(1, min(nlist, math.ceil(N * rec_dtype.itemsize / BUCKET_BYTES)))
    lists_per_bucket = math.ceil(nlist / n_buckets)
    n_buckets = math.ceil(nlist / lists_per_bucket)
    params = {"catalog": catalog.fingerprint(), "config": cfg.to_dict(), "out": str(out.resolve()),
              "rows_per_commit": rows_per_commit, "buckets": n_buckets, "format": 1}
    man = _Manifest(work / MANIFEST, params)
    times: dict[str, float] = dict(man.state.get("times", {}))

    def timed(stage: str, t0: float) -> None:
        times[stage] = times.get(stage, 0.0) + time.perf_counter() - t0
        man.state["times"] = times

    # 1. k-means sample (as build_index)
    if not man.done("sample"):
        t0 = time.perf_counter()
        g = torch.Generator().manual_seed(config.seed)
        n_train = min(N, max(nlist, min(config.max_kmeans_points, nlist * config.kmeans_points_per_list)))
        rows = torch.randperm(N, generator=g)[:n_train].sort().values
        sample = catalog.read_rows(rows.numpy())
        _check_finite(sample, rows)
        del rows
        _log(progress, f"k-means: {n_train:,} points → {nlist:,} lists × {config.kmeans_iters} iterations")
        centroids = spherical_kmeans(sample, nlist, iters=config.kmeans_iters, seed=config.seed)
        tiers = _probe_stats(sample, centroids, config, nlist, D, source="items")
        del sample
        # the same catalog rows' exact terms as build_index's selectivity sample
        sel = SelectivitySample.from_term_lists(catalog.read(r, r + 1)[2][0] for r in sample_rows(N).tolist())
        _save_npy(work / "centroids.npy", centroids.numpy())
        timed("sample", t0)
        man.commit("sample", done=True, tiers=tiers.to_meta(), selectivity_sample=sel.to_meta())
        hook("sample:done", 0)
    centroids = torch.from_numpy(np.load(work / "centroids.npy"))

    # 2. assign + quantize, records appended per bucket (the counting pass)
    bucket_path = [work / f"bucket-{b:05d}.rec" for b in range(n_buckets)]
    st = man.get("assign")
    if not man.done("assign"):
        t0 = time.perf_counter()
        next_row = int(st.get("next_row", 0))
        lengths_b = st.get("bucket_bytes", [0] * n_buckets)
        counts = np.zeros(nlist, dtype=np.int64)
        if next_row:
            counts = np.load(work / st["counts_file"])
        hist = np.asarray(st.get("terms_hist", [0] * (A + 1)), dtype=np.int64)
        nnz_b = list(st.get("bucket_nnz", [0] * n_buckets))
        last_id = int(st.get("last_id", -1))
        ids_sorted = bool(st.get("ids_sorted", True))
        fds = []
        for b, p in enumerate(bucket_path):
            fd = os.open(p, os.O_RDWR | os.O_CREAT, 0o644)
            os.ftruncate(fd, lengths_b[b])  # drop what an interrupted super-chunk appended
            fds.append(fd)
        try:
            c = next_row // rows_per_commit
            for start in range(next_row, N, rows_per_commit):
                end = min(N, start + rows_per_commit)
                recs = np.empty(end - start, dtype=rec_dtype)
                for s in range(start, end, config.chunk_size):
                    e = min(end, s + config.chunk_size)
                    x, ids, attrs = catalog.read(s, e)
                    _check_finite(x, torch.arange(s, e))
                    if ids.size and int(ids.min()) < 0:
                        i = int(np.flatnonzero(ids < 0)[0])
                        raise DuplicateIdError(
                            f"item {s + i} has negative id {int(ids[i])}; ids must be ≥ 0 (−1 marks empty slots)"
                        )
                    if ids.size:
                        ids_sorted &= bool(ids[0] > last_id) and bool((np.diff(ids) > 0).all())
                        last_id = int(ids[-1])
                    if metric is Metric.COSINE:
                        x = F.normalize(x, dim=1)
                    r = recs[s - start : e - start]
                    r["list"] = assign(x, centroids).numpy()
                    codes, scales = quantize_int8(x)
                    r["code"], r["scale"], r["id"] = codes.numpy(), scales.numpy(), ids
                    if A:
                        r["attr"] = attrs
                lst = recs["list"]
                counts += np.bincount(lst, minlength=nlist)
                bucket = lst // lists_per_bucket
                if A:
                    n_terms = (recs["attr"] >= 0).sum(axis=1)
                    hist += np.bincount(n_terms, minlength=A + 1)
                    nnz_per = np.bincount(bucket, weights=n_terms, minlength=n_buckets).astype(np.int64)
                else:
                    hist[0] += end - start
                order = np.argsort(bucket, kind="stable")
                bounds = np.searchsorted(bucket[order], np.arange(n_buckets + 1))
                for b in range(n_buckets):
                    lo, hi = bounds[b], bounds[b + 1]
                    if hi > lo:
                        chunk = recs[order[lo:hi]]
                        _pwrite(fds[b], lengths_b[b], chunk)
                        lengths_b[b] += chunk.nbytes
                    if A:
                        nnz_b[b] += int(nnz_per[b])
                    if b == n_buckets // 2:
                        hook("assign:chunk", c)  # mid-chunk: some buckets appended, others not
                for fd in fds:
                    os.fsync(fd)
                # a new file per commit: a kill between saving it and the commit leaves the last one valid
                old_counts = st.get("counts_file")
                _save_npy(work / f"counts-{end}.npy", counts)
                hook("assign:commit", c)  # records and counts on disk, not yet committed
                man.commit("assign", next_row=end, bucket_bytes=lengths_b, terms_hist=hist.tolist(),
                           bucket_nnz=nnz_b, last_id=last_id, ids_sorted=ids_sorted, counts_file=f"counts-{end}.npy")
                if old_counts and old_counts != st["counts_file"]:
                    (work / old_counts).unlink(missing_ok=True)
                _log(progress, f"assign+quantize: {end:,} / {N:,} rows ({time.perf_counter() - t0:.1f} s)")
                c += 1
        finally:
            for fd in fds:
                os.close(fd)
        timed("assign", t0)
        man.commit("assign", done=True)
        hook("assign:done", 0)
    st = man.get("assign")
    counts = np.load(work / st["counts_file"])
    hist = np.asarray(st["terms_hist"], dtype=np.int64)
    nnz_b = [int(v) for v in st["bucket_nnz"]]

    # 3. layout: CSR offsets, Bloom size, header room; preallocate the artifact
    caps = counts + np.ceil(counts.astype(np.float64) * config.list_slack).astype(np.int64)
    list_offsets = np.zeros(nlist + 1, dtype=np.int64)
    np.cumsum(caps, out=list_offsets[1:])
    cap = int(list_offsets[-1])
    nnz = int(sum(nnz_b))
    spec = _bloom_spec(hist, config)
    W = spec.words
    shapes = {
        "centroids": ((nlist, D), "float32"), "list_offsets": ((nlist + 1,), "int64"),
        "codes": ((cap, D), "int8"), "scales": ((cap,), "float32"), "item_ids": ((cap,), "int64"),
        "bloom": ((cap, W), "int64"), "attr_ids": ((nnz,), "int32"), "attr_offsets": ((cap + 1,), "int64"),
        "alive": (((cap + 7) // 8,), "uint8"), "version": ((), "int64"),
    }
    entries, off = [], 0
    for name in BUFFER_ORDER:
        shape, dtype = shapes[name]
        nbytes = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
        entries.append({"name": name, "dtype": dtype, "shape": list(shape), "offset": off, "nbytes": nbytes})
        off += nbytes + _pad(nbytes)
    data_len = off
    meta = {"index": {"config": cfg.to_dict(), "vocab": list(catalog.vocab),
                      "bloom": {"words": spec.words, "hashes": spec.hashes}, "tiers": man.get("sample")["tiers"],
                      "selectivity_sample": man.get("sample").get("selectivity_sample")}}
    where = {e["name"]: e for e in entries}

    def header_bytes(crc: int) -> bytes:
        return json.dumps({"format_version": FORMAT_VERSION, "kind": "item_index", "meta": meta, "tensors": entries,
                           "data_len": data_len, "data_crc": crc}, separators=(",", ":")).encode()

    data_start = _PRE.size + len(header_bytes(_CRC_MAX))
    data_start += _pad(data_start)
    partial = work / "artifact.partial"
    if not man.done("layout"):
        t0 = time.perf_counter()
        with open(partial, "wb") as f:
            f.truncate(data_start + data_len)
        fd = os.open(partial, os.O_RDWR)
        try:
            _pwrite(fd, data_start + where["centroids"]["offset"], centroids.numpy())
            _pwrite(fd, data_start + where["list_offsets"]["offset"], list_offsets)
            _pwrite(fd, data_start + where["version"]["offset"], np.array(1, dtype=np.int64))
            _pwrite(fd, data_start + where["attr_offsets"]["offset"] + 8 * cap, np.array(nnz, dtype=np.int64))
            os.fsync(fd)
        finally:
            os.close(fd)
        timed("layout", t0)
        man.commit("layout", done=True)
        hook("layout:done", 0)

    # 4. per bucket: sort by list (stable), write the bucket's slots of every per-item tensor
    vocab_words = bloom_mod.term_words(list(catalog.vocab), spec)
    nnz_start = np.concatenate([[0], np.cumsum(nnz_b)]).astype(np.int64)
    if not man.done("write"):
        t0 = time.perf_counter()
        st = man.get("write")
        fd = os.open(partial, os.O_RDWR)
        try:
            for b in range(int(st.get("next_bucket", 0)), n_buckets):
                L0, L1 = b * lists_per_bucket, min(nlist, (b + 1) * lists_per_bucket)
                s0, s1 = int(list_offsets[L0]), int(list_offsets[L1])
                recs = np.fromfile(bucket_path[b], dtype=rec_dtype)
                lst = recs["list"].astype(np.int64)
                order = np.argsort(lst, kind="stable")
                recs, lst = recs[order], lst[order]
                first = np.searchsorted(lst, lst, side="left")  # first sorted row of each row's list
                dest = list_offsets[lst] - s0 + (np.arange(lst.size) - first)
                n_slots = s1 - s0
                codes = np.zeros((n_slots, D), dtype=np.int8)
                scales = np.zeros(n_slots, dtype=np.float32)
                item_ids = np.full(n_slots, -1, dtype=np.int64)
                codes[dest], scales[dest], item_ids[dest] = recs["code"], recs["scale"], recs["id"]
                slot_len = np.zeros(n_slots, dtype=np.int64)
                if A:
                    attr = recs["attr"]
                    slot_len[dest] = (attr >= 0).sum(axis=1)
                    flat = attr[attr >= 0].astype(np.int32)
                else:
                    flat = np.zeros(0, dtype=np.int32)
                local_off = np.zeros(n_slots + 1, dtype=np.int64)
                np.cumsum(slot_len, out=local_off[1:])
                sig = bloom_mod.item_signatures(torch.from_numpy(flat), torch.from_numpy(local_off), vocab_words)
                base = data_start
                _pwrite(fd, base + where["codes"]["offset"] + s0 * D, codes)
                _pwrite(fd, base + where["scales"]["offset"] + s0 * 4, scales)
                hook("write:bucket", b)  # mid-bucket: some tensors written, others not
                _pwrite(fd, base + where["item_ids"]["offset"] + s0 * 8, item_ids)
                _pwrite(fd, base + where["bloom"]["offset"] + s0 * W * 8, sig.numpy())
                _pwrite(fd, base + where["attr_ids"]["offset"] + int(nnz_start[b]) * 4, flat)
                _pwrite(fd, base + where["attr_offsets"]["offset"] + s0 * 8, local_off[:-1] + nnz_start[b])
                os.fsync(fd)
                del recs, codes, scales, item_ids, sig, flat
                man.commit("write", next_bucket=b + 1)
                bucket_path[b].unlink(missing_ok=True)  # disk: records live until their slots are written
                _log(progress, f"write: bucket {b + 1} / {n_buckets} ({time.perf_counter() - t0:.1f} s)")
        finally:
            os.close(fd)
        timed("write", t0)
        man.commit("write", done=True)
        hook("write:done", 0)
    for p in bucket_path:
        p.unlink(missing_ok=True)

    # 5. alive bitmask, id check, checksum, header, rename
    if not man.done("finalize") and not partial.exists() and out.exists():
        man.commit("finalize", done=True)  # killed between the rename and its commit
    if not man.done("finalize"):
        t0 = time.perf_counter()
        fd = os.open(partial, os.O_RDWR)
        try:
            step = 1 << 23  # slots per read: a multiple of 8, so each packed piece is whole bytes
            ids_off = data_start + where["item_ids"]["offset"]
            for s in range(0, cap, step):
                n = min(step, cap - s)
                ids = np.frombuffer(_pread(fd, ids_off + 8 * s, 8 * n), dtype=np.int64)
                _pwrite(fd, data_start + where["alive"]["offset"] + s // 8,
                        pack_bits(torch.from_numpy(ids >= 0)).numpy())
            if not man.get("assign").get("ids_sorted", True):
                ids = np.frombuffer(_pread(fd, ids_off, 8 * cap), dtype=np.int64)
                s = np.sort(ids[ids >= 0])
                dup = np.flatnonzero(s[1:] == s[:-1])
                if dup.size:
                    raise DuplicateIdError(f"id {int(s[dup[0]])} is used by more than one item; ids must be unique")
                del ids, s
            crc, pos, end = 0, data_start, data_start + data_len
            while pos < end:
                b = os.pread(fd, min(1 << 24, end - pos), pos)
                crc = zlib.crc32(b, crc)
                pos += len(b)
            header = header_bytes(crc)
            hdr_len = data_start - _PRE.size
            header = header + b" " * (hdr_len - len(header))
            _pwrite(fd, 0, np.frombuffer(_PRE.pack(MAGIC, FORMAT_VERSION, hdr_len, zlib.crc32(header)) + header,
                                         dtype=np.uint8))
            os.fsync(fd)
        finally:
            os.close(fd)
        os.chmod(partial, _umask_mode())
        out.parent.mkdir(parents=True, exist_ok=True)
        os.replace(partial, out)
        hook("finalize:renamed", 0)
        timed("finalize", t0)
        man.commit("finalize", done=True)
        hook("finalize:done", 0)
    if not out.exists():
        raise ArtifactError(f"{work} records a finished build but {out} is missing; delete {work} and rebuild")
    return {"items": N, "nlist": nlist, "capacity": cap, "bloom_words": spec.words, "bloom_hashes": spec.hashes,
            "attr_nnz": nnz, "buckets": n_buckets, "bytes": {e["name"]: e["nbytes"] for e in entries},
            "artifact_bytes": data_start + data_len, "stage_s": times}


def _bloom_spec(hist: np.ndarray, config: IndexConfig) -> bloom_mod.BloomSpec:
    """``build_index``'s Bloom sizing, from the terms-per-item histogram instead of the [N] counts."""
    spec = bloom_mod.size_bloom(bloom_mod.TermsHistogram(np.flatnonzero(hist), hist[hist > 0]), config.target_fpr)
    if config.bloom_bits or config.bloom_hashes:
        spec = bloom_mod.BloomSpec(words=(config.bloom_bits or spec.bits) // 64,
                                   hashes=config.bloom_hashes or spec.hashes)
    return spec
