"""`sterling launch ray`: the sharded service on a Ray cluster (shard actors + gRPC router).

On an existing cluster (``ray start --head`` / ``ray start --address …``,
then ``--address auto`` or ``HOST:PORT``) or on a local one it starts.
Shard artifacts are written next to the model (``<model>.shards/``) unless
a current set is already there; actors are placed by the plan's
assignments (``--plan``), otherwise round-robin over the alive nodes. With
process groups (the plan's hosts × GPUs, or ``--ranks-per-host N``) each
actor is rank 0 of a group of ranks on its host over rank slices of its
shard (``sterling.cluster.group_shard``).
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from sterling.launch.serve_cmd import (
    add_server_arguments,
    check_servable,
    router_config_from_args,
    server_config_from_args,
)

__all__ = ["register", "run_ray", "ensure_shards", "remove_stale_shards", "check_launch_args", "group_shape",
           "ensure_group_slices"]


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("launch", help="run the sharded service on a cluster manager (ray) or over ranks of one host (torchrun)")
    kinds = p.add_subparsers(dest="launcher", metavar="LAUNCHER", required=True)
    r = kinds.add_parser(
        "ray",
        help="shard actors on Ray behind the gRPC router",
        description="Start one Ray actor per (document shard, replica), placed by the plan "
        "(placement group, STRICT_SPREAD across hosts), and serve sterling.v1.Retrieval from this "
        "process. Prints the address; stops cleanly (actors removed) on SIGINT/SIGTERM.",
    )
    r.add_argument("--model", required=True, help="artifact written by `sterling build`")
    r.add_argument("--plan", help="plan JSON (`sterling plan --out`): shard list ranges, replicas, hosts")
    r.add_argument("--shards", type=int, help="document shards without a plan (default 1)")
    r.add_argument("--replicas", type=int, help="replicas per shard without a plan (default 1)")
    r.add_argument("--shards-dir", help="where shard artifacts are (or go); default <model>.shards/")
    r.add_argument("--address", help="Ray cluster: auto or HOST:PORT (default: start a local one)")
    r.add_argument("--num-cpus", type=int, help="CPUs of the local Ray instance (no --address)")
    r.add_argument("--cpus-per-shard", type=float, default=1.0, help="Ray CPUs reserved per shard actor (per rank of its group with --ranks-per-host)")
    r.add_argument("--threads-per-shard", type=int, default=1, help="torch threads in each shard actor")
    r.add_argument("--spread", choices=("strict", "soft"), default="strict",
                   help="strict: one Ray node per plan host (STRICT_SPREAD); soft: best effort (SPREAD)")
    r.add_argument("--ready-timeout", type=float, default=300.0, help="seconds to wait for every actor")
    r.add_argument("--data-dir", help="take Upsert/Delete/UpdateAttributes: each shard replica keeps its snapshots "
                   "and update log in DIR/shard-<s>/replica-<r>/ on its node; a learned model's router keeps its "
                   "OverArch item cache in DIR/head on this host; a restart recovers before SERVING")
    r.add_argument("--snapshot-every", type=int, default=1000, help="update batches between replica snapshots")
    r.add_argument("--ranks-per-host", type=int,
                   help="each shard actor runs a process group of N ranks on its host (rank slices of its shard, "
                   "gloo on CPU / NCCL on GPU, merged exactly); with --plan the default is the plan's GPUs per "
                   "host (its shards on one host become one group), without it 1; --cpus-per-shard is then per rank")
    r.add_argument("--gpus-per-rank", type=float,
                   help="GPUs Ray reserves per rank of a shard actor's group (NCCL when the actor sees GPUs); "
                   "default 1 for a GPU plan's groups, else 0 (gloo on CPU)")
    add_server_arguments(r)
    r.set_defaults(func=run_ray)
    from sterling.launch.torchrun_cmd import register_torchrun

    register_torchrun(kinds)


def ensure_shards(model: Path, out: Path, *, num_shards: int | None, plan, plan_path: str | None,
                  ranges: list[tuple[int, int]] | None = None):
    """The shard manifest in ``out``: reused when written from this model file (not modified since) with
    the same list ranges, else rewritten. ``ranges``: exactly these shards (e.g. one per plan host)."""
    from sterling.sharding.documents import MANIFEST_NAME, read_manifest, write_shards

    want = len(ranges) if ranges is not None else plan.num_shards if plan is not None else (num_shards or 1)
    if (out / MANIFEST_NAME).exists():
        m = read_manifest(out)
        have = [tuple(s.lists) for s in m.shards]
        plan_ranges = [(s.list_start, s.list_end) for s in sorted(plan.shards, key=lambda s: s.shard)] if plan else None
        if ranges is not None:
            plan_ranges = [tuple(r) for r in ranges]
        if (m.num_shards == want and Path(m.source) == model
                and (plan_ranges is None or plan_ranges == have)
                and all(Path(s.path).exists() for s in m.shards)
                and Path(m.source).stat().st_mtime <= (out / MANIFEST_NAME).stat().st_mtime):
            return m
    if ranges is not None:
        manifest = write_shards(model, out, ranges=ranges, plan_path=plan_path)
    else:
        manifest = write_shards(model, out, num_shards=None if plan is not None else want, plan=plan,
                                plan_path=plan_path)
    remove_stale_shards(out, manifest)
    return manifest


def remove_stale_shards(out: Path, manifest) -> list[Path]:
    """Delete ``shard-*-of-*.st`` files in ``out`` that the current manifest does not list (an earlier
    layout with another shard count), so nothing stale sits beside it; returns what was removed."""
    keep = {Path(s.path).name for s in manifest.shards}
    stale = [p for p in out.glob("shard-*-of-*.st") if p.name not in keep]
    for p in stale:
        p.unlink()
        logging.getLogger(__name__).info("removed stale shard file %s (not in the new manifest)", p)
    return stale


def check_launch_args(args: argparse.Namespace) -> None:
    """The launch-only options, checked before Ray starts (typed errors naming the option)."""
    from sterling.cluster.errors import ClusterConfigError

    for name, low in (("shards", 1), ("replicas", 1), ("num_cpus", 1), ("threads_per_shard", 1)):
        v = getattr(args, name)
        if v is not None and v < low:
            raise ClusterConfigError(f"--{name.replace('_', '-')} ({v}) must be ≥ {low}")
    if not args.cpus_per_shard > 0:
        raise ClusterConfigError(f"--cpus-per-shard ({args.cpus_per_shard}) must be > 0 (fractions like 0.5 work)")
    if getattr(args, "snapshot_every", 1) < 0:
        raise ClusterConfigError(f"--snapshot-every ({args.snapshot_every}) must be ≥ 0 (0 = never)")
    if not args.ready_timeout > 0:
        raise ClusterConfigError(f"--ready-timeout ({args.ready_timeout}) must be > 0 seconds")
    if args.address and args.num_cpus is not None:
        raise ClusterConfigError("--num-cpus sizes a local Ray instance; with --address the cluster's nodes decide")
    ranks = getattr(args, "ranks_per_host", None)
    if ranks is not None and ranks < 1:
        raise ClusterConfigError(f"--ranks-per-host ({ranks}) must be ≥ 1")
    if getattr(args, "gpus_per_rank", None) is not None and not args.gpus_per_rank >= 0:
        raise ClusterConfigError(f"--gpus-per-rank ({args.gpus_per_rank}) must be ≥ 0")
    if args.data_dir and ranks is not None and ranks > 1:
        raise ClusterConfigError(
            f"--data-dir (updates) with --ranks-per-host {ranks}: process-group shards take no updates yet; "
            "drop --data-dir to serve over ranks, or use --ranks-per-host 1 to take updates"
        )


def group_shape(args: argparse.Namespace, plan, model: Path):
    """``(groups, layout)`` for process-group shards, ``(N, None)`` for N ranks per shard, or ``None`` for one
    process per shard actor.

    ``groups[s]``: with a plan, the plan shards (one per GPU) on one host that
    Ray-level shard ``s`` unites, ranks = those shards; without one,
    ``--ranks-per-host`` (an int) for every shard. With ``--data-dir`` and no
    ``--ranks-per-host`` a plan keeps one actor per GPU (groups take no
    updates). Refusals are typed and come before Ray starts.
    """
    from sterling.cluster.errors import ClusterConfigError
    from sterling.cluster.ray_backend import group_layout_from_plan

    want = args.ranks_per_host
    if plan is None:
        return None if want is None or want == 1 else (want, None)
    if want == 1:
        return None
    groups, layout = group_layout_from_plan(plan)
    sizes = sorted({len(g) for g in groups})
    if want is not None and sizes != [want]:
        raise ClusterConfigError(
            f"--ranks-per-host {want} disagrees with the plan, whose hosts hold {sizes} of its shards (GPUs) "
            f"each; drop --ranks-per-host (the plan decides), or --ranks-per-host 1 for one actor per GPU"
        )
    if sizes == [1]:
        return None
    if args.data_dir:  # updates need one process per replica: the plan's GPUs as actors, as before groups
        print(f"sterling launch ray: --data-dir takes updates, which process groups do not yet: one actor per "
              f"plan shard (GPU) instead of {sizes} rank(s) per host", file=sys.stderr, flush=True)
        return None
    return groups, layout


def _gpus_per_rank(args: argparse.Namespace, plan, ranks) -> float:
    """``--gpus-per-rank``, else one GPU per rank when a GPU plan's hosts run groups (its shards sit on GPUs)."""
    if args.gpus_per_rank is not None:
        return float(args.gpus_per_rank)
    return 1.0 if ranks and plan is not None and str(plan.topology.device.kind) == "gpu" else 0.0


