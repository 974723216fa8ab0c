"""Upsert / Delete / UpdateAttributes over real gRPC, against the single-process LiveModel.

In-process server over 2 document shards with a data directory: after each
acknowledged update the served answer equals the single-process model given
the same updates (exact merge), deleted items never appear, min_version gives
read-your-writes, and a server restarted on the same directory recovers the
same state before it serves. Then the CLI: `sterling serve --data-dir`
killed with SIGKILL and restarted keeps every acknowledged upsert.
"""

from __future__ import annotations

import os
import signal

import grpc
import numpy as np
import pytest
import torch

from sterling.benchmarks.evaluation import assert_same_topk
from sterling.cluster.client import Client
from sterling.cluster.live import live_router
from sterling.cluster.router import RouterConfig
from sterling.cluster.server import RetrievalServer, ServerConfig
from sterling.model import IndexConfig, RetrievalModel, build_index
from sterling.model.live import LiveModel
from tests.cluster.test_grpc_service import _read_address, _sterling
from tests.cluster.test_hardening_server import _sample, _scrape

D, N, NLIST, K, NPROBE = 16, 4000, 16, 50, 16


@pytest.fixture(scope="module")
def small_model(tmp_path_factory):
    g = torch.Generator().manual_seed(5)
    x = torch.randn(N, D, generator=g)
    attrs = [["lang:en"] if i % 3 else ["lang:fr"] for i in range(N)]
    path = tmp_path_factory.mktemp("upd") / "m.st"
    RetrievalModel(build_index(x, attributes=attrs, config=IndexConfig(nlist=NLIST, list_slack=0.1))).save(path)
    return path


def _serve(path, data_dir):
    router, updates = live_router(path, data_dir=data_dir, num_shards=2, config=RouterConfig(max_k=1000))
    srv = RetrievalServer(router, ServerConfig(port=0, workers=4, metrics_port=0), updates=updates).start()
    client = Client(srv.address, timeout_s=30)
    client.wait_ready(10)
    return srv, updates, client


def _same(client, oracle, xq, version, where=None):
    got = client.retrieve(query=xq, k=K, nprobe=NPROBE, where=where, adaptive=False, min_version=version)
    ref = oracle(query=torch.from_numpy(xq), k=K, nprobe=NPROBE, where=where, adaptive=False)
    assert got.version >= version
    assert_same_topk(got.ids, got.scores, ref.ids.numpy(), ref.scores.numpy(), atol=1e-5)
    return got


def test_updates_over_grpc_match_the_single_process_model_and_survive_a_restart(small_model, tmp_path):
    data = tmp_path / "data"
    srv, updates, client = _serve(small_model, data)
    oracle = LiveModel.open(RetrievalModel.load(small_model))
    rng = np.random.default_rng(0)
    xq = rng.standard_normal((8, D)).astype(np.float32)
    try:
        # bulk stream of new items (3 messages = 3 atomic batches), with attributes
        batches = []
        for b in range(3):
            ids = np.arange(N + 300 * b, N + 300 * (b + 1))
            batches.append((ids, rng.standard_normal((300, D)).astype(np.float32), [["lang:de"]] * 300))
        resp = client.upsert(batches)
        for ids, x, a in batches:
            oracle.upsert(ids, x, a)
        assert resp.upserted == 900
        _same(client, oracle, xq, resp.model_version)
        _same(client, oracle, xq, resp.model_version, where="lang:de")
        # moves: existing items get far-away vectors (many change shard), then deletes
        moved = rng.choice(N, 400, replace=False)
        x = -3.0 * rng.standard_normal((400, D)).astype(np.float32)
        resp = client.upsert([(moved, x, None)])
        oracle.upsert(moved, x)
        got = _same(client, oracle, xq, resp.model_version)
        gone = np.concatenate([moved[:100], np.arange(N, N + 50)])
        d = client.delete(gone)
        oracle.delete(gone)
        assert d.deleted == len(gone)
        got = _same(client, oracle, -xq, d.model_version)
        assert not set(got.ids.reshape(-1).tolist()) & set(gone.tolist())
        u = client.update_attributes(moved[100:200], [["lang:xx"]] * 100)
        oracle.update_attributes(moved[100:200], [["lang:xx"]] * 100)
        got = _same(client, oracle, -xq, u.model_version, where="lang:xx")
        assert set(got.ids.reshape(-1).tolist()) - {-1} <= set(moved[100:200].tolist())
        with pytest.raises(grpc.RpcError) as e:  # read-your-writes past the deadline
            client.retrieve(query=xq, k=5, min_version=u.model_version + 5, deadline_ms=100)
        assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        with pytest.raises(grpc.RpcError) as e:
            client.update_attributes([10**9], [["lang:en"]])
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        info = client.info()
        assert info.updatable and info.model_version == u.model_version and info.items == oracle.index.num_items
        # update lag: one observation per durable batch (3 + 1 upsert messages, 1 delete, 1 attribute call)
        text = _scrape(srv.metrics_port)
        assert _sample(text, "sterling_update_lag_seconds_count", kind="upsert") == 4
        assert _sample(text, "sterling_update_lag_seconds_count", kind="delete") == 1
        assert _sample(text, "sterling_update_lag_seconds_count", kind="attributes") == 1
        assert _sample(text, "sterling_applied_batches") == info.applied_batches > 0
        version = u.model_version
    finally:
        client.close()
        srv.stop()
        updates.close()
    srv, updates, client = _serve(small_model, data)  # restart on the same directory
    try:
        assert client.info().model_version == version
        _same(client, oracle, -xq, version)
        _same(client, oracle, -xq, version, where="lang:xx")
    finally:
        client.close()
        srv.stop()
        updates.close()


