"""The microservice mesh answers what the one-process learned model answers.

Oracles: ``LearnedRetrievalModel.forward`` (adaptive off) for whole answers,
the plain-Python filter evaluator ``holds`` for the filter service, and the
model's own ``rank`` for the scoring service. The mesh's ANN uses the
Sterling index's lists, vectors and nprobe, so on these catalogs its
candidates — and so its answers — are the model's (ids identical, values
and task scores to float tolerance).
"""

from __future__ import annotations

import concurrent.futures as cf

import numpy as np
import pytest
import torch

pytest.importorskip("torchrec")
pytest.importorskip("faiss")
pytest.importorskip("pyroaring")

WHERES = [None, "lang:en", "NOT lang:en", "topic:t1 OR topic:t2", "lang:zz"]


@pytest.fixture(scope="module")
def artifact(tiny_model, tmp_path_factory):
    model, _ = tiny_model
    path = tmp_path_factory.mktemp("mesh") / "learned.st"
    model.save(path)
    return str(path)


@pytest.fixture(scope="module")
def mesh(artifact):
    from sterling.benchmarks.mesh.launcher import Mesh

    with Mesh(artifact) as m:
        client = m.client()
        client.wait_ready(30)
        yield m, client
        client.close()


def _ref(model, users, **kw):
    with torch.no_grad():
        return model(user_ids=torch.as_tensor(users), adaptive=False, **kw)


def _same(got, ref):
    ids, values, tasks = got
    np.testing.assert_array_equal(ids, ref.ids.numpy())
    np.testing.assert_allclose(values, ref.values.numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(tasks, ref.task_scores.numpy(), rtol=1e-5, atol=1e-6)


def test_filter_service_bitmaps_equal_the_plain_python_evaluator(tiny_model, artifact):
    from sterling.benchmarks.evaluation import holds
    from sterling.benchmarks.mesh.services import FilterCore
    from sterling.model.filter import parse_filter

    model, _ = tiny_model
    idx = model.index
    core = FilterCore(artifact)
    ids, offs = idx.attr_ids.numpy(), idx.attr_offsets.numpy()
    live = idx.item_ids.numpy() >= 0
    for where in WHERES[1:]:
        node = parse_filter(where)
        want = {p for p in range(idx.capacity)
                if live[p] and holds(node, {idx.vocab[t] for t in ids[offs[p]:offs[p + 1]]})}
        assert set(core.eligible(where)) == want, where
    assert len(core.eligible(None)) == int(live.sum())


def test_scoring_service_equals_the_models_rank_on_the_same_candidates(tiny_model, artifact):
    from sterling.benchmarks.mesh.services import ScoringCore

    model, _ = tiny_model
    core = ScoringCore(artifact)
    users = model.users.ids[:9]
    ref = _ref(model, users, k=7, k0=60, value_formula="click + 2 * like")
    u = model.user_embedding(user_ids=users).detach().numpy()
    _same(core.score(u, ref.ann_ids.numpy(), ref.ann_scores.numpy(), 7, "click + 2 * like"), ref)


@pytest.mark.parametrize("where", WHERES)
def test_ann_service_candidates_are_the_sterling_index_candidates(tiny_model, artifact, where):
    from sterling.benchmarks.mesh.services import AnnCore, FilterCore

    model, _ = tiny_model
    ann, flt = AnnCore(artifact), FilterCore(artifact)
    users = model.users.ids[:20]
    u = model.user_embedding(user_ids=users).detach().numpy()
    for k0, nprobe in ((50, None), (120, 3)):
        ref_s, ref_i = model.index.search(torch.from_numpy(u), k=k0, nprobe=nprobe or model.nprobe_for(k0),
                                          where=where, adaptive=False)
        of = np.full(len(u), 0 if where else -1)
        ids, scores = ann.search(u, k0, nprobe or 0, [flt.eligible(where)] if where else [], of)
        np.testing.assert_array_equal(np.sort(ids, 1), np.sort(ref_i.numpy(), 1))
        np.testing.assert_allclose(np.sort(scores, 1), np.sort(ref_s.numpy(), 1), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("where", WHERES)
def test_mesh_answers_equal_the_one_process_model(tiny_model, mesh, where):
    model, _ = tiny_model
    _, client = mesh
    users = model.users.ids[:12].numpy()
    for k, k0, formula in ((10, 100, "click + like"), (1, 1, None), (25, 200, "like - click / 2")):
        got = client.recommend(users, k=k, k0=k0, where=where, value_formula=formula)
        _same(got, _ref(model, users, k=k, k0=k0, where=where, value_formula=formula))


def test_concurrent_single_user_requests_are_batched_and_each_gets_its_own_answer(tiny_model, mesh):
    model, _ = tiny_model
    _, client = mesh
    users = model.users.ids[:48].numpy()
    with cf.ThreadPoolExecutor(16) as ex:
        futs = [ex.submit(client.recommend, [u], k=10, k0=80, where=WHERES[i % len(WHERES)])
                for i, u in enumerate(users)]
        got = [f.result(timeout=60) for f in futs]
    for i, u in enumerate(users):
        _same(got[i], _ref(model, [u], k=10, k0=80, where=WHERES[i % len(WHERES)]))


def test_bad_requests_are_invalid_argument_and_the_mesh_keeps_serving(tiny_model, mesh):
    import grpc

    model, _ = tiny_model
    _, client = mesh
    users = model.users.ids[:2].numpy()
    for kw in ({"k": 10, "k0": 5}, {"k": 5, "k0": 50, "value_formula": "views"}, {"k": 5, "k0": 50, "where": "lang:"}):
        with pytest.raises(grpc.RpcError) as e:
            client.recommend(users, **kw)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT, kw
    _same(client.recommend(users, k=5, k0=50), _ref(model, users, k=5, k0=50))
