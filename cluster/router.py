"""The merge stage: validate, encode once, fan out to shards, merge exactly.

``Router`` is the transport-free core (unit-testable with fake backends);
``sterling.cluster.server`` puts it behind gRPC.

Per request: check k / nprobe / batch against the limits, run the user
tower once (or take the query embedding), validate the queries and the
filter with the *head* model (centroids, tower, vocabulary; no items), send
the same batch to every shard with the request's deadline, and merge the
per-shard top-k (``merge_topk``). Shards always scan a fixed probe
(``adaptive=False``), which is what makes the merge exact; when the request
asks for selectivity-adaptive search the router sizes and widens the probe
globally with the model's own rules: the first scan of each filtered query
from the selectivity sample the head carries (``first_scan_plan``), then
``widen_for_selectivity`` on the selectivity counts the shards report for
that scan, whose sum is the single index's count — so the router scans and
widens the queries the model does, to the same nprobe.
"""

from __future__ import annotations

import time
from collections import Counter
from contextlib import nullcontext
from dataclasses import dataclass, field, replace

import numpy as np
import torch

from sterling.cluster.backends import FanOutResult, ShardBackend
from sterling.cluster.errors import (
    DeadlineExceededError,
    RequestTooLargeError,
    ShardsUnavailableError,
)
from sterling.cluster.learned_head import LearnedHead, SparseInput
from sterling.cluster.merge import merge_topk, merge_widened_ids
from sterling.cluster.shard import ShardReply, ShardRequest
from sterling.model.errors import InvalidInputError
from sterling.model.index import prepare_queries
from sterling.model.retrieval import RetrievalModel
from sterling.model.search import first_scan_plan, measured_selectivity, widen_for_selectivity

__all__ = ["RouterConfig", "RouterResult", "Router"]


@dataclass(kw_only=True, slots=True)
class RouterConfig:
    """Limits and defaults of the merge stage.

    Args:
        max_k: largest k a request may ask for.
        max_k0: most index candidates a learned model's OverArch may rerank per query.
        max_batch: most queries in one request.
        max_results: most result entries (batch × k) in one request; above
            it the request is refused with RESOURCE_EXHAUSTED.
        default_deadline_ms: budget when neither the request nor gRPC gives one.
        adaptive: default for requests that leave ``adaptive`` unspecified.
        max_adaptive_rounds: 0 turns the router's widening off; any other value
            lets it run (the rule widens in one round: one fan-out per
            widened nprobe, one for the queries it pre-filters).
    """

    max_k: int = 10_000
    max_k0: int = 100_000
    max_batch: int = 4096
    max_results: int = 4_000_000
    default_deadline_ms: int = 5_000
    adaptive: bool = False
    max_adaptive_rounds: int = 4

    def __post_init__(self) -> None:
        for name in ("max_k", "max_k0", "max_batch", "max_results", "default_deadline_ms"):
            if getattr(self, name) < 1:
                raise ValueError(f"RouterConfig.{name} ({getattr(self, name)}) must be ≥ 1")
        if self.max_adaptive_rounds < 0:
            raise ValueError(f"RouterConfig.max_adaptive_rounds ({self.max_adaptive_rounds}) must be ≥ 0")


@dataclass(kw_only=True, slots=True)
class RouterResult:
    """Merged answer: ids [B, k] (−1 pads), scores [B, k] (−inf pads)."""

    ids: np.ndarray
    scores: np.ndarray
    version: int
    partial: bool = False
    missing: list[int] = field(default_factory=list)
    version_skew: dict[int, int] = field(default_factory=dict)
    timing: dict = field(default_factory=dict)
    task_scores: np.ndarray | None = None  # [B, k, T] per-task probabilities (learned models)
    tasks: tuple[str, ...] = ()


