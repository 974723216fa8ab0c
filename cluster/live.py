"""Updates through the one-process cluster: one ``LiveModel`` per shard, routed by list.

An upsert goes to the shard that owns its item's nearest list (the head
model's centroids, as the build assigns); every other shard deletes those
ids, so an item that moved lists leaves its old shard in the same request.
To keep shard versions in step, every shard applies exactly the same number
of batches per request (an upsert batch, possibly empty, then a delete
batch), in one order: requests are serialised by a lock. Each shard's log
numbers its batches (per-shard sequence numbers); ``DIR/shard-NNNN`` holds
its snapshots and log.

A crash between two shards' commits of one request leaves the request
unacknowledged and the shards one batch apart in version; Retrieve then
reports the skew, and ``min_version`` waits for the lowest shard.

A learned model (``sterling train``) keeps its item index in the shards and
its OverArch item cache in the router (``LearnedHead``). Its upserts carry
item features: the router embeds them once with the item tower, the shards
take the vectors (routed as above), and the cache takes the rows
(``LiveCache``, durable in ``DIR/head``: its own log of the features and
deletes, and cache snapshots). Each request is logged everywhere first, then
applied to every shard and to the cache under one hold of the router's guard
(``LearnedHead.guard``; queries hold its read side from fan-out to rerank), so
a query sees the whole request or none of it — never a new index entry with
an old cache row. Remote shards (Ray, ``parallel=True``) log and apply a batch
in one call, so there the cache's record is logged first and the guard is held
across the shards' commits and the cache's apply (``_commit_remote``).

The shards behind ``LiveShards`` need only the ``LiveModel`` write surface
(``upsert``, ``delete``, ``update_attributes``, ``holding``, ``version``,
``applied_seq``, ``wait_for_version``): on Ray each one is a
``sterling.cluster.ray_live.ReplicatedShard`` that sends every numbered batch
to all replicas of the shard, each a ``LiveReplica`` inside its actor.
"""

from __future__ import annotations

import concurrent.futures as cf
import logging
import threading
from pathlib import Path

import numpy as np
import torch

from sterling.cluster.backends import LocalBackend
from sterling.cluster.errors import ReplicaOrderError
from sterling.cluster.learned_head import LearnedHead
from sterling.cluster.router import Router, RouterConfig
from sterling.cluster.shard import ShardServer
from sterling.model import updates as upd
from sterling.model.artifact import read_artifact, write_artifact
from sterling.model.data import FeatureTable
from sterling.model.errors import ArtifactError, InvalidInputError, SnapshotError
from sterling.model.learned import CachePlan, LearnedRetrievalModel
from sterling.model.live import LiveModel, load_model
from sterling.model.retrieval import RetrievalModel
from sterling.model.wal import LogRecord, RecordKind, UpdateLog
from sterling.sharding.documents import balanced_list_ranges, slice_model

__all__ = ["LiveCache", "LiveReplica", "LiveShards", "live_router"]

log = logging.getLogger("sterling.live")


