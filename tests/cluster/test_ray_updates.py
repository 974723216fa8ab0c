"""Updates through Ray: 2 shards × 2 replicas with data directories, real gRPC, one replica killed mid-stream.

A writer streams upserts (new items tagged ``batch:<i>``, and moves of
existing items to far-away vectors, so items change shard) and deletes
through the gRPC router while a reader thread queries: every acknowledged
batch is visible to a read with its ``min_version`` (exact filter on its tag),
and no acknowledged delete ever appears. One replica of shard 0 is killed
(Ray restarts it: it recovers its own snapshot + log, then is caught up from
its peer, whose log the snapshots keep truncating). After the stream every
replica of a shard holds the same batches (same per-shard sequence numbers)
and the same items, and the router's answers equal the single-process
``LiveModel`` fed the same acknowledged requests (the replay oracle).
"""

from __future__ import annotations

import threading
import time

import grpc
import numpy as np
import pytest
import torch

from sterling.benchmarks.evaluation import assert_same_topk
from sterling.cluster.client import Client
from sterling.cluster.ray_backend import RayBackend
from sterling.cluster.router import RouterConfig
from sterling.cluster.shard import ShardRequest
from sterling.model import RetrievalModel
from sterling.model.live import LiveModel
from tests.cluster.conftest import DIM, N_ITEMS, NLIST

ray = pytest.importorskip("ray")

NEW = 40  # new items per upsert request
MOVES = 20  # existing items moved per upsert request
DELETES = 15  # existing items deleted per delete request


