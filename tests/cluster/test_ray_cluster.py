"""The Ray cluster: 2 nodes, 4 shard actors placed STRICT_SPREAD, router over real gRPC."""

from __future__ import annotations

import time

import grpc
import numpy as np
import pytest

from sterling.benchmarks.evaluation import assert_same_topk
from sterling.cluster.client import Client
from sterling.cluster.ray_backend import RayBackend
from sterling.cluster.router import Router
from sterling.model import RetrievalModel
from sterling.model.synthetic import synthetic_queries
from tests.cluster.conftest import serve_router

ray = pytest.importorskip("ray")

NPROBE = 8


@pytest.fixture(scope="module")
def four_shards(ray_cluster, shards4):
    backend = RayBackend.launch(shards4, replicas=1, ready_timeout_s=180)
    router = Router(RetrievalModel.load(shards4.head), backend)
    srv = serve_router(router)
    client = Client(srv.address, timeout_s=60)
    client.wait_ready(30)
    yield backend, client
    client.close()
    srv.stop()


def test_shards_are_spread_over_both_nodes(four_shards, ray_cluster):
    backend, client = four_shards
    nodes = {w["node_id"] for row in backend.where() for w in row}
    assert len(nodes) == 2
    info = client.info()
    assert [s.shard for s in info.shards] == [0, 1, 2, 3] and info.backend == "ray"
    assert sum(s.items for s in info.shards) == info.items == 30_000


@pytest.mark.parametrize("where", [None, "lang:en", "lang:en AND NOT policy:blocked", "country:US OR category:music"])
def test_grpc_results_equal_the_single_process_model(four_shards, cluster_model, cluster_catalog, where):
    _, client = four_shards
    model, _ = cluster_model
    for k, B in ((1, 32), (10, 32), (100, 16), (1000, 8), (10_000, 2)):
        xq = synthetic_queries(cluster_catalog, B, seed=k)
        res = client.retrieve(query=xq.numpy(), k=k, nprobe=NPROBE if k < 10_000 else 32, where=where)
        ref = model(query=xq, k=k, nprobe=NPROBE if k < 10_000 else 32, where=where, adaptive=False)
        assert not res.partial and res.version == int(model.index.version)
        assert_same_topk(res.ids, res.scores, ref.ids, ref.scores, exact=where is None)


def _health(client) -> str:
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    r = health_pb2_grpc.HealthStub(client.channel).Check(
        health_pb2.HealthCheckRequest(service="sterling.v1.Retrieval"), timeout=5
    )
    return health_pb2.HealthCheckResponse.ServingStatus.Name(r.status)


def test_killed_shard_gives_partial_answers_then_recovers(four_shards, cluster_model, cluster_catalog, shards4):
    backend, client = four_shards
    model, _ = cluster_model
    xq = synthetic_queries(cluster_catalog, 8, seed=99)
    ref = model(query=xq, k=50, nprobe=NPROBE, adaptive=False)
    dead = 1
    dead_ids = set(np.asarray(RetrievalModel.load(shards4.shards[dead].path).index.item_ids).tolist())
    pid0 = backend.where()[dead][0]["pid"]
    deadline_ms = 1500
    ray.kill(backend.actors[dead][0], no_restart=False)
    partial = complete_after = not_serving = 0
    t_end = time.monotonic() + 90
    while time.monotonic() < t_end:
        t0 = time.monotonic()
        res = client.retrieve(query=xq.numpy(), k=50, nprobe=NPROBE, deadline_ms=deadline_ms)
        assert time.monotonic() - t0 < deadline_ms / 1e3 + 1.0  # never hangs past the deadline
        if res.partial:
            partial += 1
            assert res.missing_shards == [dead]
            not_serving += _health(client) == "NOT_SERVING"
            for q in range(8):  # never wrong: the reference minus the dead shard's items is a prefix
                keep = [i for i in ref.ids[q].tolist() if i not in dead_ids]
                assert res.ids[q, : len(keep)].tolist() == keep
        else:
            assert_same_topk(res.ids, res.scores, ref.ids, ref.scores, exact=True)
            if partial:
                complete_after += 1
                if complete_after >= 3:
                    break
    assert partial >= 1, "killing the shard never showed in a response"
    assert complete_after >= 3, "the shard did not come back within 90 s"
    assert backend.where()[dead][0]["pid"] != pid0  # restarted by Ray, not by us
    assert not_serving >= 1, "the health service never said the service was incomplete"
    assert _health(client) == "SERVING"
    with pytest.raises(grpc.RpcError) as e:  # require_complete while down is UNAVAILABLE (checked quickly)
        ray.kill(backend.actors[dead][0], no_restart=False)
        for _ in range(20):
            client.retrieve(query=xq.numpy(), k=5, nprobe=NPROBE, deadline_ms=300, require_complete=True)
    assert e.value.code() == grpc.StatusCode.UNAVAILABLE
    backend.wait_ready(120)


def test_two_replicas_lose_no_response_when_one_is_killed(ray_cluster, shards2, cluster_model, cluster_catalog):
    model, _ = cluster_model
    backend = RayBackend.launch(shards2, replicas=2, ready_timeout_s=180)
    try:
        where = backend.where()
        for row in where:  # replicas on different nodes
            assert row[0]["node_id"] != row[1]["node_id"]
        router = Router(RetrievalModel.load(shards2.head), backend)
        srv = serve_router(router)
        client = Client(srv.address, timeout_s=30)
        xq = synthetic_queries(cluster_catalog, 8, seed=7)
        ref = model(query=xq, k=30, nprobe=NPROBE, adaptive=False)
        n = 0
        for i in range(60):
            if i == 5:
                ray.kill(backend.actors[0][0], no_restart=False)
            if i == 30:
                ray.kill(backend.actors[1][1], no_restart=False)
            res = client.retrieve(query=xq.numpy(), k=30, nprobe=NPROBE, deadline_ms=3000)
            assert not res.partial, f"response {i} lost shards {res.missing_shards}"
            assert_same_topk(res.ids, res.scores, ref.ids, ref.scores, exact=True)
            n += 1
        assert n == 60
        client.close()
        srv.stop()
    finally:
        backend.close()


def test_strict_spread_over_more_hosts_than_nodes_is_refused_at_once(ray_cluster, shards4):
    from sterling.cluster.ray_backend import default_layout
    from sterling.model.errors import InvalidInputError

    t0 = time.monotonic()
    with pytest.raises(InvalidInputError):
        RayBackend.launch(shards4, layout=default_layout(4, 1, 3), ready_timeout_s=60)
    assert time.monotonic() - t0 < 10
