"""``sterling plan``: dry-run placement planner (no GPU needed).

Example:
    sterling plan --items 500M --dim 128 --gpu h100-80g --gpus-per-host 8 \\
        --qps 20000 --p99-ms 100 --out plan.json --plot plan.png
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import sys
from pathlib import Path

__all__ = ["register", "run", "parse_count"]

_SUFFIX = {"": 1, "k": 10**3, "m": 10**6, "b": 10**9, "g": 10**9, "t": 10**12}


def parse_count(text: str) -> int:
    """``500M`` → 500_000_000; also ``1B``, ``100k``, ``1e9``, ``1_000``."""
    m = re.fullmatch(r"\s*([0-9][0-9_]*\.?[0-9]*(?:e[0-9]+)?)\s*([kmbgt]?)\s*", text.lower())
    if not m:
        raise argparse.ArgumentTypeError(f"not a count: {text!r} (use e.g. 500M, 1B, 100k, 1e9)")
    value = float(m.group(1).replace("_", "")) * _SUFFIX[m.group(2)]
    if value != int(value) or value < 1:
        raise argparse.ArgumentTypeError(f"not a positive whole count: {text!r}")
    return int(value)


def register(subparsers: argparse._SubParsersAction) -> None:
    from sterling.planner.devices import DEVICE_PRESETS

    p = subparsers.add_parser(
        "plan",
        help="plan hardware and tensor placement for a catalog (dry run, no GPU needed)",
        description=(
            "Plan where every tensor of the retrieval model lives: scale up (SRAM → HBM → "
            "host DRAM → remote DRAM on one GPU), then out (the host's GPUs), then "
            "document-shard across hosts, then replicate for QPS. Prints per-device "
            "memory, predicted latency/QPS and one line per decision; writes plan.json "
            "for `sterling launch`."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    what = p.add_argument_group("catalog and model")
    what.add_argument("--items", type=parse_count, help="catalog size, e.g. 500M, 1B, 2e8")
    what.add_argument("--dim", type=int, help="embedding dimension D")
    what.add_argument("--model", type=Path,
                      help="a saved Sterling artifact: take items, dim, nlist and tensor sizes from it")
    what.add_argument("--bits", type=int, default=8, choices=(4, 8, 16, 32), help="bits per code value")
    what.add_argument("--nlist", type=int, default=None, help="IVF lists (default 4·√N)")
    what.add_argument("--nprobe", type=int, default=None,
                      help="lists probed per query (default: the artifact's with --model, else 32)")
    what.add_argument("--k0", type=int, default=10_000, help="candidates kept for exact filter / OverArch")
    what.add_argument("--k", type=int, default=1_000, help="results returned per query")
    what.add_argument("--batch", type=int, default=16, help="queries per batch")
    what.add_argument("--attrs-per-item", type=int, default=10, help="filterable attributes per item")
    what.add_argument("--cache-dim", type=int, default=None,
                      help="fp16 item-embedding cache width for the OverArch (default: --dim; 0 = none)")
    what.add_argument("--tower-params", type=parse_count, default=2_000_000, help="user tower parameters")
    what.add_argument("--overarch-params", type=parse_count, default=0, help="OverArch parameters")
    what.add_argument("--sparse-tables", type=Path,
                      help="YAML list of user tables {name, num_embeddings, embedding_dim, pooling_factor, dtype}")
    hw = p.add_argument_group("hardware and targets")
    hw.add_argument("--gpu", default="h100-80g", choices=sorted(DEVICE_PRESETS), help="device preset")
    hw.add_argument("--gpus-per-host", type=int, default=None, help="default: the preset host's count")
    hw.add_argument("--max-hosts", type=int, default=1024, help="most hosts the plan may use")
    hw.add_argument("--host-dram-gb", type=float, default=None, help="host DRAM per host (default: preset)")
    hw.add_argument("--qps", type=float, default=None, help="target queries per second (default: one replica)")
    hw.add_argument("--p99-ms", type=float, default=100.0, help="p99 latency target (0 = none)")
    hw.add_argument("--allow-spill", action="store_true",
                    help="let the scan path (codes) spill to host DRAM instead of adding GPUs")
    hw.add_argument("--cold-window-mb", type=float, default=32.0,
                    help="CPU tiers (--model, --gpu cpu): slow-tier MB a serving process keeps mapped at a time")
    hw.add_argument("--profile", type=Path, default=None,
                    help="machine profile JSON (measured CPU scan and mapped-read costs) used instead of the "
                         "built-in CPU constants; write one with --calibrate")
    hw.add_argument("--calibrate", action="store_true",
                    help="measure this host (scan, cold and warm mapped reads) and write --profile; ~1 min")
    hw.add_argument("--threads", type=int, default=2, help="threads the calibration measures with")
    out = p.add_argument_group("output")
    out.add_argument("--out", type=Path, default=None, help="write the plan JSON here")
    out.add_argument("--plot", type=Path, default=None, help="write a memory-per-device chart (PNG)")
    out.add_argument("--quiet", action="store_true", help="print only the decisions")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import yaml
    from rich.console import Console

    from sterling.planner import errors
    from sterling.planner.devices import make_topology
    from sterling.planner.inventory import (
        IndexModelConfig,
        inventory_from_config,
        inventory_from_header,
        sparse_tables_from_yaml,
    )
    from sterling.planner.io import save_plan
    from sterling.planner.placement import PlanTargets, plan
    from sterling.planner.report import render_plan

    profile = None
    if args.calibrate:
        from sterling.planner.profile import measure_profile

        if args.profile is None:
            raise errors.InvalidPlanConfigError("--calibrate writes the profile to --profile PATH; give one")
        profile = measure_profile(threads=args.threads)
        profile.save(args.profile)
        print(json.dumps(dataclasses.asdict(profile)))
        print(f"wrote {args.profile}")
        if args.items is None and args.model is None:
            return 0
    elif args.profile is not None:
        from sterling.planner.profile import MachineProfile

        profile = MachineProfile.load(args.profile)
    sparse = ()
    if args.sparse_tables is not None:
        try:
            data = yaml.safe_load(args.sparse_tables.read_text(encoding="utf-8"))
        except (OSError, yaml.YAMLError) as e:
            raise errors.InvalidPlanConfigError(f"cannot read --sparse-tables {args.sparse_tables}: {e}") from e
        sparse = sparse_tables_from_yaml(data)

    inventory = None
    list_stats = None
    if args.model is not None:
        from sterling.model.artifact import read_header

        header = read_header(args.model)
        list_stats = _list_stats(args)
        if args.nprobe is None:
            args.nprobe = list_stats.nprobe
        cfg, inventory = inventory_from_header(header, nprobe=args.nprobe, k0=args.k0, batch=args.batch)
        list_stats = _at_nprobe(list_stats, cfg.nprobe)
        if args.items is not None and args.items != cfg.items:
            raise errors.InvalidPlanConfigError(
                f"--items {args.items:,} disagrees with the artifact ({cfg.items:,}); drop --items"
            )
    else:
        if args.items is None or args.dim is None:
            raise errors.InvalidPlanConfigError("give --items and --dim, or --model ARTIFACT")
        cfg = IndexModelConfig(
            items=args.items, dim=args.dim, nlist=args.nlist, nprobe=args.nprobe or 32, k0=args.k0,
            k=args.k, batch=args.batch, code_bits=args.bits, attrs_per_item=args.attrs_per_item,
            cache_dim=args.cache_dim, tower_params=args.tower_params,
            overarch_params=args.overarch_params, sparse_tables=sparse,
        )
    if inventory is not None and sparse:
        cfg = dataclasses.replace(cfg, sparse_tables=sparse)
        inventory = inventory + tuple(
            t for t in inventory_from_config(cfg) if t.name.startswith("sparse.")
        )
    if args.max_hosts < 1:
        raise errors.InvalidPlanConfigError(f"--max-hosts ({args.max_hosts}) must be >= 1")
    topo = make_topology(
        args.gpu, hosts=args.max_hosts, gpus_per_host=args.gpus_per_host,
        host_dram_bytes=None if args.host_dram_gb is None else int(args.host_dram_gb * 1e9),
    )
    targets = PlanTargets(
        qps=args.qps, p99_ms=args.p99_ms or None, allow_scan_spill=args.allow_spill,
    )
    if args.cold_window_mb < 0:
        raise errors.InvalidPlanConfigError(f"--cold-window-mb ({args.cold_window_mb}) must be >= 0")
    result = plan(cfg, topo, targets, inventory=inventory, list_stats=list_stats,
                  cold_window=int(args.cold_window_mb * 2**20), profile=profile)
    console = Console(width=None if sys.stdout.isatty() else 140)
    if args.quiet:
        for i, d in enumerate(result.decisions, 1):
            console.print(f"{i}. [{d.step}] {d.message}", markup=False, highlight=False)
    else:
        render_plan(result, console)
    if args.out is not None:
        save_plan(result, args.out)
        console.print(f"wrote {args.out}", markup=False, highlight=False)
    if args.plot is not None:
        from sterling.planner.plot import plot_plan

        plot_plan(result, args.plot)
        console.print(f"wrote {args.plot}", markup=False, highlight=False)
    return 0


def _list_stats(args: argparse.Namespace):
    """The artifact's real lists (bytes per list, probe statistics) as the planner's ``ListStats``."""
    from sterling.model.tiers import artifact_list_stats
    from sterling.planner.tiers import ListStats

    return ListStats.from_artifact(artifact_list_stats(args.model))


def _at_nprobe(stats, nprobe: int):
    """Probe frequencies measured at the build's nprobe, rescaled to the planned one (≤ 1 per list)."""
    import dataclasses

    import numpy as np

    if nprobe == stats.nprobe or stats.nprobe <= 0:
        return stats
    freq = np.minimum(stats.probe_freq * (nprobe / stats.nprobe), 1.0)
    return dataclasses.replace(stats, probe_freq=freq, nprobe=nprobe)
