"""Updates through Ray shards: every replica of a shard applies the same numbered batches in order.

``sterling launch ray --data-dir DIR`` gives each shard actor a ``LiveReplica``
over ``DIR/shard-<s>/replica-<r>/`` (its own snapshots and update log, on the
disk of the node it runs on; the placement group keeps a restarted actor on
that node). Replicas do not share a log: each one is a full, independent copy,
so losing a node's disk loses one replica, not the shard.

``ReplicatedShard`` is the router's side of one shard:

* it numbers the shard's batches (``seq`` = 1, 2, 3, …) and sends each
  ``LogRecord`` to every in-sync replica at once; the batch is acknowledged
  when every in-sync replica has logged (fsync) and applied it — or, when some
  fail or lag more than ``straggler_s`` behind the first, once at least one
  did; those drop out of sync (and out of the read rotation) until they are
  caught up;
* catch-up (``rejoin``, run by the backend's health prober when a replica
  answers ``ready()`` again, i.e. after its own snapshot + log recovery): the
  batches the replica lacks come from an in-sync peer's log
  (``records_after``) or, when a snapshot has already truncated that part of
  the peer's log, as the peer's whole state (``install_state``). Writes to the
  shard wait meanwhile; reads go on;
* reads: the router sends each shard's acknowledged version as the floor, and a
  replica below it refuses (``ReplicaBehindError``) so the next replica answers:
  no answer is older than an acknowledged write;
* a batch that no replica acknowledged leaves the shard *uncertain* (a replica
  may or may not have logged it before failing); writes to it fail with
  UNAVAILABLE until every replica answers again and all are brought to the
  newest sequence any of them holds. The same reconciliation runs at start-up.

A learned model (``sterling train``) on Ray: the shards hold its item index
and take plain vector batches as above; the router holds the ``LearnedHead``
and with it the OverArch's item-embedding cache, so the cache lives in the
router process, durable in ``DIR/head`` on the router's disk (a ``LiveCache``:
feature and delete records, cache snapshots). A feature upsert is embedded
once by the router's item tower; its record goes into the cache log first,
then the vectors to the owning shard (nearest centroid of the head model) and
a delete to every other shard (an item that moved leaves its old shard), and
the cache rows are applied — the shards' commits and the cache apply under
the write side of ``LearnedHead.guard``, which queries hold from fan-out to
rerank, so no query pairs a new index entry with an old cache row. A router
restarted on the same DIR recovers the cache from its snapshot + log, the
shards theirs from their own directories.

Example:
    >>> backend = RayBackend.launch(manifest, replicas=2, data_dir="data")
    >>> router, updates = ray_live_router(manifest, backend)
    >>> RetrievalServer(router, updates=updates).start()
"""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path

import numpy as np
import torch

from sterling.cluster.errors import ReplicaOrderError, ShardsUnavailableError
from sterling.cluster.learned_head import LearnedHead
from sterling.cluster.live import LiveCache, LiveShards
from sterling.cluster.router import Router, RouterConfig
from sterling.model.errors import InvalidInputError, VersionTimeoutError
from sterling.model.learned import LearnedRetrievalModel
from sterling.model.retrieval import RetrievalModel
from sterling.model.wal import LogRecord, RecordKind

__all__ = ["ReplicatedShard", "ray_live_router"]

log = logging.getLogger(__name__)

_CATCH_UP_CHUNK = 256  # batches per records_after call (bounds the memory of one catch-up step)


