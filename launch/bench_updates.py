"""`sterling bench updates`: streaming upserts while queries run, vs Faiss IVF-SQ8 in the same run.

Sterling: a ``LiveModel`` with a data directory (every batch logged and
fsynced before it is applied), batches of ``--batch`` upserts (half new
items, half changed vectors of existing ones). Measured:

* ``upserts_per_s``: one writer thread alone, batches back to back;
* query QPS and p99 of one reader thread (batch-1 queries) alone, then
  with a writer thread paced at ``--rate`` upserts/s; the drop is the ratio;
* visibility: the first item of each paced batch is a marker the reader
  looks up right after the batch is acknowledged; ack → first answer that
  contains it.

With ``--over serve ray`` the same load goes through gRPC instead
(``sterling.launch.bench_updates_grpc``).

Faiss: ``IndexIVFScalarQuantizer(QT_8bit)`` on Sterling's centroids with a
``DirectMap.Hashtable``; an upsert batch is ``remove_ids`` + ``add_with_ids``.
Faiss does not allow search concurrent with add/remove, so its reader and
writer share a mutex (what a Faiss server has to do). Same threads for both.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import threading
import time

__all__ = ["register", "run"]


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("updates", help="streaming upserts under query load vs Faiss IVF-SQ8 add/remove_ids")
    p.add_argument("--items", type=int, default=1_000_000)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--nlist", type=int, default=1024)
    p.add_argument("--nprobe", type=int, default=16)
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--batch", type=int, default=1000)
    p.add_argument("--rate", type=float, default=50_000, help="paced upserts/s during the with-load phase")
    p.add_argument("--seconds", type=float, default=8.0, help="length of each timed phase")
    p.add_argument("--writer-batches", type=int, default=60, help="batches in the writer-alone phase")
    p.add_argument("--slack", type=float, default=0.2, help="IndexConfig.list_slack of the build")
    p.add_argument("--no-faiss", action="store_true")
    p.add_argument("--over", nargs="+", choices=("serve", "ray"),
                   help="measure over gRPC instead: `sterling serve --data-dir` and/or `sterling launch ray "
                   "--data-dir` as a child process (acknowledged upserts/s, reader QPS with and without a writer)")
    p.add_argument("--shards", type=int, default=2, help="document shards of the gRPC service (--over)")
    p.add_argument("--replicas", type=int, default=2, help="replicas per shard of the Ray service (--over ray)")
    p.add_argument("--grpc-batches", type=int, default=300, help="upsert batches prepared for the gRPC phases")
    p.add_argument("--switch-interval-ms", type=float, default=0.5,
                   help="sys.setswitchinterval: how soon a thread back from a GIL-free scan gets the GIL "
                   "(Python's 5 ms default makes the reader wait behind the writer's Python)")
    p.set_defaults(func=run)


def _pct(lat: list[float], q: float) -> float:
    import numpy as np

    return float(np.percentile(np.array(lat) * 1e3, q)) if lat else float("nan")


def run(args: argparse.Namespace) -> int:
    if args.over:
        from sterling.launch.bench_updates_grpc import run_grpc

        return run_grpc(args)
    import numpy as np
    import torch

    from sterling.kernels import cpu_scan
    from sterling.model import IndexConfig, RetrievalModel, build_index
    from sterling.model.live import LiveModel
    from sterling.model.synthetic import synthetic_catalog, synthetic_queries

    torch.set_num_threads(1)  # one core for the reader, one for the writer
    sys.setswitchinterval(args.switch_interval_ms / 1e3)
    if cpu_scan.HAVE_NUMBA:
        import numba

        numba.set_num_threads(1)
    t_start = time.perf_counter()
    cat = synthetic_catalog(args.items, args.dim, seed=0)
    xq = synthetic_queries(cat, 2000, seed=1).numpy()
    index = build_index(cat.embeddings, ids=torch.arange(args.items),
                        config=IndexConfig(nlist=args.nlist, list_slack=args.slack))
    rng = np.random.default_rng(0)
    next_id = [args.items]
    pool = [synthetic_queries(cat, args.batch, seed=100 + i).numpy() for i in range(16)]  # vectors, reused

    def make_batch(n: int, marker: np.ndarray | None = None):
        """Half new ids, half existing ids with new vectors (generated outside the timed writes)."""
        new = n // 2
        old = np.unique(rng.integers(0, args.items, 2 * (n - new)))[: n - new]
        rng.shuffle(old)
        ids = np.concatenate([np.arange(next_id[0], next_id[0] + new), old])
        next_id[0] += new
        x = pool[int(rng.integers(len(pool)))][: len(ids)].copy()
        if marker is not None:
            x[0] = marker
        return ids, x

    def reader(search, stop, lat, pending, seen_at):
        i = 0
        while not stop.is_set():
            m = pending[0]
            t0 = time.perf_counter()
            if m is not None:
                mid, vec, t_ack = m
                ids = search(vec[None])
                if ids[0] == mid:
                    seen_at.append(time.perf_counter() - t_ack)
                    pending[0] = None
            else:
                search(xq[i % len(xq)][None])
                i += 1
            lat.append(time.perf_counter() - t0)

    def phase(search, upsert, rate: float | None):
        """Reader alone (rate None) or reader + paced writer: (qps, p99 ms, upserts/s, visibility ms list)."""
        stop, lat, pending, seen_at = threading.Event(), [], [None], []
        th = threading.Thread(target=reader, args=(search, stop, lat, pending, seen_at))
        th.start()
        n_batches = 0 if rate is None else int(args.seconds * rate / args.batch) + 1
        batches = []
        for _ in range(n_batches):
            marker = rng.standard_normal(args.dim).astype(np.float32)
            marker *= 10.0 / np.linalg.norm(marker)  # scores ~100 against itself, ≤ ~10 against others
            batches.append(make_batch(args.batch, marker))
        t0 = time.perf_counter()
        done = 0
        while time.perf_counter() - t0 < args.seconds:
            if rate is None:
                time.sleep(0.05)
                continue
            if not batches:
                break
            ids, x = batches.pop()
            marker = x[0]
            upsert(ids, x)
            pending[0] = (int(ids[0]), marker, time.perf_counter())
            done += len(ids)
            wait = t0 + done / rate - time.perf_counter()
            if wait > 0:
                time.sleep(wait)
        elapsed = time.perf_counter() - t0
        stop.set()
        th.join()
        return len(lat) / elapsed, _pct(lat, 99), done / elapsed, [s * 1e3 for s in seen_at]

    def writer_alone(upsert) -> float:
        batches = [make_batch(args.batch) for _ in range(args.writer_batches)]
        t0 = time.perf_counter()
        for ids, x in batches:
            upsert(ids, x)
        return args.writer_batches * args.batch / (time.perf_counter() - t0)

    rows = {}
    with tempfile.TemporaryDirectory(prefix="sterling-bench-updates-") as d:
        live = LiveModel.open(RetrievalModel(index), LiveModel.Config(data_dir=d, compact_waste=0))

        def st_search(q):
            return live(query=torch.from_numpy(q), k=args.k, nprobe=args.nprobe).ids[0].numpy()

        def st_upsert(ids, x):
            live.upsert(ids, x)

        writer_alone(st_upsert)  # warm-up (first CSR reserve, lazy state)
        st_search(xq[:1])
        rows["sterling"] = {"upserts_per_s": writer_alone(st_upsert)}
        rows["sterling"].update(_phases(phase, st_search, st_upsert, args.rate))
        # lists that filled: laid out again locally (a window of neighbours) or re-packed whole
        rows["sterling"].update(local_relayouts=live.local_repacks, full_repacks=live.repacks)
        live.close()
    if not args.no_faiss:
        import faiss

        faiss.omp_set_num_threads(1)
        quant = faiss.IndexFlatIP(args.dim)
        quant.add(index.centroids.numpy())
        sq8 = faiss.IndexIVFScalarQuantizer(quant, args.dim, args.nlist, faiss.ScalarQuantizer.QT_8bit,
                                            faiss.METRIC_INNER_PRODUCT)
        sq8.train(cat.embeddings[: min(args.items, 100_000)].numpy())
        sq8.set_direct_map_type(faiss.DirectMap.Hashtable)
        sq8.add_with_ids(cat.embeddings.numpy(), np.arange(args.items, dtype=np.int64))
        sq8.nprobe = args.nprobe
        mutex = threading.Lock()

        def fa_search(q):
            with mutex:
                return sq8.search(q, args.k)[1][0]

        def fa_upsert(ids, x):
            with mutex:
                sq8.remove_ids(np.ascontiguousarray(ids, dtype=np.int64))
                sq8.add_with_ids(x, ids.astype(np.int64))

        writer_alone(fa_upsert)
        rows["faiss_ivf_sq8"] = {"upserts_per_s": writer_alone(fa_upsert)}
        rows["faiss_ivf_sq8"].update(_phases(phase, fa_search, fa_upsert, args.rate))
    for name, r in rows.items():
        print(json.dumps({"system": name, "items": args.items, "dim": args.dim, "nlist": args.nlist,
                          "nprobe": args.nprobe, "k": args.k, "batch": args.batch, "rate": args.rate,
                          **{k: round(v, 4) if isinstance(v, float) else v for k, v in r.items()}}), flush=True)
    if "faiss_ivf_sq8" in rows:
        s, f = rows["sterling"], rows["faiss_ivf_sq8"]
        print(json.dumps({"ratio_upserts_per_s": round(s["upserts_per_s"] / f["upserts_per_s"], 3),
                          "ratio_qps_loaded": round(s["qps_loaded"] / f["qps_loaded"], 3),
                          "seconds": round(time.perf_counter() - t_start, 1)}), flush=True)
    return 0


def _phases(phase, search, upsert, rate: float) -> dict:
    """Reader alone, reader + paced writer, reader alone again; the figures of one system.

    ``qps_drop`` is the issue's figure: loaded QPS against the reader alone before the
    writer ran. The paced writer adds items (half of every batch is new), so the index the
    loaded phase ends on is larger than the one it started on, and queries scan more items
    whatever the writer does meanwhile; ``qps_alone_after`` measures the reader alone on
    that final index, and ``qps_drop_interference`` compares the loaded QPS with the mean of
    the two alone figures (the index grows linearly during the phase): the part of the drop
    that is the writer's interference rather than the larger index.
    """
    qps0, p99_0, _, _ = phase(search, upsert, None)
    qps1, p99_1, rate1, vis = phase(search, upsert, rate)
    qps2, p99_2, _, _ = phase(search, upsert, None)
    return dict(qps_alone=qps0, p99_ms_alone=p99_0, qps_loaded=qps1, p99_ms_loaded=p99_1,
                paced_upserts_per_s=rate1, qps_drop=1 - qps1 / qps0, qps_alone_after=qps2,
                p99_ms_alone_after=p99_2, qps_drop_interference=1 - qps1 / ((qps0 + qps2) / 2),
                visibility_ms_p50=_pct_list(vis, 50), visibility_ms_max=max(vis, default=float("nan")),
                visibility_samples=len(vis))


def _pct_list(v: list[float], q: float) -> float:
    import numpy as np

    return float(np.percentile(v, q)) if v else float("nan")
