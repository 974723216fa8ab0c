"""Per-stage search times (``sterling.model.stages``): exclusive, complete, and free of side effects."""

from __future__ import annotations

import threading
import time

import torch

from sterling.model import RetrievalModel
from sterling.model.stages import record_stages, stage, staged
from sterling.model.synthetic import synthetic_queries


def test_nested_stages_are_counted_once_in_the_inner_stage():
    with record_stages() as st:
        with stage("scan"):
            time.sleep(0.02)
            with stage("filter"):
                time.sleep(0.03)
    s = st.seconds
    assert 0.025 <= s["filter"] < 0.2
    assert 0.015 <= s["scan"] < 0.029  # the outer stage's own 20 ms, not 50 ms
    assert set(s) == {"scan", "filter"}


def test_stages_outside_a_recorder_record_nothing_and_recorders_are_per_thread():
    seen = {}

    def other():
        with record_stages() as st:
            staged("rerank")(time.sleep)(0.01)
        seen.update(st.seconds)

    with record_stages() as mine:
        t = threading.Thread(target=other)
        t.start()
        t.join()
    with stage("probe"):  # no recorder: a no-op
        pass
    assert set(seen) == {"rerank"} and mine.seconds == {}


def test_a_search_reports_its_stages_and_they_add_up_to_at_most_its_wall_time(small_index, small_catalog):
    model = RetrievalModel(small_index)
    xq = synthetic_queries(small_catalog, 32, seed=3)
    for where, want in ((None, {"probe", "scan"}), ("lang:en AND NOT policy:blocked", {"filter", "probe", "scan"})):
        ref = model(query=xq, k=20, nprobe=8, where=where)
        t0 = time.perf_counter()
        with record_stages() as st:
            out = model(query=xq, k=20, nprobe=8, where=where)
        wall = time.perf_counter() - t0
        assert want <= set(st.seconds), (where, st.seconds)
        assert all(v >= 0 for v in st.seconds.values())
        assert sum(st.seconds.values()) <= wall
        # recording changes nothing in the answer
        assert torch.equal(out.ids, ref.ids) and torch.equal(out.scores, ref.scores)
    one = synthetic_queries(small_catalog, 1, seed=4)  # the batch-1 fast path is timed too
    with record_stages() as st:
        model(query=one, k=5, nprobe=4)
    assert {"probe", "scan"} <= set(st.seconds)