def ensure_group_slices(manifest, ranks, *, plan=None, groups=None) -> tuple[list[str], list[int]]:
    """Per shard, the directory of its ranks' slices (``<shard>.ranks-N/``, reused when current) and N.

    ``ranks`` an int: each shard's lists cut into that many by bytes; with a
    plan's ``groups``, the ranks' lists are the plan shards'.
    """
    from sterling.launch.worker import ensure_rank_slices
    from sterling.model.retrieval import RetrievalModel
    from sterling.sharding.ranks import rank_ranges_within

    dirs, counts = [], []
    for s, sh in enumerate(manifest.shards):
        if groups is not None:
            ps = sorted(plan.shards, key=lambda x: x.shard)
            ranges = [(int(ps[i].list_start), int(ps[i].list_end)) for i in groups[s]]
        else:
            ranges = rank_ranges_within(RetrievalModel.load(sh.path, verify=False).index, sh.lists, ranks)
        out = Path(str(Path(sh.path).with_suffix("")) + f".ranks-{len(ranges)}")
        ensure_rank_slices(Path(sh.path), out, world_size=len(ranges), ranges=ranges)
        dirs.append(str(out.resolve()))
        counts.append(len(ranges))
    return dirs, counts


def _learned_model(args: argparse.Namespace):
    """For a learned artifact, the ``LearnedRetrievalModel`` whose ``LearnedHead`` the router keeps (towers,
    OverArch, heads, item cache; the shards hold its item index); None for an index model."""
    from sterling.model.artifact import read_header

    if read_header(args.model).get("kind") != "learned_retrieval_model":
        return None
    from sterling.model.learned import LearnedRetrievalModel

    return LearnedRetrievalModel.load(args.model).eval()


