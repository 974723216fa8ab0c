"""The mesh's five services: the computation (``*Core``) and its gRPC servicer, one OS process each.

Every service loads what it needs from the SAME learned artifact Sterling
serves (``sterling train`` output), so the two systems run the same model:

- ``TowerCore``: the trained user tower over the artifact's users table;
- ``FilterCore``: a pyroaring inverted index (``RoaringIndex``) over the
  index's exact attribute store; one serialized bitmap of eligible item
  positions per distinct expression;
- ``AnnCore``: Faiss ``IndexIVFScalarQuantizer`` (SQ8, inner product) over the
  Sterling index's own item vectors (its int8 codes × scales), with the
  Sterling index's centroids as the coarse quantizer and every item in the
  same list, searched with the same nprobe; a filtered query is restricted
  with an ``IDSelectorBitmap`` built from the filter service's bitmap
  (probe-then-filter, as Sterling). The top ``refine × K0`` SQ8 candidates
  are re-scored exactly against the fp32 vectors (Faiss ``IndexRefineFlat``
  semantics), so the scores the OverArch sees as its prior are exact, as
  Sterling's are;
- ``ScoringCore``: ``LearnedRetrievalModel.rank`` — OverArch, task heads,
  Value Model — over the candidates;
- ``Orchestrator``: dynamic batching of concurrent single-user requests,
  then tower ∥ filter → ANN → scoring per batch.

Run one with ``python -m sterling.benchmarks.mesh.services ROLE --artifact model.st``;
it prints ``MESH READY <port>`` once it serves.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import signal
import sys
import threading
import time
from dataclasses import dataclass

import grpc
import numpy as np

from sterling.benchmarks.mesh import mesh_pb2 as pb
from sterling.benchmarks.mesh import mesh_pb2_grpc as pbg
from sterling.model.errors import InvalidInputError, SterlingError

__all__ = [
    "TowerCore", "FilterCore", "AnnCore", "ScoringCore", "Orchestrator", "OrchestratorConfig",
    "matrix", "from_matrix", "MAX_MESSAGE_BYTES", "ROLES", "main",
]

MAX_MESSAGE_BYTES = 64 << 20  # as `sterling serve --max-message-mb 64`
ROLES = ("tower", "filter", "ann", "scoring", "orchestrator")
_OPTIONS = [("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES)]


def matrix(x: np.ndarray) -> pb.Matrix:
    x = np.ascontiguousarray(x, dtype=np.float32)
    return pb.Matrix(rows=x.shape[0], cols=x.shape[1], data=x.tobytes())


def from_matrix(m: pb.Matrix) -> np.ndarray:
    return np.frombuffer(m.data, dtype=np.float32).reshape(m.rows, m.cols)


def candidates_msg(ids: np.ndarray, scores: np.ndarray) -> pb.Candidates:
    return pb.Candidates(rows=ids.shape[0], k0=ids.shape[1], ids=np.ascontiguousarray(ids, np.int64).tobytes(),
                         scores=np.ascontiguousarray(scores, np.float32).tobytes())


def from_candidates(c: pb.Candidates) -> tuple[np.ndarray, np.ndarray]:
    return (np.frombuffer(c.ids, np.int64).reshape(c.rows, c.k0),
            np.frombuffer(c.scores, np.float32).reshape(c.rows, c.k0))


def ranked_msg(ids: np.ndarray, values: np.ndarray, tasks: np.ndarray) -> pb.Ranked:
    return pb.Ranked(rows=ids.shape[0], k=ids.shape[1], tasks=tasks.shape[2],
                     ids=np.ascontiguousarray(ids, np.int64).tobytes(),
                     values=np.ascontiguousarray(values, np.float32).tobytes(),
                     task_scores=np.ascontiguousarray(tasks, np.float32).tobytes())


def from_ranked(r: pb.Ranked) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(ids [B, k], values [B, k], task scores [B, k, T])."""
    return (np.frombuffer(r.ids, np.int64).reshape(r.rows, r.k),
            np.frombuffer(r.values, np.float32).reshape(r.rows, r.k),
            np.frombuffer(r.task_scores, np.float32).reshape(r.rows, r.k, r.tasks))