class ReplicatedShard:
    """One shard's write path over its replica actors (the ``LiveModel`` surface ``LiveShards`` uses).

    Args:
        backend: the ``RayBackend`` (actors ``backend.actors[shard]``, health marks).
        shard: the shard number.
        write_timeout_s: how long a batch waits for its first replica.
        straggler_s: once one replica has the batch durable, how much longer the
            others get before they are taken out of sync (and caught up later) —
            a replica that Ray is restarting does not stall the stream.
    """

    def __init__(self, backend, shard: int, *, write_timeout_s: float = 30.0, straggler_s: float = 1.0) -> None:
        self.backend = backend
        self.shard = shard
        self.write_timeout_s = write_timeout_s
        self.straggler_s = straggler_s
        self._lock = threading.RLock()  # one batch or catch-up at a time
        self._vcv = threading.Condition()  # acknowledged version
        self.seq = 0
        self._version = 0
        n = len(backend.actors[shard])
        self.in_sync = [False] * n
        self._uncertain = True  # until the first reconcile has seen every replica

    @property
    def actors(self):
        return self.backend.actors[self.shard]

    # ------------------------------------------------------------ state
    @property
    def version(self) -> int:
        """Version of the last acknowledged batch (every in-sync replica is at least there)."""
        return self._version

    @property
    def applied_seq(self) -> int:
        return self.seq

    def replica_states(self, timeout_s: float = 2.0) -> list[dict]:
        """Per replica: applied sequence number and version as it reports them, and whether it is in sync."""
        states = self._states(range(len(self.actors)), timeout_s)
        return [
            {"shard": self.shard, "replica": r, "seq": states[r][0] if r in states else -1,
             "version": states[r][1] if r in states else -1, "in_sync": self.in_sync[r]}
            for r in range(len(self.actors))
        ]

    def wait_for_version(self, version: int, timeout: float | None) -> None:
        end = None if timeout is None else time.monotonic() + timeout
        with self._vcv:
            while self._version < version:
                left = None if end is None else end - time.monotonic()
                if left is not None and left <= 0:
                    raise VersionTimeoutError(
                        f"version {version} not reached on shard {self.shard} within the deadline (at "
                        f"{self._version}); retry later or with a longer deadline"
                    )
                self._vcv.wait(left)

    def _set(self, seq: int, version: int) -> None:
        with self._vcv:
            self.seq, self._version = seq, version
            self._vcv.notify_all()

    def _states(self, replicas, timeout_s: float) -> dict[int, tuple[int, int]]:
        import ray

        refs = {self.actors[r].applied.remote(): r for r in replicas}
        ready, _ = ray.wait(list(refs), num_returns=len(refs), timeout=timeout_s)
        out = {}
        for ref in ready:
            try:
                out[refs[ref]] = tuple(ray.get(ref, timeout=0))
            except Exception:
                continue
        return out

    def _drop(self, r: int, why: str) -> None:
        if self.in_sync[r]:
            log.warning("shard %d replica %d out of sync (%s); it is caught up when it answers again",
                        self.shard, r, why)
        self.in_sync[r] = False
        self.backend._mark(self.shard, r, False)

    # ------------------------------------------------------- reconcile
    def reconcile(self, *, timeout_s: float = 10.0) -> bool:
        """Bring every answering replica to the newest batch any of them holds; True when ≥ 1 is in sync.

        While the shard is uncertain (start-up, or a batch no replica
        acknowledged) it needs every replica to answer.
        """
        with self._lock:
            n = len(self.actors)
            states = self._states(range(n), timeout_s)
            if not states or (self._uncertain and len(states) < n):
                return False
            src = max(states, key=lambda r: states[r][0])
            target, version = states[src]
            if not self._uncertain and target < self.seq:
                return False  # the replicas holding the acknowledged batches are all away: wait for them
            self._set(target, version)
            self._uncertain = False
            for r in range(n):
                if r == src:
                    self.in_sync[r] = True
                elif r in states:
                    self._catch_up(r, src, states[r][0], timeout_s)
                else:
                    self._drop(r, "not answering")
            return any(self.in_sync)

    def rejoin(self, r: int, timeout_s: float = 30.0) -> bool:
        """Catch replica ``r`` up (the backend prober calls this once it answers ``ready()``)."""
        with self._lock:
            if self.in_sync[r]:
                return True
            src = next((p for p in range(len(self.actors)) if self.in_sync[p] and p != r), None)
            if self._uncertain or src is None:
                return self.reconcile(timeout_s=timeout_s) and self.in_sync[r]
            state = self._states([r], timeout_s)
            if r not in state:
                return False
            self._catch_up(r, src, state[r][0], timeout_s)
            return self.in_sync[r]

    def _catch_up(self, r: int, src: int, have: int, timeout_s: float) -> None:
        import ray

        try:
            while have < self.seq:
                recs = ray.get(self.actors[src].records_after.remote(have, _CATCH_UP_CHUNK), timeout=timeout_s)
                if recs is None:  # the peer's log no longer reaches back: copy its whole slice
                    log.info("shard %d replica %d: copying replica %d's state (at batch %d)", self.shard, r, src,
                             self.seq)
                    have, _ = ray.get(self.actors[r].install_state.remote(self.actors[src].state.remote()),
                                      timeout=max(timeout_s, 120.0))
                    continue
                if not recs:
                    raise ReplicaOrderError(f"replica {src} of shard {self.shard} has no batch after {have}")
                have, _ = ray.get(self.actors[r].apply_many.remote(recs), timeout=timeout_s)
            if have != self.seq:
                raise ReplicaOrderError(f"replica {r} of shard {self.shard} is at batch {have}, not {self.seq}")
        except Exception as e:
            self._drop(r, f"catch-up failed: {e!r}")
            return
        log.info("shard %d replica %d caught up to batch %d", self.shard, r, self.seq)
        self.in_sync[r] = True

    # ----------------------------------------------------------- writes
    def _commit(self, kind: RecordKind, ids: np.ndarray, vec: np.ndarray, meta) -> int:
        import ray
        from ray.exceptions import RayTaskError

        with self._lock:
            if (self._uncertain or not any(self.in_sync)) and not self.reconcile():
                raise ShardsUnavailableError(
                    f"shard {self.shard}: no replica can take updates now (all away, or catching up after a "
                    "batch none acknowledged); the update was not applied — retry when the shard is back",
                    missing=[self.shard],
                )
            rec = LogRecord(kind, self.seq + 1, ids, vec, meta)
            refs = {self.actors[r].apply.remote(rec): r for r in range(len(self.actors)) if self.in_sync[r]}
            pending, done = list(refs), set()
            end = time.monotonic() + self.write_timeout_s
            while pending:  # all in-sync replicas, or: after the first one, stragglers get straggler_s more
                left = end - time.monotonic()
                if left <= 0:
                    break
                ready, pending = ray.wait(pending, num_returns=1, timeout=left)
                if ready and not done:
                    end = min(end, time.monotonic() + self.straggler_s)
                done.update(ready)
            ok: dict[int, tuple[int, int]] = {}
            bad_input: InvalidInputError | None = None
            refused: set[int] = set()
            for ref, r in refs.items():
                if ref not in done:
                    self._drop(r, f"batch {rec.seq} not applied in time")
                    continue
                try:
                    ok[r] = tuple(ray.get(ref, timeout=0))
                except RayTaskError as e:
                    if isinstance(e.cause, InvalidInputError):
                        bad_input = e.cause
                        refused.add(r)
                    self._drop(r, f"batch {rec.seq}: {e.cause!r}")
                except Exception as e:
                    self._drop(r, f"batch {rec.seq}: {e!r}")
            if not ok:
                if bad_input is not None and refused == set(refs.values()):
                    for r in refs.values():  # the batch itself is bad: nothing was logged anywhere
                        self.in_sync[r] = True
                        self.backend._mark(self.shard, r, True)
                    raise bad_input
                self._uncertain = True
                raise ShardsUnavailableError(
                    f"shard {self.shard}: no replica acknowledged batch {rec.seq}; the update may be applied "
                    "or not — retry it (upserts and deletes are idempotent)", missing=[self.shard],
                )
            seqs = {v[0] for v in ok.values()}
            versions = {v[1] for v in ok.values()}
            if seqs != {rec.seq} or len(versions) != 1:
                raise ReplicaOrderError(f"shard {self.shard} replicas disagree on batch {rec.seq}: {ok}")
            self._set(rec.seq, versions.pop())
            return self._version

    def upsert(self, ids, embeddings, attributes=None) -> int:
        id_np = torch.as_tensor(ids).reshape(-1).to(torch.int64).numpy()
        x = torch.as_tensor(embeddings).detach().float()
        x = x.reshape(id_np.size, x.shape[-1] if x.ndim else -1).numpy()  # [n, D], n may be 0
        return self._commit(RecordKind.UPSERT, id_np, np.ascontiguousarray(x), attributes)

    def delete(self, ids) -> int:
        id_np = torch.as_tensor(ids).reshape(-1).to(torch.int64).numpy()
        return self._commit(RecordKind.DELETE, id_np, np.zeros((id_np.size, 0), np.float32), None)

    def update_attributes(self, ids, attributes) -> int:
        id_np = torch.as_tensor(ids).reshape(-1).to(torch.int64).numpy()
        return self._commit(RecordKind.ATTRIBUTES, id_np, np.zeros((id_np.size, 0), np.float32),
                            [list(dict.fromkeys(t)) for t in attributes])

    def holding(self, ids: list[int]) -> list[bool]:
        import ray

        with self._lock:
            for r in range(len(self.actors)):
                if self.in_sync[r]:
                    try:
                        return list(ray.get(self.actors[r].holding.remote(list(ids)), timeout=self.write_timeout_s))
                    except Exception as e:
                        self._drop(r, repr(e))
        raise ShardsUnavailableError(f"shard {self.shard}: no replica in sync answered", missing=[self.shard])

    def close(self) -> None:
        pass


