"""``LiveModel``: a serving model that takes upserts and deletes in place, durably.

Write path of one batch (``upsert`` / ``delete`` / ``update_attributes``)::

    validate + encode (no lock) → append to the update log (sequence number)
    → fsync (group commit: one fsync for every writer waiting) → apply to the
    index tensors in sequence order, under the exclusive side of the guard
    → version + 1 → return the version (the batch is now durable and visible)

Readers (``search``, ``__call__``) hold the shared side of a reader/writer
guard for the whole search, so a query sees every item of a batch entirely
before or entirely after it, never torn. Writers queue behind the
guard's writer preference, so a stream of queries cannot starve them. The
batch's slots, Bloom rows, CSR entries and alive bytes are worked out before
the exclusive side is taken; only the tensor writes happen under it.

Capacity: an upsert writes into free slots of its item's nearest list (slack
reserved at build time, ``IndexConfig.list_slack``, and slots freed by
deletes and moves). When a list has no free slot left the batch first
re-packs the whole index with fresh slack per list (documented re-pack: the
new layout is built while queries keep running, then swapped in under the
guard in one step). ``compact()`` does the same to reclaim tombstones and
return memory; it runs in a background thread when the index holds more
than ``compact_waste`` free slots per live item.

Durability (``data_dir``): ``snapshot-<seq>.st`` files (the ordinary model
artifact, written to a temp file and renamed; ``meta.log_seq`` is the last
batch it contains) and the update log (``sterling.model.wal``). Recovery =
the newest snapshot (else the model given) + replay of the log records after
it. A snapshot starts a new log segment and deletes the segments and older
snapshots it covers. An interrupted snapshot leaves only a temp file, which
recovery deletes.

A learned model (``LearnedRetrievalModel``, ``sterling train``) is served the
same way; its upserts carry item features (``item_features=``: a
``FeatureTable`` in the items-table layout, or mapped ``ItemInputs``)
instead of vectors. The item tower embeds them (no grad, eval mode); the
index entry (quantized, assigned as for a vector) and the OverArch's cached
item row (``EmbeddingCache.plan_upsert``) are written under the same hold of
the writer guard, so a query sees both or neither. Deletes drop the cache row
in the same hold. The log record (``upsert_features``) carries the tower's
inputs, so replay re-embeds them into the same index entries and cache rows;
snapshots are learned-model artifacts and include the cache.

Example:
    >>> live = LiveModel.open(RetrievalModel.load("m.st"), LiveModel.Config(data_dir="data"))
    >>> v = live.upsert([1001, 1002], xb_new, [["lang:en"], ["lang:fr"]])
    >>> out = live(query=xq, k=100, min_version=v)   # read-your-writes
    >>> live.delete([17]); live.snapshot(); live.close()
"""

from __future__ import annotations

import logging
import threading
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from sterling.model import updates as upd
from sterling.model.artifact import read_artifact, write_artifact
from sterling.model.data import FeatureTable, ItemInputs
from sterling.model.errors import (
    ArtifactError,
    InvalidInputError,
    ItemFeaturesError,
    SnapshotError,
    VersionTimeoutError,
)
from sterling.model.learned import LearnedRetrievalModel
from sterling.model.retrieval import RetrievalModel, RetrievalOutput
from sterling.model.wal import LogRecord, RecordKind, UpdateLog

__all__ = ["LiveModel", "ReadWriteGuard", "Staged", "load_model"]

log = logging.getLogger("sterling.live")


@dataclass(frozen=True, slots=True)
class Staged:
    """A batch logged (durable) but not yet applied: ``LiveModel.apply_staged`` applies it."""

    record: LogRecord
    prepared: object = None


class ReadWriteGuard:
    """Many readers or one writer; a waiting writer blocks new readers (no starvation)."""

    def __init__(self) -> None:
        self._cv = threading.Condition()
        self._readers = 0
        self._writer = False
        self._waiting = 0

    @contextmanager
    def read(self):
        with self._cv:
            while self._writer or self._waiting:
                self._cv.wait()
            self._readers += 1
        try:
            yield
        finally:
            with self._cv:
                self._readers -= 1
                if not self._readers:
                    self._cv.notify_all()

    @contextmanager
    def write(self):
        with self._cv:
            self._waiting += 1
            while self._writer or self._readers:
                self._cv.wait()
            self._waiting -= 1
            self._writer = True
        try:
            yield
        finally:
            with self._cv:
                self._writer = False
                self._cv.notify_all()


