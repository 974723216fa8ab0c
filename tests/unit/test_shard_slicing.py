"""Document shards: whole-list slicing, artifacts, and the exact shard merge (no Ray, no sockets)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sterling.benchmarks.evaluation import assert_same_topk
from sterling.cluster.merge import merge_topk
from sterling.cluster.shard import ShardRequest, ShardServer
from sterling.model import RetrievalModel
from sterling.model.errors import InvalidInputError
from sterling.model.synthetic import synthetic_queries
from sterling.sharding.documents import (
    balanced_list_ranges,
    list_bytes,
    list_ranges_from_plan,
    read_manifest,
    slice_model,
    write_shards,
)


@pytest.fixture(scope="module")
def model(small_index):
    return RetrievalModel(small_index)


def _sharded(model, n):
    return [ShardServer(slice_model(model, r), shard=i, lists=r)
            for i, r in enumerate(balanced_list_ranges(model.index, n))]


def _merged(shards, xq, k, nprobe, where):
    req = ShardRequest(xq=xq.numpy(), k=k, nprobe=nprobe, where=where)
    reps = [s.search(req) for s in shards]
    return merge_topk([(r.ids, r.scores) for r in reps], k)


@pytest.mark.parametrize("n", [1, 2, 3, 4, 7])
def test_balanced_ranges_tile_all_lists_by_bytes(small_index, n):
    ranges = balanced_list_ranges(small_index, n)
    assert ranges[0][0] == 0 and ranges[-1][1] == small_index.nlist
    assert all(a < b for a, b in ranges) and all(ranges[i][1] == ranges[i + 1][0] for i in range(n - 1))
    lb = list_bytes(small_index)
    per = [int(lb[a:b].sum()) for a, b in ranges]
    assert max(per) <= sum(per) / n + int(lb.max())  # within one list of perfect balance


def test_too_many_shards_is_refused(small_index):
    with pytest.raises(InvalidInputError):
        balanced_list_ranges(small_index, small_index.nlist + 1)


def test_slices_partition_the_items_and_keep_every_centroid(model):
    shards = _sharded(model, 4)
    ids = torch.cat([s.model.index.item_ids for s in shards])
    assert torch.equal(ids, model.index.item_ids)
    for s in shards:
        idx = s.model.index
        assert torch.equal(idx.centroids, model.index.centroids)
        sizes = idx.list_offsets[1:] - idx.list_offsets[:-1]
        a, b = s.lists
        assert int(sizes[:a].sum()) == 0 and int(sizes[b:].sum()) == 0
        assert int(idx.list_offsets[-1]) == idx.capacity


@pytest.mark.parametrize("k", [1, 10, 100, 2000])
def test_unfiltered_shard_merge_is_bit_identical(model, small_catalog, k):
    xq = synthetic_queries(small_catalog, 32, seed=5)
    ref = model(query=xq, k=k, nprobe=8, adaptive=False)
    ids, scores = _merged(_sharded(model, 4), xq, k, 8, None)
    assert_same_topk(ids, scores, ref.ids, ref.scores, exact=True)


@pytest.mark.parametrize("where", ["lang:en", "lang:en AND NOT policy:blocked", "country:US OR category:music",
                                   "lang:ja AND device:tv", "NOT lang:en"])
def test_filtered_shard_merge_equals_single_process(model, small_catalog, where):
    xq = synthetic_queries(small_catalog, 32, seed=6)
    for k in (1, 50, 500):
        ref = model(query=xq, k=k, nprobe=8, where=where, adaptive=False)
        ids, scores = _merged(_sharded(model, 3), xq, k, 8, where)
        assert_same_topk(ids, scores, ref.ids, ref.scores)


def test_merge_orders_ties_by_shard_then_rank():
    ids0, s0 = np.array([[10, 11, -1]]), np.array([[1.0, 0.5, -np.inf]], np.float32)
    ids1, s1 = np.array([[20, 21, 22]]), np.array([[1.0, 0.7, 0.5]], np.float32)
    ids, s = merge_topk([(ids0, s0), (ids1, s1)], 5)
    assert ids.tolist() == [[10, 20, 21, 11, 22]]
    ids, s = merge_topk([(ids0, s0)], 4)
    assert ids.tolist() == [[10, 11, -1, -1]] and np.isneginf(s[0, 2:]).all()


def test_shard_artifacts_load_unchanged_and_answer_like_the_model(model, small_catalog, tmp_path):
    model.save(tmp_path / "model.st")
    m = write_shards(tmp_path / "model.st", tmp_path / "shards", num_shards=3)
    m2 = read_manifest(tmp_path / "shards")
    assert m2 == m and len(m.shards) == 3
    assert sum(s.items for s in m.shards) == model.index.num_items
    head = RetrievalModel.load(m.head)
    assert head.index.capacity == 0 and torch.equal(head.index.centroids, model.index.centroids)
    shards = [ShardServer.load(s.path, shard=s.index) for s in m.shards]
    assert [s.lists for s in shards] == [s.lists for s in m.shards]
    xq = synthetic_queries(small_catalog, 16, seed=7)
    ref = model(query=xq, k=100, nprobe=8, adaptive=False)
    ids, scores = _merged(shards, xq, 100, 8, None)
    assert_same_topk(ids, scores, ref.ids, ref.scores, exact=True)


class _PlanShard:
    def __init__(self, shard, a, b):
        self.shard, self.list_start, self.list_end = shard, a, b


class _Plan:
    def __init__(self, nlist, ranges):
        self.nlist, self.num_shards = nlist, len(ranges)
        self.shards = tuple(_PlanShard(i, a, b) for i, (a, b) in enumerate(ranges))


def test_plan_ranges_are_checked(small_index):
    n = small_index.nlist
    assert list_ranges_from_plan(_Plan(n, [(0, 10), (10, n)]), n) == [(0, 10), (10, n)]
    for bad in ([(0, 10), (11, n)], [(0, 10), (10, n - 1)], [(0, 0), (0, n)]):
        with pytest.raises(InvalidInputError):
            list_ranges_from_plan(_Plan(n, bad), n)
    with pytest.raises(InvalidInputError):
        list_ranges_from_plan(_Plan(n + 1, [(0, n + 1)]), n)


def test_merging_one_shard_equals_the_general_merge():
    """The one-shard shortcut gives what the k-way merge gives, padding and ties included."""
    rng = np.random.default_rng(5)
    for _ in range(20):
        B, k = 3, 6
        s = np.sort(rng.choice([0.5, 0.25, 1.0, -np.inf], size=(B, k)).astype(np.float32), axis=1)[:, ::-1]
        ids = np.where(np.isneginf(s), -1, rng.integers(0, 100, size=(B, k)))
        fast = merge_topk([(ids, s)], k)
        # the general path: the same answer split as shard + an empty shard
        slow = merge_topk([(ids, s), (np.full((B, 1), -1), np.full((B, 1), -np.inf, np.float32))], k)
        np.testing.assert_array_equal(fast[0], slow[0])
        np.testing.assert_array_equal(fast[1], slow[1])
