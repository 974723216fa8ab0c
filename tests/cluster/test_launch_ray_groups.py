"""`sterling launch ray` with a process group per host: Ray shards across hosts, gloo ranks inside each.

Real Ray (the 2-node test cluster), real gloo groups (ranks are
``sterling.launch.worker`` processes the shard actors start), real gRPC.
The oracle is the single-process model on the same artifact.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import time
from pathlib import Path

import grpc
import numpy as np
import pytest

from sterling.cluster.client import Client
from sterling.model.synthetic import synthetic_queries
from tests.cluster.test_grpc_service import _read_address, _sterling
from tests.distributed.conftest import dist_catalog, learned_path  # noqa: F401 (fixtures)

ray = pytest.importorskip("ray")
pytestmark = pytest.mark.timeout(400)


def _hosts_x_gpus_plan(nlist: int, *, replicas: int = 1):
    """2 hosts × 2 devices: 4 plan shards (deliberately unequal list ranges), shards 0-1 on host 0, 2-3 on host 1."""
    from sterling.planner import IndexModelConfig, PlanTargets, make_topology, plan
    from sterling.planner.types import DeviceAssignment, ShardSpec

    p = plan(IndexModelConfig(items=30_000, dim=32, nlist=nlist), make_topology("cpu", hosts=2, gpus_per_host=2),
             PlanTargets())
    cuts = [0, nlist // 6, nlist // 2, nlist // 2 + nlist // 8, nlist]
    shards = tuple(ShardSpec(shard=i, list_start=cuts[i], list_end=cuts[i + 1],
                             fraction=(cuts[i + 1] - cuts[i]) / nlist, items=0) for i in range(4))
    assign = tuple(DeviceAssignment(shard=s, replica=r, host=s // 2 + 2 * r, gpu=s % 2)
                   for r in range(replicas) for s in range(4))
    return dataclasses.replace(
        p, num_shards=4, replicas=replicas, hosts_used=2 * replicas, shards=shards, assignments=assign,
        devices=tuple(dataclasses.replace(p.devices[0], shard=s) for s in range(4)),
    )


def _group_ranks(under: Path) -> dict[int, dict[int, int]]:
    """Rank-0 (shard actor) pid → {RANK: pid} of the group ranks serving rank slices under ``under``."""
    out: dict[int, dict[int, int]] = {}
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            cmd = (d / "cmdline").read_bytes().decode().split("\0")
            if "sterling.launch.worker" not in cmd or not any(str(under) in x for x in cmd):
                continue
            env = dict(kv.split("=", 1) for kv in (d / "environ").read_bytes().decode().split("\0") if "=" in kv)
        except (OSError, ValueError, UnicodeDecodeError):
            continue
        if "STERLING_PARENT_PID" in env and "zombie" not in _state(int(d.name)):
            parent = int(env["STERLING_PARENT_PID"])
            out.setdefault(parent, {0: parent})[int(env["RANK"])] = int(d.name)
    return out


def _state(pid: int) -> str:
    try:
        return (Path(f"/proc/{pid}/status").read_text().split("State:")[1].split("\n")[0]).lower()
    except (OSError, IndexError):
        return "zombie"


def _wait_groups(under: Path, n: int, old=(), timeout_s: float = 120.0) -> dict:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        got = _group_ranks(under)
        if len(got) == n and not {p for g in got.values() for p in g.values()} & set(old):
            return got
        time.sleep(0.2)
    raise AssertionError(f"{n} groups did not appear within {timeout_s} s (have {_group_ranks(under)})")


def _exact(c, model, xq, *, ks, wheres, nprobe=8):
    for where in wheres:
        for k in ks:
            res = c.retrieve(query=xq.numpy(), k=k, nprobe=nprobe, where=where, require_complete=True)
            ref = model(query=xq, k=k, nprobe=nprobe, where=where, adaptive=False)
            assert (res.ids == ref.ids.numpy()).all() and (res.scores == ref.scores.numpy()).all(), (k, where)


def test_plan_hosts_x_gpus_become_ray_shards_of_rank_groups_exact_and_a_killed_rank_restarts(
        ray_cluster, cluster_model, cluster_catalog, tmp_path):
    model, path = cluster_model
    nlist = model.index.nlist
    plan = _hosts_x_gpus_plan(nlist)
    (tmp_path / "plan.json").write_text(plan.to_json())
    proc = _sterling("launch", "ray", "--plan", str(tmp_path / "plan.json"), "--model", str(path),
                     "--shards-dir", str(tmp_path / "shards"), "--address", ray_cluster.address, "--port", "0")
    try:
        address = _read_address(proc, timeout_s=300)
        out = "".join(proc.lines_read)
        assert "replica 0 on node 0 (2 ranks each)" in out and "replica 0 on node 1 (2 ranks each)" in out, out
        xq = synthetic_queries(cluster_catalog, 12, seed=33)
        per_query = [["lang:en", None, "NOT lang:en"][i % 3] for i in range(12)]
        with Client(address, timeout_s=120) as c:
            info = c.info()
            # one Ray-level shard per plan host: the union of its two GPUs' list ranges
            assert [(s.list_start, s.list_end) for s in info.shards] == [(0, nlist // 2), (nlist // 2, nlist)]
            assert info.items == model.index.num_items
            _exact(c, model, xq, ks=(1, 100, 3000), wheres=(None, "lang:en AND NOT policy:blocked", per_query))

            ranks = _wait_groups(tmp_path, 2)
            assert all(sorted(r) == [0, 1] for r in ranks.values())
            victim = next(iter(ranks.values()))[1]
            os.kill(victim, signal.SIGKILL)
            with pytest.raises(grpc.RpcError) as err:  # the group's rank 0 names the dead rank; nothing hangs
                deadline = time.monotonic() + 30
                while time.monotonic() < deadline:
                    c.retrieve(query=xq.numpy(), k=10, nprobe=8, require_complete=True)
                    time.sleep(0.05)
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE
            assert "RankFailedError" in err.value.details() and "rank 1 of its 2-rank group died" in err.value.details()

            deadline = time.monotonic() + 120  # the group restarts its ranks; the replica serves exactly again
            while True:
                try:
                    _exact(c, model, xq, ks=(100,), wheres=(None, "lang:en"))
                    break
                except grpc.RpcError:
                    assert time.monotonic() < deadline, "the group did not come back"
                    time.sleep(0.5)
            after = _wait_groups(tmp_path, 2, old={victim})
            assert victim not in {p for r in after.values() for p in r.values()}
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
        deadline = time.monotonic() + 30  # no orphan ranks once the actors are gone
        while time.monotonic() < deadline and _group_ranks(tmp_path):
            time.sleep(0.2)
        assert not _group_ranks(tmp_path)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
    _ = np



def test_a_learned_model_over_ray_shards_of_rank_groups_reranks_like_in_process(ray_cluster, learned_path,  # noqa: F811
                                                                                 tmp_path):
    """2 Ray shards × 2 ranks each hold the learned model's item index; the router's LearnedHead reranks the
    K0 merged over shards of merged ranks with the towers, OverArch and heads: bit for bit in-process."""
    from tests.cluster.learned_launch import assert_serves_learned_like_in_process

    proc = _sterling("launch", "ray", "--model", str(learned_path), "--shards", "2", "--ranks-per-host", "2",
                     "--shards-dir", str(tmp_path / "shards"), "--address", ray_cluster.address, "--port", "0")
    assert_serves_learned_like_in_process(proc, learned_path, timeout_s=300)


def test_a_dead_rank_fails_the_replica_with_a_typed_error_until_its_group_is_back(ray_cluster, cluster_model,
                                                                                  shards2, tmp_path):
    """The shard actor itself: ``ready()`` and ``search`` raise ``RankFailedError`` naming shard, replica and
    rank once a rank is gone, and stay failed when no group restarts are left."""
    from ray.exceptions import RayTaskError

    from sterling.cluster.errors import RankFailedError
    from sterling.cluster.ray_backend import ShardActor
    from sterling.cluster.shard import ShardRequest
    from sterling.launch.launch_cmd import ensure_group_slices

    model, _ = cluster_model
    dirs, ranks = ensure_group_slices(shards2, 2)
    assert ranks == [2, 2]
    from sterling.cluster.errors import ClusterConfigError
    from sterling.cluster.ray_backend import RayBackend

    with pytest.raises(ClusterConfigError, match=r"need 4 GPUs .*--gpus-per-rank 0"):  # this cluster has none
        RayBackend.launch(shards2, rank_dirs=dirs, ranks=ranks, gpus_per_rank=1.0, strategy="PACK")
    actor = ray.remote(ShardActor).options(num_cpus=2, max_restarts=0).remote(
        shards2.shards[1].path, 1, 0, 1, None, 1000, dirs[1], 120.0, 0)
    try:
        assert ray.get(actor.ready.remote(), timeout=240) is True
        pids = ray.get(actor.ranks.remote(), timeout=30)
        xq = np.random.default_rng(2).standard_normal((3, 32)).astype(np.float32)
        req = ShardRequest(xq=xq, k=50, nprobe=16)
        rep = ray.get(actor.search.remote(req), timeout=60)
        one = ShardActor(shards2.shards[1].path, 1, 0, 1).search(req)  # the same shard in one process
        assert (rep.ids == one.ids).all() and (rep.scores == one.scores).all()
        os.kill(pids[1], signal.SIGKILL)
        deadline = time.monotonic() + 30
        while True:
            try:
                ray.get(actor.search.remote(req), timeout=30)
            except RayTaskError as e:
                err = e.cause
                break
            assert time.monotonic() < deadline, "search kept answering with a dead rank"
        assert isinstance(err, RankFailedError) and (err.shard, err.replica, err.rank) == (1, 0, 1)
        assert "no group restarts left" in str(err)
        with pytest.raises(RayTaskError) as e2:
            ray.get(actor.ready.remote(), timeout=30)
        assert isinstance(e2.value.cause, RankFailedError)
    finally:
        ray.kill(actor, no_restart=True)
    _ = model


def test_bad_group_flags_are_refused_before_ray_starts(cluster_model, tmp_path):
    import argparse

    from sterling.cluster.errors import ClusterConfigError
    from sterling.launch.launch_cmd import group_shape, register
    from sterling.model.errors import InvalidInputError

    model, path = cluster_model
    p = argparse.ArgumentParser()
    register(p.add_subparsers(dest="cmd"))

    def parse(*extra):
        return p.parse_args(["launch", "ray", "--model", str(path), *extra])

    from sterling.launch.launch_cmd import check_launch_args

    with pytest.raises(ClusterConfigError, match="--ranks-per-host"):
        check_launch_args(parse("--ranks-per-host", "0"))
    with pytest.raises(ClusterConfigError, match="--gpus-per-rank"):
        check_launch_args(parse("--gpus-per-rank", "-1"))
    with pytest.raises(ClusterConfigError, match="--data-dir.*--ranks-per-host 2"):
        check_launch_args(parse("--ranks-per-host", "2", "--data-dir", str(tmp_path / "d")))
    plan = _hosts_x_gpus_plan(model.index.nlist)
    with pytest.raises(ClusterConfigError, match="--ranks-per-host 3 disagrees with the plan"):
        group_shape(parse("--ranks-per-host", "3"), plan, path)
    # updates keep the one-actor-per-GPU path a plan launched before groups; asking for ranks too is refused
    assert group_shape(parse("--data-dir", str(tmp_path / "d"), "--plan", "p.json"), plan, path) is None
    with pytest.raises(ClusterConfigError, match="--data-dir.*--ranks-per-host 2"):
        check_launch_args(parse("--data-dir", str(tmp_path / "d"), "--plan", "p.json", "--ranks-per-host", "2"))
    assert group_shape(parse("--ranks-per-host", "1"), plan, path) is None  # one actor per GPU, as before
    groups, layout = group_shape(parse(), plan, path)
    assert groups == [(0, 1), (2, 3)] and layout.hosts == ((0,), (1,))
    two = _hosts_x_gpus_plan(model.index.nlist, replicas=2)
    groups, layout = group_shape(parse(), two, path)
    assert groups == [(0, 1), (2, 3)] and layout.hosts == ((0, 2), (1, 3)) and layout.num_hosts == 4
    # replicas whose host groups differ cannot be one Ray-level shard
    mixed = dataclasses.replace(two, assignments=tuple(
        dataclasses.replace(a, host=({0: 0, 1: 1, 2: 1, 3: 1}[a.shard] if a.replica == 1 else a.host) + 2 * a.replica)
        for a in two.assignments))
    with pytest.raises(InvalidInputError, match="replica 1"):
        group_shape(parse(), mixed, path)
    # more ranks than a shard has lists
    from sterling.launch.launch_cmd import ensure_group_slices, ensure_shards

    m = ensure_shards(path, tmp_path / "s", num_shards=model.index.nlist // 2, plan=None, plan_path=None)
    with pytest.raises(InvalidInputError, match="--ranks-per-host"):
        ensure_group_slices(m, 3)


def test_launch_ray_refuses_data_dir_with_ranks_before_starting_ray(cluster_model, tmp_path):
    proc = _sterling("launch", "ray", "--model", str(cluster_model[1]), "--ranks-per-host", "2", "--data-dir",
                     str(tmp_path / "d"), "--port", "0")
    rc = proc.wait(timeout=120)
    err = proc.stderr.read()
    assert rc != 0 and "--data-dir" in err and "--ranks-per-host" in err and "Ray" not in err[:0], err[-2000:]
    assert "Started a local Ray instance" not in err


def test_the_router_fails_over_to_the_other_replica_when_a_rank_of_one_dies(ray_cluster, cluster_model,
                                                                             cluster_catalog, tmp_path):
    """1 shard × 2 replicas, each a 2-rank group: killing a rank of one replica costs no request (the router asks
    the other replica, answers stay exact and complete); the replica is healthy again once its group is back."""
    from sterling.cluster.ray_backend import RayBackend
    from sterling.cluster.router import Router
    from sterling.launch.launch_cmd import ensure_group_slices
    from sterling.model.retrieval import RetrievalModel
    from sterling.sharding.documents import write_shards

    model, path = cluster_model
    manifest = write_shards(path, tmp_path / "one", num_shards=1)
    dirs, ranks = ensure_group_slices(manifest, 2)
    backend = RayBackend.launch(manifest, replicas=2, rank_dirs=dirs, ranks=ranks, strategy="STRICT_SPREAD",
                                ready_timeout_s=240)
    try:
        router = Router(RetrievalModel.load(manifest.head), backend)
        xq = synthetic_queries(cluster_catalog, 8, seed=35)
        ref = model(query=xq, k=200, nprobe=8, where="lang:en", adaptive=False)
        pids = [ray.get(row.ranks.remote(), timeout=30) for row in backend.actors[0]]
        os.kill(pids[0][1], signal.SIGKILL)
        t_end = time.monotonic() + 6.0  # several requests while replica 0's group is down and restarting
        seen_down = False
        while time.monotonic() < t_end:
            seen_down |= not backend.healthy()[0][0]
            res = router.retrieve(query=xq, k=200, nprobe=8, where="lang:en", require_complete=True, deadline_s=30)
            assert not res.partial
            assert (res.ids == ref.ids.numpy()).all() and (res.scores == ref.scores.numpy()).all()
        assert seen_down and backend.healthy()[0][1]  # replica 0 was taken out, replica 1 never
        deadline = time.monotonic() + 120
        while not all(backend.healthy()[0]):  # the prober sees replica 0's restarted group ready again
            assert time.monotonic() < deadline, "replica 0 never came back"
            router.retrieve(query=xq, k=200, nprobe=8, where="lang:en", deadline_s=30)
            time.sleep(0.3)
        assert ray.get(backend.actors[0][0].ranks.remote(), timeout=30)[1] != pids[0][1]
    finally:
        backend.close()
