"""Two-tier index (hot part on the scan device, cold part on the host) on CPU.

Oracle: the same catalog's untiered ``ItemIndex``. The CPU ``TieredIndex``
runs the whole orchestration the GPU runs — which lists are cold, chunking
into a bounded staging buffer, position mapping, exact merge — with plain
copies instead of a side stream, so it must return bit-identical ids and
scores for any split, staging bound, mode, filter, nprobe and k.

The tiered index takes the Bloom-then-verify path for filters (the one the
GPU takes). The untiered CPU index's compiled exact-filter scan differs from
that path twice: it measures selectivity differently (so an adaptive query
can widen to another nprobe), and its masked dot products may round the
last bit differently. The oracle for filtered searches is therefore the
untiered index on the Bloom-then-verify path (``_fused_exact`` off).
"""

from __future__ import annotations

from unittest import mock

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import sterling.model.search as search_mod
from sterling.model.device_tiers import TierMode, TierModeError
from sterling.model.errors import InvalidInputError

WHERES = [None, "lang:en", "lang:es AND NOT lang:en", "(lang:ja OR lang:ko) AND NOT lang:en", "lang:zz"]


@pytest.fixture(scope="module")
def index(small_index):
    return small_index


@pytest.fixture(scope="module")
def queries(small_catalog):
    from sterling.model.synthetic import synthetic_queries

    return synthetic_queries(small_catalog, 48, seed=21)


def _min_staging(index, fast) -> int:
    sizes = (index.list_offsets[1:] - index.list_offsets[:-1]).numpy()
    largest = int(sizes[~fast].max()) if (~fast).any() else 0
    return 2 * (-(-largest // 8)) * (8 * (index.dim + 4 + 8 * index.bloom.shape[1]) + 1)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    seed=st.integers(0, 2**31 - 1),
    hot_share=st.sampled_from([0.0, 0.1, 0.5, 0.9, 1.0]),
    stage_mult=st.sampled_from([1.0, 1.5, 4.0, 1000.0]),
    mode=st.sampled_from(list(TierMode)),
    where=st.sampled_from(WHERES),
    nprobe=st.sampled_from([1, 3, 8, 64]),
    k=st.sampled_from([1, 10, 100]),
    batch=st.integers(1, 48),
    adaptive=st.booleans(),
)
def test_tiered_search_is_the_untiered_search(index, queries, seed, hot_share, stage_mult, mode, where, nprobe, k,
                                              batch, adaptive):
    rng = np.random.default_rng(seed)
    fast = rng.random(index.nlist) < hot_share
    staging = int(_min_staging(index, fast) * stage_mult)
    t = index.to_tiers(fast, device="cpu", mode=mode, staging_bytes=staging)
    xq = queries[rng.choice(queries.shape[0], batch, replace=False)]
    with mock.patch.object(search_mod, "_fused_exact", return_value=False):
        want_s, want_i = index.search(xq, k=k, nprobe=nprobe, where=where, adaptive=adaptive)
    got_s, got_i = t.search(xq, k=k, nprobe=nprobe, where=where, adaptive=adaptive)
    assert torch.equal(got_s, want_s)
    assert torch.equal(got_i, want_i)
    if mode is TierMode.STREAM:
        assert t.stage_stats.peak_rows <= t.stage_stats.slot_rows  # the staging bound held
        assert t.staging_bytes() <= staging


def test_small_staging_cuts_the_cold_lists_into_chunks_and_counts_them(index, queries):
    fast = np.zeros(index.nlist, dtype=bool)
    fast[::4] = True
    need = _min_staging(index, fast)
    t = index.to_tiers(fast, device="cpu", mode="stream", staging_bytes=need)
    s, i = t.search(queries, k=10, nprobe=64)  # every list: all cold lists staged once per batch
    assert torch.equal(i, index.search(queries, k=10, nprobe=64)[1])
    sizes = (index.list_offsets[1:] - index.list_offsets[:-1]).numpy()
    st_ = t.stage_stats
    assert st_.rows_staged == int(sizes[~fast].sum())  # each cold list copied once for the batch
    assert st_.chunks >= int(np.ceil(sizes[~fast].sum() / st_.slot_rows))
    assert st_.chunks > 2 and st_.peak_rows <= st_.slot_rows
    assert st_.bytes_staged == st_.rows_staged * (index.dim + 4)  # unfiltered: no Bloom words copied
    assert t.hot_bytes() + t.cold_bytes() == sum(
        getattr(index, n).numel() * getattr(index, n).element_size() for n in ("codes", "scales", "bloom",
                                                                               "item_ids"))


def test_hot_only_batches_stage_nothing(index, queries):
    from sterling.kernels import probe_lists

    probe = probe_lists(queries[:4], index.centroids, 4)
    fast = np.zeros(index.nlist, dtype=bool)
    fast[probe.unique().numpy()] = True
    t = index.to_tiers(fast, device="cpu", mode="stream", staging_bytes=_min_staging(index, fast))
    assert torch.equal(t.search(queries[:4], k=10, nprobe=4)[1], index.search(queries[:4], k=10, nprobe=4)[1])
    assert t.stage_stats.chunks == 0


def test_stats_and_prefiltered_queries_match(index, queries):
    fast = np.arange(index.nlist) % 3 == 0
    t = index.to_tiers(fast, device="cpu", mode="stream", staging_bytes=_min_staging(index, fast))
    where = "lang:ja AND country:JP"  # selective: widened or pre-filtered
    with mock.patch.object(search_mod, "_fused_exact", return_value=False):  # the path the tiers take
        a = index.search(queries, k=20, nprobe=4, where=where, return_stats=True)
    b = t.search(queries, k=20, nprobe=4, where=where, return_stats=True)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert b[2].widened + b[2].prefiltered > 0  # the filter was selective enough to widen
    assert b[2].nprobe_used == a[2].nprobe_used and b[2].items_scanned == a[2].items_scanned
    assert torch.equal(b[2].selectivity_counts, a[2].selectivity_counts)


def test_bad_arguments_raise_typed_errors(index):
    fast = np.zeros(index.nlist, dtype=bool)
    with pytest.raises(InvalidInputError, match="staging_bytes"):
        index.to_tiers(fast, device="cpu", mode="stream", staging_bytes=1000)
    with pytest.raises(InvalidInputError, match="tier mode"):
        index.to_tiers(fast, device="cpu", mode="mmap")
    with pytest.raises(InvalidInputError, match="nlist"):
        index.to_tiers(fast[:3], device="cpu")
    if not torch.cuda.is_available():
        with pytest.raises(TierModeError, match="CUDA"):
            index.to_tiers(fast, device="cuda")
