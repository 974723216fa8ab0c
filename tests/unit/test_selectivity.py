"""The selectivity sample: its rows, its estimate against a plain-Python count, and where it travels."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sterling.model import IndexConfig, ItemIndex, build_index
from sterling.model.errors import ArtifactError
from sterling.model.selectivity import SAMPLE_SIZE, SelectivitySample, sample_rows
from tests.oracle import holds, random_expr, render

FEATURES = ("lang", "country", "tier", "policy")


def _catalog(seed: int, n: int):
    rng = random.Random(seed)
    lists = [sorted({f"{f}:v{rng.randrange(4)}" for f in rng.choices(FEATURES, k=rng.randint(0, 4))})
             for _ in range(n)]
    return torch.randn(n, 8, generator=torch.Generator().manual_seed(seed)), lists


@pytest.mark.parametrize(("n", "size"), [(1, 4096), (7, 4096), (5000, 4096), (10_000, 64)])
def test_sample_rows_are_evenly_spaced_distinct_catalog_rows(n, size):
    rows = sample_rows(n, size)
    assert rows.size == min(n, size) and rows[0] == 0 and rows[-1] == n - 1
    assert (np.diff(rows) > 0).all()
    gaps = np.diff(rows)
    assert gaps.size == 0 or gaps.max() - gaps.min() <= 1  # as even as integers allow


@settings(max_examples=25, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 2**31 - 1), B=st.integers(1, 12))
def test_estimate_is_the_smoothed_pass_rate_of_the_sampled_rows(seed, B):
    """Each program's estimate equals (items of the sampled catalog rows the expression holds for + 1) /
    (rows + 2), counted by the plain-Python evaluator on the catalog's own attribute lists."""
    x, lists = _catalog(seed, 600)
    index = build_index(x, attributes=lists, config=IndexConfig(nlist=8, kmeans_iters=2))
    vocab = sorted({t for ts in lists for t in ts})
    rng = random.Random(seed + 1)
    exprs = [random_expr(rng, vocab, depth=3) for _ in range(B)]
    filters = index.compile_filters([render(e) for e in exprs], B)
    est = index.selectivity_sample.eligible_fraction(filters.programs, filters.term_vocab)
    rows = sample_rows(len(lists)).tolist()
    for q, e in enumerate(exprs):
        want = (sum(holds(e, set(lists[r])) for r in rows) + 1) / (len(rows) + 2)
        assert float(est[filters.query_program[q]]) == pytest.approx(want, abs=1e-12)
    again = index.selectivity_sample.eligible_fraction(filters.programs, filters.term_vocab)  # memo
    assert torch.equal(est, again)


def test_sample_survives_save_load_and_slicing(tmp_path):
    from sterling.sharding.documents import balanced_list_ranges, slice_index

    x, lists = _catalog(3, 3000)
    index = build_index(x, attributes=lists, config=IndexConfig(nlist=16, kmeans_iters=2))
    s = index.selectivity_sample
    assert s.size == min(SAMPLE_SIZE, 3000)
    index.save(tmp_path / "i.st")
    back = ItemIndex.load(tmp_path / "i.st").selectivity_sample
    assert np.array_equal(back.offsets, s.offsets) and np.array_equal(back.ids, s.ids)
    for part in balanced_list_ranges(index, 2):
        sl = slice_index(index, part).selectivity_sample
        assert np.array_equal(sl.offsets, s.offsets) and np.array_equal(sl.ids, s.ids)


def test_an_index_without_a_sample_loads_and_searches_as_before(tmp_path):
    """Artifacts written before the sample existed carry no ``selectivity_sample``: the index loads with
    None and an adaptive search widens from the measured selectivity alone."""
    x, lists = _catalog(4, 2000)
    index = build_index(x, attributes=lists, config=IndexConfig(nlist=16, kmeans_iters=2))
    index.selectivity_sample = None
    index.save(tmp_path / "old.st")
    old = ItemIndex.load(tmp_path / "old.st")
    assert old.selectivity_sample is None
    xq = torch.randn(6, 8, generator=torch.Generator().manual_seed(1))
    s, ids, st_ = old.search(xq, k=10, nprobe=2, where="lang:v0 AND tier:v1", return_stats=True)
    assert st_.presized == 0 and (st_.widened + st_.prefiltered) > 0


@pytest.mark.parametrize("meta", [
    {"items": 2, "offsets": "AAAA", "ids": ""},  # offsets not whole int64s
    {"items": 1, "offsets": "AAAAAAAAAAABAAAAAAAAAA==", "ids": ""},  # offsets end past the ids
    {"items": 1},  # fields missing
])
def test_a_malformed_sample_is_a_typed_artifact_error(meta):
    with pytest.raises(ArtifactError, match="selectivity sample"):
        SelectivitySample.from_meta(meta)
