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

__all__ = ["register", "run"]

FILTERS = {  # name → expression; selectivities are measured and printed
    "~10%": "lang:es AND NOT policy:blocked",
    "~1%": "lang:fr AND tier:premium",
}


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
    p.add_argument("--write", action="store_true", help="write the figures into BENCHMARKS.md")
    p.add_argument("--out", default="BENCHMARKS.md")
    p.set_defaults(func=run)


def _recall(found, truth) -> float:
    hit = total = 0
    for f, t in zip(found.tolist(), truth.tolist()):
        t = {x for x in t if x >= 0}
        hit += len(t & set(f))
        total += len(t)
    return hit / max(total, 1)


def _timed(fn, repeat: int = 3):
    fn()  # warm-up
    best, out = float("inf"), None
    for _ in range(repeat):
        t = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t)
    return best, out


def _roaring_eval(node, postings, universe):
    from sterling.model.filter import And, Not, Term

    if isinstance(node, Term):
        return postings.get(node.text, type(universe)())
    if isinstance(node, Not):
        return universe - _roaring_eval(node.child, postings, universe)
    parts = [_roaring_eval(c, postings, universe) for c in node.children]
    out = parts[0]
    for p in parts[1:]:
        out = (out & p) if isinstance(node, And) else (out | p)
    return out


def _machine() -> str:
    """CPU model and core count, for the record."""
    import os

    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{model}, {os.cpu_count()} CPUs"


