"""``sterling bench filter``: Bloom eligibility vs an inverted index, in one run.

Per catalog size, on the same synthetic catalog (6 features, Zipf-skewed
values, ``sterling.model.synthetic``) and the same generated expressions
(AND of OR-groups over 2–4 features, some groups negated; about 7 terms):

(a) Sterling Bloom over the whole catalog — bit-sliced signatures
    (``kernels.bloom_sliced``) and, for the layout comparison, item-major;
    Bloom pass alone, and with exact verification of the survivors;
(b) Sterling probe-then-filter inside ``ItemIndex.search`` at
    nprobe / nlist = 1/16 (filtered vs unfiltered latency, items tested);
(c) a CPU inverted index: ``pyroaring`` bitmap per ``feature:value``,
    AND / OR / NOT by bitmap ops;
(d) a NumPy forward index (padded [N, L] int32 matrix of attribute ids).

Prints one JSON line per (items, structure, batch) plus a summary line with
the ratios and targets; ``--append-md`` adds a section to BENCHMARKS.md.
Every structure's exact answer is cross-checked against roaring on a subset.

Example:
    sterling bench filter --items 1000000 --exprs 5000 --slow-exprs 200
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import time
from pathlib import Path

from sterling.benchmarks.evaluation import ForwardIndex, RoaringIndex, best_time

__all__ = ["register", "run"]


def register(bench_sub: argparse._SubParsersAction) -> None:
    p = bench_sub.add_parser("filter", help="Bloom eligibility vs pyroaring inverted index and NumPy forward index")
    p.add_argument("--items", default="1000000,10000000", help="comma-separated catalog sizes")
    p.add_argument("--exprs", type=int, default=5000, help="expressions for the fast structures (Bloom, roaring)")
    p.add_argument("--slow-exprs", type=int, default=200, help="expressions for slow paths (NumPy, item-major, exact)")
    p.add_argument("--search-queries", type=int, default=256, help="queries for probe-then-filter search")
    p.add_argument("--batches", default="1,64")
    p.add_argument("--dim", type=int, default=16, help="embedding dim of the synthetic catalog")
    p.add_argument("--nlist", type=int, default=1024)
    p.add_argument("--probe-frac", type=float, default=1 / 16, help="nprobe / nlist for (b)")
    p.add_argument("--target-fpr", type=float, default=1e-3)
    p.add_argument("--threads", type=int, default=1, help="torch threads (roaring and NumPy are single-threaded)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--parts", default="filter,search", help="filter = (a), (c), (d); search = (b)")
    p.add_argument("--append-md", metavar="PATH", help="append a section to this BENCHMARKS.md")
    p.set_defaults(func=run)


# ------------------------------------------------------------ expressions
def make_expressions(catalog, n: int, seed: int) -> list[str]:
    """AND of OR-groups: 2–4 features, 1–3 Zipf-drawn values each, ~25 % of groups negated."""
    from sterling.model.synthetic import FEATURES, _values, _zipf

    rng = random.Random(seed)
    weights = {f: _zipf(len(_values(f)), s).tolist() for f, (_, _, s) in FEATURES.items()}
    feats = list(FEATURES)
    out = []
    for _ in range(n):
        groups = []
        for f in rng.sample(feats, rng.choice([2, 3, 3, 4])):
            vals = _values(f)
            k = min(len(vals), rng.choice([1, 2, 2, 3, 3]))
            picked = []
            while len(picked) < k:
                v = rng.choices(vals, weights[f])[0]
                if v not in picked:
                    picked.append(v)
            g = " OR ".join(f"{f}:{v}" for v in picked)
            g = f"({g})" if k > 1 else g
            groups.append(f"NOT {g}" if rng.random() < 0.25 else g)
        out.append(" AND ".join(groups))
    return out


def _count_terms(exprs: list[str]) -> float:
    return sum(e.count(":") for e in exprs) / max(len(exprs), 1)


# ---------------------------------------------------------------- helpers
def _emit(row: dict) -> None:
    print(json.dumps(row), flush=True)


def run(args: argparse.Namespace) -> int:
    import torch

    torch.set_num_threads(args.threads)
    rows: list[dict] = []
    for n in [int(x) for x in args.items.split(",") if x]:
        rows += bench_one(n, args)
    if args.append_md:
        _append_md(Path(args.append_md), rows, args)
    return 0


def bench_one(n: int, args: argparse.Namespace) -> list[dict]:
    import numpy as np
    import torch

    from sterling.kernels.bloom_numba import HAVE_NUMBA, filter_sliced_fused
    from sterling.kernels.bloom_sliced import filter_sliced, popcount_words, positions_from_words
    from sterling.kernels.filter_eval import bloom_term_hits, exact_term_hits
    from sterling.kernels.ivf import probe_lists
    from sterling.model import IndexConfig, build_index
    from sterling.model.bloom import bit_slice, measure_fpr
    from sterling.model.filter import parse_filter
    from sterling.model.synthetic import synthetic_catalog, synthetic_queries

    out: list[dict] = []
    batches = [int(b) for b in args.batches.split(",")]
    if max(batches) > args.search_queries:
        from sterling.model.errors import InvalidInputError

        raise InvalidInputError(f"--search-queries ({args.search_queries}) must be ≥ the largest of --batches "
                                f"({max(batches)}): each timed batch is cut from those queries")
    t0 = time.perf_counter()
    cat = synthetic_catalog(n, args.dim, seed=args.seed)
    cfg = IndexConfig(nlist=min(args.nlist, n), target_fpr=args.target_fpr, kmeans_iters=4, seed=args.seed)
    index = build_index(cat.embeddings, ids=cat.ids, attributes=cat.attributes, config=cfg)
    build_s = time.perf_counter() - t0
    N = index.capacity
    exprs = make_expressions(cat, args.exprs, args.seed + 1)
    slow = exprs[: args.slow_exprs]
    trees = [parse_filter(e) for e in exprs]

    parts = set(args.parts.split(","))
    sliced = roaring = fwd = None
    slice_s = roaring_build_s = float("nan")
    if "filter" in parts:
        t0 = time.perf_counter()
        sliced = bit_slice(index.bloom)
        slice_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        roaring = RoaringIndex(index.attr_ids, index.attr_offsets, index.vocab, N)
        roaring_build_s = time.perf_counter() - t0
        fwd = ForwardIndex(index.attr_ids, index.attr_offsets, index.vocab)

    def sterling_sliced(batch_exprs):
        f = index.compile_filters(batch_exprs, len(batch_exprs))
        plan = f.plan(bloom=True)
        return f, filter_sliced(sliced, plan, positions_from_words(f.term_words[plan.terms]), n_items=N)

    def sterling_fused(batch_exprs):
        f = index.compile_filters(batch_exprs, len(batch_exprs))
        plan = f.plan(bloom=True)
        return f, filter_sliced_fused(sliced, plan, positions_from_words(f.term_words[plan.terms]), n_items=N)

    def sterling_item_major(batch_exprs):
        f = index.compile_filters(batch_exprs, len(batch_exprs))
        plan = f.plan(bloom=True)
        words = f.term_words[plan.terms]
        res = []
        for s in range(0, N, 1 << 20):
            res.append(plan.eval(bloom_term_hits(index.bloom[s : s + (1 << 20)], words)))
        return torch.cat(res, dim=1)

    def sterling_exact(batch_exprs):
        """Bloom (bit-sliced) + exact verification of every survivor → per-expression positions."""
        f, words = (sterling_fused if HAVE_NUMBA else sterling_sliced)(batch_exprs)
        plan = f.plan(bloom=False)
        vocab = f.term_vocab[plan.terms]
        shifts = torch.arange(64, dtype=torch.int64)
        res = []
        for p in range(words.shape[0]):
            pos = ((words[p][:, None] >> shifts) & 1).reshape(-1).nonzero().squeeze(1)
            ok = plan.eval(exact_term_hits(index.attr_ids, index.attr_offsets, pos, vocab))[p]
            res.append(pos[ok])
        return res

    common = {"bench": "filter", "items": N, "threads": args.threads, "cpu": platform.processor() or platform.machine()}
    terms_per_expr = _count_terms(exprs)
    _emit(
        {**common, "what": "setup", "build_s": round(build_s, 1), "bit_slice_s": round(slice_s, 2),
         "roaring_build_s": round(roaring_build_s, 1), "exprs": len(exprs), "slow_exprs": len(slow),
         "terms_per_expr": round(terms_per_expr, 2), "bloom_bits": index.bloom_spec.bits,
         "bloom_hashes": index.bloom_spec.hashes}
    )

    lat: dict[tuple[str, int], float] = {}
    mem: dict[str, float] = {}
    per_term_fpr = expr_fpr = expr_fpr_monotone = float("nan")
    mismatches = 0
    if "filter" in parts:
        # --- correctness cross-check on the slow subset (exact answers must agree)
        exact_sets = sterling_exact(slow)
        mismatches = 0
        fp_rates, fp_rates_monotone = [], []
        sl_words = sterling_sliced(slow)[1]
        if HAVE_NUMBA:
            mismatches += int(not torch.equal(sl_words, sterling_fused(slow)[1]))
        for i, tree in enumerate(trees[: len(slow)]):
            r = roaring.eval(tree)
            want = np.fromiter(iter(r), dtype=np.int64, count=len(r))
            mismatches += int(not np.array_equal(exact_sets[i].numpy(), want))
            mismatches += int(int(fwd.eval(tree).sum()) != len(r))
            bloom_count = int(popcount_words(sl_words[i]))
            neg = N - len(r)
            if neg:
                fp_rates.append((bloom_count - len(r)) / neg)
                if "NOT" not in slow[i]:
                    fp_rates_monotone.append((bloom_count - len(r)) / neg)
        per_term_fpr = measure_fpr(index, samples=400_000)
        expr_fpr = float(np.mean(fp_rates)) if fp_rates else 0.0
        expr_fpr_monotone = float(np.mean(fp_rates_monotone)) if fp_rates_monotone else 0.0

        # --- memory (bytes per item)
        mem.update({
            "sterling_bloom": index.bloom.numel() * 8 / N,
            "sterling_exact_csr": (index.attr_ids.numel() * 4 + index.attr_offsets.numel() * 8) / N,
            "roaring": roaring.serialized_bytes() / N,
            "numpy_forward": fwd.nbytes() / N,
        })
        _emit({**common, "what": "memory_bytes_per_item", **{k: round(v, 2) for k, v in mem.items()},
               "bloom_vs_roaring": round(mem["sterling_bloom"] / mem["roaring"], 3),
               "bloom_plus_csr_vs_roaring": round((mem["sterling_bloom"] + mem["sterling_exact_csr"]) / mem["roaring"], 3)})
        _emit({**common, "what": "fpr_before_verification", "target": args.target_fpr,
               "per_term_measured": per_term_fpr, "per_expression_measured": expr_fpr,
               "per_expression_measured_without_not": expr_fpr_monotone,
               "per_term_ratio_to_target": round(per_term_fpr / args.target_fpr, 3), "exact_mismatches": mismatches})

        # --- latency, whole catalog

        def measure(name, fn, items, b, reps=1):
            nb = max(1, len(items) // b)
            chunks = [items[i * b : (i + 1) * b] for i in range(nb)]  # the last may be short
            fn(chunks[0])  # warm-up
            t = sum(best_time(lambda c=c: fn(c), reps, warmup=False)[0] for c in chunks)
            nq = sum(len(c) for c in chunks)
            ms = t / nq * 1e3
            lat[(name, b)] = ms
            _emit({**common, "what": "latency", "structure": name, "batch": min(b, len(chunks[0])), "queries": nq,
                   "ms_per_query": round(ms, 4)})

        for b in batches:
            measure("sterling_bloom_bitsliced", lambda c: sterling_sliced(c), exprs, b)
            if HAVE_NUMBA:
                measure("sterling_bloom_bitsliced_fused", lambda c: sterling_fused(c), exprs, b)
            measure("roaring", lambda c: [roaring.eval(parse_filter(e)) for e in c], exprs, b)
            measure("sterling_bloom_item_major", sterling_item_major, slow, b)
            measure("sterling_bloom_bitsliced+exact", sterling_exact, slow, b)
            measure("numpy_forward", lambda c: [fwd.eval(parse_filter(e)) for e in c], slow[: max(b, len(slow) // 4)], b)

    reduction = float("nan")
    nprobe = max(1, round(index.nlist * args.probe_frac))
    if "search" in parts:
        # --- (b) probe-then-filter inside search
        nq = args.search_queries
        xq = synthetic_queries(cat, nq, seed=args.seed + 2)
        where = (exprs * (nq // len(exprs) + 1))[:nq]
        probe = probe_lists(xq, index.centroids, nprobe)
        sizes = (index.list_offsets[1:] - index.list_offsets[:-1])
        tested = sizes[probe].sum(1).double() / N
        for b in batches:
            for name, w in (("search_unfiltered", None), ("search_probe_then_filter", where)):
                def fn(rows, w=w):
                    index.search(xq[rows], k=100, nprobe=nprobe, where=None if w is None else w[rows.start : rows.stop],
                                 adaptive=False)
                steps = [slice(s, s + b) for s in range(0, nq - b + 1, b)][: max(1, 256 // b)]
                fn(steps[0])
                t = sum(best_time(lambda s=s: fn(s), 1, warmup=False)[0] for s in steps)
                ms = t / (len(steps) * b) * 1e3
                lat[(name, b)] = ms
                _emit({**common, "what": "latency", "structure": name, "batch": b, "queries": len(steps) * b,
                       "nprobe": nprobe, "nlist": index.nlist, "ms_per_query": round(ms, 4)})
        reduction = float(tested.mean())

    bmax = max(batches)
    best = "sterling_bloom_bitsliced_fused" if HAVE_NUMBA else "sterling_bloom_bitsliced"
    def ratio(a: str, b: str, bb: int) -> float:
        if (a, bb) not in lat or (b, bb) not in lat:
            return float("nan")
        return round(lat[(a, bb)] / lat[(b, bb)], 3)

    summary = {
        **common,
        "what": "summary",
        "speedup_vs_roaring_bitsliced": {b: ratio("roaring", "sterling_bloom_bitsliced", b) for b in batches},
        "speedup_vs_roaring_best": {b: ratio("roaring", best, b) for b in batches},
        "speedup_vs_roaring_bitsliced_exact": {b: ratio("roaring", "sterling_bloom_bitsliced+exact", b) for b in batches},
        "search_filtered_over_unfiltered": {b: ratio("search_probe_then_filter", "search_unfiltered", b) for b in batches},
        "probe_then_filter_items_tested_fraction": round(reduction, 4),
        f"target_speedup_5x_at_batch_{bmax}": ratio("roaring", best, bmax) >= 5,
        "target_memory_third_of_roaring": bool(mem) and mem["sterling_bloom"] <= mem["roaring"] / 3,
        "target_tested_le_tenth": reduction <= 0.1,
        "target_fpr_within_2x": args.target_fpr / 2 <= per_term_fpr <= 2 * args.target_fpr,
        "exact_mismatches": mismatches,
    }
    _emit(summary)
    out += [{"n": N, "lat": {f"{k[0]}@{k[1]}": v for k, v in lat.items()}, "mem": mem, "per_term_fpr": per_term_fpr,
             "expr_fpr": expr_fpr, "expr_fpr_monotone": expr_fpr_monotone, "reduction": reduction, "summary": summary, "terms_per_expr": terms_per_expr,
             "spec": (index.bloom_spec.bits, index.bloom_spec.hashes), "exprs": len(exprs), "slow": len(slow),
             "nprobe": nprobe, "nlist": index.nlist}]
    return out


def _append_md(path: Path, rows: list[dict], args: argparse.Namespace) -> None:
    import sys

    lines = ["", "## sterling bench filter", "", f"Command: `sterling bench {' '.join(sys.argv[2:])}`", ""]
    for r in rows:
        lines += [
            f"### {r['n']:,} items — Bloom {r['spec'][0]} bits × {r['spec'][1]} hashes, "
            f"{r['exprs']} expressions ({r['terms_per_expr']:.1f} terms avg; slow paths on {r['slow']}), "
            f"threads={args.threads}",
            "",
            "| structure | batch | ms / query |",
            "|---|---|---|",
        ]
        for k, v in r["lat"].items():
            name, b = k.rsplit("@", 1)
            lines.append(f"| {name} | {b} | {v:.4f} |")
        lines += ["", "| memory | bytes / item |", "|---|---|"]
        lines += [f"| {k} | {v:.2f} |" for k, v in r["mem"].items()]
        s = r["summary"]
        lines += [
            "",
            f"- FPR before verification: per term {r['per_term_fpr']:.2e} (target {args.target_fpr:.0e}); "
            f"per expression {r['expr_fpr']:.2e} (NOT counts as 'maybe' in the Bloom pass); "
            f"per expression without NOT {r['expr_fpr_monotone']:.2e}",
            f"- probe-then-filter at nprobe/nlist = {r['nprobe']}/{r['nlist']}: items tested / catalog = {r['reduction']:.4f}",
            f"- speed-up vs roaring (Bloom pass; torch bit-sliced): {s['speedup_vs_roaring_bitsliced']}; "
            f"best Sterling path: {s['speedup_vs_roaring_best']}; "
            f"with exact verification: {s['speedup_vs_roaring_bitsliced_exact']}",
            f"- targets: {json.dumps({k: v for k, v in s.items() if k.startswith('target')})}; "
            f"exact mismatches vs roaring: {s['exact_mismatches']}",
            "",
        ]
    with path.open("a") as fh:
        fh.write("\n".join(lines))
