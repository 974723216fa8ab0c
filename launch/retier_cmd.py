"""``sterling retier``: write a plan's memory tier of each IVF list into an artifact.

Example:
    sterling plan --model m.st --gpu cpu --host-dram-gb 64 --out plan.json
    sterling retier --model m.st --plan plan.json

The artifact is rewritten atomically (temp file + rename; the tensors are
unchanged, only the per-list tier in its header). ``ItemIndex.load`` and
``sterling serve`` then keep the fast lists resident and serve the others
from the memory-mapped file. A running server re-tiers itself online from
the probes it observes (``ItemIndex.retier_from_observed``).
"""

from __future__ import annotations

import argparse
from pathlib import Path

__all__ = ["register", "run", "fast_mask_of_plan"]


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "retier",
        help="record a plan's per-list memory tiers (resident / memory-mapped) in an artifact",
        description=(
            "Take the per-list tier split of `sterling plan --model M` (the hottest lists by probe "
            "frequency resident, the rest served from the memory-mapped artifact) and write it into "
            "the artifact, atomically. Give --plan, or --fast-mb to choose the split here."
        ),
    )
    p.add_argument("--model", type=Path, required=True, help="the artifact to re-tier (rewritten in place)")
    how = p.add_mutually_exclusive_group(required=True)
    how.add_argument("--plan", type=Path, help="plan.json from `sterling plan --model` on this artifact")
    how.add_argument("--fast-mb", type=float, help="resident budget in MB: hottest lists that fit")
    how.add_argument("--all", choices=("fast", "slow"), help="every list in one tier")
    p.add_argument("--out", type=Path, default=None, help="write here instead of rewriting --model")
    p.set_defaults(func=run)


def fast_mask_of_plan(plan, nlist: int):
    """[nlist] bool from a plan's shard-0 tier split; typed error when the plan has none or another layout."""
    import numpy as np

    from sterling.planner import errors

    tiers = plan.devices[0].tiers if plan.devices else None
    if plan.num_shards != 1 or tiers is None:
        raise errors.PlanFormatError(
            "the plan has no per-list tier split for one shard; make it with "
            "`sterling plan --model THIS_ARTIFACT --gpu cpu` (a single-process CPU plan)"
        )
    fast = np.frombuffer(tiers["fast"].encode(), dtype=np.uint8) == ord("1")
    if fast.shape[0] != nlist:
        raise errors.PlanFormatError(
            f"the plan's split covers {fast.shape[0]} lists but the artifact has {nlist}; "
            "re-plan with `sterling plan --model` on this artifact"
        )
    return fast


def run(args: argparse.Namespace) -> int:
    import numpy as np

    from sterling.model.errors import InvalidInputError
    from sterling.model.tiers import artifact_list_stats, retier_artifact
    from sterling.planner.io import load_plan
    from sterling.planner.tiers import pick_fast

    stats = artifact_list_stats(args.model)
    lb = sum(stats["bytes_by_tensor"].values())
    nlist = lb.shape[0]
    window = advice = None
    if args.plan is not None:
        plan = load_plan(args.plan)
        fast = fast_mask_of_plan(plan, nlist)
        window = plan.devices[0].tiers.get("cold_window_bytes")
        advice = plan.devices[0].tiers.get("slow_advice")  # absent from plans written before it
    elif args.all is not None:
        fast = np.full(nlist, args.all == "fast")
    else:
        if args.fast_mb < 0:
            raise InvalidInputError(f"--fast-mb ({args.fast_mb}) must be >= 0")
        fast = pick_fast(stats["probe_freq"], lb, int(args.fast_mb * 1e6))
    retier_artifact(args.model, fast, out=args.out, cold_window=window, slow_advice=advice)
    hot = float(stats["probe_freq"][fast].sum() / max(stats["probe_freq"].sum(), 1e-300))
    print(f"{args.out or args.model}: {int(fast.sum())} of {nlist} lists resident "
          f"({int(lb[fast].sum()) / 1e6:.1f} MB, {hot:.0%} of probes), {int((~fast).sum())} memory-mapped "
          f"({int(lb[~fast].sum()) / 1e6:.1f} MB)"
          + (", read one page a fault (MADV_RANDOM)" if advice == "random" and (~fast).any() else "")
          + ("" if stats["measured"] else
          "; the artifact has no probe statistics (built before they were recorded): uniform assumed"))
    return 0