class LiveCache:
    """A learned model's OverArch item cache in the router, durable on its own (``DIR/head``).

    Log records: ``upsert_features`` (ids, the item tower's inputs) and
    ``delete``; snapshots ``cache-<seq>.st`` hold the cache buffers. Recovery
    = newest snapshot + replay, re-embedding the logged features with the
    same item tower. Writes are staged (logged, durable) by ``stage`` and
    applied by ``apply`` under the caller's writer guard.
    """

    def __init__(self, model: LearnedRetrievalModel, data_dir: str | Path, *, snapshot_every: int = 1000,
                 fsync: bool = True) -> None:
        self.model = model
        self.data_dir = Path(data_dir)
        self.snapshot_every = snapshot_every
        self.data_dir.mkdir(parents=True, exist_ok=True)
        covered = 0
        for tmp in self.data_dir.glob("cache-*.st.tmp-*"):
            tmp.unlink()
        for _seq, path in reversed(self._snapshots()):
            try:
                h, tensors = read_artifact(path)
            except ArtifactError as e:
                log.error("cache snapshot %s is unreadable (%s); trying an older one", path, e)
                continue
            layout = dict(tensors)
            layout["data"] = model.overarch.adapt_cache(layout["data"])  # written by an earlier cache layout
            model.cache.apply(CachePlan(rows=torch.zeros(0, dtype=torch.int64), data=None, scale=None, live=True,
                                        layout=layout))
            covered = int(h["meta"]["log_seq"])
            break
        self._wal = UpdateLog.open(self.data_dir, fsync=fsync)
        self.applied_seq = covered
        self._since_snapshot = 0
        for rec in self._wal.replay(after=covered):
            self.apply(self._plan(rec))
            self.applied_seq = rec.seq
        self._next_seq = max(self.applied_seq, self._wal.last_seq) + 1

    def _snapshots(self) -> list[tuple[int, Path]]:
        out = []
        for p in self.data_dir.glob("cache-*.st"):
            try:
                out.append((int(p.stem.split("-")[1]), p))
            except (IndexError, ValueError):
                continue
        return sorted(out)

    def stage(self, kind: RecordKind, ids: np.ndarray, features=None, rows: torch.Tensor | None = None):
        """Log one batch (durable when this returns); ``rows`` [n, C]: the cache rows already computed."""
        rec = LogRecord(kind, self._next_seq, np.ascontiguousarray(ids, dtype=np.int64),
                        np.zeros((len(ids), 0), np.float32), None, features)
        self._wal.append(rec)
        self._next_seq += 1
        self._wal.sync(rec.seq)
        return rec, rows

    def _plan(self, staged) -> tuple[int, CachePlan]:
        rec, rows = staged if isinstance(staged, tuple) else (staged, None)
        ids = torch.from_numpy(rec.ids)
        if rec.kind is RecordKind.DELETE:
            return rec.seq, self.model.cache.plan_delete(ids)
        if rows is None:
            with torch.no_grad():
                rows = self.model.overarch.item_side(self.model.embed_items(rec.features))
        return rec.seq, self.model.cache.plan_upsert(ids, rows.detach().float())

    def plan(self, staged) -> tuple[int, CachePlan]:
        """The cache change of a staged batch (made from the current cache; apply it next)."""
        return self._plan(staged)

    def apply(self, planned: tuple[int, CachePlan]) -> None:
        seq, plan = planned
        self.model.cache.apply(plan)
        self.applied_seq = seq
        self._since_snapshot += 1

    def maintain(self) -> None:
        if self.snapshot_every and self._since_snapshot >= self.snapshot_every:
            try:
                self.snapshot()
            except SnapshotError:
                log.exception("automatic cache snapshot failed; updates stay durable in the log")

    def snapshot(self) -> Path:
        """Write the cache as of the last applied batch; truncate the log it covers.

        Called by the one writer (``LiveShards`` holds its request lock), so the copy is consistent.
        """
        covered = self._wal.rotate()
        tensors = {n: t.detach().clone() for n, t in self.model.cache.state_dict().items()}
        self._since_snapshot = 0
        path = self.data_dir / f"cache-{covered:020d}.st"
        try:
            write_artifact(path, kind="embedding_cache", meta={"log_seq": covered}, tensors=tensors)
        except OSError as e:
            raise SnapshotError(f"cache snapshot {path} could not be written ({e.strerror or e}); the update log "
                                "still holds every acknowledged batch. Free space and retry") from e
        for seq, old in self._snapshots():
            if seq < covered:
                old.unlink()
        self._wal.truncate(covered)
        return path

    def close(self) -> None:
        self._wal.close()