# ------------------------------------------------------------------ cores
class TowerCore:
    """User ids → [B, D] user embeddings with the artifact's trained tower and users table."""

    def __init__(self, artifact: str) -> None:
        from sterling.model.learned import LearnedRetrievalModel

        self.model = LearnedRetrievalModel.load(artifact).eval()

    def embed(self, user_ids: np.ndarray) -> np.ndarray:
        import torch

        if user_ids.size == 0:
            raise InvalidInputError("user_ids is empty; send at least one user id")
        with torch.inference_mode():
            return self.model.user_embedding(user_ids=torch.from_numpy(user_ids.astype(np.int64))).numpy()


class FilterCore:
    """Filter expressions → roaring bitmaps of eligible item positions (the index's slots)."""

    def __init__(self, artifact: str) -> None:
        from sterling.benchmarks.evaluation import RoaringIndex
        from sterling.model.index import ItemIndex

        index = ItemIndex.load(artifact)
        self.roaring = RoaringIndex(index.attr_ids.numpy(), index.attr_offsets.numpy(), index.vocab, index.capacity)
        alive = index.item_ids.numpy() >= 0
        from pyroaring import BitMap

        self.live = BitMap(np.nonzero(alive)[0].astype(np.uint32))

    def eligible(self, where: str):
        from sterling.model.filter import parse_filter

        node = parse_filter(where)
        if node is None:
            return self.live
        return self.roaring.eval(node) & self.live


class AnnCore:
    """Faiss IVF-SQ8 over the Sterling index's vectors and lists (see the module docstring)."""

    def __init__(self, artifact: str, *, refine: int = 2) -> None:
        import faiss
        import torch

        from sterling.model.index import ItemIndex

        if refine < 1:
            raise InvalidInputError(f"refine ({refine}) must be ≥ 1 (1 = re-score exactly the K0 SQ8 candidates)")
        index = ItemIndex.load(artifact)
        self.metric, self.dim, self.refine = index.metric, index.dim, int(refine)
        self.capacity, self.nlist = index.capacity, index.nlist
        self.default_nprobe = index.default_nprobe()
        self.item_ids = index.item_ids.numpy().copy()
        with torch.no_grad():
            self.xb = (index.codes.float() * index.scales[:, None]).numpy().copy()  # [N_cap, D] what Sterling scores
        offs = index.list_offsets.numpy()
        list_no = np.repeat(np.arange(self.nlist, dtype=np.int64), np.diff(offs))
        pos = np.arange(offs[-1], dtype=np.int64)
        keep = self.item_ids[pos] >= 0
        pos, list_no = pos[keep], list_no[keep]
        quantizer = faiss.IndexFlatIP(self.dim)
        quantizer.add(np.ascontiguousarray(index.centroids.numpy(), dtype=np.float32))
        ivf = faiss.IndexIVFScalarQuantizer(quantizer, self.dim, self.nlist, faiss.ScalarQuantizer.QT_8bit,
                                            faiss.METRIC_INNER_PRODUCT)
        ivf.by_residual = False  # SQ8 of the vectors themselves, as Sterling's int8 codes
        x = np.ascontiguousarray(self.xb[pos])
        ivf.train(x)  # the quantizer holds nlist centroids already: only the SQ ranges are trained
        ivf.add_core(len(pos), faiss.swig_ptr(x), faiss.swig_ptr(pos), faiss.swig_ptr(list_no))
        self.quantizer, self.ivf, self.faiss = quantizer, ivf, faiss

    def nprobe_for(self, k0: int) -> int:
        from sterling.model.learned import nprobe_for_k0

        return nprobe_for_k0(k0, capacity=self.capacity, nlist=self.nlist, default=self.default_nprobe)

    def search(self, xq: np.ndarray, k0: int, nprobe: int, bitmaps: list, bitmap_of_query: np.ndarray):
        """(ids [B, K0] external, −1 pads; scores [B, K0] exact fp32, −inf pads)."""
        from sterling.model.index import prepare_queries

        if k0 < 1:
            raise InvalidInputError(f"k0 ({k0}) must be ≥ 1")
        nprobe = nprobe or self.nprobe_for(k0)
        if not 1 <= nprobe <= self.nlist:
            raise InvalidInputError(f"nprobe ({nprobe}) must be in 1..nlist ({self.nlist})")
        xq = prepare_queries(np.array(xq, dtype=np.float32), self.dim, self.metric).numpy()
        B, kk = xq.shape[0], int(k0) * self.refine
        out_i = np.full((B, k0), -1, np.int64)
        out_s = np.full((B, k0), -np.inf, np.float32)
        for g in np.unique(bitmap_of_query):
            rows = np.nonzero(bitmap_of_query == g)[0]
            params = self.faiss.SearchParametersIVF(nprobe=int(nprobe))
            if g >= 0:
                mask = np.zeros(self.capacity, dtype=bool)
                mask[np.frombuffer(bitmaps[g].to_array(), np.uint32) if len(bitmaps[g]) else []] = True
                packed = np.packbits(mask, bitorder="little")
                sel = self.faiss.IDSelectorBitmap(self.capacity, self.faiss.swig_ptr(packed))
                params = self.faiss.SearchParametersIVF(nprobe=int(nprobe), sel=sel)
            _, P = self.ivf.search(np.ascontiguousarray(xq[rows]), kk, params=params)
            valid = P >= 0
            xs = np.einsum("bkd,bd->bk", self.xb[np.where(valid, P, 0)], xq[rows])  # exact re-score
            xs = np.where(valid, xs, -np.inf).astype(np.float32)
            top = np.argsort(-xs, axis=1, kind="stable")[:, :k0]
            s = np.take_along_axis(xs, top, 1)
            p = np.take_along_axis(P, top, 1)
            out_s[rows, : s.shape[1]] = s
            out_i[rows, : p.shape[1]] = np.where(np.isneginf(s), -1, self.item_ids[np.maximum(p, 0)])
        return out_i, out_s


