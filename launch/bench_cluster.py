"""`sterling bench cluster`: QPS and p50/p99 through the gRPC router vs the model in-process.

One run: build (or load) a model, measure the single-process model on the
request stream, then for each shard count start the router (gRPC on
loopback) over Ray shard actors (``--backend ray``, the real cluster) or
in-process shards (``--backend local``) and replay the same stream from
``--concurrency`` client threads (the in-process side uses as many threads). Prints one JSON line per shard count with
both sides and their ratio, and checks the answers are the model's.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import threading
import time
from pathlib import Path

from sterling.benchmarks.evaluation import percentiles_ms

__all__ = ["register", "run"]


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("cluster", help="router (gRPC, 1/2/4 shards) vs the model in-process: QPS, p50/p99")
    p.add_argument("--model", help="artifact to serve (default: a synthetic catalog built here)")
    p.add_argument("--items", type=int, default=200_000)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--nlist", type=int, default=256)
    p.add_argument("--shards", default="1,2,4", help="comma-separated shard counts")
    p.add_argument("--backend", choices=("ray", "local"), default="ray")
    p.add_argument("--k", type=int, default=100)
    p.add_argument("--nprobe", type=int, default=16)
    p.add_argument("--where", default=None, help="filter for every query")
    p.add_argument("--batch", type=int, default=1, help="queries per request")
    p.add_argument("--requests", type=int, default=300)
    p.add_argument("--concurrency", type=int, default=4, help="client threads against the router")
    p.add_argument("--threads-per-shard", type=int, default=1)
    p.add_argument("--ranks-per-host", default="1",
                   help="comma list (ray backend): each shard actor a process group of N gloo ranks (1 = no group)")
    p.add_argument("--batch-wait-ms", default="0,20",
                   help="comma list of router dynamic-batching waits to compare (0 = batching off)")
    p.add_argument("--out", help="append the JSON lines to this file")
    p.set_defaults(func=run)


def _inprocess(model, reqs, args) -> dict:
    """The same request stream on the model in this process, from ``--concurrency`` threads (no gRPC)."""
    lat = [0.0] * len(reqs)
    ids: list = [None] * len(reqs)
    model(query=reqs[0], k=args.k, nprobe=args.nprobe, where=args.where, adaptive=False)  # warm-up
    nxt = iter(range(len(reqs)))
    lock = threading.Lock()

    def worker():
        while True:
            with lock:
                i = next(nxt, None)
            if i is None:
                return
            t = time.perf_counter()
            ids[i] = model(query=reqs[i], k=args.k, nprobe=args.nprobe, where=args.where, adaptive=False).ids
            lat[i] = time.perf_counter() - t

    threads = [threading.Thread(target=worker) for _ in range(args.concurrency)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    p50, p99 = percentiles_ms(lat)
    return {"qps": len(reqs) * args.batch / wall, "p50_ms": p50, "p99_ms": p99, "ids": ids}


def _through_router(address: str, reqs, args) -> dict:
    import numpy as np

    from sterling.cluster.client import Client

    clients = [Client(address, timeout_s=60) for _ in range(args.concurrency)]
    for c in clients:
        c.wait_ready(30)
        c.retrieve(query=reqs[0].numpy(), k=args.k, nprobe=args.nprobe, where=args.where)  # warm-up
    lat = [0.0] * len(reqs)
    ids: list = [None] * len(reqs)
    partial = [False] * len(reqs)
    nxt = iter(range(len(reqs)))
    lock = threading.Lock()

    def worker(c):
        while True:
            with lock:
                i = next(nxt, None)
            if i is None:
                return
            t = time.perf_counter()
            r = c.retrieve(query=reqs[i].numpy(), k=args.k, nprobe=args.nprobe, where=args.where)
            lat[i] = time.perf_counter() - t
            ids[i], partial[i] = r.ids, r.partial

    threads = [threading.Thread(target=worker, args=(c,)) for c in clients]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    for c in clients:
        c.close()
    p50, p99 = percentiles_ms(lat)
    return {"qps": len(reqs) * args.batch / wall, "p50_ms": p50, "p99_ms": p99, "ids": ids,
            "partial": int(np.sum(partial))}


def run(args: argparse.Namespace) -> int:
    import numpy as np
    import torch

    from sterling.cluster.batching import BatchingConfig
    from sterling.cluster.router import Router, RouterConfig
    from sterling.cluster.server import RetrievalServer, ServerConfig
    from sterling.model import IndexConfig, RetrievalModel, build_index
    from sterling.model.synthetic import synthetic_catalog, synthetic_queries
    from sterling.sharding.documents import write_shards

    tmp = Path(tempfile.mkdtemp(prefix="sterling-bench-cluster-"))
    if args.model:
        path = Path(args.model)
    else:
        cat = synthetic_catalog(args.items, args.dim, seed=0)
        index = build_index(cat.embeddings, ids=cat.ids, attributes=cat.attributes,
                            config=IndexConfig(nlist=args.nlist))
        path = tmp / "model.st"
        RetrievalModel(index).save(path)
    model = RetrievalModel.load(path)
    g = torch.Generator().manual_seed(1)
    D = model.index.dim
    if args.model:
        xq_all = torch.nn.functional.normalize(torch.randn(args.requests * args.batch, D, generator=g), dim=1)
    else:
        xq_all = synthetic_queries(cat, args.requests * args.batch, seed=1)
    reqs = list(xq_all.split(args.batch))
    base = _inprocess(model, reqs, args)
    counts = [int(x) for x in args.shards.split(",") if x.strip()]
    rank_counts = [int(x) for x in str(args.ranks_per_host).split(",") if x.strip()]
    if args.backend != "ray" and rank_counts != [1]:
        from sterling.cluster.errors import ClusterConfigError

        raise ClusterConfigError(f"--ranks-per-host {args.ranks_per_host} needs --backend ray (groups run in Ray actors)")
    if args.backend == "ray":
        import ray

        ray.init(num_cpus=max(4, max(counts) * max(rank_counts)), log_to_driver=False, include_dashboard=False)
    rows = []
    try:
        for n, ranks in [(n, rk) for n in counts for rk in rank_counts]:
            manifest = write_shards(path, tmp / f"shards{n}", num_shards=n)
            head = RetrievalModel.load(manifest.head)
            if args.backend == "ray":
                from sterling.cluster.ray_backend import RayBackend

                groups = {}
                if ranks > 1:
                    from sterling.launch.launch_cmd import ensure_group_slices

                    dirs, per = ensure_group_slices(manifest, ranks)
                    groups = {"rank_dirs": dirs, "ranks": per}
                backend = RayBackend.launch(manifest, replicas=1, threads_per_actor=args.threads_per_shard,
                                            cpus_per_actor=1.0, strategy="PACK", **groups)
            else:
                from sterling.cluster.backends import LocalBackend
                from sterling.cluster.shard import ShardServer

                backend = LocalBackend([[ShardServer.load(s.path, shard=s.index)] for s in manifest.shards])
            router = Router(head, backend, RouterConfig(max_k=max(10_000, args.k), default_deadline_ms=30_000))
            try:
                for wait in [float(x) for x in str(args.batch_wait_ms).split(",") if x.strip()]:
                    cfg = ServerConfig(port=0, workers=max(4, args.concurrency),
                                       batching=BatchingConfig(max_wait_ms=wait))
                    # the next wait setting reuses these shards
                    srv = RetrievalServer(router, cfg, backend_name=args.backend, close_backend=False).start()
                    try:
                        r = _through_router(srv.address, reqs, args)
                    finally:
                        srv.stop()
                    equal = all(np.array_equal(a, b.numpy()) for a, b in zip(r["ids"], base["ids"]))
                    row = {
                        "bench": "cluster", "backend": args.backend, "shards": n, "ranks_per_shard": ranks,
                        "items": model.index.num_items,
                        "dim": D, "nlist": model.index.nlist, "k": args.k, "nprobe": args.nprobe, "where": args.where,
                        "batch": args.batch, "requests": args.requests, "concurrency": args.concurrency,
                        "batch_wait_ms": wait,
                        "router_qps": round(r["qps"], 1), "router_p50_ms": round(r["p50_ms"], 2),
                        "router_p99_ms": round(r["p99_ms"], 2),
                        "inprocess_qps": round(base["qps"], 1), "inprocess_p50_ms": round(base["p50_ms"], 2),
                        "inprocess_p99_ms": round(base["p99_ms"], 2),
                        "qps_ratio": round(r["qps"] / base["qps"], 3), "partial": r["partial"], "ids_equal": equal,
                    }
                    rows.append(row)
                    print(json.dumps(row), flush=True)
            finally:
                router.backend.close()
    finally:
        if args.backend == "ray":
            import ray

            ray.shutdown()
    if args.out:
        with open(args.out, "a") as f:
            for row in rows:
                f.write(json.dumps(row) + "\n")
    return 0
