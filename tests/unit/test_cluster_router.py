"""Router semantics with in-process shards and fakes: partial answers, replicas, versions, limits, errors."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from sterling.benchmarks.evaluation import assert_same_topk
from sterling.cluster.backends import LocalBackend
from sterling.cluster.embedded import local_router
from sterling.cluster.errors import (
    ClusterConfigError,
    DeadlineExceededError,
    RequestTooLargeError,
    ShardsUnavailableError,
    status_code_name,
)
from sterling.cluster.router import Router, RouterConfig
from sterling.cluster.shard import ShardServer
from sterling.model import RetrievalModel
from sterling.model.errors import (
    DimensionMismatchError,
    FilterSyntaxError,
    InvalidInputError,
    NonFiniteError,
)
from sterling.model.synthetic import synthetic_queries
from sterling.sharding.documents import balanced_list_ranges, slice_model


class _Slow(ShardServer):
    """A shard that sleeps before answering (injected delay, bounded)."""

    def __init__(self, inner: ShardServer, delay_s: float) -> None:
        super().__init__(inner.model, shard=inner.shard, replica=inner.replica, lists=inner.lists)
        self.delay_s = delay_s

    def search(self, req):
        time.sleep(self.delay_s)
        return super().search(req)


class _Broken(ShardServer):
    """A replica that fails every request like a dead actor (counts calls)."""

    def __init__(self, inner: ShardServer) -> None:
        super().__init__(inner.model, shard=inner.shard, replica=inner.replica, lists=inner.lists)
        self.calls = 0
        self.alive = threading.Event()

    def search(self, req):
        self.calls += 1
        if not self.alive.is_set():
            raise ConnectionError("replica is down")
        return super().search(req)

    def ready(self):
        return self.alive.is_set()


class _Versioned(ShardServer):
    def __init__(self, inner: ShardServer, version: int) -> None:
        super().__init__(inner.model, shard=inner.shard, replica=inner.replica, lists=inner.lists)
        self.version = version

    def search(self, req):
        rep = super().search(req)
        return type(rep)(shard=rep.shard, replica=rep.replica, ids=rep.ids, scores=rep.scores,
                         version=self.version, ms=rep.ms)


@pytest.fixture(scope="module")
def model(small_index):
    return RetrievalModel(small_index)


def _servers(model, n, replicas=1):
    out = []
    for s, r in enumerate(balanced_list_ranges(model.index, n)):
        sub = slice_model(model, r)
        out.append([ShardServer(sub, shard=s, replica=i, lists=r) for i in range(replicas)])
    return out


def _router(model, servers, **cfg):
    return Router(slice_model(model, (0, 0)), LocalBackend(servers), RouterConfig(**cfg))


def test_router_answer_equals_the_model(model, small_catalog):
    router = local_router(model, num_shards=4)
    xq = synthetic_queries(small_catalog, 16, seed=11)
    for where in (None, "lang:en AND NOT policy:blocked"):
        res = router.retrieve(query=xq, k=64, nprobe=8, where=where)
        ref = model(query=xq, k=64, nprobe=8, where=where, adaptive=False)
        assert_same_topk(res.ids, res.scores, ref.ids, ref.scores, exact=where is None)
        assert not res.partial and res.version == int(model.index.version)


def test_slow_shard_gives_partial_answer_within_the_deadline(model, small_catalog):
    servers = _servers(model, 3)
    servers[1][0] = _Slow(servers[1][0], 1.0)
    router = _router(model, servers)
    xq = synthetic_queries(small_catalog, 4, seed=12)
    t0 = time.monotonic()
    res = router.retrieve(query=xq, k=10, nprobe=8, deadline_s=0.3)
    assert time.monotonic() - t0 < 0.9
    assert res.partial and res.missing == [1]
    # the partial answer is exactly the merge of the shards that answered: never wrong
    from sterling.cluster.merge import merge_topk
    from sterling.cluster.shard import ShardRequest

    req = ShardRequest(xq=xq.numpy(), k=10, nprobe=8)
    parts = [servers[s][0].search(req) for s in (0, 2)]
    ids, scores = merge_topk([(p.ids, p.scores) for p in parts], 10)
    np.testing.assert_array_equal(res.ids, ids)
    np.testing.assert_array_equal(res.scores, scores)
    with pytest.raises(ShardsUnavailableError) as e:
        router.retrieve(query=xq, k=10, nprobe=8, deadline_s=0.3, require_complete=True)
    assert e.value.missing == [1] and status_code_name(e.value) == "UNAVAILABLE"


def test_a_too_short_client_deadline_marks_no_replica_unhealthy(model, small_catalog):
    """2 ms deadlines that no replica can meet: partial answers, every replica still healthy.

    The same replicas missing a deadline they had ``sick_after_s`` to meet are
    marked unhealthy (the slow-replica rule still holds).
    """
    servers = _servers(model, 2, replicas=2)
    servers[1] = [_Slow(srv, 0.4) for srv in servers[1]]
    router = _router(model, servers)
    xq = synthetic_queries(small_catalog, 2, seed=13)
    for _ in range(5):
        try:
            res = router.retrieve(query=xq, k=10, nprobe=8, deadline_s=0.002)
        except DeadlineExceededError:
            continue  # no shard in 2 ms: a typed refusal, fine
        assert res.partial and 1 in res.missing
    assert router.backend.healthy() == [[True, True], [True, True]]
    time.sleep(0.5)  # the abandoned slow searches finish and free the shard threads
    res = router.retrieve(query=xq, k=10, nprobe=8, deadline_s=0.3)
    assert res.missing == [1]
    assert False in router.backend.healthy()[1]  # the replica asked first had 0.3 s: marked


def test_dead_replica_loses_no_answer_and_recovers(model, small_catalog):
    servers = _servers(model, 2, replicas=2)
    broken = _Broken(servers[0][0])
    servers[0][0] = broken
    router = _router(model, servers)
    flips = []
    router.backend.on_health_change(flips.append)
    xq = synthetic_queries(small_catalog, 4, seed=13)
    ref = model(query=xq, k=20, nprobe=8, adaptive=False)
    for _ in range(6):
        res = router.retrieve(query=xq, k=20, nprobe=8, deadline_s=2.0)
        assert not res.partial
        assert_same_topk(res.ids, res.scores, ref.ids, ref.scores, exact=True)
    assert router.backend.healthy()[0] == [False, True]
    assert broken.calls == 1  # marked unhealthy after one failure, healthy replica first after that
    assert router.backend.complete() and flips == [True]  # shard 0 still has a healthy replica
    broken.alive.set()
    deadline = time.monotonic() + 5
    while router.backend.healthy()[0] != [True, True] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert router.backend.healthy()[0] == [True, True]
    router.backend.close()


def test_version_skew_is_reported(model, small_catalog):
    servers = _servers(model, 3)
    servers[2][0] = _Versioned(servers[2][0], 99)
    res = _router(model, servers).retrieve(query=synthetic_queries(small_catalog, 2), k=5, nprobe=8)
    assert res.version_skew == {0: 1, 1: 1, 2: 99} and res.version == 1


@pytest.mark.parametrize(
    "kwargs, err",
    [
        (dict(query=np.zeros((2, 31), np.float32), k=5), DimensionMismatchError),
        (dict(query=np.full((1, 32), np.nan, np.float32), k=5), NonFiniteError),
        (dict(k=0), InvalidInputError),
        (dict(k=10_001), InvalidInputError),
        (dict(k=5, nprobe=10_000), InvalidInputError),
        (dict(k=5, where="lang:en AND ("), FilterSyntaxError),
        (dict(k=5, where=["lang:en"] * 3), InvalidInputError),
        (dict(query=np.zeros((5000, 32), np.float32), k=1), RequestTooLargeError),
    ],
)
def test_bad_requests_raise_typed_errors(model, small_catalog, kwargs, err):
    router = local_router(model, num_shards=2)
    kwargs.setdefault("query", synthetic_queries(small_catalog, 2).numpy())
    with pytest.raises(err) as e:
        router.retrieve(**kwargs)
    assert status_code_name(e.value) == ("RESOURCE_EXHAUSTED" if err is RequestTooLargeError else "INVALID_ARGUMENT")


def test_router_widening_finds_what_the_adaptive_model_finds(model, small_catalog):
    xq = synthetic_queries(small_catalog, 16, seed=14)
    where = "lang:ja AND device:tv"  # selective
    fixed = local_router(model, num_shards=4).retrieve(query=xq, k=50, nprobe=4, where=where, adaptive=False)
    wide = local_router(model, num_shards=4).retrieve(query=xq, k=50, nprobe=4, where=where, adaptive=True)
    ref = model(query=xq, k=50, nprobe=4, where=where, adaptive=True)
    n_fixed, n_wide, n_ref = ((a >= 0).sum() for a in (fixed.ids, wide.ids, ref.ids.numpy()))
    assert n_wide > n_fixed
    assert n_wide >= 0.95 * n_ref
    # what it finds is as good: the best score per query is at least the adaptive model's
    assert (wide.scores[:, 0] >= ref.scores.numpy()[:, 0] - 1e-6).mean() >= 0.9


@pytest.mark.parametrize("sampled", [True, False])
@pytest.mark.parametrize("num_shards", [2, 4])
def test_router_and_model_widen_by_one_rule_to_the_same_answer(model, small_catalog, num_shards, sampled,
                                                               monkeypatch):
    """The router sizes each filtered query's first scan from the selectivity sample its head carries
    (the model's ``first_scan_plan``), sums the shards' selectivity counts and applies the model's
    widening rule: the queries the model widens are widened to the same nprobe, with the same
    answer; pre-filtered queries (the model scores them outside the scan) find the same items.
    Without a sample (an index built before it existed) both widen from nprobe alone."""
    if not sampled:
        monkeypatch.setattr(model.index, "selectivity_sample", None)
    xq = synthetic_queries(small_catalog, 24, seed=15)
    where = ["lang:ja AND device:tv", "lang:en", "country:BR AND NOT lang:en", None] * 6
    router = local_router(model, num_shards=num_shards)
    assert (router.head.index.selectivity_sample is None) is not sampled
    got = router.retrieve(query=xq, k=20, nprobe=4, where=where, adaptive=True)
    s, ids, st = model.index.search(model.encode(query=xq), k=20, nprobe=4, where=where, adaptive=True,
                                    return_stats=True)
    used = np.array(st.nprobe_used)
    assert st.widened > 0  # the case exercises widening after the first scan
    assert (st.presized > 0) is sampled  # and, with the sample, first scans sized before it
    scan = used < model.index.nlist
    np.testing.assert_array_equal(got.ids[scan], ids.numpy()[scan])
    np.testing.assert_array_equal(got.scores[scan], s.numpy()[scan])
    for q in np.nonzero(~scan)[0]:
        assert set(got.ids[q].tolist()) == set(ids[q].tolist())
        np.testing.assert_allclose(got.scores[q], s[q].numpy(), atol=1e-5)
    fixed = router.retrieve(query=xq, k=20, nprobe=4, where=where, adaptive=False)
    assert (got.ids != fixed.ids).any()


def test_public_bind_requires_tls_and_token():
    from sterling.cluster.server import SecurityConfig, ServerConfig

    ServerConfig(host="127.0.0.1", port=0)
    ServerConfig(host="localhost", port=0)
    with pytest.raises(ClusterConfigError):
        ServerConfig(host="0.0.0.0", port=0)
    with pytest.raises(ClusterConfigError):
        ServerConfig(host="0.0.0.0", port=0, security=SecurityConfig(token="t"))
    with pytest.raises(ClusterConfigError):
        SecurityConfig(cert="c.pem")
    ServerConfig(host="0.0.0.0", port=0, security=SecurityConfig(cert="c.pem", key="k.pem", token="t"))


def test_shard_without_healthy_replica_makes_the_backend_incomplete(model, small_catalog):
    servers = _servers(model, 2)
    broken = _Broken(servers[1][0])
    servers[1][0] = broken
    router = _router(model, servers)
    flips = []
    router.backend.on_health_change(flips.append)
    res = router.retrieve(query=synthetic_queries(small_catalog, 2, seed=15), k=5, nprobe=8, deadline_s=2.0)
    assert res.partial and res.missing == [1] and flips == [False] and not router.backend.complete()
    broken.alive.set()
    deadline = time.monotonic() + 5
    while not router.backend.complete() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert router.backend.complete() and flips == [False, True]
    router.backend.close()