def test_sterling_serve_data_dir_killed_and_restarted_keeps_acknowledged_upserts(small_model, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    args = ("serve", "--model", str(small_model), "--data-dir", str(tmp_path / "d"), "--port", "0",
            "--snapshot-every", "2")
    proc = _sterling(*args, env=env)
    rng = np.random.default_rng(1)
    x = rng.standard_normal((5, 40, D)).astype(np.float32)
    try:
        with Client(_read_address(proc), timeout_s=30) as c:
            for b in range(5):
                version = c.upsert([(np.arange(40) + 10_000 + 40 * b, x[b], None)]).model_version
            c.delete([10_000])
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        proc = _sterling(*args, env=env)
        with Client(_read_address(proc), timeout_s=30) as c:
            info = c.info()
            assert info.model_version == version + 1 and info.items == N + 199
            every = set(c.retrieve(query=x[0, :1], k=N + 200, nprobe=NLIST).ids.reshape(-1).tolist())
            assert set(range(10_001, 10_200)) <= every and 10_000 not in every
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)


def test_sterling_update_cli_streams_parquet_upserts_and_deletes(small_model, tmp_path, capsys):
    import json

    import pyarrow as pa
    import pyarrow.parquet as pq

    from sterling.launch.cli import main

    rng = np.random.default_rng(3)
    ids = np.arange(20_000, 22_500)
    x = rng.standard_normal((len(ids), D)).astype(np.float32)
    attrs = [["lang:cli"] if i % 2 else [] for i in range(len(ids))]
    pq.write_table(pa.table({"id": ids, "embedding": list(x), "attributes": attrs}), tmp_path / "u.parquet")
    gone = np.concatenate([ids[:300], np.arange(0, 200)])
    pq.write_table(pa.table({"id": gone}), tmp_path / "d.parquet")
    srv, updates, client = _serve(small_model, tmp_path / "data")
    oracle = LiveModel.open(RetrievalModel.load(small_model))
    try:
        capsys.readouterr()
        rc = main(["update", "--address", srv.address, "--upserts", str(tmp_path / "u.parquet"),
                   "--deletes", str(tmp_path / "d.parquet"), "--batch", "1000", "--no-progress"])
        assert rc == 0
        out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
        assert out["upserted"] == len(ids) and out["deleted"] == len(gone)
        for s in range(0, len(ids), 1000):
            oracle.upsert(ids[s : s + 1000], x[s : s + 1000], attrs[s : s + 1000])
        oracle.delete(gone)
        xq = rng.standard_normal((6, D)).astype(np.float32)
        got = _same(client, oracle, xq, out["model_version"], where="lang:cli")
        assert not set(got.ids.reshape(-1).tolist()) & set(gone.tolist())
        assert main(["update", "--address", srv.address]) == 2  # neither file: a clear error
    finally:
        client.close()
        srv.stop()
        updates.close()
