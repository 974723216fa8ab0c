"""One document shard's server object: a ``RetrievalModel`` over its slice.

Pure Python + torch (no Ray, no gRPC), so the same object runs inside a Ray
actor (``sterling.cluster.ray_backend``), in a thread of the one-process
server (``sterling serve``) and in unit tests. Requests and replies are
numpy arrays so that Ray moves them without pickling tensors.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from sterling.model.retrieval import RetrievalModel
from sterling.model.stages import record_stages

__all__ = ["ShardRequest", "ShardReply", "ShardServer"]


@dataclass(frozen=True, kw_only=True, slots=True)
class ShardRequest:
    """What the router sends every shard: encoded (not yet normalised) queries [B, D] fp32."""

    xq: np.ndarray
    k: int
    nprobe: int
    where: str | list[str | None] | None = None
    exact: bool = True
    min_versions: tuple[int, ...] | None = None  # per shard: answer only from this version on (else ReplicaBehindError)
    counts: bool = False  # also reply the per-query selectivity counts of the scan (adaptive widening)
    # scan only the lists ranked skip_lists..nprobe: a widening round, whose first lists the shard answered
    skip_lists: int = 0


@dataclass(frozen=True, kw_only=True, slots=True)
class ShardReply:
    """One shard's top-k, ordered by (score desc, slot asc): ids [B, k] (−1 pads), scores [B, k] (−inf pads)."""

    shard: int
    replica: int
    ids: np.ndarray
    scores: np.ndarray
    version: int
    ms: float
    stages: dict[str, float] = field(default_factory=dict)  # exclusive ms per search stage
    # [B, 4] int64 per query (``SearchStats.selectivity_counts``) when the request asked for them; the router
    # sums them over shards into the single index's counts
    counts: np.ndarray | None = None


_SHARD_MAX_K = 1 << 24  # far above any RouterConfig.max_k; the router refuses larger k first


class ShardServer:
    """Serves one slice. Shards always search with ``adaptive=False``.

    The shard-local eligible fraction differs from the global one, so a
    shard that widened its probe on its own would break the exact merge;
    selectivity-adaptive widening is the router's job.
    """

    def __init__(self, model: RetrievalModel, *, shard: int = 0, replica: int = 0,
                 lists: tuple[int, int] | None = None) -> None:
        if model.index.config.max_k < _SHARD_MAX_K:  # the router bounds k (RouterConfig.max_k); shards trust it
            model.index.config = dataclasses.replace(model.index.config, max_k=_SHARD_MAX_K)
        self.model = model
        self.shard = shard
        self.replica = replica
        self.lists = lists if lists is not None else (0, model.index.nlist)

    @classmethod
    def load(cls, path: str | Path, *, shard: int = 0, replica: int = 0) -> ShardServer:
        """Memory-map a shard artifact (``sterling shard``) or a whole model."""
        from sterling.sharding.documents import shard_info

        model = RetrievalModel.load(path)
        info = shard_info(path)
        lists = tuple(info["lists"]) if info else None
        return cls(model, shard=shard, replica=replica, lists=lists)

    def search(self, req: ShardRequest) -> ShardReply:
        t0 = time.perf_counter()
        if req.min_versions is not None and self.shard < len(req.min_versions):
            have, need = int(self.model.index.version), int(req.min_versions[self.shard])
            if have < need:
                from sterling.cluster.errors import ReplicaBehindError

                raise ReplicaBehindError(
                    f"shard {self.shard} replica {self.replica} is at version {have}, below the acknowledged "
                    f"{need} (catching up); ask another replica"
                )
        query = torch.from_numpy(np.ascontiguousarray(req.xq, dtype=np.float32))
        counts = None
        with record_stages() as st:
            if req.counts or req.skip_lists:  # RetrievalModel.forward, with the index's stats
                xq = self.model.encode(query=query)
                scores, ids, stats = self.model.index.search(
                    xq, k=req.k, nprobe=req.nprobe, where=req.where, exact=req.exact, adaptive=False,
                    return_stats=True, skip_lists=req.skip_lists,
                )
                version = int(self.model.index.version)
                counts = stats.selectivity_counts.numpy() if req.counts else None
            else:
                out = self.model(query=query, k=req.k, nprobe=req.nprobe, where=req.where, exact=req.exact,
                                 adaptive=False)
                scores, ids, version = out.scores, out.ids, out.version
        return ShardReply(
            shard=self.shard, replica=self.replica, ids=ids.numpy(), scores=scores.numpy(),
            version=version, ms=(time.perf_counter() - t0) * 1e3, stages=st.ms(), counts=counts,
        )

    def warmup(self) -> None:
        """One tiny search, with and without a filter, so the first real request pays no lazy set-up.

        Run before a shard reports ready: a (re)started replica that answers
        ``ready()`` answers searches at full speed.
        """
        idx = self.model.index
        xq = idx.centroids[:1].numpy()
        where = idx.vocab[0] if idx.vocab else None
        for w in (None, where):
            self.model(query=torch.from_numpy(xq), k=1, nprobe=1, where=w, adaptive=False)

    def info(self) -> dict:
        idx = self.model.index
        return {
            "shard": self.shard, "replica": self.replica, "lists": list(self.lists),
            "items": idx.num_items, "version": int(idx.version),
        }

    def ready(self) -> bool:
        return True