def run_ray(args: argparse.Namespace) -> int:
    import ray

    from sterling.cluster.ray_backend import RayBackend, default_layout, layout_from_plan
    from sterling.cluster.router import Router
    from sterling.cluster.server import RetrievalServer
    from sterling.launch.logs import configure_logging
    from sterling.model.errors import InvalidInputError
    from sterling.model.retrieval import RetrievalModel

    configure_logging(args.log_format)
    check_launch_args(args)
    server_cfg = server_config_from_args(args)
    router_cfg = router_config_from_args(args)
    plan = None
    if args.plan:
        from sterling.planner.types import Plan

        plan = Plan.from_json(Path(args.plan).read_text())
        if args.shards is not None and args.shards != plan.num_shards:
            raise InvalidInputError(f"--shards {args.shards} disagrees with the plan ({plan.num_shards}); drop one")
        if args.replicas is not None and args.replicas != plan.replicas:
            raise InvalidInputError(f"--replicas {args.replicas} disagrees with the plan ({plan.replicas}); drop one")
    check_servable(args.model)
    learned = _learned_model(args)  # before Ray starts: a bad artifact costs nothing
    model = Path(args.model)
    shape = group_shape(args, plan, model)
    out = Path(args.shards_dir) if args.shards_dir else Path(str(model) + ".shards")
    groups = rank_dirs = ranks = None
    if shape is not None and shape[1] is not None:  # the plan's hosts × GPUs: one shard per (host) group
        groups, layout = shape
        ps = sorted(plan.shards, key=lambda x: x.shard)
        ranges = [(int(ps[g[0]].list_start), int(ps[g[-1]].list_end)) for g in groups]
        manifest = ensure_shards(model, out, num_shards=None, plan=None, plan_path=args.plan, ranges=ranges)
    else:
        manifest = ensure_shards(model, out, num_shards=args.shards, plan=plan, plan_path=args.plan)
    if shape is not None:
        rank_dirs, ranks = ensure_group_slices(manifest, shape[0], plan=plan, groups=groups)
    print(f"sterling launch ray: {manifest.num_shards} shard(s) in {out}/"
          + (f", ranks per shard {ranks}" if ranks else ""), flush=True)

    if args.address:
        ray.init(address=args.address, log_to_driver=False)
    else:
        ray.init(num_cpus=args.num_cpus, log_to_driver=False, include_dashboard=False)
    backend = None
    try:
        alive = [n for n in ray.nodes() if n.get("Alive")]
        if groups is None:  # else the layout came with the plan's host groups
            layout = (layout_from_plan(plan, manifest.num_shards) if plan is not None
                      else default_layout(manifest.num_shards, args.replicas or 1, len(alive)))
        backend = RayBackend.launch(
            manifest, layout=layout, cpus_per_actor=args.cpus_per_shard, threads_per_actor=args.threads_per_shard,
            strategy="STRICT_SPREAD" if args.spread == "strict" else "SPREAD", ready_timeout_s=args.ready_timeout,
            local_ray=not args.address, snapshot_every=args.snapshot_every,
            data_dir=str(Path(args.data_dir).resolve()) if args.data_dir else None,  # actors' cwd may differ
            rank_dirs=rank_dirs, ranks=ranks, gpus_per_rank=_gpus_per_rank(args, plan, ranks),
        )
        updates = None
        if args.data_dir:
            from sterling.cluster.ray_live import ray_live_router

            data_dir = Path(args.data_dir).resolve()
            router, updates = ray_live_router(manifest, backend, router_cfg, timeout_s=args.ready_timeout,
                                              learned=learned, head_dir=data_dir / "head",
                                              snapshot_every=args.snapshot_every)
        else:
            from sterling.cluster.learned_head import LearnedHead

            router = Router(RetrievalModel.load(manifest.head), backend, router_cfg,
                            learned=None if learned is None else LearnedHead(learned))
        srv = RetrievalServer(router, server_cfg, backend_name="ray", updates=updates).start()
        where = backend.where()
        nodes = sorted({w["node_id"] for row in where for w in row})
        for s, row in enumerate(where):
            placed = ", ".join(f"replica {r} on node {nodes.index(w['node_id'])}" for r, w in enumerate(row))
            if ranks:
                placed += f" ({ranks[s]} ranks each)"
            print(f"  shard {s} lists [{manifest.shards[s].lists[0]}, {manifest.shards[s].lists[1]}): {placed}")
        logged = f", updates logged in {args.data_dir} (model version {updates.version})" if updates else ""
        print(f"sterling launch ray: listening on {srv.address} ({manifest.num_shards} shard(s) × "
              f"{max(layout.replicas)} replica(s) on {len(nodes)} Ray node(s){logged}); Ctrl-C to stop", flush=True)
        srv.wait_for_signal(on_stop=updates.close if updates is not None else None)
        backend = None  # srv.stop() closed it (actors killed, placement group removed)
    finally:
        if backend is not None:
            backend.close()
        ray.shutdown()
    print("sterling launch ray: stopped", file=sys.stderr, flush=True)
    return 0