class ScoringCore:
    """OverArch + task heads + Value Model (``LearnedRetrievalModel.rank``) over [B, K0] candidates."""

    def __init__(self, artifact: str) -> None:
        from sterling.model.learned import LearnedRetrievalModel

        self.model = LearnedRetrievalModel.load(artifact).eval()

    def score(self, u: np.ndarray, ids: np.ndarray, scores: np.ndarray, k: int, formula: str | None):
        import torch

        if k < 1 or k > ids.shape[1]:
            raise InvalidInputError(f"k ({k}) must be in 1..k0 ({ids.shape[1]})")
        with torch.inference_mode():
            out = self.model.rank(torch.from_numpy(np.array(u)), torch.from_numpy(np.array(scores)),
                                  torch.from_numpy(np.array(ids)), k, formula or None)
        return out.ids.numpy(), out.values.numpy(), out.task_scores.numpy()


# ------------------------------------------------------------------ servicers
def _abort(context, e: Exception):
    code = grpc.StatusCode.INVALID_ARGUMENT if isinstance(e, SterlingError) else grpc.StatusCode.INTERNAL
    context.abort(code, f"{type(e).__name__}: {e}")


class _Tower(pbg.UserTowerServicer):
    def __init__(self, core: TowerCore) -> None:
        self.core = core

    def Embed(self, request, context):
        try:
            return matrix(self.core.embed(np.asarray(request.user_ids, dtype=np.int64)))
        except Exception as e:  # noqa: BLE001 — every failure becomes a status
            _abort(context, e)


class _Filter(pbg.FilterServicer):
    def __init__(self, core: FilterCore) -> None:
        self.core = core

    def Eligible(self, request, context):
        try:
            maps = [self.core.eligible(w) for w in request.where]
            return pb.FilterReply(bitmaps=[m.serialize() for m in maps], counts=[len(m) for m in maps])
        except Exception as e:  # noqa: BLE001
            _abort(context, e)


class _Ann(pbg.AnnServicer):
    def __init__(self, core: AnnCore) -> None:
        self.core = core

    def Search(self, request, context):
        from pyroaring import BitMap

        try:
            maps = [BitMap.deserialize(b) for b in request.bitmaps]
            of = np.asarray(request.bitmap_of_query, dtype=np.int64)
            xq = from_matrix(request.queries)
            if of.size == 0:
                of = np.full(xq.shape[0], -1, np.int64)
            if of.size != xq.shape[0] or (of >= len(maps)).any():
                raise InvalidInputError(f"bitmap_of_query has {of.size} entries for {xq.shape[0]} queries and "
                                        f"{len(maps)} bitmaps; give one index (< {len(maps)}, or −1) per query")
            ids, scores = self.core.search(xq, int(request.k0), int(request.nprobe), maps, of)
            return candidates_msg(ids, scores)
        except Exception as e:  # noqa: BLE001
            _abort(context, e)


