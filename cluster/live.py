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
"""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import torch

from sterling.cluster.backends import LocalBackend
from sterling.cluster.router import Router, RouterConfig
from sterling.cluster.shard import ShardServer
from sterling.model import updates as upd
from sterling.model.errors import InvalidInputError
from sterling.model.live import LiveModel
from sterling.model.retrieval import RetrievalModel
from sterling.sharding.documents import balanced_list_ranges, slice_model

__all__ = ["LiveShards", "live_router"]


class LiveShards:
    """The shards' ``LiveModel``s and the routing of update requests to them."""

    def __init__(self, head: RetrievalModel, ranges: list[tuple[int, int]], lives: list[LiveModel]) -> None:
        self.head = head
        self.ranges = ranges
        self.lives = lives
        self._starts = np.array([r[0] for r in ranges])
        self._lock = threading.Lock()

    @classmethod
    def open(cls, model: RetrievalModel, num_shards: int, data_dir: str | Path, *,
             snapshot_every: int = 1000) -> LiveShards:
        ranges = balanced_list_ranges(model.index, num_shards)
        lives = []
        for s, r in enumerate(ranges):
            sub = slice_model(model, r) if num_shards > 1 else model
            cfg = LiveModel.Config(data_dir=Path(data_dir) / f"shard-{s:04d}", snapshot_every=snapshot_every)
            lives.append(LiveModel.open(sub, cfg))
        return cls(slice_model(model, (0, 0)), ranges, lives)

    @property
    def version(self) -> int:
        """The lowest shard version (every shard has applied at least this much)."""
        return min(live.version for live in self.lives)

    @property
    def applied_batches(self) -> int:
        return sum(live.applied_seq for live in self.lives)

    def wait_for_version(self, version: int, timeout: float | None) -> None:
        for live in self.lives:
            live.wait_for_version(version, timeout)

    def upsert(self, ids, embeddings, attributes=None) -> tuple[int, int]:
        """(items upserted, version); durable on every shard when it returns."""
        batch = upd.prepare_upsert(self.head.index, ids, embeddings, attributes)  # validated once here
        owner = np.searchsorted(self._starts, batch.lists.numpy(), side="right") - 1
        x = torch.as_tensor(embeddings).detach().float().reshape(batch.ids.numel(), self.head.index.dim)
        with self._lock:
            for s, live in enumerate(self.lives):
                own = torch.from_numpy(owner == s)
                attrs = None if batch.attributes is None else [a for a, o in zip(batch.attributes, own.tolist()) if o]
                live.upsert(batch.ids[own], x[own], attrs)
                live.delete(batch.ids[~own])
        return batch.ids.numel(), self.version

    def delete(self, ids) -> tuple[int, int]:
        """(items that existed and are gone, version)."""
        id_t = upd.check_batch_ids(ids, "delete")
        with self._lock:
            held = sum(sum(live.holding(id_t.tolist())) for live in self.lives)
            for live in self.lives:
                live.delete(id_t)
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
            for live, h in zip(self.lives, held):
                rows = [j for j, ok in enumerate(h) if ok]
                live.update_attributes(id_t[rows], [lists[j] for j in rows])
        return id_t.numel(), self.version

    def close(self) -> None:
        for live in self.lives:
            live.close()


def live_router(model: RetrievalModel | str | Path, *, data_dir: str | Path, num_shards: int = 1,
                config: RouterConfig | None = None, snapshot_every: int = 1000) -> tuple[Router, LiveShards]:
    """A ``Router`` over in-process shards that take updates, recovered from ``data_dir`` first."""
    if not isinstance(model, RetrievalModel):
        model = RetrievalModel.load(model)
    shards = LiveShards.open(model, num_shards, data_dir, snapshot_every=snapshot_every)
    servers = [[ShardServer(live, shard=s, lists=r)] for s, (r, live) in enumerate(zip(shards.ranges, shards.lives))]
    return Router(shards.head, LocalBackend(servers), config), shards
