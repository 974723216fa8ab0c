"""Per-rank slices: whole lists per rank, balanced by bytes and by the probe load of a query sample."""

from __future__ import annotations

import pytest
import torch

from sterling.model import RetrievalModel
from sterling.model.errors import InvalidInputError
from sterling.model.synthetic import synthetic_queries
from sterling.sharding.documents import balanced_list_ranges, list_bytes, read_manifest, shard_info
from sterling.sharding.ranks import (
    probe_load,
    rank_costs,
    rank_list_ranges,
    write_rank_slices,
)


def _skewed_sample(small_index, small_catalog, n=400):
    """Queries around the first few lists' centroids only: the probe load piles up at the start of the list range."""
    g = torch.Generator().manual_seed(9)
    c = small_index.centroids[torch.randint(0, 6, (n,), generator=g)]
    return torch.nn.functional.normalize(c + 0.05 * torch.randn(c.shape, generator=g), dim=1)


def test_probe_load_counts_items_scanned_per_list(small_index, small_catalog):
    xq = synthetic_queries(small_catalog, 50, seed=4)
    load = probe_load(small_index, xq, 8)
    sizes = (small_index.list_offsets[1:] - small_index.list_offsets[:-1]).double()
    from sterling.kernels.ivf import probe_lists
    from sterling.model.index import prepare_queries

    p = probe_lists(prepare_queries(xq, small_index.dim, small_index.metric), small_index.centroids, 8)
    brute = torch.zeros(small_index.nlist, dtype=torch.float64)
    for row in p.tolist():
        for lst in row:
            brute[lst] += sizes[lst]
    assert torch.equal(load, brute)


@pytest.mark.parametrize("world", [2, 3, 4])
def test_load_aware_ranges_spread_a_skewed_probe_load(small_index, small_catalog, world):
    sample = _skewed_sample(small_index, small_catalog)
    by_bytes = balanced_list_ranges(small_index, world)
    both = rank_list_ranges(small_index, world, xq_sample=sample, nprobe=8)
    assert both[0][0] == 0 and both[-1][1] == small_index.nlist
    assert all(a < b for a, b in both) and all(both[i][1] == both[i + 1][0] for i in range(world - 1))
    c_bytes = rank_costs(small_index, by_bytes, xq_sample=sample, nprobe=8)
    c_both = rank_costs(small_index, both, xq_sample=sample, nprobe=8)
    # the combined cost (bytes share + load share) of the worst rank is lower than a bytes-only cut gives
    worst = lambda c: max(b + s for b, s in zip(c["bytes"], c["load"]))  # noqa: E731
    assert worst(c_both) < worst(c_bytes)
    # and within one list's cost of perfect balance
    lb = list_bytes(small_index).double()
    load = probe_load(small_index, sample, 8)
    per_list = lb / lb.sum() + load / load.sum()
    assert worst(c_both) <= 2 / world + float(per_list.max()) + 1e-9


def test_without_a_sample_ranks_are_cut_by_bytes(small_index):
    assert rank_list_ranges(small_index, 4) == balanced_list_ranges(small_index, 4)
    with pytest.raises(InvalidInputError):
        rank_list_ranges(small_index, small_index.nlist + 1)


def test_rank_artifacts_load_alone_and_partition_the_items(small_index, small_catalog, tmp_path):
    model = RetrievalModel(small_index)
    model.save(tmp_path / "m.st")
    m = write_rank_slices(tmp_path / "m.st", tmp_path / "r", world_size=3,
                          xq_sample=_skewed_sample(small_index, small_catalog), nprobe=8)
    assert read_manifest(tmp_path / "r") == m
    ids = []
    for r, s in enumerate(m.shards):
        info = shard_info(s.path)
        assert info["rank"] == r and info["world_size"] == 3 and tuple(info["lists"]) == s.lists
        assert info["capacity"] == small_index.capacity and info["items"] == small_index.num_items
        ids.append(RetrievalModel.load(s.path).index.item_ids)
    assert torch.equal(torch.cat(ids), small_index.item_ids)
    assert not list((tmp_path / "r").glob("*.tmp"))


def test_plan_tower_sharding_is_checked():
    pytest.importorskip("torchrec")
    from sterling.model.towers import SparseFeature, Tower
    from sterling.sharding.tower import table_constraints

    tower = Tower(Tower.Config(sparse=(SparseFeature(name="user_id", num_embeddings=10),), output_dim=8))
    cpu = torch.device("cpu")
    c = table_constraints(tower, {"user_id": "column_wise"}, device=cpu)
    assert c["t_user_id"].sharding_types == ["column_wise"] and c["t_user_id"].compute_kernels == ["fused"]
    assert table_constraints(tower, "data_parallel", device=cpu)["t_user_id"].compute_kernels == ["dense"]
    with pytest.raises(InvalidInputError):
        table_constraints(tower, {"user_id": "row_wise"}, device=cpu)  # not offered on CPU
    with pytest.raises(InvalidInputError):
        table_constraints(tower, {"nosuch": "table_wise"}, device=cpu)
    from types import SimpleNamespace

    from sterling.sharding.tower import tower_sharding_from_plan

    plan = SimpleNamespace(sparse_tables=(SimpleNamespace(name="t_user_id", sharding_type="column_wise"),))
    assert table_constraints(tower, tower_sharding_from_plan(plan), device=cpu)["t_user_id"].sharding_types == \
        ["column_wise"]


def test_a_plan_decides_the_ranks_list_ranges(small_index, tmp_path):
    from types import SimpleNamespace

    n = small_index.nlist
    ranges = [(0, 5), (5, n)]  # deliberately not the balanced cut
    plan = SimpleNamespace(nlist=n, num_shards=2, shards=tuple(
        SimpleNamespace(shard=i, list_start=a, list_end=b) for i, (a, b) in enumerate(ranges)))
    RetrievalModel(small_index).save(tmp_path / "m.st")
    m = write_rank_slices(tmp_path / "m.st", tmp_path / "r", plan=plan, plan_path="plan.json")
    assert [s.lists for s in m.shards] == ranges and m.plan == "plan.json"
    with pytest.raises(InvalidInputError):
        write_rank_slices(tmp_path / "m.st", tmp_path / "r2", world_size=3, plan=plan)
