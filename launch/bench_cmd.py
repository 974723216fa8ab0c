"""`sterling bench <name>`: benchmarks that compare against a named peer in the same run.

Each benchmark lives in ``sterling.launch.bench_<name>`` and exposes
``register(subparsers)``; it prints one JSON line per configuration (ratios
against the peer measured in the same process) and can append rows to
``BENCHMARKS.md``. Benchmarks are never timed unit tests.
"""

from __future__ import annotations

import argparse
import importlib

__all__ = ["register", "BENCHES"]

BENCHES: tuple[str, ...] = ("ann", "filter", "cluster", "e2e", "scale", "updates", "reliability", "rerank", "tiers",
                           "shards")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="benchmarks against named peers (prints JSON lines)")
    bench_sub = p.add_subparsers(dest="bench", metavar="BENCH", required=True)
    for name in BENCHES:
        try:
            module = importlib.import_module(f"sterling.launch.bench_{name}")
        except ModuleNotFoundError as e:
            if e.name == f"sterling.launch.bench_{name}":
                continue
            raise
        module.register(bench_sub)
