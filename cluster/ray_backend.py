"""Document shards as Ray actors, placed by the plan with a placement group.

One actor per (shard, replica). Each *plan host* is one bundle of a
placement group with strategy ``STRICT_SPREAD``, so plan hosts land on
distinct Ray nodes; an actor is scheduled into the bundle of the host the
plan assigned it to (replicas of a shard go to different hosts when the
plan — or the default layout — says so). Actors have ``max_restarts``: a
restarted actor re-runs its constructor, which memory-maps its slice again
before ``ready()`` can answer, so the router's health probe only sees it
healthy once it can serve. With ``data_dir`` each actor also recovers its
replica's snapshot + update log there, and the router catches it up from a
peer before it serves again (``sterling.cluster.ray_live``).

Example:
    >>> ray.init(address="auto")
    >>> backend = RayBackend.launch(read_manifest("model.st.shards"), replicas=2)
    >>> router = Router(RetrievalModel.load(manifest.head), backend)
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from sterling.cluster.backends import ShardBackend
from sterling.cluster.errors import ClusterConfigError
from sterling.cluster.shard import ShardReply, ShardRequest
from sterling.model.errors import InvalidInputError
from sterling.sharding.documents import ShardManifest

__all__ = [
    "ActorLayout", "ShardActor", "RayBackend", "default_layout", "layout_from_plan", "group_layout_from_plan",
    "check_capacity", "bundles_for",
]

log = logging.getLogger(__name__)


class ShardActor:
    """The Ray actor body: a ``ShardServer`` over one shard artifact (wrapped with ``ray.remote`` at launch).

    With ``rank_dir`` (rank slices of the shard, ``write_rank_slices``) the
    actor is rank 0 of a process group on its host instead
    (``sterling.cluster.group_shard.GroupShardServer``): one such group per
    plan host, its ranks started by the actor, replies merged exactly.

    With ``data_dir`` the shard takes updates: a ``LiveReplica`` over
    ``data_dir/shard-<s>/replica-<r>/`` recovers its snapshot + update log in
    the constructor, so a restarted actor answers ``ready()`` only after that.
    """

    def __init__(self, path: str, shard: int, replica: int, threads: int, data_dir: str | None = None,
                 snapshot_every: int = 1000, rank_dir: str | None = None, group_timeout_s: float = 300.0,
                 max_group_restarts: int = 10) -> None:
        import torch

        from sterling.cluster.shard import ShardServer

        torch.set_num_threads(threads)
        self.replica = None
        if rank_dir is not None:  # a process group over the shard's rank slices; this process is rank 0
            from sterling.cluster.group_shard import GroupShardServer
            from sterling.sharding.documents import shard_info

            info = shard_info(path)
            self.server = GroupShardServer(rank_dir, shard=shard, replica=replica, threads=threads,
                                           lists=tuple(info["lists"]) if info else None, timeout_s=group_timeout_s,
                                           max_group_restarts=max_group_restarts)
        elif data_dir is None:
            self.server = ShardServer.load(path, shard=shard, replica=replica)
        else:
            from pathlib import Path

            from sterling.cluster.live import LiveReplica
            from sterling.model.retrieval import RetrievalModel
            from sterling.sharding.documents import shard_info

            info = shard_info(path)
            self.replica = LiveReplica(
                RetrievalModel.load(path), Path(data_dir) / f"shard-{shard:04d}" / f"replica-{replica}",
                shard=shard, replica=replica, lists=tuple(info["lists"]) if info else None,
                snapshot_every=snapshot_every,
            )
            self.server = self.replica.server
        self.server.warmup()

    def search(self, req: ShardRequest) -> ShardReply:
        server = self.replica.server if self.replica is not None else self.server
        return server.search(req)

    def info(self) -> dict:
        server = self.replica.server if self.replica is not None else self.server
        out = server.info()
        if self.replica is not None:
            out["seq"] = self.replica.applied()[0]
        return out

    def ready(self) -> bool:
        """True once the shard serves; a process-group shard raises ``RankFailedError`` while a rank is down."""
        return self.server.ready()

    def ranks(self) -> dict[int, int]:
        """RANK → pid of this replica's process group (``{0: pid}`` without one)."""
        import os

        return self.server.pids() if hasattr(self.server, "pids") else {0: os.getpid()}

    # update path (``sterling.cluster.ray_live``); only with a data_dir
    def applied(self) -> tuple[int, int]:
        return self._live().applied()

    def apply(self, rec) -> tuple[int, int]:
        return self._live().apply(rec)

    def apply_many(self, records) -> tuple[int, int]:
        return self._live().apply_many(records)

    def records_after(self, seq: int, limit: int):
        return self._live().records_after(seq, limit)

    def state(self):
        return self._live().state()

    def install_state(self, state) -> tuple[int, int]:
        return self._live().install_state(state)

    def holding(self, ids: list[int]) -> list[bool]:
        return self._live().holding(ids)

    def _live(self):
        if self.replica is None:
            from sterling.cluster.errors import NotImplementedYetError

            raise NotImplementedYetError("this shard actor has no data directory; launch with --data-dir")
        return self.replica

    def where(self) -> dict:
        import os

        import ray

        return {"node_id": ray.get_runtime_context().get_node_id(), "pid": os.getpid()}


