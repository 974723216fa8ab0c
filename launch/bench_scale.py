"""`sterling bench scale`: a thin front for ``sterling.benchmarks.scale`` (catalog size vs build, bytes, RSS, QPS)."""

from __future__ import annotations

import argparse

__all__ = ["register", "run", "QUICK"]

QUICK = dict(items=(20_000,), dim=32, nlist=64, nprobes=(8,), k=20, queries=64, batch=16)


def _counts(text: str) -> tuple[int, ...]:
    from sterling.launch.plan_cmd import parse_count

    return tuple(parse_count(t) for t in text.split(",") if t.strip())


def _ints(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(t) for t in text.split(",") if t.strip())
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"not a list of integers: {text!r} (e.g. 16,32,64)") from e


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "scale",
        help="build and serve synthetic catalogs of growing size on this host, the planner next to each figure",
        description="Per size: generate a clustered synthetic catalog to disk in chunks, build it with the chunked, "
        "resumable builder (child process: time, peak RSS), measure bytes per item, compute exact top-k "
        "chunk by chunk, serve it (child process: RSS, QPS and recall at fixed nprobe). Prints JSON lines; "
        "progress on stderr (docs/scale.md).",
    )
    p.add_argument("--items", type=_counts, default=(1_000_000, 10_000_000), help="catalog sizes, e.g. 1M,10M,100M")
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--nlist", type=int, default=None, help="IVF lists (default: a power of two near √N)")
    p.add_argument("--nprobe", type=_ints, default=(16, 64, 256), help="fixed nprobe values served, e.g. 16,64,256")
    p.add_argument("--k", type=int, default=100, help="recall@k against exact")
    p.add_argument("--queries", type=int, default=1000, help="query sample (exact top-k is computed for each)")
    p.add_argument("--batch", type=int, default=16, help="queries per search call while serving")
    p.add_argument("--host-dram-gb", type=float, default=24.0, help="the host the planner places the index on")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--work-dir", default="bench-scale", help="catalogs, build state and artifacts (needs disk: "
                   "≈ 400 B per item at dim 64 while a size runs)")
    p.add_argument("--keep", action="store_true", help="keep each size's catalog and artifact")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="tiny version (seconds) for CI")
    p.add_argument("--json", default=None, metavar="FILE", help="also write the per-size records to FILE (one JSON "
                   "list, whole or absent), the input of --from-json")
    p.add_argument("--plot", default=None, metavar="PNG", help="scale curves (build time, bytes per item, serving RSS, "
                   "QPS and recall; the planner's prediction beside each) as a matplotlib PNG")
    p.add_argument("--from-json", default=None, metavar="FILE", help="redraw --plot from the records of an earlier "
                   "run's --json FILE instead of running")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from sterling.benchmarks.scale import (
        ScaleConfig,
        plot_scale,
        read_records,
        run_scale,
        write_records,
    )
    from sterling.model.errors import InvalidInputError

    if args.from_json:
        if not args.plot:
            raise InvalidInputError("--from-json only redraws a plot; add --plot PNG")
        plot_scale(read_records(args.from_json), args.plot)
        return 0
    kw = dict(items=args.items, dim=args.dim, nlist=args.nlist, nprobes=args.nprobe, k=args.k, queries=args.queries,
              batch=args.batch, host_dram_gb=args.host_dram_gb, threads=args.threads, work_dir=args.work_dir,
              keep=args.keep, seed=args.seed)
    if args.quick:
        kw.update(QUICK)
    recs = run_scale(ScaleConfig(**kw))
    if args.json:
        write_records(recs, args.json)
    if args.plot:
        plot_scale(recs, args.plot)
    return 0
