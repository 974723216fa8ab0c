"""One model served by a process group on one host: each rank searches its slice, rank 0 merges and reranks.

Per request (collective; rank 0 drives, the other ranks wait in ``serve``):

1. rank 0 validates the request (k, nprobe, the filter, the queries) and
   broadcasts it — with the query embedding when the tower is replicated
   (rank 0 runs it), with the tower's inputs when its tables are sharded
   (every rank runs the sharded tower on the same batch, then rank 0's
   embedding is broadcast so every rank searches with the same bits);
2. every rank searches its own IVF lists for the per-rank top-K0 with a
   fixed probe (``adaptive=False``: a rank-local widening would break the
   exact merge);
3. the [B, K0] ids and scores are gathered to rank 0 (``dist.gather``) and
   merged with the document-shard rule (``cluster.merge.merge_topk``:
   stable sort by score over the rank-ordered concatenation, so ties keep
   the global slot order) — the single-process top-K0, bit for bit;
4. a learned model's OverArch, heads and Value Model run on rank 0 over the
   merged K0 (``LearnedRetrievalModel.rank``).

Why the rerank runs after the merge, on rank 0, not per rank: the
single-process model reranks exactly the global top-K0. Per-rank reranking
of the local top-K0 would score up to world × K0 candidates (the union of
local lists) or need a second round trip to learn which local candidates
made the global K0; the ``attention`` OverArch attends over the whole
candidate set, so it cannot be split at all; and a GEMM over a different
number of rows rounds differently, so per-rank values would not be
bit-identical. The cost of this choice is the item-side cache on rank 0 and
a serial rerank there; ``sterling bench shards`` reports the rerank's share
of the request time.
"""

from __future__ import annotations

import dataclasses
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from sterling.cluster.merge import merge_topk
from sterling.model.artifact import read_header
from sterling.model.errors import InvalidInputError, LimitExceededError
from sterling.model.index import prepare_queries
from sterling.sharding.documents import read_manifest
from sterling.sharding.ranks import RankInfo

__all__ = ["GroupRequest", "GroupResult", "RankGroup", "backend_for_device", "set_rank_threads"]

_RANK_MAX_K = 1 << 24  # rank 0 checks k against the model's max_k; ranks trust it


def set_rank_threads(n: int) -> None:
    """Threads of this rank for torch *and* the numba CPU scan (which defaults to every core).

    N ranks on C cores each left at C numba threads oversubscribe the host
    N-fold; measured on 2 cores with 2 ranks: ~8× slower requests.
    """
    n = max(1, int(n))
    torch.set_num_threads(n)
    try:
        import numba
    except ImportError:
        return
    numba.set_num_threads(min(n, numba.config.NUMBA_NUM_THREADS))


def backend_for_device() -> tuple[str, torch.device]:
    """("nccl", cuda:LOCAL_RANK) when CUDA is present, else ("gloo", cpu)."""
    import os

    if torch.cuda.is_available():
        local = int(os.environ.get("LOCAL_RANK", "0"))
        return "nccl", torch.device("cuda", local % torch.cuda.device_count())
    return "gloo", torch.device("cpu")


@dataclass(frozen=True, kw_only=True, slots=True)
class GroupRequest:
    """What rank 0 broadcasts: op ``search`` (queries or tower inputs), ``info`` or ``stop``."""

    op: str
    xq: np.ndarray | None = None  # [B, D] fp32 embeddings (replicated tower, or given)
    tower_inputs: tuple | None = None  # (keys, [values per key], [lengths per key], dense [B, d] | None)
    k: int = 0  # per-rank top-k (K0 for a learned model)
    nprobe: int = 1
    where: str | list[str | None] | None = None
    exact: bool = True
    counts: bool = False  # also sum the ranks' selectivity counts (``SearchStats.selectivity_counts``)
    skip_lists: int = 0  # scan only the lists ranked skip_lists..nprobe (``ItemIndex.search``)


