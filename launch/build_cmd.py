"""`sterling build`: catalog file → one model artifact."""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

__all__ = ["register", "check_output_path"]


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "build",
        help="build a model artifact from a catalog (.parquet or .npy)",
        description="Build an index from a catalog and write ONE artifact (atomic, checksummed). "
        "Parquet columns: id:int64, embedding:list<float>, attributes:list<string> (optional).",
    )
    p.add_argument("--catalog", required=True, help="catalog .parquet, or .npy embeddings [N, D]")
    p.add_argument("--ids", help="with .npy: int64 ids .npy [N] (default 0..N-1; Parquet needs an 'id' column)")
    p.add_argument("--out", required=True, help="artifact path to write, e.g. model.st")
    p.add_argument("--nlist", type=int, help="IVF lists (default ≈ 4·sqrt(N), a power of two)")
    p.add_argument("--metric", default="ip", choices=["ip", "cosine"], help="similarity")
    p.add_argument("--target-fpr", type=float, default=1e-3, help="Bloom false-positive target per term")
    p.add_argument("--list-slack", type=float, default=0.0, help="spare slots per list for upserts (fraction)")
    p.add_argument("--max-attributes-per-item", type=int, default=1024,
                   help="most feature:value terms one item may carry (more is refused)")
    p.add_argument("--max-k", type=int, default=262_144, help="largest k a search of this model may ask for")
    p.add_argument("--max-filter-terms", type=int, default=256, help="most terms in one filter expression")
    p.add_argument("--seed", type=int, default=0, help="seed for sampling and k-means")
    p.add_argument("--work-dir", metavar="DIR",
                   help="with .npy: build chunk by chunk on disk in bounded memory, resumable — rerun the same "
                   "command with the same DIR after an interruption (docs/scale.md)")
    p.add_argument("--from-checkpoint", metavar="MODEL",
                   help="a `sterling train` artifact: re-embed --catalog (an items .parquet, docs/data.md) "
                   "with its item tower and write the model over the new catalog")
    p.set_defaults(func=run)


def check_output_path(out: str) -> None:
    """Fail before the build, not after it: ``--out`` must be a file path whose directory can be written."""
    from sterling.model.errors import ArtifactError

    p = Path(out)
    if p.is_dir():
        raise ArtifactError(f"--out {p} is a directory; give a file path, e.g. --out {p / 'model.st'}")
    parent = p.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise ArtifactError(f"--out {p}: {parent} is a file, so the artifact's directory cannot be created")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ArtifactError(f"--out {p}: directory {parent} is not writable by this user")


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
        max_attributes_per_item=args.max_attributes_per_item,
        max_k=args.max_k,
        max_filter_terms=args.max_filter_terms,
        seed=args.seed,
    )
    check_output_path(args.out)
    t0 = time.perf_counter()
    if args.work_dir:
        from sterling.model.build_chunked import NpyCatalog, build_chunked
        from sterling.model.errors import InvalidInputError
        from sterling.model.index import ItemIndex

        if not str(args.catalog).endswith(".npy"):
            raise InvalidInputError(f"--work-dir builds .npy catalogs; {args.catalog} is not one (use a plain "
                                    "`sterling build` for Parquet)")
        build_chunked(NpyCatalog(args.catalog, args.ids), args.out, config=config, work_dir=args.work_dir,
                      progress=True)
        build_s = time.perf_counter() - t0
        index = ItemIndex.load(args.out)
    else:
        source = open_catalog(args.catalog, ids_path=args.ids)
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

    check_output_path(args.out)
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