@dataclass(frozen=True, kw_only=True, slots=True)
class ActorLayout:
    """``hosts[s][r]`` is the plan host of replica ``r`` of shard ``s``; hosts are 0..num_hosts-1."""

    hosts: tuple[tuple[int, ...], ...]
    num_hosts: int

    @property
    def replicas(self) -> list[int]:
        return [len(h) for h in self.hosts]


def default_layout(num_shards: int, replicas: int, num_hosts: int) -> ActorLayout:
    """Actors round-robin over hosts: replica ``r`` of shard ``s`` on host ``(s · replicas + r) % hosts``.

    Every host gets an actor (hosts = min(num_hosts, actors)), and replicas
    of one shard are on different hosts whenever ``replicas ≤ hosts``.
    """
    if num_shards < 1 or replicas < 1 or num_hosts < 1:
        raise InvalidInputError(f"shards ({num_shards}), replicas ({replicas}) and hosts ({num_hosts}) must be ≥ 1")
    used = min(num_hosts, num_shards * replicas)
    return ActorLayout(
        hosts=tuple(tuple((s * replicas + r) % used for r in range(replicas)) for s in range(num_shards)),
        num_hosts=used,
    )


def layout_from_plan(plan, num_shards: int) -> ActorLayout:
    """The plan's ``assignments`` (shard, replica → host), hosts renumbered densely."""
    if plan.num_shards != num_shards:
        raise InvalidInputError(
            f"the plan has {plan.num_shards} shards but the shard manifest has {num_shards}; "
            "re-shard with `sterling shard --plan` using the same plan"
        )
    by = {}
    for a in plan.assignments:
        by[(a.shard, a.replica)] = a.host
    hosts_used = sorted(set(by.values()))
    dense = {h: i for i, h in enumerate(hosts_used)}
    out = []
    for s in range(num_shards):
        reps = sorted(r for (s2, r) in by if s2 == s)
        if reps != list(range(plan.replicas)):
            raise InvalidInputError(f"plan assignments for shard {s} name replicas {reps}, not 0..{plan.replicas - 1}")
        out.append(tuple(dense[by[(s, r)]] for r in reps))
    return ActorLayout(hosts=tuple(out), num_hosts=len(hosts_used))


def group_layout_from_plan(plan) -> tuple[list[tuple[int, ...]], ActorLayout]:
    """The plan's hosts × GPUs as process groups: one group per (host, replica), its ranks the plan shards there.

    Returns ``groups`` (per Ray-level shard, the plan shards its ranks hold, in
    list order) and the layout of those shards' replicas over the plan's hosts.
    Every replica must put the same consecutive plan shards together on a host
    (the planner does when the shards fill whole hosts), else the replicas of
    a Ray-level shard would hold different lists.
    """
    by = {(a.shard, a.replica): a.host for a in plan.assignments}
    missing = [(s, r) for s in range(plan.num_shards) for r in range(plan.replicas) if (s, r) not in by]
    if missing:
        raise InvalidInputError(f"the plan assigns no host to (shard, replica) {missing[:8]}; re-plan")
    per_replica = []
    for r in range(plan.replicas):
        on = {}
        for s in range(plan.num_shards):
            on.setdefault(by[(s, r)], []).append(s)
        groups = sorted(tuple(v) for v in on.values())
        for g in groups:
            if list(g) != list(range(g[0], g[0] + len(g))):
                raise InvalidInputError(
                    f"the plan puts shards {list(g)} of replica {r} on one host: a host's process group needs "
                    "consecutive shards (contiguous lists); re-plan, or launch one actor per GPU (--ranks-per-host 1)"
                )
        per_replica.append(groups)
    for r, groups in enumerate(per_replica[1:], 1):
        if groups != per_replica[0]:
            raise InvalidInputError(
                f"the plan groups replica 0's shards by host as {per_replica[0]} but replica {r}'s as {groups}: "
                "the replicas of a host's group would hold different lists; re-plan with shards a multiple of "
                "the GPUs per host, or launch one actor per GPU (--ranks-per-host 1)"
            )
    groups = per_replica[0]
    used = sorted({by[(g[0], r)] for g in groups for r in range(plan.replicas)})
    dense = {h: i for i, h in enumerate(used)}
    hosts = tuple(tuple(dense[by[(g[0], r)]] for r in range(plan.replicas)) for g in groups)
    return groups, ActorLayout(hosts=hosts, num_hosts=len(used))


