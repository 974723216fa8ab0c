"""`sterling bench updates --over serve|ray`: acknowledged upserts/s and reader QPS over real gRPC.

The service runs as a child process — ``sterling serve --data-dir`` (in-process
shards) or ``sterling launch ray --data-dir`` (a local Ray instance, shard
actors with replicas) — on a model built here; this process is the client.
Upsert messages (batches of ``--batch``: half new ids, half changed vectors of
existing ids) and queries are encoded before the timed phases, so the client's
Python is not what is measured. Phases, each ``--seconds`` long:

* reader alone: one thread, batch-1 ``Retrieve`` calls back to back → QPS, p99;
* writer alone: one thread, ``Upsert`` calls back to back, each returning once
  its batch is durable (fsync) on every in-sync replica → acknowledged upserts/s;
* both at once → acknowledged upserts/s with the reader running, reader QPS and
  p99 with the writer running, and the drop against the reader alone.

One JSON line per service, then one with the ratios between them.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from sterling.benchmarks.evaluation import start_listening

__all__ = ["run_grpc"]


def _stop(proc) -> None:
    import signal

    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=30)


def _measure(address: str, args, upserts: list, queries: list) -> dict:
    import numpy as np

    from sterling.cluster.client import Client

    client = Client(address, timeout_s=120)  # first calls may JIT-compile the scan (cold numba cache)
    stub = client.stub
    client.wait_ready(120)
    for q in queries[:20]:
        stub.Retrieve(q, timeout=120)
    for m in upserts[:3]:
        stub.Upsert(iter([m]), timeout=120)
    todo = list(upserts[3:])

    def reader(stop, lat):
        i = 0
        while not stop.is_set():
            t0 = time.perf_counter()
            stub.Retrieve(queries[i % len(queries)], timeout=30)
            lat.append(time.perf_counter() - t0)
            i += 1

    def writer(stop, done):
        while not stop.is_set() and todo:
            m = todo.pop()
            stub.Upsert(iter([m]), timeout=60)
            done.append(len(m.ids))

    def phase(read: bool, write: bool) -> tuple[float, float, float]:
        stop, lat, done = threading.Event(), [], []
        threads = ([threading.Thread(target=reader, args=(stop, lat))] if read else []) + \
                  ([threading.Thread(target=writer, args=(stop, done))] if write else [])
        t0 = time.perf_counter()
        for t in threads:
            t.start()
        time.sleep(args.seconds)
        stop.set()
        for t in threads:
            t.join()
        el = time.perf_counter() - t0
        p99 = float(np.percentile(np.array(lat) * 1e3, 99)) if lat else float("nan")
        return len(lat) / el, p99, sum(done) / el

    qps0, p99_0, _ = phase(True, False)
    _, _, ups0 = phase(False, True)
    qps1, p99_1, ups1 = phase(True, True)
    info = client.info()
    client.close()
    sent = len(upserts) - len(todo)
    if not todo:
        print("warning: the writer ran out of prepared batches; raise --grpc-batches", file=sys.stderr)
    return {"qps_alone": qps0, "p99_ms_alone": p99_0, "upserts_per_s_alone": ups0,
            "qps_with_writer": qps1, "p99_ms_with_writer": p99_1, "upserts_per_s_with_reader": ups1,
            "qps_drop": 1 - qps1 / qps0, "model_version": int(info.model_version),
            "upsert_requests": sent,
            "replica_seqs": sorted({int(r.seq) for r in info.replica_logs})}


def run_grpc(args) -> int:
    import numpy as np
    import torch

    from sterling.cluster import retrieval_pb2 as pb
    from sterling.model import IndexConfig, RetrievalModel, build_index
    from sterling.model.synthetic import synthetic_catalog, synthetic_queries

    t_start = time.perf_counter()
    cat = synthetic_catalog(args.items, args.dim, seed=0)
    xq = synthetic_queries(cat, 500, seed=1).numpy()
    queries = [pb.RetrieveRequest(k=args.k, nprobe=args.nprobe, batch_size=1, query_embedding=q.tolist())
               for q in xq]
    rng = np.random.default_rng(0)
    per_phase = int(args.grpc_batches)
    rows = {}
    with tempfile.TemporaryDirectory(prefix="sterling-bench-updates-grpc-") as d:
        work = Path(d)
        index = build_index(cat.embeddings, ids=torch.arange(args.items),
                            config=IndexConfig(nlist=args.nlist, list_slack=args.slack))
        RetrievalModel(index).save(work / "m.st")
        del index
        for over in args.over:
            next_id = args.items
            upserts = []
            for _ in range(per_phase):
                new = args.batch // 2
                old = rng.choice(args.items, args.batch - new, replace=False)
                ids = np.concatenate([np.arange(next_id, next_id + new), old])
                next_id += new
                x = synthetic_queries(cat, args.batch, seed=int(rng.integers(1 << 30))).numpy()
                upserts.append(pb.UpsertRequest(ids=ids.tolist(), embeddings=x.reshape(-1).tolist()))
            base = [sys.executable, "-m", "sterling.launch.cli"]
            common = ["--model", str(work / "m.st"), "--data-dir", str(work / f"data-{over}"), "--port", "0",
                      "--shards", str(args.shards), "--workers", "4"]
            if over == "serve":
                cmd = [*base, "serve", *common]
            else:
                cmd = [*base, "launch", "ray", *common, "--replicas", str(args.replicas), "--num-cpus",
                       str(max(2, args.shards * args.replicas)), "--cpus-per-shard", "0.5", "--spread", "soft",
                       "--shards-dir", str(work / "shards")]
            proc, address = start_listening(cmd, work / f"{over}.log")
            try:
                rows[over] = _measure(address, args, upserts, queries)
            finally:
                _stop(proc)
    for over, r in rows.items():
        print(json.dumps({"over": over, "items": args.items, "dim": args.dim, "nlist": args.nlist,
                          "nprobe": args.nprobe, "k": args.k, "batch": args.batch, "shards": args.shards,
                          "replicas": args.replicas if over == "ray" else 1,
                          **{k: round(v, 4) if isinstance(v, float) else v for k, v in r.items()}}), flush=True)
    if len(rows) == 2:
        s, r = rows["serve"], rows["ray"]

        def ratio(key: str) -> float | None:
            return round(r[key] / s[key], 3) if s[key] else None

        print(json.dumps({"ratio_ray_over_serve_upserts_per_s_with_reader": ratio("upserts_per_s_with_reader"),
                          "ratio_ray_over_serve_qps_with_writer": ratio("qps_with_writer"),
                          "seconds": round(time.perf_counter() - t_start, 1)}), flush=True)
    return 0
