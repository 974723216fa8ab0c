"""`sterling shard`: cut a model artifact into document-shard artifacts (whole IVF lists)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

__all__ = ["register", "run"]


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "shard",
        help="write one artifact per document shard (+ head.st, manifest.json)",
        description="Slice a model artifact into document shards by whole IVF lists: the plan's list "
        "ranges with --plan, otherwise N ranges balanced by bytes. Each shard is a normal model "
        "artifact (memory-mapped on load) that keeps every centroid, so shards probe globally and "
        "their merged top-k equals the unsharded model's.",
    )
    p.add_argument("--model", required=True, help="artifact written by `sterling build`")
    p.add_argument("--shards", type=int, help="number of document shards (default: the plan's)")
    p.add_argument("--plan", help="plan JSON written by `sterling plan --out`")
    p.add_argument("--out", help="output directory (default: <model>.shards/)")
    p.add_argument("--json", action="store_true", help="print the manifest as JSON")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from sterling.sharding.documents import write_shards

    plan = None
    if args.plan:
        from sterling.planner.types import Plan

        plan = Plan.from_json(Path(args.plan).read_text())
    out = Path(args.out) if args.out else Path(str(args.model) + ".shards")
    m = write_shards(args.model, out, num_shards=args.shards, plan=plan, plan_path=args.plan)
    if args.json:
        print(Path(out / "manifest.json").read_text())
        return 0
    print(f"wrote {m.num_shards} shards of {args.model} (version {m.source_version}, nlist {m.nlist}) to {out}/")
    for s in m.shards:
        print(f"  shard {s.index}: lists [{s.lists[0]}, {s.lists[1]}), {s.items} items, "
              f"{s.nbytes / 2**20:.1f} MiB  {Path(s.path).name}")
    _ = json
    return 0