def bundles_for(layout: ActorLayout, cpus_per_actor: float, ranks: list[int] | None = None) -> list[float]:
    """CPUs each plan host's bundle needs: its actor count × ``cpus_per_actor``.

    With ``ranks`` (per shard, the ranks of its replicas' process groups) an
    actor counts ``ranks[s]`` times: ``cpus_per_actor`` is then per rank.
    """
    per_host = [0] * layout.num_hosts
    for s, hs in enumerate(layout.hosts):
        for h in hs:
            per_host[h] += 1 if ranks is None else ranks[s]
    return [cpus_per_actor * c for c in per_host]


def check_capacity(bundles: list[float], node_cpus: list[float], *, strategy: str, cpus_per_actor: float,
                   local: bool = False, unit: str = "shard actor(s)") -> None:
    """Fail fast (instead of waiting for a placement group that can never be placed) when the Ray
    cluster's CPUs cannot hold the bundles.

    Args:
        bundles: CPUs per plan host (``bundles_for``).
        node_cpus: total CPUs of each alive Ray node.
        strategy: ``STRICT_SPREAD`` (one node per bundle), ``SPREAD`` or ``PACK``.
        cpus_per_actor: the ``--cpus-per-shard`` value, to compute the fix.
        unit: what ``cpus_per_actor`` is reserved for (``rank(s)`` for process-group shards).
        local: the Ray instance was started by this process, so ``--num-cpus`` is a fix that applies.
    Raises:
        ClusterConfigError: with the CPUs needed and available and the remedies that apply.
    """
    need, have = sum(bundles), sum(node_cpus)
    actors = round(need / cpus_per_actor) if cpus_per_actor > 0 else 0
    eps = 1e-9
    if strategy == "STRICT_SPREAD":
        nodes = sorted(node_cpus, reverse=True)
        fits = len(bundles) <= len(nodes) and all(b <= n + eps for b, n in zip(sorted(bundles, reverse=True), nodes))
    else:
        fits = need <= have + eps and max(bundles, default=0.0) <= max(node_cpus, default=0.0) + eps
    if fits:
        return
    fixes = []
    if have > 0 and actors:
        per = have / actors if strategy != "STRICT_SPREAD" else min(
            n / max(1, round(b / cpus_per_actor)) for b, n in zip(sorted(bundles, reverse=True),
                                                                sorted(node_cpus, reverse=True)))
        per = int(per * 100) / 100
        if 0 < per < cpus_per_actor:
            fixes.append(f"reserve fewer CPUs per {unit.removesuffix('(s)')}: --cpus-per-shard {per:g}")
    if local:
        fixes.append(f"give the local Ray instance more CPUs: --num-cpus {int(-(-need // 1))}")
    else:
        fixes.append("add Ray nodes (`ray start --address …` on more hosts)")
    fixes.append("use fewer --shards or --replicas")
    listed = " ".join(f"{i}) {f};" for i, f in enumerate(fixes, 1)).rstrip(";")
    raise ClusterConfigError(
        f"{actors} {unit} × {cpus_per_actor:g} CPU need {need:g} CPUs "
        f"({len(bundles)} host bundle(s) {bundles}, {strategy}) but the Ray cluster has {have:g} CPUs on "
        f"{len(node_cpus)} node(s) {node_cpus}; the actors could never be placed. Possible fixes: {listed}"
    )


def _node_cpus() -> list[float]:
    import ray

    return [float(n.get("Resources", {}).get("CPU", 0.0)) for n in ray.nodes() if n.get("Alive")]