def test_two_by_two_ray_cluster_keeps_every_acknowledged_write_through_a_replica_kill(
        ray_cluster, shards2, cluster_model, cluster_catalog, tmp_path, caplog):
    import logging

    caplog.set_level(logging.INFO, logger="sterling.cluster.ray_live")
    from sterling.cluster.ray_live import ray_live_router
    from sterling.cluster.server import RetrievalServer, ServerConfig

    backend = RayBackend.launch(shards2, replicas=2, ready_timeout_s=180, data_dir=str(tmp_path / "data"),
                                snapshot_every=4)
    srv = client = None
    try:
        router, updates = ray_live_router(shards2, backend, RouterConfig(max_k=100_000))
        srv = RetrievalServer(router, ServerConfig(port=0, workers=4), backend_name="ray", updates=updates).start()
        client = Client(srv.address, timeout_s=120)  # first calls may JIT-compile the scan (cold numba cache)
        client.wait_ready(60)
        oracle = LiveModel.open(RetrievalModel.load(cluster_model[1]))
        base = np.asarray(cluster_catalog.ids)
        emb = np.asarray(cluster_catalog.embeddings, dtype=np.float32)
        rng = np.random.default_rng(11)
        order = rng.permutation(N_ITEMS)
        delete_pool = list(base[order[: N_ITEMS // 3]])  # deleted, never upserted again
        move_pool = list(base[order[N_ITEMS // 3:]])
        client.retrieve(query=emb[:1], k=5)  # warm-up (no short client limit: numba may compile here)

        lock = threading.Lock()
        acked: list[tuple[int, int, set[int]]] = []  # (batch, version, ids) of acknowledged upserts
        deleted: set[int] = set()  # acknowledged deletes
        errors: list[str] = []
        checks = {"visible": 0, "delete_checks": 0}
        stop = threading.Event()

        def reader() -> None:
            r_rng = np.random.default_rng(3)
            while not stop.is_set():
                with lock:
                    last = acked[-1] if acked else None
                    gone = set(deleted)
                try:
                    if last is not None:
                        b, v, ids = last
                        res = client.retrieve(query=emb[:1], k=200, nprobe=NLIST, where=f"batch:{b}",
                                              min_version=v, deadline_ms=5000)
                        got = set(res.ids[0][res.ids[0] >= 0].tolist())
                        if got != ids or res.version < v:
                            errors.append(f"batch {b} at version {v}: got {len(got)} of {len(ids)} items, "
                                          f"version {res.version}")
                        checks["visible"] += 1
                    if gone:
                        probe = r_rng.choice(sorted(gone), size=min(8, len(gone)), replace=False)
                        rows = np.searchsorted(base, probe)
                        res = client.retrieve(query=emb[rows], k=20, nprobe=8, deadline_ms=5000)
                        back = set(res.ids.reshape(-1).tolist()) & gone
                        if back:
                            errors.append(f"deleted ids {sorted(back)[:5]} reappeared")
                        checks["delete_checks"] += 1
                except grpc.RpcError as e:
                    errors.append(f"read failed: {e.code().name} {e.details()}")

        t = threading.Thread(target=reader, daemon=True)
        t.start()
        pid0 = backend.where()[0][1]["pid"]
        killed_at = None
        t_end = time.monotonic() + 45
        i = 0
        while time.monotonic() < t_end:
            new_ids = np.arange(10_000_000 + NEW * i, 10_000_000 + NEW * (i + 1))
            moved = np.array([move_pool.pop() for _ in range(MOVES)])
            ids = np.concatenate([new_ids, moved])
            x = rng.standard_normal((len(ids), DIM)).astype(np.float32)
            x[NEW:] *= -3.0
            attrs = [[f"batch:{i}"]] * NEW + [[f"moved:{i}"]] * MOVES
            resp = client.upsert([(ids, x, attrs)])
            oracle.upsert(ids, x, attrs)
            with lock:
                acked.append((i, resp.model_version, set(new_ids.tolist())))
            gone = np.array([delete_pool.pop() for _ in range(DELETES)])
            d = client.delete(gone)
            assert d.deleted == DELETES
            oracle.delete(gone)
            with lock:
                deleted.update(gone.tolist())
            if i == 4:
                ray.kill(backend.actors[0][1], no_restart=False)
                killed_at = time.monotonic()
            i += 1
            if killed_at is not None and i >= 12:
                info = client.info()
                if all(r.in_sync for r in info.replica_logs) and all(backend.healthy()[s][r]
                                                                       for s in range(2) for r in range(2)):
                    if i >= 20:
                        break
        stop.set()
        t.join(timeout=30)
        assert not errors, errors[:5]
        assert checks["visible"] >= 5 and checks["delete_checks"] >= 5, checks
        assert i >= 20, f"the killed replica did not rejoin within the stream ({i} requests)"
        assert backend.where()[0][1]["pid"] != pid0  # restarted by Ray
        said = caplog.text
        assert "shard 0 replica 1 out of sync" in said and "shard 0 replica 1 caught up" in said, said[-2000:]
        print(f"{i} requests, {checks}, {said.count('copying')} state copies")

        # every replica of a shard applied the same batches (per-shard sequence numbers) and holds the same items
        info = client.info()
        logs = {(r.shard, r.replica): r for r in info.replica_logs}
        assert len(logs) == 4 and all(r.in_sync for r in logs.values())
        for s in range(2):
            assert logs[(s, 0)].seq == logs[(s, 1)].seq > 0 and logs[(s, 0)].version == logs[(s, 1)].version
        live_ids = set(np.asarray(oracle.index.item_ids)[np.asarray(oracle.index.item_ids) >= 0].tolist())
        xq1 = emb[:1]
        union = set()
        for s in range(2):
            held = []
            for r in range(2):
                rep = ray.get(backend.actors[s][r].search.remote(
                    ShardRequest(xq=xq1, k=N_ITEMS * 2, nprobe=NLIST)), timeout=60)
                held.append(set(rep.ids[0][rep.ids[0] >= 0].tolist()))
            assert held[0] == held[1], f"shard {s}: replicas differ in {len(held[0] ^ held[1])} items"
            union |= held[0]
        assert union == live_ids and not union & deleted
        assert all(set(ids) <= union for _, _, ids in acked)
        # the router's answers equal the replay oracle
        xq = np.concatenate([rng.standard_normal((8, DIM)).astype(np.float32), -3 * emb[:8]])
        for where in (None, "batch:3", "moved:2 OR lang:en"):
            got = client.retrieve(query=xq, k=100, nprobe=8, where=where, adaptive=False,
                                  min_version=info.model_version)
            ref = oracle(query=torch.from_numpy(xq), k=100, nprobe=8, where=where, adaptive=False)
            assert not got.partial
            assert_same_topk(got.ids, got.scores, ref.ids.numpy(), ref.scores.numpy(), atol=1e-5)
    finally:
        if client is not None:
            client.close()
        if srv is not None:
            srv.stop()  # closes the backend (actors killed, placement group removed)
        else:
            backend.close()
