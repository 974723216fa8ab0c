"""`sterling build`: catalog file → one model artifact."""

from __future__ import annotations

import argparse
import os
import time

__all__ = ["register"]


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "build",
        help="build a model artifact from a catalog (.parquet or .npy)",
        description="Build an index from a catalog and write ONE artifact (atomic, checksummed). "
        "Parquet columns: id:int64, embedding:list<float>, attributes:list<string> (optional).",
    )
    p.add_argument("--catalog", required=True, help="catalog .parquet, or .npy embeddings [N, D]")
    p.add_argument("--ids", help="with .npy: int64 ids .npy [N] (default 0..N-1)")
    p.add_argument("--out", required=True, help="artifact path to write, e.g. model.st")
    p.add_argument("--nlist", type=int, help="IVF lists (default ≈ 4·sqrt(N), a power of two)")
    p.add_argument("--metric", default="ip", choices=["ip", "cosine"])
    p.add_argument("--target-fpr", type=float, default=1e-3, help="Bloom false-positive target per term")
    p.add_argument("--list-slack", type=float, default=0.0, help="spare slots per list for upserts (fraction)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--from-checkpoint", metavar="MODEL",
                   help="a `sterling train` artifact: re-embed --catalog (an items .parquet, docs/data.md) "
                   "with its item tower and write the model over the new catalog")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    from sterling.model import IndexConfig, RetrievalModel, build_index
    from sterling.model.bloom import measure_fpr
    from sterling.model.catalog import open_catalog

    console = Console(stderr=True)
    if args.from_checkpoint:
        return _from_checkpoint(args, console)
    config = IndexConfig(
        nlist=args.nlist,
        metric=args.metric,
        target_fpr=args.target_fpr,
        list_slack=args.list_slack,
        seed=args.seed,
    )
    source = open_catalog(args.catalog, ids_path=args.ids)
    t0 = time.perf_counter()
    index = build_index(source, config=config, progress=True)
    build_s = time.perf_counter() - t0
    RetrievalModel(index).save(args.out)
    size = os.path.getsize(args.out)
    fpr = measure_fpr(index)
    table = Table(title=f"built {args.out}")
    table.add_column("what")
    table.add_column("value", justify="right")
    for k, v in [
        ("items", f"{index.num_items:,}"),
        ("dim", index.dim),
        ("nlist", index.nlist),
        ("metric", str(index.metric)),
        ("vocabulary terms", f"{len(index.vocab):,}"),
        ("bloom bits/item × hashes", f"{index.bloom_spec.bits} × {index.bloom_spec.hashes}"),
        ("bloom FPR per term (measured / target)", f"{fpr:.2e} / {config.target_fpr:.0e}"),
        ("artifact size", f"{size / 1e6:,.1f} MB ({size / max(index.num_items, 1):.1f} B/item)"),
        ("build time", f"{build_s:.1f} s"),
    ]:
        table.add_row(k, str(v))
    console.print(table)
    return 0


def _from_checkpoint(args: argparse.Namespace, console) -> int:
    from sterling.model.config import IndexConfig
    from sterling.model.data import read_features
    from sterling.model.learned import LearnedRetrievalModel

    model = LearnedRetrievalModel.load(args.from_checkpoint)
    items = read_features(args.catalog, "item_id")
    cfg = IndexConfig(nlist=args.nlist, metric=model.index.metric, target_fpr=args.target_fpr,
                      list_slack=args.list_slack, seed=args.seed)
    t0 = time.perf_counter()
    new = model.with_catalog(items, index_config=cfg)
    new.save(args.out)
    console.print(f"re-embedded {new.index.num_items:,} items with the trained item tower in "
                  f"{time.perf_counter() - t0:.1f} s → {args.out} ({os.path.getsize(args.out) / 1e6:,.1f} MB)")
    return 0
