"""Machine profile: measured rates replace the planner's CPU constants, term by term."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest

from sterling.planner import IndexModelConfig, make_topology, plan
from sterling.planner.errors import InvalidPlanConfigError
from sterling.planner.profile import MachineProfile, measure_profile
from sterling.planner.tiers import ListStats

PROFILE = MachineProfile(threads=2, batch=16, overhead_s=3e-4, scan_bytes_per_s=2e9, int8_ops_per_s=2e10,
                         mmap_cold_bw=4e8, mmap_read_s=5e-5, page_cache_bw=1.5e9)


def _stats(nlist=64, seed=0):
    rng = np.random.default_rng(seed)
    items = rng.integers(100, 400, nlist)
    freq = rng.random(nlist)
    freq *= 8 / freq.sum()
    return ListStats(bytes_by_tensor={"codes": items * 64, "scales": items * 4, "item_ids": items * 8},
                     probe_freq=freq, nprobe=8, always=4096), items


def test_profile_round_trips_and_a_bad_file_is_a_typed_error(tmp_path):
    PROFILE.save(tmp_path / "p.json")
    assert MachineProfile.load(tmp_path / "p.json") == PROFILE
    (tmp_path / "bad.json").write_text("{\"threads\": 2}")
    with pytest.raises(InvalidPlanConfigError, match="--calibrate"):
        MachineProfile.load(tmp_path / "bad.json")


@pytest.mark.parametrize("readaround", [0.0, 128 << 10])
@pytest.mark.parametrize("fast_share", [1.0, 0.3, 0.0])
def test_profiled_cpu_latency_is_the_sum_of_the_measured_terms(fast_share, readaround):
    stats, items = _stats()
    cfg = IndexModelConfig(items=int(items.sum()), dim=64, nlist=64, nprobe=8, k0=10, k=10, batch=16,
                           attrs_per_item=0, cache_dim=0, tower_params=0)
    fast = np.random.default_rng(1).random(64) < fast_share
    topo = make_topology("cpu")
    prof = dataclasses.replace(PROFILE, mmap_readaround_bytes=float(readaround))
    p = plan(cfg, topo, list_stats=stats, list_fast=fast, profile=prof)
    c = p.cost
    # oracle: the planner's own bytes per tier and ops, priced at the profile's rates
    from sterling.planner.cost import COMPUTE_EFFICIENCY, batch_compute_ops

    scanned = float(stats.probe_freq @ items)
    ops = batch_compute_ops(cfg, 1.0, scanned)
    from sterling.planner.tiers import slow_reads_per_batch, split_lists

    reads = slow_reads_per_batch(split_lists(stats, 0, fast=fast), stats, batch=16, k=10)
    mapped = c.bytes_per_tier["mmap"]
    if readaround:  # each separate read pulls its read-around window, at most the whole slow tier
        mapped = min(float(stats.list_bytes[~fast].sum()), max(mapped, reads * readaround))
    want = (PROFILE.overhead_s + c.bytes_per_tier["dram"] / PROFILE.scan_bytes_per_s
            + mapped / PROFILE.mmap_cold_bw + reads * PROFILE.mmap_read_s
            + ops["int8"] / PROFILE.int8_ops_per_s + ops["fp32"] / (topo.device.fp32_flops * COMPUTE_EFFICIENCY)
            + ops["fp16"] / (topo.device.fp16_flops * COMPUTE_EFFICIENCY))
    assert math.isclose(c.latency_ms, want * 1e3, rel_tol=1e-9)
    assert (c.bytes_per_tier["mmap"] > 0) == bool((~fast).any())
    base = plan(cfg, topo, list_stats=stats, list_fast=fast)
    assert not math.isclose(base.cost.latency_ms, c.latency_ms)  # the constants were replaced


def test_measure_profile_returns_positive_rates_quickly():
    prof = measure_profile(threads=1, batch=4, items=6000, dim=16, nlist=32, repeat=1, mmap_bytes=8 << 20)
    assert prof.threads == 1 and prof.batch == 4 and prof.cpu
    for v in (prof.scan_bytes_per_s, prof.int8_ops_per_s, prof.mmap_cold_bw, prof.page_cache_bw):
        assert v > 0
    assert prof.overhead_s >= 0 and prof.mmap_read_s >= 0 and np.isfinite(prof.fit_error)
    assert prof.random_fault_s >= 0 and np.isfinite(prof.random_fault_s)  # 0 where eviction is impossible (tmpfs)
