"""The learned model served: router (in-process and over gRPC, `sterling serve`) equals the one-process model.

The oracle is ``LearnedRetrievalModel.forward`` in this process. Served, the
item index is sliced into document shards, the router merges their top-K0
exactly and reranks the merged candidates with the same OverArch, heads and
Value Model: with ``adaptive=False`` ids must be identical and values /
task scores equal to float tolerance.
"""

from __future__ import annotations

import grpc
import numpy as np
import pytest
import torch

from sterling.cluster.client import Client
from sterling.cluster.embedded import local_router
from sterling.cluster.learned_head import SparseInput
from sterling.cluster.router import RouterConfig
from sterling.cluster.server import RetrievalServer, ServerConfig
from sterling.model.errors import InvalidInputError, LimitExceededError
from sterling.model.value_model import FormulaError

pytest.importorskip("torchrec")


@pytest.fixture(scope="module")
def served(tiny_model):
    model, data = tiny_model
    router = local_router(model, num_shards=2, config=RouterConfig(max_k0=250))
    srv = RetrievalServer(router, ServerConfig(port=0, workers=2)).start()
    client = Client(srv.address, timeout_s=120)
    client.wait_ready(10)
    yield model, data, router, client
    client.close()
    srv.stop()


def _sparse_parts(model, user_ids):
    """The users-table rows as (keys, lengths, values): what a client holding raw features sends."""
    kjt, dense = model.users.inputs(torch.as_tensor(user_ids))
    return (list(kjt.keys()), kjt.lengths().numpy(), kjt.values().numpy()), dense


