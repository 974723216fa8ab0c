"""A learned model's feature upserts through Ray: 2 shards × 2 replicas, real gRPC, shard actors killed.

The router keeps the ``LearnedHead`` (towers, OverArch, the item cache in
``DIR/head``); the shard actors hold the item index, each replica with its own
snapshots + log. A stream of feature upserts (new items, changed features of
catalog items, so items move lists and shards) and deletes goes through gRPC;
after every acknowledged batch the served answers (ids, values, task scores,
with and without a filter) equal the single-process ``LiveModel`` that applied
the same batches (the oracle), and no acknowledged delete is served. Mid-stream
one replica of shard 0 is killed (it rejoins from its peer); later both
replicas of shard 1 are killed at once, so the answers after their restart
come from what each recovered from its own snapshot + log before ``ready()``.
"""

from __future__ import annotations

import random
import time

import grpc
import numpy as np
import pytest

from sterling.cluster.client import Client
from sterling.cluster.ray_backend import RayBackend
from sterling.cluster.router import RouterConfig
from tests.cluster.test_grpc_learned_updates import _same
from tests.unit.test_live_learned import _stream, _table

ray = pytest.importorskip("ray")


def _wait_in_sync(client, backend, timeout_s: float = 90.0) -> None:
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        try:
            logs = client.info().replica_logs
        except Exception:
            logs = []
        if logs and all(r.in_sync for r in logs) and all(all(row) for row in backend.healthy()):
            return
        time.sleep(0.3)
    raise AssertionError(f"replicas not back in sync within {timeout_s} s: {backend.healthy()}")


def _wait_restarted(actors, old_pids, timeout_s: float = 90.0) -> None:
    """Every actor answers again from a new process (Ray restarted it after ``ray.kill``)."""
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        try:
            pids = [ray.get(a.where.remote(), timeout=10)["pid"] for a in actors]
        except Exception:  # restarting: ActorUnavailableError, timeouts
            pids = list(old_pids)
        if not set(pids) & set(old_pids):
            return
        time.sleep(0.3)
    raise AssertionError(f"actors not restarted within {timeout_s} s")


def test_learned_feature_upserts_on_ray_match_one_process_through_shard_actor_restarts(
        ray_cluster, learned_path, items, tmp_path, caplog):
    import logging

    caplog.set_level(logging.INFO, logger="sterling.cluster.ray_live")
    from sterling.cluster.ray_live import ray_live_router
    from sterling.cluster.server import RetrievalServer, ServerConfig
    from sterling.model.learned import LearnedRetrievalModel
    from sterling.model.live import LiveModel
    from sterling.sharding.documents import write_shards

    manifest = write_shards(learned_path, tmp_path / "shards", num_shards=2)
    data = tmp_path / "data"
    backend = RayBackend.launch(manifest, replicas=2, ready_timeout_s=180, data_dir=str(data), snapshot_every=3)
    srv = client = None
    try:
        router, updates = ray_live_router(manifest, backend, RouterConfig(max_k=1000),
                                          learned=LearnedRetrievalModel.load(learned_path).eval(),
                                          head_dir=data / "head", snapshot_every=3)
        srv = RetrievalServer(router, ServerConfig(port=0, workers=4), backend_name="ray", updates=updates).start()
        client = Client(srv.address, timeout_s=120)
        client.wait_ready(60)
        oracle = LiveModel.open(learned_path)
        users = [int(u) for u in oracle.model.users.ids[:6]]
        _same(client, oracle, users, 0)
        ops, catalog = _stream(items, random.Random(7), 14)
        deleted: set[int] = set()
        pid1 = [w["pid"] for w in backend.where()[1]]
        version = 0
        for n, (op, ids, src) in enumerate(ops):
            if op == "delete":
                r = client.delete(ids)
                oracle.delete(ids)
                deleted |= set(ids)
            else:
                t = _table(items, ids, src)
                r = client.upsert([(t.ids, t, t.attributes)])
                assert r.upserted == len(ids)
                oracle.upsert(ids, item_features=t, attributes=t.attributes)
                deleted -= set(ids)
            assert r.model_version >= version
            version = r.model_version
            for where in (None, "lang:en"):
                got = _same(client, oracle, users, version, where)
                assert not set(got.ids.reshape(-1).tolist()) & deleted
            if n == 3:  # mid-stream: the next batches go on without it; it is caught up from its peer
                ray.kill(backend.actors[0][1], no_restart=False)
            if n == 8:  # both replicas of shard 1 at once: each recovers from its own snapshot + log
                _wait_in_sync(client, backend)
                for a in backend.actors[1]:
                    ray.kill(a, no_restart=False)
                _wait_restarted(backend.actors[1], pid1)
                _wait_in_sync(client, backend)
                _same(client, oracle, users, version)
        _wait_in_sync(client, backend)
        said = caplog.text
        assert "shard 0 replica 1 out of sync" in said and "shard 0 replica 1 caught up" in said, said[-2000:]
        info = client.info()
        logs = {(r.shard, r.replica): r for r in info.replica_logs}
        assert len(logs) == 4
        for s in range(2):
            assert logs[(s, 0)].seq == logs[(s, 1)].seq > 0 and logs[(s, 0)].version == logs[(s, 1)].version
        assert info.items == len(catalog)
        gone = {i for op, ids, _ in ops if op == "delete" for i in ids} - set(catalog)
        assert gone
        everything = client.retrieve(user_ids=users, k=50, k0=len(items) + 100, adaptive=False)
        assert not set(everything.ids.reshape(-1).tolist()) & gone
        for where in (None, "lang:en", "NOT lang:en"):
            _same(client, oracle, users, version, where)
        with pytest.raises(grpc.RpcError) as e:  # a learned model takes item features, not vectors
            client.upsert([([77_000], np.zeros((1, oracle.model.index.dim), np.float32), None)])
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "item_features" in e.value.details()
        assert client.info().model_version == info.model_version  # nothing was applied
    finally:
        if client is not None:
            client.close()
        if srv is not None:
            srv.stop()
        else:
            backend.close()