class LiveShards:
    """The shards' ``LiveModel``s and the routing of update requests to them."""

    def __init__(self, head: RetrievalModel, ranges: list[tuple[int, int]], lives: list, *,
                 parallel: bool = False, learned: LearnedHead | None = None, cache: LiveCache | None = None) -> None:
        self.head = head
        self.learned, self.cache = learned, cache
        self.ranges = ranges
        self.lives = lives
        self._starts = np.array([r[0] for r in ranges])
        self._lock = threading.Lock()
        # remote shards (Ray): the shards of one request commit concurrently, each in its own order
        self._pool = cf.ThreadPoolExecutor(len(lives), thread_name_prefix="sterling-upd") if parallel else None

    def _each(self, fn) -> None:
        """``fn(s, live)`` for every shard: in turn, or concurrently when ``parallel``; returns once every
        shard's call has ended (none still running behind a caller's guard), then re-raises the first error."""
        if self._pool is None:
            for s, live in enumerate(self.lives):
                fn(s, live)
            return
        futures = [self._pool.submit(fn, s, live) for s, live in enumerate(self.lives)]
        cf.wait(futures)
        for f in futures:
            f.result()

    def shard_versions(self) -> list[int]:
        """Per shard, the version every acknowledged batch is in (reads are answered from it or later)."""
        return [int(live.version) for live in self.lives]

    @classmethod
    def open(cls, model: RetrievalModel | LearnedRetrievalModel, num_shards: int, data_dir: str | Path, *,
             snapshot_every: int = 1000) -> LiveShards:
        """Shards recovered from ``data_dir/shard-NNNN`` (and, for a learned model, the cache from ``data_dir/head``)."""
        learned = cache = None
        if isinstance(model, LearnedRetrievalModel):
            learned = LearnedHead(model)
            cache = LiveCache(learned.model, Path(data_dir) / "head", snapshot_every=snapshot_every)
            model = RetrievalModel(model.index)
        ranges = balanced_list_ranges(model.index, num_shards)
        lives = []
        for s, r in enumerate(ranges):
            sub = slice_model(model, r) if num_shards > 1 else model
            cfg = LiveModel.Config(data_dir=Path(data_dir) / f"shard-{s:04d}", snapshot_every=snapshot_every)
            lives.append(LiveModel.open(sub, cfg))
        return cls(slice_model(model, (0, 0)), ranges, lives, learned=learned, cache=cache)

    @property
    def version(self) -> int:
        """The lowest shard version (every shard has applied at least this much)."""
        return min(live.version for live in self.lives)

    def replica_states(self) -> list[dict]:
        """Per replica of every shard: ``shard, replica, seq, version, in_sync`` (in-process shards: one each)."""
        out = []
        for s, live in enumerate(self.lives):
            if hasattr(live, "replica_states"):
                out.extend(live.replica_states())
            else:
                out.append({"shard": s, "replica": 0, "seq": live.applied_seq, "version": live.version,
                            "in_sync": True})
        return out

    @property
    def applied_batches(self) -> int:
        return sum(live.applied_seq for live in self.lives)

    def wait_for_version(self, version: int, timeout: float | None) -> None:
        for live in self.lives:
            live.wait_for_version(version, timeout)

    def upsert(self, ids, embeddings=None, attributes=None, *, item_features: FeatureTable | None = None
               ) -> tuple[int, int]:
        """(items upserted, version); durable on every shard when it returns.

        Index models take ``embeddings``; learned models ``item_features`` (a
        ``FeatureTable`` for ``ids``), anything else is an ``ItemFeaturesError``.
        """
        upd.check_upsert_kind(learned=self.cache is not None, embeddings=embeddings, item_features=item_features)
        if self.cache is not None:
            return self._upsert_features(ids, attributes, item_features)
        if embeddings is None:
            raise InvalidInputError("upsert needs embeddings, one [D] row per id")
        batch = upd.prepare_upsert(self.head.index, ids, embeddings, attributes)  # validated once here
        owner = np.searchsorted(self._starts, batch.lists.numpy(), side="right") - 1
        x = torch.as_tensor(embeddings).detach().float().reshape(batch.ids.numel(), self.head.index.dim)

        def one(s: int, live) -> None:
            own = torch.from_numpy(owner == s)
            attrs = None if batch.attributes is None else [a for a, o in zip(batch.attributes, own.tolist()) if o]
            live.upsert(batch.ids[own], x[own], attrs)
            live.delete(batch.ids[~own])

        with self._lock:
            self._each(one)
        return batch.ids.numel(), self.version

    def _upsert_features(self, ids, attributes, item_features) -> tuple[int, int]:
        head = self.learned.model
        id_t = upd.check_batch_ids(ids, "upsert")
        got = np.asarray(item_features.ids, dtype=np.int64).reshape(-1)
        if not np.array_equal(got, id_t.numpy()):
            raise InvalidInputError(f"item_features hold {got.size} ids for {id_t.numel()} upsert ids; give one "
                                    "features row per id, in the same order")
        inputs = head.item_inputs(item_features)
        E = head.embed_items(inputs)
        with torch.no_grad():
            rows = head.overarch.item_side(E).detach().float()
        batch = upd.prepare_upsert(self.head.index, id_t, E, attributes)  # validated here, before any log
        owner = np.searchsorted(self._starts, batch.lists.numpy(), side="right") - 1
        if self._pool is not None:  # remote shards (Ray): each commits its own numbered batches

            def one(s: int, live) -> None:
                own = torch.from_numpy(owner == s)
                attrs = None if batch.attributes is None else [a for a, o in zip(batch.attributes, own.tolist()) if o]
                live.upsert(id_t[own], E[own], attrs)
                live.delete(id_t[~own])

            with self._lock:
                self._commit_remote(self.cache.stage(RecordKind.UPSERT_FEATURES, id_t.numpy(), inputs, rows), one)
            return id_t.numel(), self.version
        with self._lock:
            staged = []
            try:
                staged.append((self.cache, self.cache.stage(RecordKind.UPSERT_FEATURES, id_t.numpy(), inputs, rows)))
                for s, live in enumerate(self.lives):
                    own = torch.from_numpy(owner == s)
                    attrs = None if batch.attributes is None else [a for a, o in zip(batch.attributes, own.tolist())
                                                                   if o]
                    staged.append((live, live.stage_upsert(id_t[own], E[own], attrs)))
                    staged.append((live, live.stage_delete(id_t[~own])))
            finally:
                self._apply_all(staged)  # whatever was logged is applied, so later batches can follow it
        return id_t.numel(), self.version

    def _commit_remote(self, staged, fn) -> None:
        """One learned request over remote shards: ``staged`` (the cache's record, already durable), then
        ``fn(s, shard)`` on every shard, each shard's batches committed on all its replicas.

        Remote shards log and apply a batch in one call, so the router's
        writer guard is held across the shards' commits and the cache's apply:
        queries wait for the request (a remote fsync per shard, ~ms; up to a
        straggler's ``straggler_s`` when a replica is away) and see the whole
        of it or none of it. The cache's row is applied even when a shard
        fails, as a restart would replay its log; the request then failed
        (UNAVAILABLE) and its retry — upserts and deletes are idempotent —
        brings the shards level. A delete is therefore in the cache once
        logged there: the OverArch drops a candidate without a live cache row,
        so a deleted item is never served after the delete is logged.
        """
        planned = self.cache.plan(staged)
        try:
            with self.learned.guard.write():
                try:
                    self._each(fn)
                finally:
                    self.cache.apply(planned)
        finally:
            self.cache.maintain()

    def _apply_all(self, staged: list) -> None:
        """Apply logged batches of the shards and the cache under one hold of the router's writer guard."""
        for who, st in staged:  # list overflow: re-pack before the hold, while queries run
            if who is not self.cache:
                who.make_room(st)
        planned = [(who, who.plan(st) if who is self.cache else st) for who, st in staged]
        with self.learned.guard.write():
            for who, st in planned:
                if who is self.cache:
                    who.apply(st)
                else:
                    who.apply_staged(st, maintenance=False)
        for who in {id(w): w for w, _ in staged}.values():
            who.maintain()

    def delete(self, ids) -> tuple[int, int]:
        """(items that existed and are gone, version)."""
        id_t = upd.check_batch_ids(ids, "delete")
        with self._lock:
            held = sum(sum(live.holding(id_t.tolist())) for live in self.lives)
            if self.cache is None:
                self._each(lambda s, live: live.delete(id_t))
                return held, self.version
            if self._pool is not None:
                self._commit_remote(self.cache.stage(RecordKind.DELETE, id_t.numpy()),
                                    lambda s, live: live.delete(id_t))
                return held, self.version
            staged = []
            try:
                staged.append((self.cache, self.cache.stage(RecordKind.DELETE, id_t.numpy())))
                staged.extend((live, live.stage_delete(id_t)) for live in self.lives)
            finally:
                self._apply_all(staged)
        return held, self.version

    def update_attributes(self, ids, attributes) -> tuple[int, int]:
        """(items updated, version). Every id must exist on some shard."""
        id_t = upd.check_batch_ids(ids, "update_attributes")
        lists = list(attributes)
        if len(lists) != id_t.numel():
            raise InvalidInputError(f"{id_t.numel()} ids but {len(lists)} attribute lists; give one per id")
        with self._lock:
            held = [live.holding(id_t.tolist()) for live in self.lives]
            missing = [i for j, i in enumerate(id_t.tolist()) if not any(h[j] for h in held)]
            if missing:
                raise InvalidInputError(
                    f"id {missing[0]} is not in the index; UpdateAttributes changes existing items — "
                    "add new items with Upsert"
                )

            def one(s: int, live) -> None:
                rows = [j for j, ok in enumerate(held[s]) if ok]
                live.update_attributes(id_t[rows], [lists[j] for j in rows])

            self._each(one)
        return id_t.numel(), self.version

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
        for live in self.lives:
            live.close()
        if self.cache is not None:
            self.cache.close()


