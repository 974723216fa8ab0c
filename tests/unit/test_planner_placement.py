"""Golden placement decisions: scale up → out → document-shard → replicate."""

from __future__ import annotations

import math
import time

import pytest

from sterling.planner import (
    IndexModelConfig,
    MemoryTier,
    Placement,
    PlanTargets,
    estimate_cost,
    make_topology,
    plan,
)
from sterling.planner.cost import MEMORY_EFFICIENCY
from sterling.planner.errors import InfeasiblePlanError

STEP_ORDER = {"up": 0, "out": 1, "shard": 2, "replicate": 3, "sparse": 4}
GB = 10**9


def _steps(p) -> list[str]:
    return [d.step for d in p.decisions]


def _assert_ordered(p) -> None:
    ranks = [STEP_ORDER[s] for s in _steps(p)]
    assert ranks == sorted(ranks), _steps(p)


def _bytes_in(p, shard: int, name: str, tier: MemoryTier) -> int:
    return sum(x.nbytes for x in p.devices[shard].placements if x.name == name and x.tier is tier)


def test_100m_x_128_fits_one_h100_in_hbm():
    p = plan(IndexModelConfig(items=100_000_000, dim=128),
             make_topology("h100-80g", hosts=1, gpus_per_host=1))
    assert (p.num_shards, p.replicas, p.hosts_used) == (1, 1, 1)
    assert _bytes_in(p, 0, "codes", MemoryTier.HBM) == 12_800_000_000  # int8 100M x 128
    assert p.devices[0].storage.dram == 0 and p.devices[0].storage.remote == 0
    assert p.devices[0].storage.hbm <= 72 * GB  # 90% of 80 GB
    assert _steps(p) == ["up"]


def test_1b_x_256_int8_needs_more_than_one_8x80gb_host_for_20k_qps():
    p = plan(IndexModelConfig(items=1_000_000_000, dim=256),
             make_topology("h100-80g", hosts=256, gpus_per_host=8),
             PlanTargets(qps=20_000, p99_ms=100))
    assert p.hosts_used > 1
    assert p.num_shards > 8
    steps = _steps(p)
    assert steps[0] == "up" and "out" in steps and "shard" in steps
    _assert_ordered(p)
    assert p.cost.qps_total >= 20_000
    assert p.cost.p99_ms <= 100


def test_1b_x_256_without_qps_target_uses_the_fewest_gpus_with_cold_tail_in_dram():
    # Hand arithmetic: device-resident per shard = codes 256e9 + bloom 24e9 + scales 4e9
    # + alive 0.125e9 + list offsets; replicated = centroids (4*sqrt(1e9)=126491 lists
    # x 256 x 4 B) + tower 8e6. Capacity = 72e9 HBM + 37.5e6 persisting L2.
    nlist = round(4 * math.sqrt(1e9))
    scan = 256e9 + 24e9 + 4e9 + 1e9 / 8 + (nlist + 1) * 8
    replicated = nlist * 256 * 4 + 8e6
    cap = 72e9 + 37.5e6
    expected = math.ceil(scan / (cap - replicated))
    assert expected == 4
    p = plan(IndexModelConfig(items=1_000_000_000, dim=256),
             make_topology("h100-80g", hosts=256, gpus_per_host=8))
    assert p.num_shards == expected and p.replicas == 1 and p.hosts_used == 1
    # the embedding cache (read only for K0 survivors) is the cold tail in host DRAM
    assert _bytes_in(p, 0, "embedding_cache", MemoryTier.DRAM) > 0
    assert _bytes_in(p, 0, "codes", MemoryTier.DRAM) == 0
    assert _steps(p) == ["up", "out"]


def test_centroids_go_to_sram_when_they_fit():
    p = plan(IndexModelConfig(items=10_000_000, dim=128), make_topology("h100-80g", hosts=1))
    # 4*sqrt(1e7) = 12649 lists x 128 x 4 B = 6.5 MB < 37.5 MB persisting L2
    assert _bytes_in(p, 0, "centroids", MemoryTier.SRAM) == 12649 * 128 * 4


def test_replicas_are_added_for_qps_after_sharding():
    topo = make_topology("h100-80g", hosts=16, gpus_per_host=1)
    one = plan(IndexModelConfig(items=100_000_000, dim=128), topo)
    target = 3.5 * one.cost.qps_per_replica
    p = plan(IndexModelConfig(items=100_000_000, dim=128), topo, PlanTargets(qps=target))
    assert p.num_shards == 1 and p.replicas == 4 and p.hosts_used == 4
    assert _steps(p) == ["up", "replicate"]


