"""`sterling launch ray --plan plan.json --address …` on the 2-node test cluster, in a subprocess."""

from __future__ import annotations

import dataclasses
import signal
import time

import numpy as np
import pytest

from sterling.benchmarks.evaluation import assert_same_topk
from sterling.cluster.client import Client
from sterling.model.synthetic import synthetic_queries
from tests.cluster.test_grpc_service import _read_address, _sterling
from tests.distributed.conftest import dist_catalog, learned_path  # noqa: F401 (fixtures)

ray = pytest.importorskip("ray")


def _two_host_plan(nlist: int):
    from sterling.planner import IndexModelConfig, PlanTargets, make_topology, plan
    from sterling.planner.types import DeviceAssignment, ShardSpec

    p = plan(IndexModelConfig(items=30_000, dim=32, nlist=nlist), make_topology("cpu", hosts=2, gpus_per_host=1),
             PlanTargets())
    cut = nlist // 3  # deliberately not the byte-balanced cut
    return dataclasses.replace(
        p, num_shards=2, replicas=1, hosts_used=2,
        shards=(ShardSpec(shard=0, list_start=0, list_end=cut, fraction=cut / nlist, items=0),
                ShardSpec(shard=1, list_start=cut, list_end=nlist, fraction=1 - cut / nlist, items=0)),
        assignments=(DeviceAssignment(shard=0, replica=0, host=0, gpu=0),
                     DeviceAssignment(shard=1, replica=0, host=1, gpu=0)),
        devices=(p.devices[0], dataclasses.replace(p.devices[0], shard=1)),
    )


def test_launch_ray_follows_the_plan_and_stops_cleanly(ray_cluster, cluster_model, cluster_catalog, tmp_path):
    model, path = cluster_model
    plan = _two_host_plan(model.index.nlist)
    (tmp_path / "plan.json").write_text(plan.to_json())
    proc = _sterling("launch", "ray", "--plan", str(tmp_path / "plan.json"), "--model", str(path),
                     "--shards-dir", str(tmp_path / "shards"), "--address", ray_cluster.address, "--port", "0")
    try:
        address = _read_address(proc, timeout_s=240)
        with Client(address, timeout_s=60) as c:
            info = c.info()
            cut = model.index.nlist // 3
            assert [(s.list_start, s.list_end) for s in info.shards] == [(0, cut), (cut, model.index.nlist)]
            xq = synthetic_queries(cluster_catalog, 16, seed=31)
            for where in (None, "lang:en AND NOT policy:blocked"):
                res = c.retrieve(query=xq.numpy(), k=100, nprobe=8, where=where)
                ref = model(query=xq, k=100, nprobe=8, where=where, adaptive=False)
                assert_same_topk(res.ids, res.scores, ref.ids, ref.scores, exact=where is None)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
        out = "".join(proc.lines_read)
        assert "shard 0" in out and "replica 0 on node 0" in out and "replica 0 on node 1" in out  # STRICT_SPREAD
        deadline = time.monotonic() + 30  # actors and the placement group are gone: all CPUs free again
        while time.monotonic() < deadline and ray.available_resources().get("CPU", 0) < 8:
            time.sleep(0.2)
        assert ray.available_resources().get("CPU", 0) == 8
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
    _ = np


def test_launch_ray_data_dir_killed_and_relaunched_recovers_every_replica(ray_cluster, cluster_model, tmp_path):
    """`launch ray --data-dir`: acknowledged upserts/deletes survive a SIGKILL of the whole service (router
    and, with it, its actors); the relaunch recovers each replica's snapshot + log before it serves."""
    model, path = cluster_model
    args = ("launch", "ray", "--model", str(path), "--shards", "2", "--replicas", "2", "--shards-dir",
            str(tmp_path / "shards"), "--address", ray_cluster.address, "--port", "0", "--data-dir",
            str(tmp_path / "data"), "--snapshot-every", "3", "--max-k", "40000")
    rng = np.random.default_rng(4)
    x = rng.standard_normal((4, 25, 32)).astype(np.float32)
    proc = _sterling(*args)
    try:
        with Client(_read_address(proc, timeout_s=240), timeout_s=120) as c:
            for b in range(4):
                version = c.upsert([(np.arange(25) + 50_000 + 25 * b, x[b], [[f"new:{b}"]] * 25)]).model_version
            base = [1_000_000_000 + i for i in (0, 1, 2)]  # catalog items (synthetic ids start at 10^9)
            d = c.delete(list(range(50_000, 50_010)) + base)
            assert d.deleted == 13
            version = d.model_version
            assert c.info().updatable
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        proc = _sterling(*args)
        with Client(_read_address(proc, timeout_s=240), timeout_s=120) as c:
            info = c.info()
            assert info.model_version == version and info.items == 30_000 + 100 - 13
            logs = sorted((r.shard, r.replica, r.seq, r.in_sync) for r in info.replica_logs)
            assert [r[:2] for r in logs] == [(0, 0), (0, 1), (1, 0), (1, 1)] and all(r[3] for r in logs)
            assert logs[0][2] == logs[1][2] == logs[2][2] == logs[3][2] == 9  # 4 × (upsert + delete) + 1
            got = c.retrieve(query=x[0, :1], k=200, nprobe=model.index.nlist, where="new:0 OR new:3",
                             min_version=version)
            assert set(got.ids[0][got.ids[0] >= 0].tolist()) == set(range(50_010, 50_025)) | set(range(50_075, 50_100))
            every = set(c.retrieve(query=x[0, :1], k=40_000, nprobe=model.index.nlist).ids.reshape(-1).tolist())
            assert len(every - {-1}) == 30_087 and not every & ({1_000_000_000, 1_000_000_001, 1_000_000_002}
                                                                 | set(range(50_000, 50_010)))
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)


def test_launch_ray_serves_a_learned_model_like_in_process(ray_cluster, learned_path, tmp_path):  # noqa: F811
    """Ray shards hold the learned model's item index; the router's LearnedHead reranks the merged K0
    with the towers, OverArch and heads: the in-process model's ids and values, bit for bit."""
    from tests.cluster.learned_launch import assert_serves_learned_like_in_process

    proc = _sterling("launch", "ray", "--model", str(learned_path), "--shards", "2",
                     "--shards-dir", str(tmp_path / "shards"), "--address", ray_cluster.address, "--port", "0")
    assert_serves_learned_like_in_process(proc, learned_path, timeout_s=240)