class LiveReplica:
    """One replica of one document shard that applies the shard's numbered batches (in its Ray actor).

    The router numbers every batch of a shard (1, 2, 3, …) and sends the
    same ``LogRecord`` to every replica; a replica applies batch ``seq`` only
    right after ``seq − 1`` (``ReplicaOrderError`` otherwise), so all replicas
    of a shard hold the same batches in the same order, and the replica's
    ``LiveModel`` logs it under the same sequence number. Its data directory
    (snapshots + update log) is its own; a restarted replica recovers from it,
    then the router catches it up from a peer (``records_after`` from the
    peer's log, or the peer's whole state when the log no longer reaches back).

    Example:
        >>> rep = LiveReplica(RetrievalModel.load("shard-0000-of-0002.st"), "data/shard-0000/replica-0",
        ...                   shard=0, replica=0, lists=(0, 32))
        >>> rep.apply(LogRecord(RecordKind.DELETE, 1, np.array([7]), np.zeros((1, 0), np.float32)))
        (1, 2)
    """

    def __init__(self, model: RetrievalModel, data_dir: str | Path, *, shard: int, replica: int,
                 lists: tuple[int, int] | None = None, snapshot_every: int = 1000) -> None:
        self.data_dir = Path(data_dir)
        self.shard, self.replica, self.lists = shard, replica, lists
        self._config = LiveModel.Config(data_dir=self.data_dir, snapshot_every=snapshot_every)
        self._lock = threading.Lock()  # one batch (or catch-up step) at a time; searches run alongside
        self.live = LiveModel.open(model, self._config)
        self.server = ShardServer(self.live, shard=shard, replica=replica, lists=lists)

    def applied(self) -> tuple[int, int]:
        """(sequence number of the last batch applied, version)."""
        return self.live.applied_seq, self.live.version

    def apply(self, rec: LogRecord) -> tuple[int, int]:
        """Apply batch ``rec.seq`` (durable when this returns); returns ``applied()``."""
        with self._lock:
            return self._apply(rec)

    def apply_many(self, records: list[LogRecord]) -> tuple[int, int]:
        with self._lock:
            out = self.applied()
            for rec in records:
                out = self._apply(rec)
            return out

    def _apply(self, rec: LogRecord) -> tuple[int, int]:
        have = self.live.applied_seq
        if rec.seq != have + 1:
            raise ReplicaOrderError(
                f"shard {self.shard} replica {self.replica} has applied batches up to {have} and was sent "
                f"batch {rec.seq}; the router catches it up from a peer first"
            )
        if rec.kind is RecordKind.UPSERT:
            version = self.live.upsert(rec.ids, torch.from_numpy(rec.vectors), rec.meta)
        elif rec.kind is RecordKind.DELETE:
            version = self.live.delete(rec.ids)
        else:
            version = self.live.update_attributes(rec.ids, rec.meta)
        return self.live.applied_seq, version

    def holding(self, ids: list[int]) -> list[bool]:
        return self.live.holding(ids)

    def records_after(self, seq: int, limit: int = 256) -> list[LogRecord] | None:
        """Up to ``limit`` logged batches after ``seq``, in order; ``None`` when the log no longer holds
        batch ``seq + 1`` (a snapshot covered it): then copy ``state()`` instead."""
        from sterling.model.wal import _scan

        with self._lock:
            if seq >= self.live.applied_seq:
                return []
            wal = self.live._wal
            segs = wal.segments()
            out: list[LogRecord] = []
            for i, (_first, path) in enumerate(segs):
                if i + 1 < len(segs) and segs[i + 1][0] <= seq + 1:
                    continue  # every record of this segment is ≤ seq
                for _off, payload in _scan(path)[0]:
                    rec = LogRecord.decode(payload)
                    if rec.seq > seq:
                        out.append(rec)
                        if len(out) >= limit:
                            break
                if len(out) >= limit:
                    break
            if not out or out[0].seq != seq + 1:
                return None
            return out

    def state(self) -> tuple[dict[str, np.ndarray], dict, int]:
        """(tensors, artifact metadata, sequence number): a consistent copy of this replica's slice."""
        from sterling.model.live import _model_parts

        with self._lock:
            with self.live.guard.read():
                tensors, meta = _model_parts(self.live.model)
            return {n: t.numpy() for n, t in tensors.items()}, meta, self.live.applied_seq

    def install_state(self, state: tuple[dict[str, np.ndarray], dict, int]) -> tuple[int, int]:
        """Replace this replica's slice with a peer's ``state()``: written as this directory's newest
        snapshot (temp + rename) before the old log and snapshots go, so a crash at any point recovers
        either the old state or the new one."""
        import os

        from sterling.model.artifact import write_artifact
        from sterling.model.wal import _segment_name

        tensors, meta, seq = state
        with self._lock:
            path = self.data_dir / f"snapshot-{seq:020d}.st"
            write_artifact(path, kind="retrieval_model", meta={**meta, "log_seq": seq},
                           tensors={n: torch.from_numpy(np.ascontiguousarray(t)) for n, t in tensors.items()})
            self.live.close()  # after the write: a failed write leaves this replica as it was
            for p in self.data_dir.glob("wal-*.log"):
                p.unlink()
            for p in self.data_dir.glob("snapshot-*.st"):
                if p != path:
                    p.unlink()
            fd = os.open(self.data_dir / _segment_name(seq + 1), os.O_WRONLY | os.O_CREAT, 0o644)
            os.fsync(fd)
            os.close(fd)
            self.live = LiveModel.open(self.live.model, self._config)  # loads the snapshot just written
            server = ShardServer(self.live, shard=self.shard, replica=self.replica, lists=self.lists)
            server.warmup()
            self.server = server
            return self.applied()

    def close(self) -> None:
        self.live.close()


def live_router(model: RetrievalModel | LearnedRetrievalModel | str | Path, *, data_dir: str | Path,
                num_shards: int = 1, config: RouterConfig | None = None, snapshot_every: int = 1000
                ) -> tuple[Router, LiveShards]:
    """A ``Router`` over in-process shards that take updates, recovered from ``data_dir`` first
    (a learned model's router keeps the OverArch cache, recovered from ``data_dir/head``)."""
    if not isinstance(model, (RetrievalModel, LearnedRetrievalModel)):
        model = load_model(model)
    shards = LiveShards.open(model, num_shards, data_dir, snapshot_every=snapshot_every)
    servers = [[ShardServer(live, shard=s, lists=r)] for s, (r, live) in enumerate(zip(shards.ranges, shards.lives))]
    return Router(shards.head, LocalBackend(servers), config, learned=shards.learned), shards