def _commit() -> str:
    import subprocess

    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).resolve().parent)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def run(args: argparse.Namespace) -> int:
    started = time.perf_counter()
    import faiss
    import numpy as np
    import torch
    from pyroaring import BitMap

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
    truth = exact(args.k)
    for nprobe in args.nprobe:
        sq8.nprobe = flat.nprobe = nprobe
        t_st, (_, i_st) = _timed(lambda nprobe=nprobe: index.search(xq, k=args.k, nprobe=nprobe))
        t_sq, (_, i_sq) = _timed(lambda: sq8.search(xq_np, args.k))
        t_fl, (_, i_fl) = _timed(lambda: flat.search(xq_np, args.k), repeat=1)
        emit({**base, "bench": "ann", "case": "unfiltered", "batch": args.queries, "k": args.k, "nprobe": nprobe,
              "sterling_qps": args.queries / t_st, "faiss_sq8_qps": args.queries / t_sq,
              "faiss_flat_qps": args.queries / t_fl,
              "recall_sterling": _recall(i_st, truth), "recall_faiss_sq8": _recall(torch.from_numpy(i_sq), truth),
              "recall_faiss_flat": _recall(torch.from_numpy(i_fl), truth),
              "speedup_vs_sq8": t_sq / t_st, "speedup_vs_flat": t_fl / t_st})

    # batch 1 latency
    nprobe = args.nprobe[-1]
    sq8.nprobe = nprobe
    n1 = min(200, args.queries)
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
    emit({**base, "bench": "ann", "case": "batch1", "k": args.k, "nprobe": nprobe,
          "sterling_p50_ms": p50(lat_st), "sterling_p99_ms": p99(lat_st),
          "faiss_sq8_p50_ms": p50(lat_sq), "faiss_sq8_p99_ms": p99(lat_sq),
          "speedup_p50_vs_sq8": p50(lat_sq) / p50(lat_st)})

    # filtered: Sterling's in-scan filter vs Faiss + per-query roaring bitmap
    vocab, offs, aids = cat.attributes.vocab, cat.attributes.offsets.tolist(), cat.attributes.ids.tolist()
    postings: dict[str, BitMap] = {}
    by_term: dict[int, list[int]] = {}
    for i in range(args.items):
        for t in aids[offs[i] : offs[i + 1]]:
            by_term.setdefault(t, []).append(i)
    for t, items in by_term.items():
        postings[vocab[t]] = BitMap(items)
    universe = BitMap(range(args.items))
    for name, expr in FILTERS.items():
        node = parse_filter(expr)
        mask_bm = _roaring_eval(node, postings, universe)
        mask = torch.zeros(args.items, dtype=torch.bool)
        mask[torch.tensor(list(mask_bm), dtype=torch.int64)] = True
        ftruth = exact(args.k, mask)

        def faiss_filtered(node=node):
            out = np.empty((args.queries, args.k), dtype=np.int64)
            for q in range(args.queries):
                bm = _roaring_eval(node, postings, universe)  # per query, as a filter service would
                bits = np.zeros((args.items + 7) // 8, dtype=np.uint8)
                arr = np.fromiter(iter(bm), dtype=np.int64, count=len(bm))
                np.bitwise_or.at(bits, arr >> 3, (1 << (arr & 7)).astype(np.uint8))
                sel = faiss.IDSelectorBitmap(args.items, faiss.swig_ptr(bits))
                params = faiss.SearchParametersIVF(sel=sel, nprobe=nprobe)
                _, i = sq8.search(xq_np[q : q + 1], args.k, params=params)
                out[q] = i[0]
            return out

        t_st, (_, i_st) = _timed(lambda expr=expr: index.search(xq, k=args.k, nprobe=nprobe, where=expr), repeat=1)
        t_fx, (_, i_fx) = _timed(
            lambda expr=expr: index.search(xq, k=args.k, nprobe=nprobe, where=expr, adaptive=False), repeat=1
        )
        t_sq, i_sq = _timed(faiss_filtered, repeat=1)
        emit({**base, "bench": "ann", "case": f"filtered {name}", "expr": expr,
              "eligible": float(mask.float().mean()), "batch": args.queries, "k": args.k, "nprobe": nprobe,
              "sterling_qps": args.queries / t_st, "sterling_fixed_nprobe_qps": args.queries / t_fx,
              "faiss_sq8_roaring_qps": args.queries / t_sq,
              "recall_sterling": _recall(i_st, ftruth), "recall_sterling_fixed_nprobe": _recall(i_fx, ftruth),
              "recall_faiss_sq8": _recall(torch.from_numpy(i_sq), ftruth),
              "speedup_vs_sq8": t_sq / t_st, "speedup_fixed_nprobe_vs_sq8": t_sq / t_fx})

    # large k
    nq = min(100, args.queries)
    for k in args.large_k:
        npr = args.large_k_nprobe or min(args.nlist, max(nprobe, -(-k * args.nlist * 2 // args.items)))
        sq8.nprobe = npr
        ltruth = exact(k, q=xq[:nq])
        t_st, (_, i_st) = _timed(lambda k=k, npr=npr: index.search(xq[:nq], k=k, nprobe=npr), repeat=1)
        t_sq, (_, i_sq) = _timed(lambda k=k: sq8.search(xq_np[:nq], k), repeat=1)
        emit({**base, "bench": "ann", "case": "large-k", "batch": nq, "k": k, "nprobe": npr,
              "sterling_qps": nq / t_st, "faiss_sq8_qps": nq / t_sq,
              "recall_sterling": _recall(i_st, ltruth), "recall_faiss_sq8": _recall(torch.from_numpy(i_sq), ltruth),
              "speedup_vs_sq8": t_sq / t_st})

    elapsed = time.perf_counter() - started
    print(json.dumps({"bench": "ann", "case": "total", "seconds": elapsed}), flush=True)
    if args.write:
        _write(Path(args.out), rows_out, args, elapsed)
    return 0


def _write(path: Path, rows: list[dict], args, elapsed: float) -> None:
    cmd = "sterling bench ann --write" + ("" if args.items == 1_000_000 else f" --items {args.items}")
    lines = [
        "## sterling bench ann",
        "",
        f"Command: `{cmd}` (CPU, {args.threads} threads, {args.items:,} × {args.dim} synthetic clustered catalog, "
        f"{args.queries} queries, nlist {args.nlist}; Faiss on Sterling's centroids). Measured {time.strftime('%Y-%m-%d')} "
        f"on {_machine()} at commit {_commit()}; the whole run took {elapsed:.0f} s.",
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
        elif r["case"].startswith("filtered"):
            lines.append(f"| {r['case']} ({r['eligible']:.1%} eligible: `{r['expr']}`), batch {r['batch']} | {r['k']} | "
                         f"{r['nprobe']} | {r['sterling_qps']:,.0f} QPS adaptive, {r['sterling_fixed_nprobe_qps']:,.0f} fixed | "
                         f"{r['faiss_sq8_roaring_qps']:,.0f} QPS (+ roaring bitmap per query) | "
                         f"{r['speedup_vs_sq8']:.2f}× / {r['speedup_fixed_nprobe_vs_sq8']:.2f}× | "
                         f"{r['recall_sterling']:.3f} adaptive, {r['recall_sterling_fixed_nprobe']:.3f} fixed / {r['recall_faiss_sq8']:.3f} |")
        else:
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
