"""`sterling bench e2e`: a thin front for ``sterling.benchmarks.e2e`` (Sterling vs the microservice mesh)."""

from __future__ import annotations

import argparse

__all__ = ["register", "run"]

QUICK = dict(n_users=150, n_items=300, n_requests=120, k=10, k0=50, step_s=0.6, fractions=(0.3, 0.7, 1.2))


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "e2e",
        help="Sterling (`sterling serve`) vs a microservice mesh, same model and requests, open loop",
        description="Trains (or takes) one learned artifact; serves it with `sterling serve` and with a mesh of "
        "five processes (orchestrator, user tower, pyroaring filter, Faiss IVF-SQ8 ANN, scoring); replays one "
        "deterministic request set open loop at increasing rates; prints JSON lines (docs/mesh.md).",
    )
    p.add_argument("--artifact", help="learned artifact to serve (default: train one into --work-dir)")
    p.add_argument("--work-dir", default="bench-e2e", help="where the trained artifact and its data go")
    p.add_argument("--users", type=int, default=2000, help="synthetic users (when training)")
    p.add_argument("--items", type=int, default=20000, help="synthetic items (when training)")
    p.add_argument("--requests", type=int, default=2000, help="requests in the deterministic set")
    p.add_argument("--k", type=int, default=50)
    p.add_argument("--k0", type=int, default=500, help="candidates the OverArch reranks")
    p.add_argument("--step-s", type=float, default=4.0, help="seconds per open-loop rate step (bounds its count)")
    p.add_argument("--batch-wait-ms", type=float, default=20.0, help="dynamic batching wait bound, both systems")
    p.add_argument("--batch-max-queries", type=int, default=64, help="dynamic batching size bound, both systems")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--plot", help="write a QPS-vs-p99 PNG here (needs matplotlib)")
    p.add_argument("--quick", action="store_true", help="tiny version (≈ 30 s) for CI")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from sterling.benchmarks.e2e import E2EConfig, run_e2e

    kw = dict(artifact=args.artifact, work_dir=args.work_dir, n_users=args.users, n_items=args.items,
              n_requests=args.requests, k=args.k, k0=args.k0, step_s=args.step_s, batch_wait_ms=args.batch_wait_ms,
              batch_max_queries=args.batch_max_queries, seed=args.seed, plot=args.plot)
    if args.quick:
        kw.update(QUICK)
    run_e2e(E2EConfig(**kw))
    return 0
