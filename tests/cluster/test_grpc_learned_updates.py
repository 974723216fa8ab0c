"""A learned model's feature upserts over real gRPC: `sterling serve --data-dir` semantics in process.

Two document shards hold the index, the router holds the OverArch cache; the
served answers after a stream of feature upserts and deletes equal the
single-process ``LiveModel`` given the same batches, and a server restarted
on the same directory (shard logs + the cache's own log) answers the same.
Then ``sterling update`` streams an items-table Parquet file.
"""

from __future__ import annotations

import json
import random

import grpc
import numpy as np
import pytest
import torch

from sterling.cluster.client import Client
from sterling.cluster.live import live_router
from sterling.cluster.router import RouterConfig
from sterling.cluster.server import RetrievalServer, ServerConfig
from tests.unit.test_live_learned import _stream, _table


def _serve(path, data_dir):
    router, updates = live_router(path, data_dir=data_dir, num_shards=2, config=RouterConfig(max_k=1000),
                                  snapshot_every=5)
    srv = RetrievalServer(router, ServerConfig(port=0, workers=4, metrics_port=0), updates=updates).start()
    client = Client(srv.address, timeout_s=30)
    client.wait_ready(10)
    return srv, updates, client


def _same(client, oracle, users, version, where=None):
    kw = dict(k=10, k0=80, where=where, adaptive=False)
    got = client.retrieve(user_ids=users, min_version=version, **kw)
    with torch.no_grad():
        ref = oracle(user_ids=torch.tensor(users), **kw)
    assert got.version >= version
    assert (got.ids == ref.ids.numpy()).all()
    np.testing.assert_allclose(got.scores, ref.values.numpy(), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(got.task_scores, ref.task_scores.numpy(), rtol=1e-6, atol=1e-7)
    return got


def test_feature_upserts_over_grpc_match_the_single_process_model_and_survive_a_restart(learned_path, items,
                                                                                         tmp_path):
    from sterling.model.live import LiveModel

    srv, updates, client = _serve(learned_path, tmp_path / "data")
    oracle = LiveModel.open(learned_path)
    users = [int(u) for u in oracle.model.users.ids[:6]]
    ops, catalog = _stream(items, random.Random(3), 12)
    try:
        version = 0
        for op, ids, src in ops:
            if op == "delete":
                r = client.delete(ids)
                oracle.delete(ids)
            else:
                t = _table(items, ids, src)
                r = client.upsert([(t.ids, t, t.attributes)])
                assert r.upserted == len(ids)
                oracle.upsert(ids, item_features=t, attributes=t.attributes)
            version = r.model_version
            for where in (None, "lang:en"):
                got = _same(client, oracle, users, version, where)
                assert not set(got.ids[got.ids >= 0].tolist()) - set(catalog) - set(items.ids.tolist())
        gone = {i for op, ids, _ in ops if op == "delete" for i in ids} - set(catalog)
        final = client.retrieve(user_ids=users, k=10, k0=300, adaptive=False)
        assert not set(final.ids.reshape(-1).tolist()) & gone
        with pytest.raises(grpc.RpcError) as e:  # a learned model takes features, not vectors
            client.upsert([([77_000], np.zeros((1, oracle.model.index.dim), np.float32), None)])
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "item_features" in e.value.details()
        cache_state = {n: t.clone() for n, t in updates.learned.model.cache.state_dict().items()}
    finally:
        client.close()
        srv.stop()
        updates.close()
    srv, updates, client = _serve(learned_path, tmp_path / "data")  # shard logs + the cache's log (snapshots)
    try:
        assert updates.version == version
        for n, t in updates.learned.model.cache.state_dict().items():
            assert torch.equal(t, cache_state[n]), n
        _same(client, oracle, users, version)
    finally:
        client.close()
        srv.stop()
        updates.close()


def test_sterling_update_cli_streams_an_items_table_to_a_learned_server(learned_path, items, tmp_path, capsys):
    from sterling.launch.cli import main
    from sterling.model.data import write_parquet
    from sterling.model.live import LiveModel

    new_ids = np.arange(50_000, 50_040)
    src = np.arange(40) * 3
    t = _table(items, new_ids, src)
    cols = {"item_id": new_ids}
    for k, (v, o) in t.sparse.items():
        cols[k] = [list(v[o[i] : o[i + 1]]) for i in range(len(new_ids))]
    cols.update({k: v[:, 0] if v.ndim == 2 and v.shape[1] == 1 else list(v) for k, v in t.dense.items()})
    cols["attributes"] = [a + ["src:cli"] for a in t.attributes]
    write_parquet(tmp_path / "u.parquet", cols)
    write_parquet(tmp_path / "d.parquet", {"id": new_ids[:5]})
    srv, updates, client = _serve(learned_path, tmp_path / "data")
    oracle = LiveModel.open(learned_path)
    try:
        capsys.readouterr()
        rc = main(["update", "--address", srv.address, "--upserts", str(tmp_path / "u.parquet"),
                   "--deletes", str(tmp_path / "d.parquet"), "--batch", "16", "--no-progress"])
        assert rc == 0
        out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
        assert out["upserted"] == len(new_ids) and out["deleted"] == 5
        from sterling.model.data import read_features

        back = read_features(tmp_path / "u.parquet", "item_id")
        for s in range(0, len(new_ids), 16):
            rows = np.arange(s, min(s + 16, len(new_ids)))
            oracle.upsert(new_ids[rows], item_features=_table(back, new_ids[rows], rows),
                          attributes=[back.attributes[i] for i in rows])
        oracle.delete(new_ids[:5])
        users = [int(u) for u in oracle.model.users.ids[:6]]
        got = _same(client, oracle, users, out["model_version"], where="src:cli")
        served = set(got.ids[got.ids >= 0].tolist())
        assert served and served <= set(new_ids[5:].tolist())
    finally:
        client.close()
        srv.stop()
        updates.close()


def test_sterling_serve_data_dir_serves_a_learned_model_and_recovers_after_sigkill(learned_path, items, tmp_path):
    import os
    import signal

    from tests.cluster.test_grpc_service import _read_address, _sterling

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    args = ("serve", "--model", str(learned_path), "--data-dir", str(tmp_path / "d"), "--port", "0",
            "--shards", "2", "--snapshot-every", "2")
    proc = _sterling(*args, env=env)
    new = np.arange(60_000, 60_030)
    try:
        with Client(_read_address(proc), timeout_s=60) as c:
            for b in range(3):
                ids = new[10 * b : 10 * b + 10]
                t = _table(items, ids, np.arange(10) + 10 * b)
                t.attributes = [["src:serve"]] * 10
                version = c.upsert([(ids, t, t.attributes)]).model_version
            version = c.delete([int(new[0])]).model_version
            before = c.retrieve(user_ids=[1, 2], k=40, k0=300, where="src:serve", adaptive=False)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        proc = _sterling(*args, env=env)
        with Client(_read_address(proc), timeout_s=60) as c:
            assert c.info().model_version == version
            after = c.retrieve(user_ids=[1, 2], k=40, k0=300, where="src:serve", adaptive=False)
        assert set(after.ids[after.ids >= 0].tolist()) == set(new[1:].tolist())
        assert (after.ids == before.ids).all() and (after.scores == before.scores).all()
        assert (after.task_scores == before.task_scores).all()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
