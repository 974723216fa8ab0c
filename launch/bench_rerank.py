"""`sterling bench rerank`: quality and cost of the wide funnel, against named peers in the same run.

Quality (held-out recall@k / NDCG@k per task, same time split, seen items
excluded): ANN only (two-tower + index) vs ANN → OverArch + heads + Value
Model, next to ``implicit`` BPR and ALS trained on the same training
interactions. Data: MovieLens-100k (from the recbole wheel) and the
synthetic hidden-factor set.

Cost: candidates scored per second by each OverArch (gather from the cache
+ OverArch + heads) at K0 = 10k on a 100k-item cache, and the GEMM FLOP
rate this implies as a fraction of the fp32 sgemm rate measured in the same
process, next to the roofline bound (FLOPs per byte of cache row × the read
bandwidth measured in the same run: a DRAM stream, and a buffer of the gathered
rows' size read back just after it is written); each OverArch under ``torch.compile``
vs eager; end-to-end latency (p50/p99) at batch 1 and 64 with and without
the OverArch at K0 = 10k.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np

from sterling.benchmarks.evaluation import best_time

__all__ = ["register", "run", "implicit_recs"]


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("rerank", help="learned model: ANN-only vs full model vs implicit BPR/ALS; OverArch cost")
    p.add_argument("--datasets", default="ml100k,synthetic",
                   help="comma list of ml100k, synthetic, synthetic-60k (60,000 items: for K0 = 10k / 50k rows)")
    p.add_argument("--overarch", default="mol", help="OverArch trained for the quality rows")
    p.add_argument("--k", type=int, default=100)
    p.add_argument("--k0", default="1000", help="comma list of K0 for the full stage (capped at the catalog size)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-cost", action="store_true", help="skip the OverArch cost and latency rows")
    p.add_argument("--no-quality", action="store_true", help="skip the quality rows")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile vs eager OverArch rows")
    p.set_defaults(func=lambda a: run(a) and 0)


def implicit_recs(data, kind: str, k: int, *, seed: int = 0, factors: int = 64, threads: int = 2):
    """Top-k item ids per held-out user from implicit's BPR or ALS on the same training positives."""
    import scipy.sparse as sp
    from implicit.cpu.als import AlternatingLeastSquares
    from implicit.cpu.bpr import BayesianPersonalizedRanking

    train = ~data.test & data.positive
    ur, ir = data.user_row[train], data.item_row[train]
    mat = sp.csr_matrix((np.ones(len(ur), np.float32), (ur, ir)), shape=(len(data.users), len(data.item_ids)))
    mat.data[:] = 1.0
    if kind == "bpr":
        model = BayesianPersonalizedRanking(factors=factors, iterations=100, random_state=seed, num_threads=threads)
    else:
        model = AlternatingLeastSquares(factors=factors, iterations=15, regularization=0.05, random_state=seed,
                                        num_threads=threads)
    model.fit(mat, show_progress=False)
    test_users = np.array(sorted({int(u) for u in data.inter.user_id[data.test]}), dtype=np.int64)
    rows = data.users.row_of(test_users)
    ids, _ = model.recommend(rows, mat[rows], N=k, filter_already_liked_items=True)
    # `mat` holds train positives only; drop train non-positives too (as the model's --exclude does)
    seen_all = {}
    tr = np.flatnonzero(~data.test)
    for r in tr:
        seen_all.setdefault(int(data.user_row[r]), set()).add(int(data.item_row[r]))
    out = {}
    for u, r, row in zip(test_users, rows, ids):
        s = seen_all.get(int(r), set())
        out[int(u)] = [int(data.item_ids[i]) for i in row if i >= 0 and int(i) not in s]
    return out


def _dataset(name: str, tmp: Path, seed: int):
    from sterling.model.data import read_features, read_interactions

    if name == "ml100k":
        from sterling.model.movielens import write_movielens_100k

        paths = write_movielens_100k(tmp / "ml100k")
    elif name == "synthetic":
        from sterling.model.synthetic_rec import write_synthetic_rec

        paths = write_synthetic_rec(tmp / "synthetic", seed=seed)
    elif name == "synthetic-60k":  # a catalog large enough for K0 = 10k and 50k
        from sterling.model.synthetic_rec import write_synthetic_rec

        paths = write_synthetic_rec(tmp / "synthetic-60k", n_users=2000, n_items=60_000, seed=seed)
    else:
        raise SystemExit(f"unknown dataset {name!r}; use ml100k, synthetic or synthetic-60k")
    return (
        read_interactions(paths["interactions"]),
        read_features(paths["users"], "user_id"),
        read_features(paths["items"], "item_id"),
    )