def _same(got_ids, got_values, got_tasks, ref):
    np.testing.assert_array_equal(np.asarray(got_ids), ref.ids.numpy())
    np.testing.assert_allclose(np.asarray(got_values), ref.values.detach().numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(got_tasks), ref.task_scores.detach().numpy(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("where", [None, "lang:en"])
def test_router_over_two_shards_equals_the_model(served, where):
    model, _, router, _ = served
    users = model.users.ids[:12]
    for k, k0, formula in ((10, 100, "click + like"), (1, 1, None), (25, 200, "like - click / 2")):
        ref = model(user_ids=users, k=k, k0=k0, where=where, value_formula=formula, adaptive=False)
        res = router.retrieve(user_ids=users.numpy(), k=k, k0=k0, where=where, value_formula=formula,
                              adaptive=False)
        _same(res.ids, res.scores, res.task_scores, ref)
        assert res.tasks == tuple(model.tasks)


def test_grpc_answers_equal_the_model_for_user_ids_sparse_features_and_embeddings(served):
    model, _, _, client = served
    users = model.users.ids[20:28]
    ref = model(user_ids=users, k=10, k0=120, value_formula="2 * click + like", adaptive=False)
    got = client.retrieve(user_ids=users.numpy(), k=10, k0=120, value_formula="2 * click + like", adaptive=False)
    _same(got.ids, got.scores, got.task_scores, ref)
    assert got.tasks == list(model.tasks)
    parts, dense = _sparse_parts(model, users)
    got = client.retrieve(sparse=parts, user_features=None if dense is None else dense.numpy(), k=10, k0=120,
                          value_formula="2 * click + like", adaptive=False)
    _same(got.ids, got.scores, got.task_scores, ref)
    u = model.user_embedding(user_ids=users).detach().numpy()
    got = client.retrieve(query=u, k=10, k0=120, value_formula="2 * click + like", adaptive=False)
    _same(got.ids, got.scores, got.task_scores, ref)
    # defaults: k0 and formula from the artifact
    ref = model(user_ids=users, k=5, adaptive=False)
    got = client.retrieve(user_ids=users.numpy(), k=5, adaptive=False)
    _same(got.ids, got.scores, got.task_scores, ref)
    info = client.info()
    assert list(info.tasks) == list(model.tasks) and info.default_k0 == model.k0 and info.max_k0 == 250
    assert list(info.sparse_keys) == list(model.user_tower.keys) and info.has_user_tower


def test_bad_learned_requests_are_typed_errors_and_the_server_keeps_serving(served):
    model, _, router, client = served
    users = model.users.ids[:2].numpy()
    parts, dense = _sparse_parts(model, users)
    keys, lengths, values = parts
    cases = [
        (dict(user_ids=users, k=10, k0=5), InvalidInputError),  # k0 < k
        (dict(user_ids=users, k=10, k0=251), LimitExceededError),  # above max_k0
        (dict(user_ids=users, k=10, value_formula="click +"), FormulaError),
        (dict(user_ids=users, k=10, value_formula="views"), FormulaError),
        (dict(sparse=SparseInput(keys=tuple(keys), lengths=lengths, values=values + 10**6)), LimitExceededError),
        (dict(sparse=SparseInput(keys=tuple(reversed(keys)) if len(keys) > 1 else ("nope",), lengths=lengths,
                                 values=values)), InvalidInputError),
        (dict(sparse=SparseInput(keys=tuple(keys), lengths=lengths, values=values[:-1])), InvalidInputError),
        (dict(user_ids=users, query=np.zeros((2, model.index.dim), np.float32)), InvalidInputError),
    ]
    for kw, err in cases:
        kw.setdefault("k", 10)
        if "sparse" in kw and dense is not None:
            kw["user_features"] = dense.numpy()
        with pytest.raises(err):
            router.retrieve(**kw)
    for kw in ({"k0": 251}, {"k0": 5}, {"value_formula": "__import__('os')"}):
        with pytest.raises(grpc.RpcError) as e:
            client.retrieve(user_ids=users, k=10, **kw)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT, kw
        assert str(kw.get("k0", "")) in e.value.details()
    with pytest.raises(grpc.RpcError) as e:
        client.retrieve(sparse=(keys, lengths, values + 10**6), k=10,
                        user_features=None if dense is None else dense.numpy())
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "outside its table" in e.value.details()
    ref = model(user_ids=model.users.ids[:2], k=10, adaptive=False)
    got = client.retrieve(user_ids=users, k=10, adaptive=False)
    np.testing.assert_array_equal(got.ids, ref.ids.numpy())


def test_an_index_model_refuses_learned_fields_by_name(small_index):
    from sterling.model import RetrievalModel

    srv = RetrievalServer(local_router(RetrievalModel(small_index)), ServerConfig(port=0, workers=1)).start()
    try:
        with Client(srv.address, timeout_s=60) as c:
            for kw, name in (({"user_ids": [1, 2]}, "user_ids"),
                             ({"query": np.zeros((1, small_index.dim), np.float32), "k0": 50}, "k0"),
                             ({"query": np.zeros((1, small_index.dim), np.float32), "value_formula": "click"},
                              "value_formula")):
                with pytest.raises(grpc.RpcError) as e:
                    c.retrieve(k=5, **kw)
                assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and name in e.value.details()
    finally:
        srv.stop()


def test_sterling_serve_and_query_a_trained_artifact(tiny_model, tmp_path):
    """`sterling serve --model learned.st --shards 2` + `sterling query --address --user-ids`: the CLI answers
    equal the in-process model loaded from the same artifact."""
    import json
    import subprocess
    import sys

    from sterling.model.learned import LearnedRetrievalModel
    from tests.cluster.test_grpc_service import _read_address, _sterling

    model, _ = tiny_model
    path = tmp_path / "learned.st"
    model.save(path)
    oracle = LearnedRetrievalModel.load(path)
    users = [int(u) for u in model.users.ids[:3]]
    proc = _sterling("serve", "--model", str(path), "--shards", "2", "--port", "0")
    try:
        address = _read_address(proc)
        out = subprocess.run(
            [sys.executable, "-m", "sterling.launch.cli", "query", "--address", address, "--user-ids",
             ",".join(map(str, users)), "--k", "5", "--k0", "80", "--value-formula", "click + like", "--json"],
            capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr
        lines = [json.loads(ln) for ln in out.stdout.splitlines()]
    finally:
        proc.terminate()
        proc.wait(30)
    ref = oracle(user_ids=torch.tensor(users), k=5, k0=80, value_formula="click + like", adaptive=False)
    assert [[h["id"] for h in ln["results"]] for ln in lines] == [[i for i in row if i >= 0] for row in ref.ids.tolist()]
    got_v = [[h["value"] for h in ln["results"]] for ln in lines]
    np.testing.assert_allclose(np.array(got_v), ref.values.detach().numpy(), rtol=1e-5)
    assert set(lines[0]["results"][0]) == {"id", "value", *oracle.tasks}