def ray_live_router(manifest, backend, config: RouterConfig | None = None, *,
                    write_timeout_s: float = 30.0, timeout_s: float = 60.0,
                    learned: LearnedRetrievalModel | None = None, head_dir: str | Path | None = None,
                    snapshot_every: int = 1000) -> tuple[Router, LiveShards]:
    """Router + update path over a ``RayBackend`` launched with ``data_dir``.

    Reconciles every shard first (all replicas answer, all brought to the
    newest batch any holds), then hooks ``rejoin`` into the backend's health
    prober so a restarted replica is caught up before it serves again.

    ``learned`` (the artifact the manifest was cut from, ``sterling train``):
    the router keeps its ``LearnedHead`` — towers, OverArch, heads and the
    item-embedding cache the OverArch reads — and takes feature upserts: the
    item tower embeds them here, the vectors go to the shards like any
    upsert, and the cache rows stay in this process, durable in
    ``head_dir`` (a ``LiveCache``: its own log of features and deletes, and
    cache snapshots; recovered before the router is returned).
    """
    head = RetrievalModel.load(manifest.head)
    head_model = cache = None
    if learned is not None:
        if head_dir is None:
            raise InvalidInputError("a learned model's router keeps its OverArch cache on disk: give head_dir "
                                    "(launch ray uses DIR/head)")
        head_model = LearnedHead(learned)
        cache = LiveCache(head_model.model, head_dir, snapshot_every=snapshot_every)
    groups = [ReplicatedShard(backend, s, write_timeout_s=write_timeout_s) for s in range(manifest.num_shards)]
    end = time.monotonic() + timeout_s
    for g in groups:
        while not g.reconcile(timeout_s=max(1.0, end - time.monotonic())):
            if time.monotonic() > end:
                raise ShardsUnavailableError(
                    f"shard {g.shard}: not every replica answered within {timeout_s:.0f} s, so the newest "
                    "update batch cannot be known; check the shard actors", missing=[g.shard],
                )
            time.sleep(0.2)
    backend.rejoin = lambda s, r: groups[s].rejoin(r)
    ranges = [tuple(s.lists) for s in manifest.shards]
    return (Router(head, backend, config, learned=head_model),
            LiveShards(head, ranges, groups, parallel=True, learned=head_model, cache=cache))