class RayBackend(ShardBackend):
    """Replica routing over Ray actor handles (``actors[s][r]``)."""

    def __init__(self, actors, *, placement_group=None, hedge_fraction: float = 0.5) -> None:
        super().__init__([len(a) for a in actors], hedge_fraction=hedge_fraction)
        self.actors = [list(a) for a in actors]
        self.placement_group = placement_group
        self.rejoin = None  # (shard, replica) -> bool: catch a replica up before it is healthy again (ray_live)

    @classmethod
    def launch(
        cls,
        manifest: ShardManifest,
        *,
        layout: ActorLayout | None = None,
        replicas: int = 1,
        cpus_per_actor: float = 1.0,
        threads_per_actor: int = 1,
        max_restarts: int = -1,
        strategy: str = "STRICT_SPREAD",
        ready_timeout_s: float = 300.0,
        hedge_fraction: float = 0.5,
        local_ray: bool = False,
        data_dir: str | None = None,
        snapshot_every: int = 1000,
        rank_dirs: list[str] | None = None,
        ranks: list[int] | None = None,
        gpus_per_rank: float = 0.0,
        max_group_restarts: int = 10,
    ) -> RayBackend:
        """Create the placement group and one actor per (shard, replica); wait until all are ready.

        ``layout`` defaults to ``default_layout`` over the alive Ray nodes.
        ``strategy`` applies across plan hosts: ``STRICT_SPREAD`` (one Ray
        node per host, fails when there are fewer nodes) or ``SPREAD``/``PACK``.
        Bundles the cluster's CPUs cannot hold fail at once (``check_capacity``);
        ``local_ray`` says the Ray instance is this process's own, so the
        error can suggest ``--num-cpus``. ``data_dir``: the shards take updates
        (``sterling.cluster.ray_live``), each replica keeping its snapshots and
        log in ``data_dir/shard-<s>/replica-<r>/`` on its node.

        ``rank_dirs`` (per shard, a ``write_rank_slices`` directory over its
        artifact, ``ranks[s]`` ranks): every replica of the shard is a process
        group on its host (``GroupShardServer``), reserving ``ranks[s]`` ×
        ``cpus_per_actor`` CPUs and ``ranks[s]`` × ``gpus_per_rank`` GPUs.
        """
        import ray
        from ray.util.placement_group import placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        n = manifest.num_shards
        if layout is None:
            nodes = [x for x in ray.nodes() if x.get("Alive")]
            layout = default_layout(n, replicas, max(1, len(nodes)))
        if len(layout.hosts) != n:
            raise InvalidInputError(f"layout has {len(layout.hosts)} shards, the manifest {n}")
        if rank_dirs is not None:
            if data_dir is not None:
                raise ClusterConfigError("process-group shards (rank_dirs) take no updates: drop data_dir")
            if ranks is None or len(ranks) != n or len(rank_dirs) != n:
                raise InvalidInputError(f"give rank_dirs and ranks for each of the {n} shards")
        else:
            ranks = None
        cpus = bundles_for(layout, cpus_per_actor, ranks)
        if not all(cpus):
            raise InvalidInputError(f"layout leaves hosts {[h for h, c in enumerate(cpus) if not c]} without actors")
        gpus = bundles_for(layout, gpus_per_rank, ranks) if gpus_per_rank > 0 else None
        if gpus is not None:
            have_gpus = float(ray.cluster_resources().get("GPU", 0.0))
            if sum(gpus) > have_gpus + 1e-9:
                raise ClusterConfigError(
                    f"the shard actors' ranks × {gpus_per_rank:g} GPU need {sum(gpus):g} GPUs (per host {gpus}) but "
                    f"the Ray cluster has {have_gpus:g}; run the ranks on CPU (--gpus-per-rank 0, gloo), "
                    "or add GPU nodes (`ray start --address … --num-gpus N`)"
                )
        bundles = [{"CPU": c} if gpus is None else {"CPU": c, "GPU": g} for c, g in zip(cpus, gpus or cpus)]
        strat = strategy if layout.num_hosts > 1 else "PACK"
        alive = len([x for x in ray.nodes() if x.get("Alive")])
        if not (strat == "STRICT_SPREAD" and layout.num_hosts > alive):
            check_capacity(cpus, _node_cpus(), strategy=strat, cpus_per_actor=cpus_per_actor, local=local_ray,
                           unit="shard actor(s)" if ranks is None else "rank(s)")
        if strat == "STRICT_SPREAD" and layout.num_hosts > alive:
            raise InvalidInputError(
                f"the layout spreads shards over {layout.num_hosts} hosts but this Ray cluster has {alive} alive "
                f"node(s): add nodes (`ray start --address …` on each host), or pass --spread soft"
            )
        pg = placement_group(bundles, strategy=strat, name="")
        try:
            ray.get(pg.ready(), timeout=ready_timeout_s)
        except Exception as e:
            from ray.util.placement_group import remove_placement_group

            remove_placement_group(pg)
            raise InvalidInputError(
                f"could not place {layout.num_hosts} hosts × {bundles} with {strat} on this Ray cluster "
                f"({alive} alive nodes) within {ready_timeout_s:.0f} s: "
                "add nodes (`ray start --address …`), lower the replicas"
                + (", or use --spread soft" if strat == "STRICT_SPREAD" else "")
            ) from e
        Actor = ray.remote(ShardActor)
        actors = []
        for s, hs in enumerate(layout.hosts):
            row = []
            for r, h in enumerate(hs):
                w = 1 if ranks is None else ranks[s]
                row.append(
                    Actor.options(
                        num_cpus=cpus_per_actor * w,
                        num_gpus=gpus_per_rank * w,
                        max_restarts=max_restarts,
                        max_task_retries=0,
                        max_concurrency=4,
                        name=None,
                        scheduling_strategy=PlacementGroupSchedulingStrategy(
                            placement_group=pg, placement_group_bundle_index=h
                        ),
                    ).remote(manifest.shards[s].path, s, r, threads_per_actor,
                             None if data_dir is None else str(data_dir), snapshot_every,
                             None if rank_dirs is None else str(rank_dirs[s]), ready_timeout_s, max_group_restarts)
                )
            actors.append(row)
        backend = cls(actors, placement_group=pg, hedge_fraction=hedge_fraction)
        backend.wait_ready(ready_timeout_s)
        return backend

    def wait_ready(self, timeout_s: float) -> None:
        """Block until every actor answers ``ready()`` (retrying while Ray restarts them), or raise."""
        import time

        import ray

        deadline = time.monotonic() + timeout_s
        todo = [(s, r) for s, row in enumerate(self.actors) for r in range(len(row))]
        while todo:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"shard actors {todo} (shard, replica) not ready after {timeout_s:.0f} s")
            refs = {self.actors[s][r].ready.remote(): (s, r) for s, r in todo}
            ready, _ = ray.wait(list(refs), num_returns=len(refs), timeout=min(left, 5.0))
            for ref in ready:
                try:
                    ray.get(ref, timeout=0)
                    todo.remove(refs[ref])
                except Exception:
                    pass  # restarting: ask again
            if todo:
                time.sleep(0.1)

    def _submit(self, shard: int, replica: int, req: ShardRequest):
        return self.actors[shard][replica].search.remote(req)

    def _wait(self, handles, timeout: float):
        import ray

        ready, _ = ray.wait(handles, num_returns=1, timeout=timeout)
        return ready

    def _result(self, handle) -> ShardReply:
        import ray
        from ray.exceptions import RayTaskError

        from sterling.cluster.errors import RankFailedError

        try:
            return ray.get(handle, timeout=0)
        except RayTaskError as e:
            if isinstance(e.cause, (InvalidInputError, RankFailedError)):  # typed: the router fails over on the latter
                raise e.cause from None
            raise

    def _probe(self, shard: int, replica: int, timeout: float) -> bool:
        import ray

        ok = bool(ray.get(self.actors[shard][replica].ready.remote(), timeout=timeout))
        return ok and (self.rejoin is None or bool(self.rejoin(shard, replica)))

    def shard_infos(self) -> list[dict]:
        import ray

        healthy = self.healthy()
        out = []
        for s, row in enumerate(self.actors):
            order = [r for r in range(len(row)) if healthy[s][r]] + [r for r in range(len(row)) if not healthy[s][r]]
            info = None
            for r in order:
                try:
                    info = ray.get(row[r].info.remote(), timeout=2.0)
                    break
                except Exception:
                    continue
            if info is None:
                info = {"shard": s, "lists": [0, 0], "items": 0, "version": -1}
            out.append({**info, "shard": s, "replicas": len(row), "healthy_replicas": sum(healthy[s])})
        return out

    def where(self) -> list[list[dict]]:
        """Node id and pid of every actor (for tests and `sterling launch` output)."""
        import ray

        return [ray.get([a.where.remote() for a in row], timeout=30) for row in self.actors]

    def close(self) -> None:
        import ray

        super().close()
        for row in self.actors:
            for a in row:
                try:
                    ray.kill(a, no_restart=True)
                except Exception:
                    pass
        if self.placement_group is not None:
            from ray.util.placement_group import remove_placement_group

            try:
                remove_placement_group(self.placement_group)
            except Exception:
                pass
