"""2 and 4 gloo ranks serving one artifact answer bit for bit like the single-process model.

One process group per world size for the whole module: rank 0 runs every
case, the other ranks serve; the references are computed here, in the test
process, by the unsharded model on the same artifact (``adaptive=False``:
the group searches a fixed probe, as document shards do).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sterling.benchmarks.evaluation import assert_same_topk
from sterling.model.synthetic import synthetic_queries
from tests.distributed.conftest import N_USERS
from tests.distributed.harness import run_group
from tests.distributed.workers import serve_cases

pytestmark = pytest.mark.timeout(600)

KS = (1, 10, 100, 10_000)
NQ = 12


def _wheres(B):
    per_query = [["lang:en", None, "NOT lang:en", "country:US OR category:music"][i % 4] for i in range(B)]
    return {"none": None, "one": "lang:en AND NOT policy:blocked", "per_query": per_query}


def _user_ids():
    return [100 + i for i in range(NQ - 1)] + [100 + N_USERS + 7]  # the last one is unknown: empty bags


def _plain_cases(xq):
    cases, keys = [], []
    for k in KS:
        for wname, where in _wheres(len(xq)).items():
            cases.append(("search", {"xq": xq, "k": k, "nprobe": 8, "where": where}))
            keys.append(("plain", k, wname))
    for wname, where in _wheres(len(xq)).items():
        cases.append(("search", {"xq": xq, "k": 10, "nprobe": 8, "where": where, "counts": True}))
        keys.append(("counts", wname))
    cases.append(("search", {"xq": xq, "k": 0}))
    keys.append(("error", "k0"))
    cases.append(("search", {"xq": xq, "k": 5, "where": "lang:en AND ("}))
    keys.append(("error", "filter"))
    cases.append(("infos", {}))
    keys.append(("infos",))
    return cases, keys


def _learned_cases():
    cases, keys = [], []
    for k in KS:
        for wname, where in _wheres(NQ).items():
            cases.append(("retrieve", {"user_ids": _user_ids(), "k": k, "where": where}))
            keys.append(("overarch", k, wname))
            cases.append(("retrieve", {"user_ids": _user_ids(), "k": k, "nprobe": 8, "where": where,
                                       "rerank": False}))
            keys.append(("ann", k, wname))
    return cases, keys


def _tower_cases():
    return [("retrieve", {"user_ids": _user_ids(), "k": 10, "nprobe": 8, "rerank": False}),
            ("retrieve", {"user_ids": _user_ids(), "k": 50})], [("tower_u",), ("tower_overarch",)]


SHARDING = {2: {"user_id": "column_wise", "region": "table_wise", "history": "table_wise"},
            4: {"user_id": "table_wise", "region": "data_parallel", "history": "column_wise"}}


@pytest.fixture(scope="module", params=[2, 4], ids=lambda w: f"{w}ranks")
def group(request, plain_path, learned_path, dist_catalog, tmp_path_factory):
    from sterling.sharding.ranks import write_rank_slices

    world = request.param
    tmp = tmp_path_factory.mktemp(f"ranks{world}")
    xq = synthetic_queries(dist_catalog, NQ, seed=21)
    sample = synthetic_queries(dist_catalog, 256, seed=22)
    plain_dir = write_rank_slices(plain_path, tmp / "plain", world_size=world, xq_sample=sample, nprobe=8)
    learned_dir = write_rank_slices(learned_path, tmp / "learned", world_size=world, xq_sample=sample, nprobe=8)
    pc, pk = _plain_cases(xq.numpy())
    lc, lk = _learned_cases()
    tc, tk = _tower_cases()
    jobs = [(str(tmp / "plain"), None, pc), (str(tmp / "learned"), None, lc), (str(tmp / "learned"), SHARDING[world], tc)]
    out = tmp / "results.pt"
    run_group(world, serve_cases, jobs, str(out))
    res = torch.load(out, weights_only=False)
    by_key = {}
    for j, keys in enumerate((pk, lk, tk)):
        assert len(res[j]) == len(keys)
        by_key.update(dict(zip(keys, res[j])))
    return {"world": world, "xq": xq, "res": by_key, "manifests": (plain_dir, learned_dir)}


@pytest.fixture(scope="module")
def plain_model(plain_path):
    from sterling.model import RetrievalModel

    return RetrievalModel.load(plain_path)


@pytest.fixture(scope="module")
def learned_model(learned_path):
    from sterling.model.learned import LearnedRetrievalModel

    return LearnedRetrievalModel.load(learned_path).eval()


@pytest.mark.parametrize("k", KS)
@pytest.mark.parametrize("wname", ["none", "one", "per_query"])
def test_index_stage_over_ranks_equals_single_process(group, plain_model, k, wname):
    xq = group["xq"]
    got = group["res"][("plain", k, wname)]
    ref = plain_model(query=xq, k=k, nprobe=8, where=_wheres(len(xq))[wname], adaptive=False)
    assert got["ids"].shape == (len(xq), k)
    np.testing.assert_array_equal(got["ids"], ref.ids.numpy())
    np.testing.assert_array_equal(got["scores"], ref.scores.numpy())
    assert got["version"] == ref.version


@pytest.mark.parametrize("wname", ["none", "one", "per_query"])
def test_ranks_selectivity_counts_sum_to_the_single_index_counts(group, plain_model, wname):
    """What the router's adaptive widening reads from a rank group: the single process's counts."""
    xq = group["xq"]
    got = group["res"][("counts", wname)]
    s, ids, st = plain_model.index.search(plain_model.encode(query=xq), k=10, nprobe=8,
                                          where=_wheres(len(xq))[wname], adaptive=False, return_stats=True)
    np.testing.assert_array_equal(got["ids"], ids.numpy())
    np.testing.assert_array_equal(got["counts"], st.selectivity_counts.numpy())
    if wname != "none":
        assert got["counts"][:, 0].sum() > 0


@pytest.mark.parametrize("k", KS)
@pytest.mark.parametrize("wname", ["none", "one", "per_query"])
def test_learned_model_over_ranks_equals_single_process(group, learned_model, k, wname):
    where = _wheres(NQ)[wname]
    got = group["res"][("overarch", k, wname)]
    with torch.no_grad():
        ref = learned_model(user_ids=_user_ids(), k=k, where=where, adaptive=False)
    for name in ("ann_ids", "ann_scores", "ids", "values", "task_scores"):
        np.testing.assert_array_equal(got[name], getattr(ref, name).numpy(), err_msg=name)
    assert got["ids"].shape == (NQ, k) and got["version"] == ref.version


@pytest.mark.parametrize("k", KS)
@pytest.mark.parametrize("wname", ["none", "one", "per_query"])
def test_learned_ann_stage_without_overarch_equals_single_process(group, learned_model, k, wname):
    where = _wheres(NQ)[wname]
    got = group["res"][("ann", k, wname)]
    with torch.no_grad():
        u = learned_model.user_embedding(user_ids=_user_ids())
        ref_s, ref_i = learned_model.index.search(u, k=k, nprobe=8, where=where, adaptive=False)
    np.testing.assert_array_equal(got["u"], u.numpy())
    np.testing.assert_array_equal(got["ids"], ref_i.numpy())
    np.testing.assert_array_equal(got["scores"], ref_s.numpy())


def test_bad_requests_raise_typed_errors_and_the_group_keeps_serving(group):
    res = group["res"]
    assert res[("error", "k0")] == {"error": "InvalidInputError"}
    assert res[("error", "filter")] == {"error": "FilterSyntaxError"}
    infos = res[("infos",)]["infos"]  # answered after the errors: no rank hung
    assert [i["shard"] for i in infos] == list(range(group["world"]))


def test_every_rank_holds_its_own_lists_and_items(group, plain_model):
    infos = group["res"][("infos",)]["infos"]
    plain_dir, _ = group["manifests"]
    assert [tuple(i["lists"]) for i in infos] == [s.lists for s in plain_dir.shards]
    assert sum(i["items"] for i in infos) == plain_model.index.num_items
    assert infos[0]["lists"][0] == 0 and infos[-1]["lists"][1] == plain_model.index.nlist


def test_torchrec_sharded_user_tower_equals_the_unsharded_tower(group, learned_model):
    got = group["res"][("tower_u",)]
    with torch.no_grad():
        ref = learned_model.user_embedding(user_ids=_user_ids())
    # the fused TorchRec kernel pools in another order than nn.EmbeddingBag: equal to fp32 rounding
    np.testing.assert_allclose(got["u"], ref.numpy(), rtol=0, atol=1e-6)
    assert not np.array_equal(got["u"], np.zeros_like(got["u"]))


def test_learned_model_with_sharded_tower_matches_single_process(group, learned_model):
    got = group["res"][("tower_overarch",)]
    with torch.no_grad():
        ref = learned_model(user_ids=_user_ids(), k=50, adaptive=False)
    assert_same_topk(got["ann_ids"], got["ann_scores"], ref.ann_ids.numpy(), ref.ann_scores.numpy(), atol=1e-5)
    np.testing.assert_allclose(got["values"], ref.values.numpy(), rtol=0, atol=1e-3)
