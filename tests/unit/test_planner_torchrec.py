"""TorchRec bridge: sparse user tables planned by EmbeddingShardingPlanner on our topology."""

from __future__ import annotations

import pytest

from sterling.planner import (
    IndexModelConfig,
    MemoryTier,
    PlanTargets,
    SparseTableSpec,
    make_topology,
    plan,
)
from sterling.planner.torchrec_bridge import KERNEL_TIERS, plan_sparse_tables, torchrec_available

needs_torchrec = pytest.mark.skipif(not torchrec_available(), reason="torchrec not installed")

SMALL = SparseTableSpec(name="user_id", num_embeddings=1_000_000, embedding_dim=64, pooling_factor=1)
PAGES = SparseTableSpec(name="pages", num_embeddings=200_000, embedding_dim=32, pooling_factor=20)


def _sparse_bytes(p, tier: MemoryTier) -> int:
    return sum(x.nbytes for d in p.devices for x in d.placements
               if x.name.startswith("sparse.") and x.tier is tier)


@needs_torchrec
def test_torchrec_plans_small_tables_into_hbm_and_reports_stats():
    cfg = IndexModelConfig(items=10_000_000, dim=64, sparse_tables=(SMALL, PAGES))
    p = plan(cfg, make_topology("h100-80g", hosts=1, gpus_per_host=2), PlanTargets())
    assert {t.name for t in p.sparse_tables} == {"user_id", "pages"}
    assert all(t.planner == "torchrec" for t in p.sparse_tables)
    assert all(t.compute_kernel in KERNEL_TIERS for t in p.sparse_tables)
    # plenty of HBM left: the weights live in HBM (TorchRec may add IO buffers on top)
    assert _sparse_bytes(p, MemoryTier.HBM) >= SMALL.nbytes + PAGES.nbytes
    assert p.sparse_stats  # TorchRec's own stats table, captured
    assert p.decisions[-1].step == "sparse"


@needs_torchrec
def test_table_larger_than_leftover_hbm_goes_to_host_dram_via_uvm():
    # 60M x 128 fp32 = 30.7 GB; an L4 has 21.6 GB usable and the index takes some
    big = SparseTableSpec(name="big", num_embeddings=60_000_000, embedding_dim=128)
    cfg = IndexModelConfig(items=10_000_000, dim=64, sparse_tables=(big,))
    p = plan(cfg, make_topology("l4-24g", hosts=1, gpus_per_host=1), PlanTargets())
    (t,) = p.sparse_tables
    assert t.compute_kernel in ("fused_uvm", "fused_uvm_caching")
    assert _sparse_bytes(p, MemoryTier.DRAM) > 0


def test_greedy_fallback_without_torchrec():
    cfg = IndexModelConfig(items=10_000_000, dim=64, sparse_tables=(SMALL, PAGES))
    base = plan(cfg, make_topology("h100-80g", hosts=1, gpus_per_host=2), plan_sparse=False)
    result = plan_sparse_tables(
        cfg.sparse_tables, topo=base.topology, devices=base.devices, batch=cfg.batch,
        use_torchrec=False,
    )
    assert {t.planner for t in result.tables} == {"sterling"}
    added = sum(d.storage.total for d in result.devices) - sum(d.storage.total for d in base.devices)
    assert added == SMALL.nbytes + PAGES.nbytes
