"""Planner value types, inventory arithmetic, plan JSON round trip, import purity."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from sterling.planner import (
    IndexModelConfig,
    MemoryTier,
    Plan,
    PlanTargets,
    SparseTableSpec,
    Storage,
    bloom_bits_per_item,
    inventory_from_config,
    make_topology,
    plan,
)
from sterling.planner.errors import InvalidPlanConfigError, PlanFormatError, PlannerError


def test_storage_arithmetic_reads_like_algebra():
    a = Storage(hbm=10, dram=5)
    b = Storage(sram=1, hbm=3)
    assert a + b == Storage(sram=1, hbm=13, dram=5)
    assert (a + b) - b == a
    assert 2 * a == Storage(hbm=20, dram=10)
    assert a.total == 15
    assert a.get(MemoryTier.DRAM) == 5
    assert a.fits_in(Storage(hbm=10, dram=5))
    assert not a.fits_in(Storage(hbm=9, dram=100))
    assert Storage.from_dict(a.to_dict()) == a


def test_bloom_width_from_target_fpr_rounds_to_words():
    # m = -10 ln(1e-3) / ln(2)^2 = 143.8 bits -> 3 words of 64 = 192 bits = 24 bytes
    assert bloom_bits_per_item(10, 1e-3) == 192
    # 4 attributes: 57.5 bits -> 64
    assert bloom_bits_per_item(4, 1e-3) == 64
    assert bloom_bits_per_item(0) == 0


def test_inventory_bytes_match_the_index_layout():
    n, d = 100_000_000, 128
    inv = {t.name: t for t in inventory_from_config(IndexModelConfig(items=n, dim=d))}
    nlist = 40_000  # 4 * sqrt(1e8)
    assert inv["codes"].nbytes == 12_800_000_000  # int8 [N, D]
    assert inv["scales"].nbytes == n * 4
    assert inv["item_ids"].nbytes == n * 8
    assert inv["alive"].nbytes == n // 8
    assert inv["bloom"].nbytes == n * 24
    assert inv["attr_ids"].nbytes == n * 10 * 4
    assert inv["attr_offsets"].nbytes == (n + 1) * 8
    assert inv["centroids"].nbytes == nlist * d * 4
    assert inv["list_offsets"].nbytes == (nlist + 1) * 8
    assert inv["embedding_cache"].nbytes == n * d * 2  # fp16, cache_dim defaults to dim
    # a query scans nprobe/nlist of the codes: 12.8e9 * 32 / 40000
    assert inv["codes"].bytes_per_query == pytest.approx(10_240_000)
    # centroids are read once per batch of 16
    assert inv["centroids"].bytes_per_query == pytest.approx(nlist * d * 4 / 16)
    # ids: K0 = 10k random 8-byte reads, each a 32-byte sector
    assert inv["item_ids"].bytes_per_query == 10_000 * 32


def test_int4_codes_halve_and_fp16_codes_drop_scales():
    inv4 = {t.name: t for t in inventory_from_config(IndexModelConfig(items=1000, dim=64, code_bits=4))}
    inv16 = {t.name: t for t in inventory_from_config(IndexModelConfig(items=1000, dim=64, code_bits=16))}
    assert inv4["codes"].nbytes == 1000 * 32
    assert inv16["codes"].nbytes == 1000 * 128
    assert "scales" not in inv16


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(items=0, dim=8),
        dict(items=100, dim=0),
        dict(items=100, dim=8, nlist=10, nprobe=11),
        dict(items=100, dim=8, code_bits=3),
        dict(items=100, dim=8, nlist=101),
    ],
)
def test_bad_config_raises_typed_error(kwargs):
    with pytest.raises(InvalidPlanConfigError):
        IndexModelConfig(**kwargs)


def test_planner_errors_are_sterling_errors():
    from sterling.model.errors import SterlingError

    assert issubclass(PlannerError, SterlingError)
    assert issubclass(InvalidPlanConfigError, PlannerError)


def _sample_plan() -> Plan:
    cfg = IndexModelConfig(
        items=300_000_000, dim=128, nlist=20_000,
        sparse_tables=(SparseTableSpec(name="user_id", num_embeddings=1000, embedding_dim=16),),
    )
    topo = make_topology("a100-40g", hosts=8)
    return plan(cfg, topo, PlanTargets(qps=5000), plan_sparse=True)


def test_plan_json_round_trip_is_exact():
    p = _sample_plan()
    text = p.to_json()
    q = Plan.from_json(text)
    assert q == p
    assert q.to_json() == text
    d = json.loads(text)
    assert d["format_version"] == 1
    assert d["num_shards"] == p.num_shards and d["replicas"] == p.replicas
    assert {"list_start", "list_end", "fraction", "items"} <= set(d["shards"][0])


def test_plan_json_with_wrong_version_or_fields_is_rejected():
    d = json.loads(_sample_plan().to_json())
    with pytest.raises(PlanFormatError):
        Plan.from_dict({**d, "format_version": 99})
    bad = dict(d)
    del bad["shards"]
    with pytest.raises(PlanFormatError):
        Plan.from_dict(bad)
    with pytest.raises(PlanFormatError):
        Plan.from_json("{not json")


def test_importing_and_running_the_planner_pulls_in_no_model_torch_or_cluster():
    code = (
        "import sys\n"
        "from sterling.planner import *\n"
        "from sterling.planner import plan, IndexModelConfig, make_topology, PlanTargets\n"
        "p = plan(IndexModelConfig(items=10**9, dim=256), make_topology('h100-80g', hosts=64),"
        " PlanTargets(qps=20000))\n"
        "bad = [m for m in sys.modules if m.split('.')[0] in ('torch', 'ray', 'grpc', 'torchrec')"
        " or m.startswith('sterling.model')]\n"
        "print(','.join(bad))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""