@dataclass(frozen=True, kw_only=True, slots=True)
class GroupResult:
    """Merged answer on rank 0: ids [B, k] (−1 pads), scores [B, k] (−inf pads); ``u`` [B, D] the queries.

    ``counts`` [B, 4] int64: the ranks' selectivity counts summed (each list lives on one rank, so the
    sum is the single index's count), when the request asked for them.
    """

    ids: np.ndarray
    scores: np.ndarray
    version: int
    u: torch.Tensor
    counts: np.ndarray | None = None


class RankGroup:
    """This rank's part of the group: its slice (and on rank 0, the model's front and rerank stages).

    Example (every rank, after ``dist.init_process_group``):
        >>> g = RankGroup.load("ranks/")                 # rank from the process group
        >>> if g.rank == 0:
        ...     out = g.retrieve(user_ids=[3, 7], k=100, where="lang:en")
        ...     g.stop()
        ... else:
        ...     g.serve()                                # until rank 0 stops
    """

    def __init__(self, part, *, info: RankInfo, device: torch.device | None = None, sharded_tower=None) -> None:
        self.part = part
        self.info = info
        self.rank, self.world_size = info.rank, info.world_size
        self.learned = hasattr(part, "overarch")
        self.device = device or torch.device("cpu")
        self.comm_device = self.device if dist.get_backend() == "nccl" else torch.device("cpu")
        self.max_k = int(part.index.config.max_k)
        if part.index.config.max_k < _RANK_MAX_K:
            part.index.config = dataclasses.replace(part.index.config, max_k=_RANK_MAX_K)
        self.sharded_tower = sharded_tower
        self._lock = threading.Lock()
        self._stopped = False

    # ---------------------------------------------------------------- load
    @classmethod
    def load(cls, rank_dir: str | Path, *, rank: int | None = None, device: torch.device | None = None,
             tower_sharding=None) -> RankGroup:
        """Memory-map this rank's artifact from a ``write_rank_slices`` directory; optionally shard the tower.

        ``tower_sharding``: ``None`` (replicated tower, run on rank 0) or a
        sharding type / ``{table: type}`` map for ``shard_tower`` (collective).
        """
        rank = dist.get_rank() if rank is None else rank
        world = dist.get_world_size()
        m = read_manifest(rank_dir)
        if m.num_shards != world:
            raise InvalidInputError(
                f"{rank_dir} holds slices for {m.num_shards} ranks but the process group has {world}; "
                f"start {m.num_shards} ranks (--nproc-per-node {m.num_shards}) or re-slice"
            )
        path = m.shards[rank].path
        h = read_header(path)
        if h["kind"] == "learned_retrieval_model":
            from sterling.model.learned import LearnedRetrievalModel

            part = LearnedRetrievalModel.load(path, verify=False)
            meta = part.extra_meta["rank"]
        else:
            from sterling.model.retrieval import RetrievalModel

            part = RetrievalModel.load(path, verify=False)
            meta = h["meta"]["shard"]
        info = RankInfo(rank=int(meta["rank"]), world_size=int(meta["world_size"]), lists=tuple(meta["lists"]),
                        capacity=int(meta["capacity"]), items=int(meta["items"]),
                        source_version=int(meta["source_version"]))
        if info.rank != rank:
            raise InvalidInputError(f"{path} is the slice of rank {info.rank}, not of rank {rank}")
        if device is not None and device.type != "cpu":
            part = part.to(device)
        sharded = None
        if tower_sharding is not None:
            if not hasattr(part, "user_tower"):
                raise InvalidInputError("tower sharding needs a learned model with a TorchRec user tower")
            from sterling.sharding.tower import shard_tower

            sharded = shard_tower(part.user_tower, sharding=tower_sharding, device=device or torch.device("cpu"))
        return cls(part, info=info, device=device, sharded_tower=sharded)

    # ------------------------------------------------------------ the step
    def _step(self, req: GroupRequest) -> GroupResult | None:
        """The collective part of one request; every rank runs it with the same ``req``."""
        if req.tower_inputs is not None:
            from sterling.model.towers import make_kjt

            keys, vals, lens, dense = req.tower_inputs
            with torch.no_grad():
                u = self.sharded_tower(make_kjt(keys, vals, lens), None if dense is None else torch.from_numpy(dense))
            u = u.to(torch.float32).contiguous().to(self.comm_device)
            dist.broadcast(u, src=0)
        else:
            u = torch.from_numpy(req.xq)
        out = self.part.index.search(u.to(self.device), k=req.k, nprobe=req.nprobe, where=req.where,
                                     exact=req.exact, adaptive=False, return_stats=req.counts,
                                     skip_lists=req.skip_lists)
        scores, ids = out[0], out[1]
        counts = None
        if req.counts:
            counts = out[2].selectivity_counts.to(self.comm_device).contiguous()
            dist.reduce(counts, dst=0, op=dist.ReduceOp.SUM)
        ids, scores = ids.to(self.comm_device).contiguous(), scores.to(self.comm_device).contiguous()
        if self.rank == 0:
            all_ids = [torch.empty_like(ids) for _ in range(self.world_size)]
            all_s = [torch.empty_like(scores) for _ in range(self.world_size)]
            dist.gather(ids, all_ids, dst=0)
            dist.gather(scores, all_s, dst=0)
            parts = [(i.cpu().numpy(), s.cpu().numpy()) for i, s in zip(all_ids, all_s)]
            mi, ms = merge_topk(parts, req.k)
            return GroupResult(ids=mi, scores=ms, version=int(self.part.index.version), u=u.cpu(),
                               counts=None if counts is None else counts.cpu().numpy())
        dist.gather(ids, None, dst=0)
        dist.gather(scores, None, dst=0)
        return None

    def _broadcast(self, req: GroupRequest | None) -> GroupRequest:
        box = [req]
        dist.broadcast_object_list(box, src=0, device=self.comm_device if self.comm_device.type == "cuda" else None)
        return box[0]

    def serve(self) -> None:
        """Ranks > 0: answer rank 0's requests until it sends ``stop``."""
        if self.rank == 0:
            raise InvalidInputError("rank 0 drives the group (search / retrieve / stop); only ranks > 0 serve")
        while True:
            req = self._broadcast(None)
            if req.op == "stop":
                return
            if req.op == "info":
                self._gather_info()
                continue
            self._step(req)

    def _gather_info(self) -> list[dict] | None:
        idx = self.part.index
        mine = {"shard": self.rank, "lists": list(self.info.lists), "items": idx.num_items,
                "version": int(idx.version), "replicas": 1, "healthy_replicas": 1}
        out = [None] * self.world_size if self.rank == 0 else None
        dist.gather_object(mine, out, dst=0)
        return out

    # --------------------------------------------------------- rank 0 side
    def _check_k(self, k) -> int:
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
            raise InvalidInputError(f"k ({k!r}) must be an integer ≥ 1")
        if k > self.max_k:
            raise LimitExceededError(
                f"k ({k}) is above max_k ({self.max_k}); ask for fewer results, or raise the limit "
                "(IndexConfig.max_k)", name="k", value=int(k), limit=self.max_k,
            )
        return int(k)

    def _run(self, req: GroupRequest) -> GroupResult:
        if self.rank != 0:
            raise InvalidInputError(f"requests go to rank 0; this is rank {self.rank}")
        with self._lock:
            if self._stopped:
                raise InvalidInputError("this process group was stopped; start a new one")
            self._broadcast(req)
            return self._step(req)

    def search(self, xq, *, k: int = 10, nprobe: int | None = None, where=None, exact: bool = True,
               counts: bool = False, skip_lists: int = 0) -> GroupResult:
        """Rank 0: the index stage over all ranks — ``index.search(xq, k, nprobe, where, adaptive=False)``.

        ``counts``: also return the summed selectivity counts (the router's adaptive widening reads them).
        ``skip_lists``: scan only the lists ranked skip_lists..nprobe (a widening round of the router).
        """
        index = self.part.index
        k = self._check_k(k)
        nprobe = index.default_nprobe() if nprobe is None else nprobe
        if isinstance(nprobe, bool) or not isinstance(nprobe, (int, np.integer)) or not 1 <= nprobe <= index.nlist:
            raise InvalidInputError(f"nprobe ({nprobe!r}) must be an integer in 1..nlist ({index.nlist})")
        xq = torch.as_tensor(xq, dtype=torch.float32)
        prepare_queries(xq, index.dim, index.metric)  # typed errors here, before any rank sees the batch
        xq = xq[None] if xq.ndim == 1 else xq
        if where is not None:
            index.compile_filters(where, int(xq.shape[0]))
        return self._run(GroupRequest(op="search", xq=np.ascontiguousarray(xq.numpy()), k=k, nprobe=int(nprobe),
                                      where=where, exact=exact, counts=bool(counts), skip_lists=int(skip_lists)))

    def retrieve(self, query=None, *, user_ids=None, kjt=None, dense=None, k: int = 10, k0: int | None = None,
                 nprobe: int | None = None, where=None, value_formula: str | None = None, exact: bool = True,
                 rerank: bool = True):
        """Rank 0: the learned model's forward (``adaptive=False``) over all ranks → ``LearnedOutput``.

        With ``rerank=False`` the answer is the merged ANN stage (ids, scores of the top-k by index score).
        """
        if not self.learned:
            raise InvalidInputError("retrieve() serves a learned model; this group holds a plain index — use search()")
        from sterling.model.learned import nprobe_for_k0

        m = self.part
        k = self._check_k(k)
        k0 = int(min(m.k0_for(k, k0), max(self.info.items, 1)))
        if nprobe is None:  # the whole index's slots, not this slice's
            nprobe = nprobe_for_k0(k0, capacity=self.info.capacity, nlist=m.index.nlist,
                                   default=m.index.default_nprobe())
        if not rerank:
            k0 = k
        tower_inputs = xq = None
        if self.sharded_tower is not None and query is None:
            if user_ids is not None:
                if m.users is None:
                    raise InvalidInputError("this model ships no users table; send user features (kjt) instead")
                kjt, dense = m.users.inputs(user_ids)
            elif kjt is None:
                raise InvalidInputError("give exactly one of `query` (an embedding), `user_ids` or `kjt` user features")
            keys = list(kjt.keys())
            lens = kjt.lengths().reshape(len(keys), -1)
            vals = torch.split(kjt.values(), [int(x) for x in lens.sum(1)])
            tower_inputs = (keys, [v.numpy() for v in vals], [ln.numpy() for ln in lens],
                            None if dense is None else dense.to(torch.float32).numpy())
            B = int(lens.shape[1])
        else:
            with torch.no_grad():
                u = m.user_embedding(query=query, user_ids=user_ids, kjt=kjt, dense=dense)
            prepare_queries(u, m.index.dim, m.index.metric)
            xq = np.ascontiguousarray(u.detach().to(torch.float32).numpy())
            B = int(xq.shape[0])
        if where is not None:
            m.index.compile_filters(where, B)
        res = self._run(GroupRequest(op="search", xq=xq, tower_inputs=tower_inputs, k=k0, nprobe=int(nprobe),
                                     where=where, exact=exact))
        if not rerank:
            return res
        with torch.no_grad():
            return m.rank(res.u, torch.from_numpy(res.scores), torch.from_numpy(res.ids), k, value_formula)

    def shard_infos(self) -> list[dict]:
        """Rank 0: per rank, its lists, items and version (collective)."""
        with self._lock:
            self._broadcast(GroupRequest(op="info"))
            return self._gather_info()

    def stop(self) -> None:
        """Rank 0: release the other ranks from ``serve``."""
        with self._lock:
            if not self._stopped:
                self._stopped = True
                self._broadcast(GroupRequest(op="stop"))