def quality(name: str, args, tmp: Path) -> list[dict]:
    from sterling.model.train import TrainConfig, evaluate, ranking_metrics, train, truth_sets

    inter, users, items = _dataset(name, tmp, args.seed)
    cfg = TrainConfig(overarch=args.overarch, seed=args.seed, progress=False)
    t0 = time.perf_counter()
    model, data, log = train(inter, users, items, cfg, evaluate_k=args.k)
    train_s = time.perf_counter() - t0
    rows = []
    truth = truth_sets(data, data.test)
    for k0 in [int(x) for x in args.k0.split(",")]:
        k0 = min(k0, len(data.item_ids))
        metrics, _ = evaluate(model, data, k=args.k, k0=k0)
        for stage in ("ann", "full"):
            if stage == "ann" and rows:
                continue
            for task, m in metrics[stage].items():
                rows.append({"dataset": name, "system": f"sterling {stage}" + (f" ({cfg.overarch}, K0={k0})" if stage == "full" else ""),
                             "task": task, **{kk: round(v, 4) if isinstance(v, float) else v for kk, v in m.items()},
                             "train_s": round(train_s, 1)})
    for kind in ("bpr", "als"):
        t0 = time.perf_counter()
        recs = implicit_recs(data, kind, args.k, seed=args.seed, threads=args.threads)
        fit_s = time.perf_counter() - t0
        for task in truth:
            m = ranking_metrics(recs, truth[task], args.k)
            rows.append({"dataset": name, "system": f"implicit {kind}", "task": task,
                         **{kk: round(v, 4) if isinstance(v, float) else v for kk, v in m.items()}, "train_s": round(fit_s, 1)})
    return rows


def _sgemm_gflops(torch) -> float:
    a, b = torch.randn(1024, 1024), torch.randn(1024, 1024)
    for _ in range(3):
        a @ b
    best = 0.0
    for _ in range(7):
        t = time.perf_counter()
        a @ b
        best = max(best, 2 * 1024**3 / (time.perf_counter() - t) / 1e9)
    return best