class _Scoring(pbg.ScoringServicer):
    def __init__(self, core: ScoringCore) -> None:
        self.core = core

    def Score(self, request, context):
        try:
            ids, scores = from_candidates(request.candidates)
            return ranked_msg(*self.core.score(from_matrix(request.users), ids, scores, int(request.k),
                                               request.value_formula))
        except Exception as e:  # noqa: BLE001
            _abort(context, e)


@dataclass(kw_only=True, slots=True)
class OrchestratorConfig:
    """The orchestrator's batching: as `sterling serve`'s router (``--batch-wait-ms``, ``--batch-max-queries``).

    A pipeline that finds no other batch in flight sends at once; while
    another is in flight it waits up to ``batch_wait_ms`` for more requests.
    ``pipelines`` batches may be in flight at once (tower/filter of one
    overlapping ANN/scoring of another).
    """

    batch_wait_ms: float = 20.0
    batch_max_queries: int = 64
    pipelines: int = 2
    timeout_s: float = 30.0

    def __post_init__(self) -> None:
        if self.batch_wait_ms < 0 or self.batch_max_queries < 1 or self.pipelines < 1:
            raise InvalidInputError(
                f"batch_wait_ms ({self.batch_wait_ms}) must be ≥ 0, batch_max_queries ({self.batch_max_queries}) "
                f"and pipelines ({self.pipelines}) ≥ 1")


class Orchestrator(pbg.OrchestratorServicer):
    """Batches concurrent Recommend calls and runs tower ∥ filter → ANN → scoring per batch."""

    def __init__(self, addresses: dict[str, str], config: OrchestratorConfig | None = None) -> None:
        self.config = config or OrchestratorConfig()
        self._channels = {r: grpc.insecure_channel(a, options=_OPTIONS) for r, a in addresses.items()}
        self.tower = pbg.UserTowerStub(self._channels["tower"])
        self.filter = pbg.FilterStub(self._channels["filter"])
        self.ann = pbg.AnnStub(self._channels["ann"])
        self.scoring = pbg.ScoringStub(self._channels["scoring"])
        self._cv = threading.Condition()
        self._queue: list[tuple[pb.RecommendRequest, cf.Future]] = []
        self._busy = 0
        self._stop = False
        self._threads = [threading.Thread(target=self._loop, daemon=True, name=f"mesh-pipeline-{i}")
                         for i in range(self.config.pipelines)]
        for t in self._threads:
            t.start()

    def close(self) -> None:
        with self._cv:
            self._stop = True
            self._cv.notify_all()
        for c in self._channels.values():
            c.close()

    def Recommend(self, request, context):
        if not request.user_ids or request.k < 1 or request.k0 < request.k:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                          f"need ≥ 1 user id and 1 ≤ k ({request.k}) ≤ k0 ({request.k0})")
        fut: cf.Future = cf.Future()
        with self._cv:
            self._queue.append((request, fut))
            self._cv.notify()
        try:
            return fut.result(timeout=self.config.timeout_s)
        except grpc.RpcError as e:
            context.abort(e.code(), e.details())
        except cf.TimeoutError:
            context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, "the mesh did not answer in time")

    def _take(self) -> list | None:
        cfg = self.config
        with self._cv:
            while not self._queue and not self._stop:
                self._cv.wait()
            if self._stop:
                return None
            if self._busy:  # another batch is in flight: let this one fill up a little
                deadline = time.monotonic() + cfg.batch_wait_ms / 1e3
                while len(self._queue) < cfg.batch_max_queries and (left := deadline - time.monotonic()) > 0:
                    self._cv.wait(left)
            batch, self._queue = self._queue[: cfg.batch_max_queries], self._queue[cfg.batch_max_queries:]
            self._busy += 1
            return batch

    def _loop(self) -> None:
        while (batch := self._take()) is not None:
            try:
                groups: dict[tuple, list] = {}
                for req, fut in batch:
                    groups.setdefault((req.k, req.k0, req.value_formula, req.nprobe), []).append((req, fut))
                for (k, k0, formula, nprobe), members in groups.items():
                    self._run(members, k, k0, formula, nprobe)
            finally:
                with self._cv:
                    self._busy -= 1

    def _run(self, members, k: int, k0: int, formula: str, nprobe: int) -> None:
        try:
            users = [u for req, _ in members for u in req.user_ids]
            wheres = sorted({req.where for req, _ in members if req.where})
            slot = {w: i for i, w in enumerate(wheres)}
            of = [slot.get(req.where, -1) for req, _ in members for _ in req.user_ids]
            t = self.config.timeout_s
            emb = self.tower.Embed.future(pb.EmbedRequest(user_ids=users), timeout=t)
            elig = self.filter.Eligible.future(pb.FilterRequest(where=wheres), timeout=t) if wheres else None
            u = emb.result()
            bitmaps = list(elig.result().bitmaps) if elig is not None else []
            cand = self.ann.Search(pb.AnnRequest(queries=u, k0=k0, nprobe=nprobe, bitmaps=bitmaps,
                                                 bitmap_of_query=of), timeout=t)
            ranked = self.scoring.Score(pb.ScoreRequest(users=u, candidates=cand, k=k, value_formula=formula),
                                        timeout=t)
            ids, values, tasks = from_ranked(ranked)
            row = 0
            for req, fut in members:
                n = len(req.user_ids)
                fut.set_result(ranked_msg(ids[row : row + n], values[row : row + n], tasks[row : row + n]))
                row += n
        except Exception as e:  # noqa: BLE001 — every caller of the batch gets the failure
            for _, fut in members:
                if not fut.done():
                    fut.set_exception(e)