def test_launch_ray_data_dir_serves_a_learned_model_and_recovers_router_cache_and_shards_after_sigkill(
        ray_cluster, learned_path, items, tmp_path):
    """`sterling launch ray --data-dir` with a `sterling train` artifact: feature upserts and deletes over gRPC
    answer like the single-process model; after a SIGKILL of the service the relaunch recovers the router's
    cache (DIR/head) and every shard replica (DIR/shard-<s>/replica-<r>) and answers the same."""
    import signal

    from sterling.model.live import LiveModel
    from tests.cluster.test_grpc_service import _read_address, _sterling

    args = ("launch", "ray", "--model", str(learned_path), "--shards", "2", "--shards-dir", str(tmp_path / "shards"),
            "--address", ray_cluster.address, "--port", "0", "--data-dir", str(tmp_path / "d"),
            "--snapshot-every", "2", "--max-k", "1000")
    oracle = LiveModel.open(learned_path)
    users = [int(u) for u in oracle.model.users.ids[:6]]
    new = np.arange(70_000, 70_030)
    proc = _sterling(*args)
    try:
        with Client(_read_address(proc, timeout_s=240), timeout_s=120) as c:
            for b in range(3):
                ids = new[10 * b: 10 * b + 10]
                t = _table(items, ids, np.arange(10) * 7 + b)
                version = c.upsert([(ids, t, t.attributes)]).model_version
                oracle.upsert(ids, item_features=t, attributes=t.attributes)
            gone = [int(new[0]), int(items.ids[1])]
            version = c.delete(gone).model_version
            oracle.delete(gone)
            before = _same(c, oracle, users, version)
        assert (tmp_path / "d" / "head").is_dir() and any((tmp_path / "d" / "head").glob("wal-*.log"))
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        proc = _sterling(*args)
        with Client(_read_address(proc, timeout_s=240), timeout_s=120) as c:
            assert c.info().model_version == version
            after = _same(c, oracle, users, version)
            for where in (None, "lang:en"):
                _same(c, oracle, users, version, where)
            every = c.retrieve(user_ids=users, k=50, k0=len(items) + 40, adaptive=False)
            assert not set(every.ids.reshape(-1).tolist()) & set(gone)
        assert (after.ids == before.ids).all() and (after.scores == before.scores).all()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
