"""Dynamic batching (``sterling.cluster.batching``): coalesced calls answer exactly as alone."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from sterling.benchmarks.evaluation import assert_same_topk
from sterling.cluster.batching import Batcher, BatchingConfig
from sterling.cluster.embedded import local_router
from sterling.model import RetrievalModel
from sterling.model.errors import FilterSyntaxError, NonFiniteError
from sterling.model.synthetic import synthetic_queries

FILTERS = [None, "lang:en", "lang:en AND NOT policy:blocked", "lang:fr OR lang:de", None, "lang:de"]


@pytest.fixture(scope="module")
def router(small_index):
    return local_router(RetrievalModel(small_index), num_shards=2)


def _slowed(router, delay_s: float, log: list):
    """The real router, each search held ``delay_s`` first so calls pile up behind it."""

    def retrieve(**kw):
        log.append(np.atleast_2d(np.asarray(kw["query"])).shape[0])
        time.sleep(delay_s)
        return router.retrieve(**kw)

    return retrieve


def _concurrently(fn, n: int):
    out: list = [None] * n
    barrier = threading.Barrier(n)

    def run(i):
        barrier.wait()
        try:
            out[i] = fn(i)
        except Exception as e:  # noqa: BLE001 - compared by the test
            out[i] = e

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    return out


def test_concurrent_calls_share_searches_and_each_gets_its_own_answer(router, small_catalog):
    xq = synthetic_queries(small_catalog, 16, seed=21).numpy()
    log: list = []
    b = Batcher(_slowed(router, 0.05, log), BatchingConfig(max_wait_ms=200, max_queries=64))
    got = _concurrently(lambda i: b.retrieve(query=xq[i], k=20, nprobe=8, where=FILTERS[i % len(FILTERS)],
                                             adaptive=False, deadline_s=30), 16)
    assert b.calls < 16 and b.coalesced >= 2 and max(log) > 1  # searches were shared
    for i, res in enumerate(got):
        assert not isinstance(res, Exception), res
        ref = router.retrieve(query=xq[i : i + 1], k=20, nprobe=8, where=FILTERS[i % len(FILTERS)], adaptive=False)
        assert_same_topk(res.ids, res.scores, ref.ids, ref.scores, atol=1e-5)
        assert res.ids.shape == (1, 20)


def test_a_bad_call_gets_its_own_typed_error_and_its_neighbours_their_answers(router, small_catalog):
    xq = synthetic_queries(small_catalog, 8, seed=22).numpy()
    bad = xq.copy()
    bad[3, 0] = np.nan
    b = Batcher(_slowed(router, 0.05, []), BatchingConfig(max_wait_ms=200))

    def call(i):
        where = "lang:en AND (" if i == 5 else None
        return b.retrieve(query=bad[i], k=5, nprobe=8, where=where, deadline_s=30)

    got = _concurrently(call, 8)
    assert isinstance(got[3], NonFiniteError) and isinstance(got[5], FilterSyntaxError)
    for i in (0, 1, 2, 4, 6, 7):
        ref = router.retrieve(query=xq[i : i + 1], k=5, nprobe=8)
        np.testing.assert_array_equal(got[i].ids, ref.ids)


def test_incompatible_calls_do_not_mix_and_a_lone_call_does_not_wait(router, small_catalog):
    xq = synthetic_queries(small_catalog, 8, seed=23).numpy()
    log: list = []
    b = Batcher(_slowed(router, 0.05, log), BatchingConfig(max_wait_ms=5000, max_queries=4))
    got = _concurrently(lambda i: b.retrieve(query=xq[i], k=5 + (i % 2), nprobe=8, deadline_s=30), 8)
    for i, res in enumerate(got):
        assert res.ids.shape == (1, 5 + (i % 2))  # k 5 and k 6 never shared a search
        ref = router.retrieve(query=xq[i : i + 1], k=5 + (i % 2), nprobe=8)
        np.testing.assert_array_equal(res.ids, ref.ids)
    assert max(log) <= 4  # max_queries holds
    t = time.monotonic()
    b.retrieve(query=xq[0], k=5, nprobe=8)  # nothing running: no 5 s wait
    assert time.monotonic() - t < 2.5
    off = Batcher(router.retrieve, BatchingConfig(max_wait_ms=0))
    assert not off.config.enabled
    np.testing.assert_array_equal(off.retrieve(query=xq[:2], k=5, nprobe=8).ids,
                                  router.retrieve(query=xq[:2], k=5, nprobe=8).ids)
    with pytest.raises(ValueError):
        BatchingConfig(max_wait_ms=-1)
