"""`sterling bench shards`: QPS and p99 of one model over N ranks (one gloo/NCCL process group) vs one process.

One run: build a synthetic catalog (or load ``--model``), write per-rank
slices for every rank count, and replay the same request stream (sequential
requests of ``--batch`` queries: the group runs one collective at a time)
against

* the same artifact in this process (the peer), with ``--threads`` torch threads, and
* a process group of N ranks (``torch.multiprocessing`` spawn, the same
  ``RankGroup`` that ``sterling launch torchrun`` serves), each rank with
  ``--threads-per-rank`` threads, timed on rank 0.

The peer is measured before and after the groups (best of the two), and
once more with one thread (what one rank has). Every
answer is checked equal to the peer's. Prints one JSON line per rank count
and writes them all to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import tempfile
import time
from pathlib import Path

__all__ = ["register", "run"]


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("shards", help="one model over 1/2/4 ranks of a process group vs one process: QPS, p99")
    p.add_argument("--model", help="plain retrieval artifact (default: a synthetic catalog built here)")
    p.add_argument("--items", type=int, default=200_000)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--nlist", type=int, default=256)
    p.add_argument("--ranks", default="1,2,4", help="comma-separated rank counts")
    p.add_argument("--k", type=int, default=100)
    p.add_argument("--nprobe", type=int, default=16)
    p.add_argument("--where", default=None, help="filter for every query")
    p.add_argument("--batch", type=int, default=32, help="queries per request")
    p.add_argument("--requests", type=int, default=100)
    p.add_argument("--threads", type=int, default=2, help="torch threads of the one-process peer")
    p.add_argument("--threads-per-rank", type=int, default=1)
    p.add_argument("--learned", action="store_true",
                   help="a learned model (random weights, MoL OverArch) over K0 candidates: also times the rerank "
                   "stage's share of a request (it runs on rank 0 after the merge)")
    p.add_argument("--k0", type=int, default=2000, help="candidates the OverArch reranks (--learned)")
    p.add_argument("--out", help="write the JSON lines to this file")
    p.set_defaults(func=run)


def _stats(lat_s: list[float], nq: int, wall: float) -> dict:
    import numpy as np

    a = np.asarray(lat_s) * 1e3
    return {"qps": nq / wall, "p50_ms": float(np.percentile(a, 50)), "p99_ms": float(np.percentile(a, 99))}


def _timed(fn, reqs) -> tuple[dict, list]:
    fn(reqs[0])  # warm-up
    lat, out = [], []
    t0 = time.perf_counter()
    for r in reqs:
        t = time.perf_counter()
        out.append(fn(r))
        lat.append(time.perf_counter() - t)
    wall = time.perf_counter() - t0
    return _stats(lat, sum(len(r) for r in reqs), wall), out


def _rank_main(rank: int, world: int, port: int, ranks_dir: str, reqs, args: dict, out_path: str) -> None:
    import numpy as np
    import torch.distributed as dist

    from sterling.sharding.group import RankGroup

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), GLOO_DEVICE_TRANSPORT="TCP")
    from sterling.sharding.group import set_rank_threads

    set_rank_threads(args["threads_per_rank"])
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        g = RankGroup.load(ranks_dir)
        if rank != 0:
            g.serve()
            return
        try:
            if args["k0"]:
                kw = {"k0": args["k0"], "nprobe": args["nprobe"], "where": args["where"]}
                ann, _ = _timed(lambda q: g.retrieve(query=q, k=args["k0"], rerank=False, **kw), reqs)
                stats, res = _timed(lambda q: g.retrieve(query=q, k=args["k"], **kw), reqs)
                stats["ann_stage"] = ann
                ids = [r.ids.numpy() for r in res]
            else:
                stats, res = _timed(lambda q: g.search(q, k=args["k"], nprobe=args["nprobe"], where=args["where"]),
                                    reqs)
                ids = [r.ids for r in res]
        finally:
            g.stop()
        np.save(out_path, np.concatenate(ids))
        Path(out_path + ".json").write_text(json.dumps(stats))
    finally:
        dist.destroy_process_group()


def _learned(index, cat):
    """A learned model with random (seeded) weights over ``index``: MoL OverArch, 2 task heads."""
    import torch

    from sterling.model.heads import TaskHeads
    from sterling.model.learned import EmbeddingCache, LearnedRetrievalModel
    from sterling.model.overarch import build_overarch
    from sterling.model.towers import SparseFeature, Tower

    torch.manual_seed(0)
    arch = build_overarch("mol", index.dim).eval()
    with torch.no_grad():
        cache = EmbeddingCache.build(cat.ids, arch.item_side(cat.embeddings))
    tower = Tower(Tower.Config(sparse=(SparseFeature(name="user_id", num_embeddings=8),), output_dim=index.dim))
    return LearnedRetrievalModel(index=index, user_tower=tower, overarch=arch, heads=TaskHeads(arch.hidden_dim,
                                 ["click", "like"]), cache=cache, value_formula="click + 2*like").eval()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(args: argparse.Namespace) -> int:
    import numpy as np
    import torch
    import torch.multiprocessing as mp

    from sterling.model import IndexConfig, RetrievalModel, build_index
    from sterling.model.synthetic import synthetic_catalog, synthetic_queries
    from sterling.sharding.group import set_rank_threads
    from sterling.sharding.ranks import rank_costs, write_rank_slices

    counts = [int(x) for x in args.ranks.split(",") if x.strip()]
    tmp = Path(tempfile.mkdtemp(prefix="sterling-bench-shards-"))
    if args.model:
        path = Path(args.model)
        model = RetrievalModel.load(path)
        xq_all = torch.nn.functional.normalize(torch.randn(args.requests * args.batch + 512, model.index.dim), dim=1)
    else:
        cat = synthetic_catalog(args.items, args.dim, seed=0)
        index = build_index(cat.embeddings, ids=cat.ids, attributes=cat.attributes, config=IndexConfig(nlist=args.nlist))
        model = _learned(index, cat) if args.learned else RetrievalModel(index)
        path = tmp / "model.st"
        model.save(path)
        model = type(model).load(path).eval() if args.learned else RetrievalModel.load(path)
        xq_all = synthetic_queries(cat, args.requests * args.batch + 512, seed=1)
    sample, xq = xq_all[:512], xq_all[512:]
    reqs = [xq[i * args.batch : (i + 1) * args.batch].numpy() for i in range(args.requests)]

    def peer(threads: int = args.threads) -> tuple[dict, np.ndarray]:
        set_rank_threads(threads)
        kw = {"nprobe": args.nprobe, "where": args.where, "adaptive": False}
        if args.learned:
            with torch.no_grad():
                ann, _ = _timed(lambda q: model.index.search(torch.from_numpy(q), k=args.k0, **kw), reqs)
                st, res = _timed(lambda q: model(query=torch.from_numpy(q), k=args.k, k0=args.k0, **kw).ids.numpy(),
                                 reqs)
            st["ann_stage"] = ann
        else:
            st, res = _timed(lambda q: model(query=torch.from_numpy(q), k=args.k, **kw).ids.numpy(), reqs)
        return st, np.concatenate(res)

    before, ref = peer()
    groups = {}
    for n in counts:
        m = write_rank_slices(path, tmp / f"ranks-{n}", world_size=n, xq_sample=sample, nprobe=args.nprobe)
        out = str(tmp / f"ids-{n}.npy")
        cfg = {"k": args.k, "nprobe": args.nprobe, "where": args.where, "threads_per_rank": args.threads_per_rank,
               "k0": args.k0 if args.learned else 0}
        mp.start_processes(_rank_main, args=(n, _free_port(), str(tmp / f"ranks-{n}"), reqs, cfg, out), nprocs=n,
                           start_method="spawn")
        same = bool(np.array_equal(np.load(out), ref))
        shares = rank_costs(model.index, [s.lists for s in m.shards], xq_sample=sample, nprobe=args.nprobe)
        groups[n] = {**json.loads(Path(out + ".json").read_text()), "answers_equal_peer": same,
                     "bytes_share": [round(x, 3) for x in shares["bytes"]],
                     "load_share": [round(x, 3) for x in shares["load"]]}
    after, _ = peer()
    one_thread, _ = peer(1)
    set_rank_threads(args.threads)
    best = before if before["qps"] >= after["qps"] else after
    lines = []
    for n, g in groups.items():
        row = {"bench": "shards", "ranks": n, "learned": args.learned, "k0": args.k0 if args.learned else None, "items": model.index.num_items, "dim": model.index.dim,
               "nlist": model.index.nlist, "k": args.k, "nprobe": args.nprobe, "batch": args.batch,
               "where": args.where, "requests": args.requests, "threads_per_rank": args.threads_per_rank,
               "cpus": os.cpu_count(), "group": g,
               "one_process": {"threads": args.threads, **best, "runs_qps": [before["qps"], after["qps"]]},
               "one_process_1_thread": one_thread,
               "qps_ratio": g["qps"] / best["qps"], "p99_ratio": g["p99_ms"] / best["p99_ms"]}
        lines.append(json.dumps(row))
        print(lines[-1], flush=True)
    if args.out:
        tmp_out = Path(args.out + ".tmp")
        tmp_out.write_text("\n".join(lines) + "\n")
        tmp_out.replace(args.out)
    return 0 if all(g["answers_equal_peer"] for g in groups.values()) else 1