class Router:
    """Validate → encode once → fan out → exact merge.

    Example:
        >>> router = Router(RetrievalModel.load("shards/head.st"), LocalBackend([[shard0], [shard1]]))
        >>> res = router.retrieve(query=xq, k=100, where="lang:en")
    """

    def __init__(self, head: RetrievalModel, backend: ShardBackend, config: RouterConfig | None = None, *,
                 learned: LearnedHead | None = None) -> None:
        self.head = head
        self.backend = backend
        self.config = config or RouterConfig()
        self.learned = learned  # a learned model's towers, OverArch, heads and cache: reranks the merged K0

    @property
    def dim(self) -> int:
        return self.head.index.dim

    def _check(self, k, nprobe, batch: int) -> tuple[int, int]:
        cfg, index = self.config, self.head.index
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
            raise InvalidInputError(f"k ({k!r}) must be an integer ≥ 1")
        if k > cfg.max_k:
            raise InvalidInputError(
                f"k ({k}) is above this server's max_k ({cfg.max_k}); ask for fewer results or "
                "start the server with a larger --max-k"
            )
        if nprobe is None or nprobe == 0:
            nprobe = index.default_nprobe()
        if isinstance(nprobe, bool) or not isinstance(nprobe, (int, np.integer)) or not 1 <= nprobe <= index.nlist:
            raise InvalidInputError(f"nprobe ({nprobe!r}) must be an integer in 1..nlist ({index.nlist}); 0 = default")
        if batch < 1:
            raise InvalidInputError("the request holds no query")
        if batch > cfg.max_batch:
            raise RequestTooLargeError(
                f"batch of {batch} queries is above this server's max_batch ({cfg.max_batch}); split it"
            )
        if batch * k > cfg.max_results:
            raise RequestTooLargeError(
                f"batch × k = {batch} × {k} = {batch * k} results is above this server's max_results "
                f"({cfg.max_results}); lower k or split the batch"
            )
        return int(k), int(nprobe)

    def encode(self, *, query=None, user_features=None) -> torch.Tensor:
        """[B, D] fp32 query embeddings, validated but *not* normalised (shards normalise, like the model)."""
        xq = self.head.encode(query=query, user_features=user_features)
        prepare_queries(xq, self.dim, self.head.index.metric)  # raises typed errors; result unused
        if xq.ndim == 1:
            xq = xq[None]
        return xq.float()

    def retrieve(
        self,
        *,
        query=None,
        user_features=None,
        k: int = 10,
        nprobe: int | None = None,
        where: str | list[str | None] | None = None,
        exact: bool = True,
        adaptive: bool | None = None,
        deadline_s: float | None = None,
        require_complete: bool = False,
        user_ids=None,
        sparse: SparseInput | None = None,
        k0: int | None = None,
        value_formula: str | None = None,
        shard_min_versions: list[int] | None = None,
    ) -> RouterResult:
        """Top-k per query over every shard (see ``RetrievalModel.forward`` for the arguments).

        A router over a learned model (``learned_router``) also takes the user
        as ``user_ids`` or ``sparse`` features (``user_features`` = their dense
        part), gathers ``k0`` candidates per query from the shards and reranks
        them with the OverArch, heads and Value Model (``value_formula``);
        ``task_scores`` then holds the per-task probabilities of the top k.

        ``shard_min_versions[s]``: shard ``s`` answers only from a replica at that version
        or later (the acknowledged version of each shard that takes updates), so no answer is staler than
        an acknowledged write.
        """
        t0 = time.monotonic()
        budget = deadline_s if deadline_s is not None else self.config.default_deadline_ms / 1e3
        deadline = t0 + budget
        if self.learned is not None:
            u = self.learned.encode(query=query, dense=user_features, user_ids=user_ids, sparse=sparse)
            xq = u
        else:
            if user_ids is not None or sparse is not None or k0 or value_formula:
                raise InvalidInputError(
                    "user_ids, sparse features, k0 and value_formula need a learned model (`sterling train`); "
                    "this server serves an index model: send query_embedding or user_features"
                )
            xq = self.encode(query=query, user_features=user_features)
        B = int(xq.shape[0])
        nprobe_asked = nprobe
        k, nprobe = self._check(k, nprobe, B)
        k_shard = k
        if self.learned is not None:
            k_shard, nprobe = self.learned.k0_and_nprobe(k, k0, nprobe_asked, B, self.config)
        if isinstance(where, (list, tuple)) and len(where) != B:
            raise InvalidInputError(f"{len(where)} filters for {B} queries; give one per query or one for all")
        filters = self.head.index.compile_filters(where, B)  # validates; raises FilterError
        if self.learned is not None:
            self.learned.value_model.compile(value_formula or self.learned.value_model.default)  # typed errors
        t_enc = time.monotonic()
        xq_np = xq.detach().numpy()
        floors = None if shard_min_versions is None else tuple(int(v) for v in shard_min_versions)
        use_adaptive = (self.config.adaptive if adaptive is None else adaptive) and self.config.max_adaptive_rounds > 0
        widen = use_adaptive and filters.any
        req = ShardRequest(xq=xq_np, k=k_shard, nprobe=nprobe, where=where, exact=exact, min_versions=floors,
                           counts=widen)
        # the model's first-scan sizes, from the selectivity sample the head carries (None: nprobe for all)
        plan = first_scan_plan(self.head.index, filters, filters.query_program, nprobe) if widen else None
        # a learned model's updates write the shards' index slices and the router's cache under the
        # write side of this guard: the candidates and the cache rows they are reranked with agree
        with self.learned.guard.read() if self.learned is not None else nullcontext():
            fo, first = self._first_round(req, plan, deadline)
            t_fan = time.monotonic()
            if fo.missing and (require_complete or not fo.replies):
                if not fo.replies and time.monotonic() >= deadline:
                    raise DeadlineExceededError(
                        f"no shard answered within {budget * 1e3:.0f} ms (shards {fo.missing}: "
                        f"{'; '.join(fo.errors[s] for s in fo.missing)}); raise the deadline or check the shards"
                    )
                raise ShardsUnavailableError(
                    f"shards {fo.missing} did not answer within {budget * 1e3:.0f} ms "
                    f"({'; '.join(f'{s}: {fo.errors[s]}' for s in fo.missing)}); the request required all shards",
                    missing=fo.missing,
                )
            order = sorted(fo.replies)
            ids, scores = merge_topk([(fo.replies[s].ids, fo.replies[s].scores) for s in order], k_shard)
            versions = {s: int(fo.replies[s].version) for s in order}
            missing = list(fo.missing)

            if widen and not missing:
                ids, scores = self._widen(xq_np, ids, scores, k_shard, nprobe, where, exact, filters, deadline,
                                          versions, floors, [fo.replies[s].counts for s in order], first)
            t_merge = time.monotonic()
            task_scores, tasks, rerank_ms = None, (), 0.0
            if self.learned is not None:
                ids, scores, task_scores = self.learned.rank(xq, ids, scores, k, value_formula)
                tasks = tuple(self.learned.tasks)
                rerank_ms = (time.monotonic() - t_merge) * 1e3
        t_end = time.monotonic()
        counts = Counter(versions.values())
        version = counts.most_common(1)[0][0] if counts else int(self.head.index.version)
        skew = dict(versions) if len(counts) > 1 else {}
        return RouterResult(
            ids=ids, scores=scores, version=version, partial=bool(missing), missing=missing, version_skew=skew,
            task_scores=task_scores, tasks=tasks,
            timing={
                "total_ms": (t_end - t0) * 1e3, "encode_ms": (t_enc - t0) * 1e3,
                "fanout_ms": (t_fan - t_enc) * 1e3, "merge_ms": (t_merge - t_fan) * 1e3, "rerank_ms": rerank_ms,
                "shards": [(s, fo.replies[s].replica, fo.replies[s].ms, fo.replies[s].stages) for s in order],
            },
        )

    def _first_round(self, req: ShardRequest, plan, deadline: float) -> tuple[FanOutResult, torch.Tensor]:
        """The first fan-out, sized as the model sizes its first scans (``first_scan_plan``):
        one fan-out per first size, each of the queries of that size (the model scans the same
        groups, so the answers are its own); a query the sample pre-filters is scanned over
        all nlist lists at once. Returns the replies assembled over the whole batch (a shard
        that misses any group counts as missing) and [B] each query's first size (nlist:
        answered whole)."""
        B = req.xq.shape[0]
        if plan is None or not bool((plan.widen | plan.brute).any()):
            return self.backend.fan_out(req, deadline), torch.full((B,), req.nprobe, dtype=torch.int64)
        nlist = self.head.index.nlist
        first = torch.where(plan.brute, torch.full_like(plan.nprobe, nlist), plan.nprobe)
        parts: dict[int, list] = {}
        missing: set[int] = set()
        errors: dict[int, str] = {}
        for w in first.unique().tolist():
            rows = (first == w).nonzero().squeeze(1).numpy()
            sub_where = [req.where[i] for i in rows] if isinstance(req.where, (list, tuple)) else req.where
            fo = self.backend.fan_out(replace(req, xq=req.xq[rows], nprobe=int(w), where=sub_where,
                                              counts=req.counts and w < nlist), deadline)
            missing.update(fo.missing)
            errors.update(fo.errors)
            for s, r in fo.replies.items():
                parts.setdefault(s, []).append((rows, r))
        k = req.k
        replies = {}
        for s, got in parts.items():
            if s in missing:
                continue
            ids = np.full((B, k), -1, dtype=np.int64)
            scores = np.full((B, k), -np.inf, dtype=np.float32)
            counts = np.zeros((B, 4), dtype=np.int64)
            for rows, r in got:
                ids[rows], scores[rows] = r.ids, r.scores
                if r.counts is not None:
                    counts[rows] = r.counts
            head = got[0][1]
            replies[s] = ShardReply(shard=s, replica=head.replica, ids=ids, scores=scores,
                                    version=min(int(r.version) for _, r in got), ms=sum(r.ms for _, r in got),
                                    stages=head.stages, counts=counts if req.counts else None)
        return FanOutResult(replies=replies, missing=sorted(missing), errors=errors), first

    def _widen(self, xq, ids, scores, k, nprobe, where, exact, filters, deadline, versions, floors, counts,
               first):
        """Selectivity-adaptive widening by the model's rule, on the global counts.

        ``counts``: each shard's [B, 4] selectivity counts of the first
        scan; each list lives in one shard, so their sum is what the single
        index counted, and ``widen_for_selectivity`` picks the same queries
        and nprobe as the adaptive model. ``first`` [B]: each query's first
        scan size (nlist: already answered over its whole eligible set).
        Each (first, widened nprobe) pair is one fan-out
        of its queries over the lists ranked first..w (``skip_lists``), whose
        top-k is merged into the first answer (the model scans the same
        groups and lists, so on the fused CPU scan the answers are the
        model's; at an exact score tie between a first-scan and a widened
        item the first-scan item comes first here, the lower position
        there); a query the rule pre-filters
        is rescanned over all nlist lists (the same verified eligible set;
        the model scores it outside the scan, so scores may differ in the
        last bits). Nothing is widened when a shard's transport reports no
        counts; a fan-out that misses a shard or the deadline keeps the
        previous (complete) answer for its queries.
        """
        if not counts or any(c is None for c in counts):
            return ids, scores
        nlist = self.head.index.nlist
        total = torch.from_numpy(np.sum(counts, axis=0))
        open_ = (filters.query_program >= 0) & (first < nlist)
        wd = widen_for_selectivity(measured_selectivity(total), open_, nprobe=nprobe, nlist=nlist)
        more = wd.widen & (wd.nprobe > first)
        pairs = sorted({(int(f), int(w)) for f, w in zip(first[more].tolist(), wd.nprobe[more].tolist())})
        groups = [(more & (first == f) & (wd.nprobe == w), f) for f, w in pairs]
        groups.append((wd.brute, 0))
        for g, (sel, skip) in enumerate(groups):
            rows = sel.nonzero().squeeze(1).numpy()
            if not rows.size or time.monotonic() >= deadline:
                continue
            brute = g == len(groups) - 1
            wide = int(wd.nprobe[rows[0]])
            sub_where = [where[i] for i in rows] if isinstance(where, (list, tuple)) else where
            fo = self.backend.fan_out(
                ShardRequest(xq=xq[rows], k=k, nprobe=wide, where=sub_where, exact=exact, min_versions=floors,
                             skip_lists=skip),
                deadline,
            )
            if fo.missing:
                continue
            order = sorted(fo.replies)
            new = merge_topk([(fo.replies[s].ids, fo.replies[s].scores) for s in order], k)
            ids[rows], scores[rows] = new if brute else merge_widened_ids(ids[rows], scores[rows], *new, k)
            versions.update({s: int(fo.replies[s].version) for s in order})
        return ids, scores