def test_latency_target_scales_out():
    topo = make_topology("a100-40g", hosts=1, gpus_per_host=8)
    cfg = IndexModelConfig(items=20_000_000, dim=128, nprobe=512, k0=1000)
    one = plan(cfg, topo, PlanTargets(p99_ms=None))
    assert one.num_shards == 1
    target = one.cost.p99_ms * 0.8
    p = plan(cfg, topo, PlanTargets(p99_ms=target))
    assert p.num_shards > 1
    assert p.cost.p99_ms <= target
    assert "out" in _steps(p)


def test_cpu_deployment_keeps_everything_in_host_dram():
    p = plan(IndexModelConfig(items=1_000_000, dim=64), make_topology("cpu"))
    st = p.devices[0].storage
    assert st.sram == 0 and st.hbm == 0 and st.remote == 0
    assert st.dram == sum(t.nbytes for t in p.inventory)


def test_shards_cover_all_lists_and_assignments_are_unique():
    p = plan(IndexModelConfig(items=1_000_000_000, dim=256),
             make_topology("h100-80g", hosts=64, gpus_per_host=8), PlanTargets(qps=50_000))
    assert p.shards[0].list_start == 0 and p.shards[-1].list_end == p.nlist
    for a, b in zip(p.shards, p.shards[1:], strict=False):
        assert a.list_end == b.list_start
    assert sum(s.fraction for s in p.shards) == pytest.approx(1.0)
    pairs = {(a.shard, a.replica) for a in p.assignments}
    slots = {(a.host, a.gpu) for a in p.assignments}
    assert len(pairs) == len(slots) == p.num_shards * p.replicas == len(p.assignments)
    assert all(a.host < p.hosts_used and a.gpu < 8 for a in p.assignments)


def test_memory_infeasible_error_carries_numbers_and_remedies():
    with pytest.raises(InfeasiblePlanError) as ei:
        plan(IndexModelConfig(items=10_000_000_000, dim=256),
             make_topology("h100-80g", hosts=1, gpus_per_host=8))
    e = ei.value
    assert e.reason == "memory" and e.needed > e.available and len(e.remedies) >= 4


def test_qps_infeasible_when_hosts_run_out():
    topo = make_topology("h100-80g", hosts=2, gpus_per_host=1)
    one = plan(IndexModelConfig(items=100_000_000, dim=128), topo)
    with pytest.raises(InfeasiblePlanError) as ei:
        plan(IndexModelConfig(items=100_000_000, dim=128), topo,
             PlanTargets(qps=10 * one.cost.qps_per_replica))
    assert ei.value.reason == "qps"


def test_latency_infeasible():
    with pytest.raises(InfeasiblePlanError) as ei:
        plan(IndexModelConfig(items=1_000_000, dim=64), make_topology("l4-24g", hosts=1),
             PlanTargets(p99_ms=0.01))
    assert ei.value.reason == "latency"


def test_cost_memory_time_is_bytes_over_bandwidth():
    topo = make_topology("h100-80g")
    cfg = IndexModelConfig(items=1000, dim=8, nlist=10, nprobe=1, tower_params=0, cache_dim=0)
    c = estimate_cost(
        topo=topo, cfg=cfg, shard_fraction=1.0, num_shards=1,
        placements=[Placement(name="x", tier=MemoryTier.HBM, nbytes=1, bytes_per_query=1e6)],
    )
    assert c.memory_s == pytest.approx(16 * 1e6 / (3.35e12 * MEMORY_EFFICIENCY))
    assert c.bytes_per_tier["hbm"] == pytest.approx(16e6)


def test_planning_1b_x_256_on_256_hosts_takes_under_2_seconds():
    t0 = time.perf_counter()
    p = plan(IndexModelConfig(items=1_000_000_000, dim=256),
             make_topology("h100-80g", hosts=256, gpus_per_host=8),
             PlanTargets(qps=200_000, p99_ms=100))
    elapsed = time.perf_counter() - t0
    assert p.gpus <= 256 * 8
    assert elapsed < 2.0


def test_denser_cold_tail_never_takes_the_scan_paths_hbm():
    from sterling.planner import (
        AccessPattern,
        DeviceKind,
        Storage,
        TensorRole,
        TensorSpec,
        place_on_device,
    )

    codes = TensorSpec(name="codes", nbytes=60, bytes_per_query=1.0, access=AccessPattern.PROBED,
                       role=TensorRole.SHARDED, scan_path=True)
    ids = TensorSpec(name="ids", nbytes=60, bytes_per_query=30.0, access=AccessPattern.GATHERED,
                     role=TensorRole.SHARDED)
    placements, overflow = place_on_device(
        [codes, ids], Storage(hbm=100, dram=1000), kind=DeviceKind.GPU,
    )
    got = {(p.name, p.tier): p.nbytes for p in placements}
    assert overflow == {}
    assert got == {("codes", MemoryTier.HBM): 60, ("ids", MemoryTier.HBM): 40,
                   ("ids", MemoryTier.DRAM): 20}
