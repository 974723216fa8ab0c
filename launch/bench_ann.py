"""`sterling bench ann`: the int8 IVF scan vs Faiss, same run, same catalog, same threads.

Peers: ``faiss.IndexIVFScalarQuantizer(QT_8bit)`` and ``faiss.IndexIVFFlat``
(inner product), built on *Sterling's* coarse centroids so that every
system scans exactly the same lists and the ratio measures the scan, not
the clustering. Recall@k against fp32 brute force on every row. Filtered
rows: Faiss gets an ``IDSelectorBitmap`` built per query from a pyroaring
inverted index (one bitmap per ``feature:value``; the expression evaluated
by bitmap ops), with that build time included in Faiss's time.

Prints one JSON line per configuration and, with ``--write``, replaces the
``## sterling bench ann`` section of BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

from sterling.benchmarks.evaluation import RoaringIndex, best_time, blocked, commit, machine, recall

__all__ = ["register", "run"]

FILTERS = {  # name → expression; selectivities are measured and printed
    "~10%": "lang:es AND NOT policy:blocked",
    "~1%": "lang:fr AND tier:premium",
}

# The shared-filter mixed set: one expression for the whole batch (a page of users with the
# same country / language / policy), 1 %–60 % eligible, AND / OR / NOT. The peer builds ONE
# roaring bitmap for the batch and passes it to one batched IVF-SQ8 search.
SHARED_FILTERS = (
    "lang:fr AND tier:premium",
    "(country:BR OR country:IN) AND category:music",
    "lang:es AND NOT policy:blocked",
    "category:sports OR category:news OR lang:pt",
    "NOT lang:en AND NOT policy:ok",
    "lang:en AND NOT policy:blocked",
    "NOT policy:blocked AND NOT tier:premium",
    "country:US OR lang:en OR device:ios",
)

# Per-query filters: query q gets LANGS[q % 10] × POLICIES[q // 10 % 4] (40 distinct expressions
# in a batch); the peer builds a bitmap per query.
PER_QUERY_LANGS = ("en", "es", "pt", "fr", "de", "ja", "ko", "it", "ru", "ar")
PER_QUERY_POLICIES = ("blocked", "sensitive", "minor_safe", "ok")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("ann", help="int8 IVF scan vs Faiss IVF-SQ8 / IVF-Flat (CPU)")
    p.add_argument("--items", type=int, default=1_000_000)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--queries", type=int, default=1000)
    p.add_argument("--nlist", type=int, default=1024)
    p.add_argument("--nprobe", type=int, nargs="+", default=[16, 64])
    p.add_argument("--k", type=int, default=100)
    p.add_argument("--large-k", type=int, nargs="*", default=[10_000, 100_000])
    p.add_argument("--large-k-nprobe", type=int, default=None,
                   help="nprobe of the large-k rows (default: max(nprobe, 2·k·nlist/items))")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--shared-queries", type=int, default=500, help="batch of the shared-filter mixed set")
    p.add_argument("--shared-repeat", type=int, default=3,
                   help="timed runs per side (best taken) of the shared-filter, per-query and large-k cases")
    p.add_argument("--serving-batches", type=int, nargs="+", default=[8, 16, 32, 64],
                   help="batch sizes of the `batches` part (consecutive batches over the first 512 queries)")
    p.add_argument("--parts", default="unfiltered,batch1,batches,filtered,shared,perquery,large-k",
                   help="comma-separated subset of the cases to run")
    p.add_argument("--write", action="store_true", help="write the figures into BENCHMARKS.md")
    p.add_argument("--out", default="BENCHMARKS.md")
    p.add_argument("--plot", default=None, metavar="PNG", help="recall vs QPS over the --nprobe sweep (unfiltered "
                   "rows), Sterling and both Faiss indexes, as a matplotlib PNG")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    started = time.perf_counter()
    import faiss
    import numpy as np
    import torch

    from sterling.kernels import cpu_scan
    from sterling.model import IndexConfig, build_index, parse_filter
    from sterling.model.synthetic import synthetic_catalog, synthetic_queries

    torch.set_num_threads(args.threads)
    faiss.omp_set_num_threads(args.threads)
    if cpu_scan.HAVE_NUMBA:
        import numba

        numba.set_num_threads(args.threads)
    rows_out: list[dict] = []

    def emit(row: dict) -> None:
        rows_out.append(row)
        print(json.dumps(row), flush=True)

    cat = synthetic_catalog(args.items, args.dim, seed=0)
    xq = synthetic_queries(cat, args.queries, seed=1)
    index = build_index(cat.embeddings, ids=torch.arange(args.items), attributes=cat.attributes,
                        config=IndexConfig(nlist=args.nlist))
    xb_np, xq_np = cat.embeddings.numpy(), xq.numpy()
    quant = faiss.IndexFlatIP(args.dim)
    quant.add(index.centroids.numpy())
    sq8 = faiss.IndexIVFScalarQuantizer(quant, args.dim, args.nlist, faiss.ScalarQuantizer.QT_8bit,
                                        faiss.METRIC_INNER_PRODUCT)
    sq8.train(xb_np[:: max(1, args.items // 100_000)])
    sq8.add(xb_np)
    quant2 = faiss.IndexFlatIP(args.dim)
    quant2.add(index.centroids.numpy())
    flat = faiss.IndexIVFFlat(quant2, args.dim, args.nlist, faiss.METRIC_INNER_PRODUCT)
    flat.add(xb_np)

    def exact(k, mask=None, q=xq):
        out = []
        for s in range(0, q.shape[0], 100):
            sc = q[s : s + 100] @ cat.embeddings.T
            if mask is not None:
                sc.masked_fill_(~mask, float("-inf"))
            v, i = sc.topk(k, dim=1)
            out.append(torch.where(torch.isneginf(v), -1, i))
        return torch.cat(out)

    base = {"items": args.items, "dim": args.dim, "nlist": args.nlist, "threads": args.threads,
            "cpu": platform.processor() or platform.machine(), "fused_scan": cpu_scan.HAVE_NUMBA}
    parts = set(args.parts.split(","))
    truth = exact(args.k)
    for nprobe in args.nprobe if "unfiltered" in parts else ():
        sq8.nprobe = flat.nprobe = nprobe
        t_st, (_, i_st) = best_time(lambda nprobe=nprobe: index.search(xq, k=args.k, nprobe=nprobe))
        t_sq, (_, i_sq) = best_time(lambda: sq8.search(xq_np, args.k))
        t_fl, (_, i_fl) = best_time(lambda: flat.search(xq_np, args.k), repeat=1)
        emit({**base, "bench": "ann", "case": "unfiltered", "batch": args.queries, "k": args.k, "nprobe": nprobe,
              "sterling_qps": args.queries / t_st, "faiss_sq8_qps": args.queries / t_sq,
              "faiss_flat_qps": args.queries / t_fl,
              "recall_sterling": recall(i_st, truth), "recall_faiss_sq8": recall(torch.from_numpy(i_sq), truth),
              "recall_faiss_flat": recall(torch.from_numpy(i_fl), truth),
              "speedup_vs_sq8": t_sq / t_st, "speedup_vs_flat": t_fl / t_st})

    # batch 1 latency
    nprobe = args.nprobe[-1]
    sq8.nprobe = nprobe
    n1 = min(200, args.queries) if "batch1" in parts else 0
    lat_st, lat_sq = [], []
    for q in range(n1):
        t = time.perf_counter()
        index.search(xq[q : q + 1], k=args.k, nprobe=nprobe)
        lat_st.append(time.perf_counter() - t)
        t = time.perf_counter()
        sq8.search(xq_np[q : q + 1], args.k)
        lat_sq.append(time.perf_counter() - t)
    p50 = lambda v: float(np.percentile(v, 50)) * 1e3  # noqa: E731
    p99 = lambda v: float(np.percentile(v, 99)) * 1e3  # noqa: E731
    if n1:
        emit({**base, "bench": "ann", "case": "batch1", "k": args.k, "nprobe": nprobe,
              "sterling_p50_ms": p50(lat_st), "sterling_p99_ms": p99(lat_st),
              "faiss_sq8_p50_ms": p50(lat_sq), "faiss_sq8_p99_ms": p99(lat_sq),
              "speedup_p50_vs_sq8": p50(lat_sq) / p50(lat_st)})

    # serving batch sizes: consecutive batches of 8 … 64 queries over the query set (what a batching
    # server hands the index), unfiltered, QPS of each side, best of --shared-repeat runs
    for bs in args.serving_batches if "batches" in parts else ():
        nb = max(1, min(args.queries, 512) // bs)

        def batches_st(bs=bs, nb=nb):
            for i in range(nb):
                index.search(xq[i * bs : (i + 1) * bs], k=args.k, nprobe=nprobe)

        def batches_sq(bs=bs, nb=nb):
            for i in range(nb):
                sq8.search(xq_np[i * bs : (i + 1) * bs], args.k)

        res = blocked({"sterling": batches_st, "faiss": batches_sq}, args.shared_repeat)
        t_st, t_sq = res["sterling"][0], res["faiss"][0]
        emit({**base, "bench": "ann", "case": "serving batch", "batch": bs, "batches": nb, "k": args.k,
              "nprobe": nprobe, "sterling_qps": nb * bs / t_st, "faiss_sq8_qps": nb * bs / t_sq,
              "speedup_vs_sq8": t_sq / t_st})

    # filtered: Sterling's in-scan filter vs Faiss + per-query roaring bitmap
    roaring = RoaringIndex(cat.attributes.ids, cat.attributes.offsets, cat.attributes.vocab, args.items)

    def selector(bm):
        """A roaring result as Faiss's IDSelectorBitmap (little-endian bit per id); keep the bits alive."""
        hit = np.zeros(args.items, dtype=bool)
        hit[np.asarray(bm.to_array(), dtype=np.int64)] = True
        bits = np.packbits(hit, bitorder="little")
        return faiss.IDSelectorBitmap(args.items, faiss.swig_ptr(bits)), bits

    def elig_mask(bm):
        mask = torch.zeros(args.items, dtype=torch.bool)
        mask[torch.from_numpy(np.asarray(bm.to_array(), dtype=np.int64))] = True
        return mask

    for name, expr in FILTERS.items() if "filtered" in parts else ():
        node = parse_filter(expr)
        mask_bm = roaring.eval(node)
        mask = torch.zeros(args.items, dtype=torch.bool)
        mask[torch.tensor(list(mask_bm), dtype=torch.int64)] = True
        ftruth = exact(args.k, mask)

        def faiss_filtered(node=node):
            out = np.empty((args.queries, args.k), dtype=np.int64)
            for q in range(args.queries):
                bm = roaring.eval(node)  # per query, as a filter service would
                sel, _bits = selector(bm)
                params = faiss.SearchParametersIVF(sel=sel, nprobe=nprobe)
                _, i = sq8.search(xq_np[q : q + 1], args.k, params=params)
                out[q] = i[0]
            return out

        t_st, (_, i_st) = best_time(lambda expr=expr: index.search(xq, k=args.k, nprobe=nprobe, where=expr), repeat=1)
        t_fx, (_, i_fx) = best_time(
            lambda expr=expr: index.search(xq, k=args.k, nprobe=nprobe, where=expr, adaptive=False), repeat=1
        )
        t_sq, i_sq = best_time(faiss_filtered, repeat=1)
        emit({**base, "bench": "ann", "case": f"filtered {name}", "expr": expr,
              "eligible": float(mask.float().mean()), "batch": args.queries, "k": args.k, "nprobe": nprobe,
              "sterling_qps": args.queries / t_st, "sterling_fixed_nprobe_qps": args.queries / t_fx,
              "faiss_sq8_roaring_qps": args.queries / t_sq,
              "recall_sterling": recall(i_st, ftruth), "recall_sterling_fixed_nprobe": recall(i_fx, ftruth),
              "recall_faiss_sq8": recall(torch.from_numpy(i_sq), ftruth),
              "speedup_vs_sq8": t_sq / t_st, "speedup_fixed_nprobe_vs_sq8": t_sq / t_fx})

    if "shared" in parts:
        _shared_cases(args, emit, base, index, sq8, xq, nprobe, exact, roaring, selector, elig_mask)
    if "perquery" in parts:
        _per_query_case(args, emit, base, index, sq8, xq, nprobe, exact, roaring, selector, elig_mask)

    # large k
    nq = min(100, args.queries)
    for k in args.large_k if "large-k" in parts else ():
        npr = args.large_k_nprobe or min(args.nlist, max(nprobe, -(-k * args.nlist * 2 // args.items)))
        sq8.nprobe = npr
        ltruth = exact(k, q=xq[:nq])
        res = blocked({  # both sides warmed up, best of the same number of runs
            "sterling": lambda k=k, npr=npr: index.search(xq[:nq], k=k, nprobe=npr),
            "faiss": lambda k=k: sq8.search(xq_np[:nq], k),
        }, args.shared_repeat)
        (t_st, (_, i_st)), (t_sq, (_, i_sq)) = res["sterling"], res["faiss"]
        emit({**base, "bench": "ann", "case": "large-k", "batch": nq, "k": k, "nprobe": npr,
              "sterling_qps": nq / t_st, "faiss_sq8_qps": nq / t_sq,
              "recall_sterling": recall(i_st, ltruth), "recall_faiss_sq8": recall(torch.from_numpy(i_sq), ltruth),
              "speedup_vs_sq8": t_sq / t_st})

    elapsed = time.perf_counter() - started
    print(json.dumps({"bench": "ann", "case": "total", "seconds": elapsed}), flush=True)
    if args.write:
        _write(Path(args.out), rows_out, args, elapsed)
    if args.plot:
        from sterling.benchmarks.plots import plot_recall_qps

        plot_recall_qps(rows_out, args.plot)
    return 0


def _shared_cases(args, emit, base, index, sq8, xq, nprobe, exact, roaring, selector, elig_mask) -> None:
    """One filter for the whole batch: Sterling (fixed nprobe) vs Faiss IVF-SQ8 with ONE bitmap per batch."""
    import faiss
    import numpy as np
    import torch

    from sterling.model import parse_filter

    nq = min(args.shared_queries, xq.shape[0])
    xs, xs_np = xq[:nq], xq[:nq].numpy()
    sq8.nprobe = nprobe
    ratios, over = [], []
    for expr in SHARED_FILTERS:
        node = parse_filter(expr)
        mask = elig_mask(roaring.eval(node))
        ftruth = exact(args.k, mask, q=xs)

        def faiss_shared(node=node):
            sel, _bits = selector(roaring.eval(node))  # once per batch
            _, i = sq8.search(xs_np, args.k, params=faiss.SearchParametersIVF(sel=sel, nprobe=nprobe))
            return i

        res = blocked({
            "sterling": lambda expr=expr: index.search(xs, k=args.k, nprobe=nprobe, where=expr, adaptive=False)[1],
            "sterling_unfiltered": lambda: index.search(xs, k=args.k, nprobe=nprobe)[1],
            "faiss": faiss_shared,
        }, args.shared_repeat)
        (t_st, i_st), (t_un, _), (t_fa, i_fa) = res["sterling"], res["sterling_unfiltered"], res["faiss"]
        bad = int((~mask[i_st.clamp(min=0)] & (i_st >= 0)).sum())
        ratios.append(t_fa / t_st)
        over.append(t_st / t_un)
        emit({**base, "bench": "ann", "case": "shared filter", "expr": expr, "eligible": float(mask.float().mean()),
              "batch": nq, "k": args.k, "nprobe": nprobe, "sterling_ms": t_st * 1e3,
              "sterling_unfiltered_ms": t_un * 1e3, "faiss_sq8_bitmap_ms": t_fa * 1e3,
              "recall_sterling": recall(i_st, ftruth), "recall_faiss_sq8": recall(torch.from_numpy(i_fa), ftruth),
              "ineligible_returned": bad, "speedup_vs_sq8": t_fa / t_st, "filtered_over_unfiltered": t_st / t_un})
    emit({**base, "bench": "ann", "case": "shared filter summary", "batch": nq, "k": args.k, "nprobe": nprobe,
          "min_speedup": min(ratios), "median_speedup": float(np.median(ratios)),
          "worst_filtered_over_unfiltered": max(over),
          "target_min_2x": min(ratios) >= 2, "target_median_3x": float(np.median(ratios)) >= 3,
          "target_over_unfiltered_1_5": max(over) <= 1.5})


def _per_query_case(args, emit, base, index, sq8, xq, nprobe, exact, roaring, selector, elig_mask) -> None:
    """A different filter per query: Sterling's batch vs Faiss + a roaring bitmap built per query."""
    import faiss
    import numpy as np
    import torch

    from sterling.model import parse_filter

    nq = min(args.shared_queries, xq.shape[0])
    xs, xs_np = xq[:nq], xq[:nq].numpy()
    exprs = [f"lang:{PER_QUERY_LANGS[q % 10]} AND NOT policy:{PER_QUERY_POLICIES[q // 10 % 4]}" for q in range(nq)]
    nodes = {e: parse_filter(e) for e in exprs}
    truth = torch.full((nq, args.k), -1, dtype=torch.int64)
    for e, node in nodes.items():
        rows = torch.tensor([q for q in range(nq) if exprs[q] == e])
        truth[rows] = exact(args.k, elig_mask(roaring.eval(node)), q=xs[rows])

    def faiss_per_query():
        out = np.empty((nq, args.k), dtype=np.int64)
        for q in range(nq):
            sel, _bits = selector(roaring.eval(nodes[exprs[q]]))
            _, i = sq8.search(xs_np[q : q + 1], args.k, params=faiss.SearchParametersIVF(sel=sel, nprobe=nprobe))
            out[q] = i[0]
        return out

    res = blocked({  # both sides warmed up, best of the same number of runs
        "sterling": lambda: index.search(xs, k=args.k, nprobe=nprobe, where=exprs, adaptive=False)[1],
        "faiss": faiss_per_query,
    }, args.shared_repeat)
    (t_st, i_st), (t_fa, i_fa) = res["sterling"], res["faiss"]
    emit({**base, "bench": "ann", "case": "per-query filters", "expr": exprs[0] + " … (40 distinct)",
          "batch": nq, "k": args.k, "nprobe": nprobe, "sterling_ms": t_st * 1e3, "faiss_sq8_bitmap_ms": t_fa * 1e3,
          "recall_sterling": recall(i_st, truth), "recall_faiss_sq8": recall(torch.from_numpy(i_fa), truth),
          "speedup_vs_sq8": t_fa / t_st})


def _write(path: Path, rows: list[dict], args, elapsed: float) -> None:
    cmd = "sterling bench ann --write" + ("" if args.items == 1_000_000 else f" --items {args.items}")
    lines = [
        "## sterling bench ann",
        "",
        f"Command: `{cmd}` (CPU, {args.threads} threads, {args.items:,} × {args.dim} synthetic clustered catalog, "
        f"{args.queries} queries, nlist {args.nlist}; Faiss on Sterling's centroids). Measured {time.strftime('%Y-%m-%d')} "
        f"on {machine()} at commit {commit()}; the whole run took {elapsed:.0f} s.",
        "",
        "| case | k | nprobe | Sterling | Faiss IVF-SQ8 | ratio | recall Sterling / SQ8 |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if r["case"] == "unfiltered":
            lines.append(f"| unfiltered, batch {r['batch']} | {r['k']} | {r['nprobe']} | {r['sterling_qps']:,.0f} QPS | "
                         f"{r['faiss_sq8_qps']:,.0f} QPS (Flat {r['faiss_flat_qps']:,.0f}) | {r['speedup_vs_sq8']:.2f}× | "
                         f"{r['recall_sterling']:.3f} / {r['recall_faiss_sq8']:.3f} (Flat {r['recall_faiss_flat']:.3f}) |")
        elif r["case"] == "batch1":
            lines.append(f"| batch 1 latency p50 / p99 | {r['k']} | {r['nprobe']} | {r['sterling_p50_ms']:.2f} / "
                         f"{r['sterling_p99_ms']:.2f} ms | {r['faiss_sq8_p50_ms']:.2f} / {r['faiss_sq8_p99_ms']:.2f} ms | "
                         f"{r['speedup_p50_vs_sq8']:.2f}× | — |")
        elif r["case"] == "serving batch":
            lines.append(f"| unfiltered, batches of {r['batch']} | {r['k']} | {r['nprobe']} | {r['sterling_qps']:,.0f} QPS | "
                         f"{r['faiss_sq8_qps']:,.0f} QPS | {r['speedup_vs_sq8']:.2f}× | — |")
        elif r["case"].startswith("filtered"):
            lines.append(f"| {r['case']} ({r['eligible']:.1%} eligible: `{r['expr']}`), batch {r['batch']} | {r['k']} | "
                         f"{r['nprobe']} | {r['sterling_qps']:,.0f} QPS adaptive, {r['sterling_fixed_nprobe_qps']:,.0f} fixed | "
                         f"{r['faiss_sq8_roaring_qps']:,.0f} QPS (+ roaring bitmap per query) | "
                         f"{r['speedup_vs_sq8']:.2f}× / {r['speedup_fixed_nprobe_vs_sq8']:.2f}× | "
                         f"{r['recall_sterling']:.3f} adaptive, {r['recall_sterling_fixed_nprobe']:.3f} fixed / {r['recall_faiss_sq8']:.3f} |")
        elif r["case"] == "shared filter":
            lines.append(f"| shared filter ({r['eligible']:.1%} eligible: `{r['expr']}`), batch {r['batch']} | {r['k']} | "
                         f"{r['nprobe']} | {r['sterling_ms']:.1f} ms (unfiltered {r['sterling_unfiltered_ms']:.1f}: "
                         f"{r['filtered_over_unfiltered']:.2f}×) | {r['faiss_sq8_bitmap_ms']:.1f} ms (+ one roaring bitmap "
                         f"per batch) | {r['speedup_vs_sq8']:.2f}× | {r['recall_sterling']:.3f} / {r['recall_faiss_sq8']:.3f} |")
        elif r["case"] == "shared filter summary":
            lines.append(f"| shared filter, all {len(SHARED_FILTERS)} | {r['k']} | {r['nprobe']} | worst filtered / "
                         f"unfiltered {r['worst_filtered_over_unfiltered']:.2f}× | — | min {r['min_speedup']:.2f}×, "
                         f"median {r['median_speedup']:.2f}× | — |")
        elif r["case"] == "per-query filters":
            lines.append(f"| per-query filters (`{r['expr']}`), batch {r['batch']} | {r['k']} | {r['nprobe']} | "
                         f"{r['sterling_ms']:.1f} ms | {r['faiss_sq8_bitmap_ms']:.1f} ms (+ roaring bitmap per query) | "
                         f"{r['speedup_vs_sq8']:.2f}× | {r['recall_sterling']:.3f} / {r['recall_faiss_sq8']:.3f} |")
        elif r["case"] == "large-k":
            lines.append(f"| large k, batch {r['batch']} | {r['k']:,} | {r['nprobe']} | {r['sterling_qps']:,.1f} QPS | "
                         f"{r['faiss_sq8_qps']:,.1f} QPS | {r['speedup_vs_sq8']:.2f}× | "
                         f"{r['recall_sterling']:.3f} / {r['recall_faiss_sq8']:.3f} |")
    section = "\n".join(lines) + "\n"
    text = path.read_text() if path.exists() else "# Benchmarks\n\nEvery figure names the command that produced it.\n\n"
    start = text.find("## sterling bench ann")
    if start >= 0:
        end = text.find("\n## ", start + 1)
        text = text[:start] + section + ("" if end < 0 else text[end + 1 :])
    else:
        text = text.rstrip("\n") + "\n\n" + section
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text)
    tmp.replace(path)