# ------------------------------------------------------------------ process entry point
def _server(workers: int) -> grpc.Server:
    return grpc.server(cf.ThreadPoolExecutor(max_workers=workers), options=_OPTIONS)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m sterling.benchmarks.mesh.services")
    p.add_argument("role", choices=ROLES)
    p.add_argument("--artifact", help="the learned artifact (`sterling train` output) Sterling serves")
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch / OpenMP threads of this service")
    p.add_argument("--workers", type=int, default=4, help="gRPC handler threads")
    p.add_argument("--refine", type=int, default=2, help="ANN: SQ8 candidates re-scored exactly, × K0")
    p.add_argument("--tower", help="orchestrator: address of the user-tower service")
    p.add_argument("--filter", help="orchestrator: address of the filter service")
    p.add_argument("--ann", help="orchestrator: address of the ANN service")
    p.add_argument("--scoring", help="orchestrator: address of the scoring service")
    p.add_argument("--batch-wait-ms", type=float, default=1.0)
    p.add_argument("--batch-max-queries", type=int, default=64)
    p.add_argument("--pipelines", type=int, default=2)
    args = p.parse_args(argv)

    import torch

    torch.set_num_threads(args.threads)
    if args.role == "ann":
        import faiss

        faiss.omp_set_num_threads(args.threads)
    server = _server(args.workers)
    if args.role == "tower":
        pbg.add_UserTowerServicer_to_server(_Tower(TowerCore(args.artifact)), server)
    elif args.role == "filter":
        pbg.add_FilterServicer_to_server(_Filter(FilterCore(args.artifact)), server)
    elif args.role == "ann":
        pbg.add_AnnServicer_to_server(_Ann(AnnCore(args.artifact, refine=args.refine)), server)
    elif args.role == "scoring":
        pbg.add_ScoringServicer_to_server(_Scoring(ScoringCore(args.artifact)), server)
    else:
        addresses = {r: getattr(args, r) for r in ("tower", "filter", "ann", "scoring")}
        if not all(addresses.values()):
            p.error("the orchestrator needs --tower, --filter, --ann and --scoring addresses")
        cfg = OrchestratorConfig(batch_wait_ms=args.batch_wait_ms, batch_max_queries=args.batch_max_queries,
                                 pipelines=args.pipelines)
        pbg.add_OrchestratorServicer_to_server(Orchestrator(addresses, cfg), server)
    port = server.add_insecure_port(f"127.0.0.1:{args.port}")
    server.start()
    print(f"MESH READY {port}", flush=True)
    done = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: done.set())
    done.wait()
    server.stop(grace=1).wait()
    return 0


if __name__ == "__main__":
    sys.exit(main())
