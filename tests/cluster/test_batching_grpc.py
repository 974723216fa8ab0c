"""Router dynamic batching over real gRPC: 16 concurrent single-query clients, each with its own filter,
get exactly the single-process model's answer for their own query."""

from __future__ import annotations

import threading

import numpy as np
import torch

from sterling.benchmarks.evaluation import assert_same_topk
from sterling.cluster.batching import BatchingConfig
from sterling.cluster.client import Client
from sterling.cluster.embedded import local_router
from sterling.cluster.router import RouterConfig
from sterling.cluster.server import RetrievalServer, ServerConfig
from sterling.model.synthetic import synthetic_queries

FILTERS = [None, "lang:en", "lang:en AND NOT policy:blocked", "lang:fr OR lang:de"]


def test_sixteen_concurrent_clients_through_the_batching_router_get_their_own_answers(cluster_model,
                                                                                       cluster_catalog):
    model, _ = cluster_model
    router = local_router(model, num_shards=2, config=RouterConfig(max_k=100))
    srv = RetrievalServer(router, ServerConfig(port=0, workers=16,
                                               batching=BatchingConfig(max_wait_ms=5, max_queries=16))).start()
    xq = synthetic_queries(cluster_catalog, 64, seed=31).numpy()
    errors, got = [], {}
    try:
        barrier = threading.Barrier(16)

        def client(t):
            with Client(srv.address, timeout_s=120) as c:
                c.wait_ready(30)
                barrier.wait()
                for i in range(t, 64, 16):
                    try:
                        got[i] = c.retrieve(query=xq[i], k=20, nprobe=8, where=FILTERS[i % 4], adaptive=False)
                    except Exception as e:  # noqa: BLE001 - any failure fails the test
                        errors.append(repr(e))

        threads = [threading.Thread(target=client, args=(t,)) for t in range(16)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(180)
    finally:
        srv.stop()
    assert errors == [] and len(got) == 64
    for i, res in got.items():
        ref = model(query=torch.from_numpy(xq[i : i + 1]), k=20, nprobe=8, where=FILTERS[i % 4], adaptive=False)
        assert_same_topk(res.ids, res.scores, ref.ids.numpy(), ref.scores.numpy(), atol=1e-5)
    shared = [r.timing for r in got.values()]
    assert all(np.isfinite(t["total_ms"]) for t in shared)
