"""Real Ray (a 2-node ``ray.cluster_utils.Cluster`` on this machine) and real gRPC on loopback.

Session-scoped: one catalog, one model artifact, shard artifacts for 4 and
2 shards, one Ray cluster. Every wait in these tests has a deadline.
"""

from __future__ import annotations

import os

import pytest

N_ITEMS, DIM, NLIST = 30_000, 32, 64


@pytest.fixture(scope="session")
def cluster_catalog():
    from sterling.model.synthetic import synthetic_catalog

    return synthetic_catalog(N_ITEMS, DIM, seed=21)


@pytest.fixture(scope="session")
def cluster_model(cluster_catalog, tmp_path_factory):
    """(model, path to model.st) — the single-process oracle and its artifact."""
    from sterling.model import IndexConfig, RetrievalModel, build_index

    c = cluster_catalog
    index = build_index(c.embeddings, ids=c.ids, attributes=c.attributes, config=IndexConfig(nlist=NLIST))
    model = RetrievalModel(index)
    path = tmp_path_factory.mktemp("model") / "model.st"
    model.save(path)
    return RetrievalModel.load(path), path


@pytest.fixture(scope="session")
def shards4(cluster_model, tmp_path_factory):
    from sterling.sharding.documents import write_shards

    return write_shards(cluster_model[1], tmp_path_factory.mktemp("shards4"), num_shards=4)


@pytest.fixture(scope="session")
def shards2(cluster_model, tmp_path_factory):
    from sterling.sharding.documents import write_shards

    return write_shards(cluster_model[1], tmp_path_factory.mktemp("shards2"), num_shards=2)


@pytest.fixture(scope="session")
def ray_cluster():
    """Two Ray nodes with custom resources host0 / host1."""
    ray = pytest.importorskip("ray")
    from ray.cluster_utils import Cluster

    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    cluster = Cluster(
        initialize_head=True,
        head_node_args={"num_cpus": 4, "resources": {"host0": 1}, "object_store_memory": 256 << 20,
                        "include_dashboard": False},
    )
    cluster.add_node(num_cpus=4, resources={"host1": 1}, object_store_memory=256 << 20)
    cluster.wait_for_nodes(timeout=60)
    ray.init(address=cluster.address, log_to_driver=False)
    try:
        yield cluster
    finally:
        ray.shutdown()
        cluster.shutdown()


def serve_router(router, *, backend_name="ray"):
    """Start a loopback gRPC server on a free port for ``router``; returns the server."""
    from sterling.cluster.server import RetrievalServer, ServerConfig

    return RetrievalServer(router, ServerConfig(port=0, workers=4), backend_name=backend_name).start()