def _read_bandwidth(torch, nbytes: int = 256 << 20, *, rewrite: bool = False) -> float:
    """Bytes/s of a streaming read (a sum over ``nbytes``, best of 5): the roofline's memory side.

    256 MB (the default) is DRAM on any machine; the gathered rows an OverArch reads (``nbytes`` of
    B·K0 rows, ``rewrite``: written just before each read, as the gather writes them) may be served
    by a large last-level cache instead, faster.
    """
    x = torch.ones(max(nbytes // 4, 1))
    x.sum()
    best = float("inf")
    for _ in range(5):
        if rewrite:
            x.fill_(1.0)
        t = time.perf_counter()
        x.sum()
        best = min(best, time.perf_counter() - t)
    return x.numel() * 4 / best


def compiled_rows(built, u, cand, prior, torch) -> list[dict]:
    """Each OverArch + heads compiled (``torch.compile``, inductor, static shapes) vs eager, same inputs."""
    rows = []
    for kind, (arch, heads, cache) in built.items():
        x, valid = cache.gather(cand)

        def eager(arch=arch, heads=heads, x=x, valid=valid):
            return heads(arch(u, x, valid), prior)

        t0 = time.perf_counter()
        compiled = torch.compile(eager, dynamic=False)
        compiled()
        compile_s = time.perf_counter() - t0
        torch.testing.assert_close(compiled(), eager(), rtol=1e-4, atol=1e-4)  # same function, same answer
        te, tc = float("inf"), float("inf")
        for _ in range(3):  # interleaved
            te = min(te, best_time(eager, 3)[0])
            tc = min(tc, best_time(compiled, 3)[0])
        n = cand.numel()
        rows.append({"overarch": kind, "mode": "torch.compile vs eager (excl. gather)",
                     "eager_candidates_per_s": round(n / te), "compiled_candidates_per_s": round(n / tc),
                     "compiled_over_eager": round(te / tc, 2), "compile_s": round(compile_s, 1)})
    return rows


def cost(args) -> list[dict]:
    import torch

    from sterling.model.heads import TaskHeads
    from sterling.model.learned import EmbeddingCache
    from sterling.model.overarch import build_overarch

    g = torch.Generator().manual_seed(args.seed)
    N, D, K0, B = 100_000, 64, 10_000, 8
    v = torch.nn.functional.normalize(torch.randn(N, D, generator=g), dim=1)
    ids = torch.arange(N, dtype=torch.int64)
    u = torch.nn.functional.normalize(torch.randn(B, D, generator=g), dim=1)
    cand = torch.stack([torch.randperm(N, generator=g)[:K0] for _ in range(B)])
    prior = torch.randn(B, K0, generator=g)
    archs = {"dot": {}, "mlp": {}, "mol": {"p_q": 4, "p_x": 4, "d": 32}, "attention": {}}
    rows = []
    with torch.no_grad():
        built = {}
        for kind, opts in archs.items():
            arch = build_overarch(kind, D, **opts).eval()
            built[kind] = (arch, TaskHeads(arch.hidden_dim, ["t0", "t1"]), EmbeddingCache.build(ids, arch.item_side(v)))
        best = {k: float("inf") for k in archs}
        best_core = {k: float("inf") for k in archs}
        peak, bw = 0.0, 0.0
        rows_bw = {k: 0.0 for k in archs}
        for _ in range(5):  # interleaved rounds, best of each
            peak = max(peak, _sgemm_gflops(torch))
            bw = max(bw, _read_bandwidth(torch))
            for kind, (_, _, cache) in built.items():
                rows_bw[kind] = max(rows_bw[kind], _read_bandwidth(torch, B * K0 * cache.data.shape[1] * 4, rewrite=True))
            for kind, (arch, heads, cache) in built.items():
                x, valid = cache.gather(cand)
                arch(u, x, valid)
                t = time.perf_counter()
                x, valid = cache.gather(cand)
                t_core = time.perf_counter()
                heads(arch(u, x, valid), prior)
                t_end = time.perf_counter()
                best[kind] = min(best[kind], t_end - t)
                best_core[kind] = min(best_core[kind], t_end - t_core)
        for kind, (arch, _, cache) in built.items():
            cps = B * K0 / best[kind]
            gf = arch.flops_per_candidate() * B * K0 / best_core[kind] / 1e9
            # roofline: each candidate's gathered cache row is read at least once (B·K0 rows of the
            # gathered x), so FLOP/s ≤ intensity × read bandwidth: from DRAM (a 256 MB stream), and
            # from wherever a just-written buffer of x's size is read back (a large L3 may hold it)
            row_bytes = cache.data.shape[1] * cache.data.element_size()
            intensity = arch.flops_per_candidate() / row_bytes
            bound = min(peak, intensity * bw / 1e9)
            bound_rows = min(peak, intensity * rows_bw[kind] / 1e9)
            rows.append({"overarch": kind, "K0": K0, "batch": B, "cache_cols": cache.data.shape[1],
                         "flops_per_candidate": arch.flops_per_candidate(),
                         "candidates_per_s": round(cps), "candidates_per_s_excl_gather": round(B * K0 / best_core[kind]),
                         "gemm_gflops": round(gf, 2), "sgemm_peak_gflops": round(peak, 1),
                         "fraction_of_sgemm_peak": round(gf / peak, 3),
                         "read_bandwidth_gbs": round(bw / 1e9, 1), "flop_per_byte": round(intensity, 2),
                         "roofline_max_fraction_of_peak": round(bound / peak, 3),
                         "rows_read_bandwidth_gbs": round(rows_bw[kind] / 1e9, 1),
                         "roofline_rows_max_fraction_of_peak": round(bound_rows / peak, 3)})
        if not getattr(args, "no_compile", False):
            rows += compiled_rows(built, u, cand, prior, torch)
    rows += latency(args, torch)
    return rows


def latency(args, torch) -> list[dict]:
    """End-to-end forward (query embedding → index K0 → OverArch → top-k) vs index-only, batch 1 and 64."""
    from sterling.model.build import build_index
    from sterling.model.config import IndexConfig
    from sterling.model.heads import TaskHeads
    from sterling.model.learned import EmbeddingCache, LearnedRetrievalModel
    from sterling.model.overarch import build_overarch
    from sterling.model.synthetic import synthetic_catalog, synthetic_queries
    from sterling.model.towers import SparseFeature, Tower

    cat = synthetic_catalog(100_000, 64, seed=args.seed, with_attributes=False)
    index = build_index(cat.embeddings, ids=cat.ids, config=IndexConfig(nlist=256))
    xq = synthetic_queries(cat, 640, seed=args.seed + 1)
    arch = build_overarch("mol", 64).eval()
    with torch.no_grad():
        cache = EmbeddingCache.build(cat.ids, arch.item_side(cat.embeddings))
    tower = Tower(Tower.Config(sparse=(SparseFeature(name="user_id", num_embeddings=8),), output_dim=64))
    model = LearnedRetrievalModel(index=index, user_tower=tower, overarch=arch, heads=TaskHeads(arch.hidden_dim, ["t"]),
                                  cache=cache, k0=10_000).eval()
    rows = []
    K0 = 10_000
    nprobe = model.nprobe_for(K0)
    for batch in (1, 64):
        n = 640 // batch if batch > 1 else 100
        for label, fn in (
            ("index only, k=100", lambda q: index.search(q, k=100, nprobe=nprobe)),
            ("index K0=10k → MoL → top-100", lambda q: model(q, k=100, k0=K0, nprobe=nprobe)),
        ):
            with torch.no_grad():
                fn(xq[:batch])
                lat = []
                for i in range(n):
                    q = xq[(i * batch) % 640 : (i * batch) % 640 + batch]
                    t = time.perf_counter()
                    fn(q)
                    lat.append(time.perf_counter() - t)
            lat_ms = np.array(lat) * 1e3
            rows.append({"e2e": label, "batch": batch, "nprobe": nprobe, "p50_ms": round(float(np.percentile(lat_ms, 50)), 2),
                         "p99_ms": round(float(np.percentile(lat_ms, 99)), 2),
                         "qps": round(batch * len(lat) / float(np.sum(lat)), 1)})
    return rows


def run(args: argparse.Namespace) -> list[dict]:
    import torch

    torch.set_num_threads(args.threads)
    rows: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="sterling-rerank-") as tmp:
        if not args.no_quality:
            for name in args.datasets.split(","):
                for r in quality(name.strip(), args, Path(tmp)):
                    print(json.dumps(r), flush=True)
                    rows.append(r)
    if not args.no_cost:
        for r in cost(args):
            print(json.dumps(r), flush=True)
            rows.append(r)
    return rows