def load_model(path: str | Path) -> RetrievalModel | LearnedRetrievalModel:
    """The model in an artifact: a learned one (``sterling train``) or an index model."""
    if read_artifact(path, verify=False)[0]["kind"] == "learned_retrieval_model":
        return LearnedRetrievalModel.load(path)
    return RetrievalModel.load(path)


class LiveModel:
    """A ``RetrievalModel`` or ``LearnedRetrievalModel`` plus the guard, update log and snapshots that keep it fresh."""

    @dataclass(kw_only=True, slots=True)
    class Config:
        """
        Args:
            data_dir: where snapshots and the log live; ``None`` = in memory only
                (updates are applied but not durable).
            snapshot_every: take a snapshot after this many batches (0 = only
                when ``snapshot()`` is called).
            fsync: fsync the log per batch (group commit). Off only for tests
                and benchmarks that measure the apply path alone.
            compact_waste: free slots per live item above which a background
                compaction starts (0 = never automatically).
            update_backend: how batches are written into the index tensors:
                ``"kernel"`` (one compiled, GIL-free call per batch; CPU),
                ``"torch"`` (tensor ops; any device) or ``None`` (the kernel
                where it can run). Both produce the same tensors.
        """

        data_dir: str | Path | None = None
        snapshot_every: int = 0
        fsync: bool = True
        compact_waste: float = 1.0
        update_backend: str | None = None

        def __post_init__(self) -> None:
            if self.snapshot_every < 0:
                raise InvalidInputError(f"snapshot_every ({self.snapshot_every}) must be ≥ 0")
            if self.compact_waste < 0:
                raise InvalidInputError(f"compact_waste ({self.compact_waste}) must be ≥ 0")
            if self.update_backend is not None and self.update_backend not in upd.BACKENDS:
                raise InvalidInputError(
                    f"update_backend {self.update_backend!r} is not one of {upd.BACKENDS} (or None)"
                )

    def __init__(self, model: RetrievalModel | LearnedRetrievalModel, config: Config, *, wal: UpdateLog | None,
                 applied: int) -> None:
        self.model = model
        self.learned = isinstance(model, LearnedRetrievalModel)
        if self.learned:
            model.eval()
        self.config = config
        self.guard = ReadWriteGuard()
        self._wal = wal
        self._seq_lock = threading.Lock()  # assigns sequence numbers; log order = apply order
        self.local_repacks = 0  # overflows answered by laying out a window of lists again
        self.repacks = 0  # overflows answered by re-packing the whole index
        self._next_seq = applied + 1
        self._applied = applied
        self._apply_cv = threading.Condition()
        self._since_snapshot = 0
        self._compactor: threading.Thread | None = None
        self._closed = False

    # ------------------------------------------------------------ open / recover
    @classmethod
    def open(cls, model: RetrievalModel | LearnedRetrievalModel | str | Path, config: Config | None = None) -> LiveModel:
        """Recover from ``config.data_dir`` (newest snapshot + log), else start from ``model``."""
        config = config or cls.Config()
        if config.data_dir is None:
            m = model if isinstance(model, (RetrievalModel, LearnedRetrievalModel)) else load_model(model)
            return cls(m, config, wal=None, applied=0)
        d = Path(config.data_dir)
        d.mkdir(parents=True, exist_ok=True)
        for tmp in d.glob("snapshot-*.st.tmp-*"):
            log.warning("deleting %s, left by an interrupted snapshot", tmp)
            tmp.unlink()
        m, covered = None, 0
        for seq, path in reversed(_snapshots(d)):
            try:
                m = load_model(path)
                covered = int(read_artifact(path, verify=False)[0]["meta"].get("log_seq", seq))
                break
            except ArtifactError as e:
                log.error("snapshot %s is unreadable (%s); trying an older one", path, e)
        if m is None:
            m = model if isinstance(model, (RetrievalModel, LearnedRetrievalModel)) else load_model(model)
        given = model if isinstance(model, (RetrievalModel, LearnedRetrievalModel)) else None
        if given is not None and isinstance(given, LearnedRetrievalModel) != isinstance(m, LearnedRetrievalModel):
            raise ArtifactError(
                f"{d} holds snapshots of a {'learned' if isinstance(m, LearnedRetrievalModel) else 'index'} model "
                "but the model given is not one; serve it with the model the data directory was made for, or a "
                "fresh --data-dir"
            )
        wal = UpdateLog.open(d, fsync=config.fsync)
        live = cls(m, config, wal=wal, applied=covered)
        n = 0
        for rec in wal.replay(after=covered):
            live._apply_record(rec)
            live._applied = rec.seq
            n += 1
        live._next_seq = max(live._applied, wal.last_seq) + 1
        if n:
            log.info("recovered %s: snapshot at sequence %d + %d logged batches → version %d",
                     d, covered, n, live.version)
        return live

    @property
    def version(self) -> int:
        return int(self.model.index.version)

    @property
    def index(self):
        """The served ``ItemIndex`` (read it under ``guard.read()`` while writers run)."""
        return self.model.index

    @property
    def tower(self):
        return getattr(self.model, "tower", None)

    def holding(self, ids: list[int]) -> list[bool]:
        """Whether each external id is in the index now."""
        with self.guard.read():
            return [s >= 0 for s in upd.slot_map(self.model.index).lookup(ids)]

    @property
    def applied_seq(self) -> int:
        """Sequence number of the last batch applied (and durable)."""
        return self._applied

    # ------------------------------------------------------------------ reads
    def __call__(self, *, min_version: int = 0, timeout: float | None = None, **kwargs) -> RetrievalOutput:
        """The model's ``forward`` under the read guard (a learned model's without autograd: serving);
        waits for ``min_version`` first."""
        if min_version:
            self.wait_for_version(min_version, timeout)
        with self.guard.read(), torch.no_grad() if self.learned else nullcontext():
            return self.model(**kwargs)

    def search(self, xq, **kwargs) -> RetrievalOutput:
        return self(query=xq, **kwargs)

    def wait_for_version(self, version: int, timeout: float | None) -> None:
        """Block until ``version`` is applied; ``VersionTimeoutError`` after ``timeout`` seconds."""
        end = None if timeout is None else time.monotonic() + timeout
        with self._apply_cv:
            while self.version < version:
                left = None if end is None else end - time.monotonic()
                if left is not None and left <= 0:
                    raise VersionTimeoutError(
                        f"version {version} not reached within the deadline (at {self.version}); "
                        "retry later or with a longer deadline"
                    )
                self._apply_cv.wait(left)

    # ----------------------------------------------------------------- writes
    def upsert(self, ids, embeddings=None, attributes=None, *, item_features=None) -> int:
        """Insert or replace items; returns the version that contains them (durable).

        ``stage_upsert`` + ``apply_staged`` (see there).
        """
        return self.apply_staged(self.stage_upsert(ids, embeddings, attributes, item_features=item_features))

    def stage_upsert(self, ids, embeddings=None, attributes=None, *, item_features=None) -> Staged:
        """Validate, encode and log an upsert batch (durable once this returns), without applying it.

        Args:
            ids: [n] external ids, unique, ≥ 0.
            embeddings: [n, D] vectors (index models).
            attributes: ``None`` or one list of ``feature:value`` terms per item.
            item_features: learned models: a ``FeatureTable`` whose ``ids`` are
                ``ids`` (the items-table layout, docs/data.md), or ``ItemInputs``.
        Raises:
            ItemFeaturesError: embeddings for a learned model, item features for an index model.
        """
        upd.check_upsert_kind(learned=self.learned, embeddings=embeddings, item_features=item_features)
        if self.learned:
            return self._upsert_features(ids, attributes, item_features)
        if embeddings is None:
            raise InvalidInputError("upsert needs embeddings, one [D] row per id")
        batch = upd.prepare_upsert(self.model.index, ids, embeddings, attributes)
        meta = batch.attributes
        shape = (batch.ids.numel(), self.model.index.dim)
        if isinstance(embeddings, np.ndarray) and embeddings.dtype == np.float32 and embeddings.shape == shape:
            vec = np.ascontiguousarray(embeddings)
        else:
            vec = np.ascontiguousarray(torch.as_tensor(embeddings).detach().float().cpu().reshape(shape).numpy())
        return self._stage(RecordKind.UPSERT, batch.ids.numpy(), vec, meta, prepared=batch)

    def _upsert_features(self, ids, attributes, item_features) -> Staged:
        id_t = upd.check_batch_ids(ids, "upsert")
        if isinstance(item_features, FeatureTable):
            got = np.asarray(item_features.ids, dtype=np.int64).reshape(-1)
            if got.shape != (id_t.numel(),) or not np.array_equal(got, id_t.numpy()):
                raise InvalidInputError(
                    f"item_features hold ids {got[:5].tolist()}… for upsert ids {id_t[:5].tolist()}…; give one "
                    "features row per id, in the same order"
                )
            inputs = self.model.item_inputs(item_features)
        elif isinstance(item_features, ItemInputs):
            inputs = item_features
        else:
            raise ItemFeaturesError(
                f"item_features is a {type(item_features).__name__}; give a FeatureTable "
                "(sterling.model.data.read_features(path, 'item_id')) or ItemInputs"
            )
        if len(inputs) != id_t.numel():
            raise InvalidInputError(f"{id_t.numel()} ids but item features for {len(inputs)} items")
        prepared = self._prepare_features(id_t, inputs, attributes)
        empty = np.zeros((id_t.numel(), 0), np.float32)
        return self._stage(RecordKind.UPSERT_FEATURES, id_t.numpy(), empty, prepared[0].attributes,
                            prepared=prepared, features=inputs)

    def _prepare_features(self, id_t: torch.Tensor, inputs: ItemInputs, attributes):
        """(index batch, [n, C] fp32 cache rows): embed with the item tower, then encode as a vector upsert."""
        E = self.model.embed_items(inputs)
        batch = upd.prepare_upsert(self.model.index, id_t, E, attributes)
        with torch.no_grad():
            rows = self.model.overarch.item_side(E).detach().float()
        return batch, rows

    def _holding_cache(self, plan_fn):
        """``guard.write`` that also applies the cache plan ``plan_fn()`` made just before, when the index
        batch inside bumped the version (an apply that changed nothing — full lists — leaves the cache too)."""
        cache, index = self.model.cache, self.model.index
        plan = plan_fn()

        @contextmanager
        def exclusive():
            with self.guard.write():
                v0 = int(index.version)
                yield
                if int(index.version) != v0:
                    cache.apply(plan)

        return exclusive

    def delete(self, ids) -> int:
        """Delete items by id (absent ids are ignored); returns the version without them."""
        return self.apply_staged(self.stage_delete(ids))

    def stage_delete(self, ids) -> Staged:
        """Log a delete batch (durable once this returns), without applying it."""
        id_t = upd.check_batch_ids(ids, "delete")
        return self._stage(RecordKind.DELETE, id_t.numpy(), np.zeros((id_t.numel(), 0), np.float32), None)

    def update_attributes(self, ids, attributes) -> int:
        """Replace the terms of existing items (``sterling.model.updates.update_attributes``)."""
        id_t = upd.check_batch_ids(ids, "update_attributes")
        lists = [list(dict.fromkeys(t)) for t in attributes]
        upd._positions_of(self.model.index, id_t.tolist())  # unknown ids fail before logging
        for i, terms in zip(id_t.tolist(), lists):
            if isinstance(terms, str):
                raise InvalidInputError(f"attributes of id {i} are a string; give a list of terms")
            for term in terms:
                upd.validate_term(term, where=f" of id {i}")
        if len(lists) != id_t.numel():
            raise InvalidInputError(f"{id_t.numel()} ids but {len(lists)} attribute lists")
        return self.apply_staged(
            self._stage(RecordKind.ATTRIBUTES, id_t.numpy(), np.zeros((id_t.numel(), 0), np.float32), lists))

    def _stage(self, kind: RecordKind, ids: np.ndarray, vec: np.ndarray, meta, *, prepared=None,
               features: ItemInputs | None = None) -> Staged:
        if self._closed:
            raise InvalidInputError("this LiveModel is closed; open the data directory again")
        with self._seq_lock:
            seq = self._next_seq
            self._next_seq += 1
            rec = LogRecord(kind, seq, ids, vec, meta, features)
            if self._wal is not None:
                self._wal.append(rec)
        if self._wal is not None:
            self._wal.sync(seq)
        return Staged(rec, prepared)

    def make_room(self, staged: Staged) -> None:
        """Re-pack now (queries keep running) when a staged vector upsert would not fit its lists, so that
        ``apply_staged`` under a caller's outer lock does not re-pack inside it. Call it when every batch
        staged before ``staged`` is applied."""
        if staged.record.kind is not RecordKind.UPSERT or staged.prepared is None:
            return
        needed, fits = upd.free_slots_needed(self.model.index, staged.prepared)
        if not fits:
            self._make_room(needed)

    def _make_room(self, needed) -> None:
        """Give the lists that lack free slots ``needed`` of them: by laying out again only the
        neighbouring lists around each (``updates.local_repack``, O(window)), or — when that
        would span a quarter of the lists — by re-packing the whole index with fresh slack. The
        new layout is worked out while queries keep running; installing it holds them out."""
        index = self.model.index
        local = upd.local_repack(index, needed)
        if local is not None:
            with self.guard.write():
                upd.install_local(index, local)
            self.local_repacks += 1
            return
        layout = upd.repack(index, extra=needed)
        with self.guard.write():
            upd.install_layout(index, layout)
        self.repacks += 1

    def apply_staged(self, staged: Staged, *, maintenance: bool = True) -> int:
        """Apply a staged batch (after every batch staged before it); returns the version it produced.

        Every staged batch must be applied, in any thread: later batches wait
        for it. ``maintenance=False`` skips the automatic snapshot / compaction
        check (call ``maintain()`` later) — for a caller that applies batches
        of several models under one outer lock and wants no snapshot inside it.
        """
        rec, prepared, seq = staged.record, staged.prepared, staged.record.seq
        with self._apply_cv:
            while self._applied != seq - 1:
                self._apply_cv.wait()
        try:
            version = self._apply_record(rec, prepared)
        finally:
            with self._apply_cv:
                self._applied = seq
                self._apply_cv.notify_all()
        if maintenance:
            self.maintain()
        return version  # this batch's version (later batches may already be applied)

    def _apply_record(self, rec: LogRecord, prepared=None) -> int:
        """Apply one logged batch; returns the version it produced."""
        index = self.model.index
        upsert = rec.kind in (RecordKind.UPSERT, RecordKind.UPSERT_FEATURES)
        if upsert and (rec.kind is RecordKind.UPSERT_FEATURES) != self.learned:
            raise ItemFeaturesError(
                f"update log record {rec.seq} is a {rec.kind.name} batch but this is "
                f"{'a learned' if self.learned else 'an index'} model; open the data directory with the model "
                "it was written for"
            )
        if upsert:
            exclusive = self.guard.write
            if rec.kind is RecordKind.UPSERT_FEATURES:
                ids_t = torch.from_numpy(rec.ids)
                batch, rows = prepared or self._prepare_features(ids_t, rec.features, rec.meta)
                exclusive = self._holding_cache(lambda: self.model.cache.plan_upsert(ids_t, rows))
            else:
                batch = prepared or upd.prepare_upsert(index, rec.ids, torch.from_numpy(rec.vectors), rec.meta)
            backend = self.config.update_backend
            try:
                return upd.apply_upsert(index, batch, exclusive=exclusive, backend=backend)
            except upd.ListsFullError as full:  # nothing was applied: make room, then apply
                self._make_room(full.needed)
                return upd.apply_upsert(index, batch, exclusive=exclusive, backend=backend)
        if rec.kind is RecordKind.DELETE:
            ids_t = torch.from_numpy(rec.ids)
            exclusive = self.guard.write
            if self.learned:
                exclusive = self._holding_cache(lambda: self.model.cache.plan_delete(ids_t))
            return upd.apply_delete(index, ids_t, exclusive=exclusive, backend=self.config.update_backend)[1]
        with self.guard.write():
            upd.update_attributes(index, torch.from_numpy(rec.ids), rec.meta)
            return int(index.version)

    def maintain(self) -> None:
        """The automatic snapshot (``snapshot_every``) and background compaction (``compact_waste``) checks."""
        self._since_snapshot += 1
        if self.config.snapshot_every and self._since_snapshot >= self.config.snapshot_every:
            try:
                self.snapshot()
            except SnapshotError:  # the batch is durable in the log; a later batch retries the snapshot
                log.exception("automatic snapshot failed; updates stay durable in the log")
        waste = self.config.compact_waste
        index = self.model.index
        if waste and self._compactor is None:
            live = max(upd.slot_map(index).live_items, 1)
            if index.capacity > (1.0 + index.config.list_slack + waste) * live:
                self._compactor = threading.Thread(target=self._background_compact, daemon=True)
                self._compactor.start()

    def _background_compact(self) -> None:
        try:
            self.compact()
        except Exception:  # pragma: no cover - logged, the index keeps serving
            log.exception("background compaction failed; the index keeps its current layout")
        finally:
            self._compactor = None

    # ----------------------------------------------------------- maintenance
    def compact(self) -> int:
        """Re-pack every list (live items only, fresh slack); returns bytes freed.

        Queries keep running while the new layout is built; writers wait.
        """
        index = self.model.index
        with self._seq_lock:  # no new batches; the pending ones finish first
            with self._apply_cv:
                while self._applied != self._next_seq - 1:
                    self._apply_cv.wait()
            before = upd.footprint(index) + self._cache_bytes()
            layout = upd.repack(index)
            cache_plan = self.model.cache.plan_compact() if self.learned else None
            with self.guard.write():
                upd.install_layout(index, layout)
                if cache_plan is not None:
                    self.model.cache.apply(cache_plan)
            return before - upd.footprint(index) - self._cache_bytes()

    def _cache_bytes(self) -> int:
        if not self.learned:
            return 0
        return sum(t.numel() * t.element_size() for t in self.model.cache.buffers())

    def snapshot(self) -> Path | None:
        """Write the whole model as of the last applied batch; truncate the log it covers.

        Raises ``SnapshotError`` when the file cannot be written (disk full);
        nothing is deleted then, so recovery still finds every batch.
        """
        if self._wal is None:
            return None
        d = Path(self.config.data_dir)
        with self._seq_lock:  # no new batches; the pending ones finish first
            with self._apply_cv:
                while self._applied != self._next_seq - 1:
                    self._apply_cv.wait()
            covered = self._wal.rotate()
            with self.guard.read():  # a consistent copy; queries continue
                tensors, meta = _model_parts(self.model)
            # from here on pick free slots as a recovery from this snapshot will (each list's
            # lowest free slot first): replaying the log after it then rebuilds this very layout
            upd.fresh_slot_map(self.model.index)
            self._since_snapshot = 0
        path = d / f"snapshot-{covered:020d}.st"
        try:
            kind = "learned_retrieval_model" if self.learned else "retrieval_model"
            write_artifact(path, kind=kind, meta={**meta, "log_seq": covered}, tensors=tensors)
        except OSError as e:  # disk full, quota, I/O error: write_artifact removed its temp file
            raise SnapshotError(
                f"snapshot {path} could not be written ({e.strerror or e}); the previous snapshot and the "
                "update log still hold every acknowledged batch. Free space in the data directory and call "
                "snapshot() again"
            ) from e
        for seq, old in _snapshots(d):
            if seq < covered:
                old.unlink()
        self._wal.truncate(covered)
        return path

    def close(self) -> None:
        t = self._compactor
        if t is not None:
            t.join()
        self._closed = True
        if self._wal is not None:
            self._wal.close()


def _model_parts(model: RetrievalModel | LearnedRetrievalModel) -> tuple[dict[str, torch.Tensor], dict]:
    """Copies of the model's tensors and its artifact metadata (as ``RetrievalModel.save`` /
    ``LearnedRetrievalModel.save``)."""
    from dataclasses import asdict

    if isinstance(model, LearnedRetrievalModel):
        tensors, meta = model.artifact_parts()
        meta["index"] = {**meta["index"], "vocab": list(model.index.vocab)}
        return {n: t.detach().clone() for n, t in tensors.items()}, meta
    index = model.index
    tensors = {f"index.{n}": t.detach().clone() for n, t in index.tensors().items()}
    meta: dict = {"index": index.meta(), "tower": None}
    meta["index"]["vocab"] = list(index.vocab)
    if model.tower is not None:
        tensors.update({f"tower.{n}": t.detach().clone() for n, t in model.tower.state_dict().items()})
        meta["tower"] = asdict(model.tower.config)
    return tensors, meta


def _snapshots(d: Path) -> list[tuple[int, Path]]:
    out = []
    for p in d.glob("snapshot-*.st"):
        try:
            out.append((int(p.stem.split("-")[1]), p))
        except (IndexError, ValueError):
            continue
    return sorted(out)
