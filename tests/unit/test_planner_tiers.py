"""Planner tiers from an artifact's real lists; `sterling plan --model` JSON/plot; `sterling retier`."""

from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sterling.launch import cli
from sterling.model import IndexConfig, ItemIndex, build_index
from sterling.model.artifact import read_artifact
from sterling.planner import IndexModelConfig, MemoryTier, PlanTargets, make_topology, plan
from sterling.planner.io import load_plan
from sterling.planner.tiers import ListStats, split_lists


def _stats(sizes, freq):
    sizes = np.asarray(sizes, dtype=np.int64)
    return ListStats(bytes_by_tensor={"codes": sizes * 64, "scales": sizes * 4},
                     probe_freq=np.asarray(freq, dtype=np.float64), nprobe=2, always=1000)


@given(st.lists(st.tuples(st.integers(0, 5000), st.floats(0, 1)), min_size=1, max_size=40),
       st.integers(0, 10**6))
@settings(max_examples=60, deadline=None)
def test_split_fits_the_budget_and_no_colder_list_displaces_a_hotter_one_that_fits(lists, budget):
    sizes, freq = zip(*lists)
    s = _stats(sizes, freq)
    sp = split_lists(s, budget, cold_window=0)
    lb = s.list_bytes
    room = lb + 2 * 4096 * 2  # the planner keeps page room per list and tensor
    assert int(room[sp.fast].sum()) <= budget
    # every slow list hotter than some fast list did not fit in what was left when it was considered
    for i in np.flatnonzero(~sp.fast):
        hotter_or_equal_fast = sp.fast & ((s.probe_freq > s.probe_freq[i]) |
                                          ((s.probe_freq == s.probe_freq[i]) & (np.arange(s.nlist) < i)))
        assert int(room[hotter_or_equal_fast].sum()) + int(room[i]) > budget
    # ranges partition the lists; bytes per tier add up per tensor
    covered = np.concatenate([np.arange(r.start, r.end) for r in sp.ranges])
    np.testing.assert_array_equal(covered, np.arange(s.nlist))
    for r in sp.ranges:
        assert (r.tier is MemoryTier.DRAM) == bool(sp.fast[r.start])
        assert r.nbytes == int(lb[r.start:r.end].sum())
    for name, b in s.bytes_by_tensor.items():
        assert sum(sp.bytes_by_tensor[name].values()) == int(b.sum())
    assert sp.fast_pages_bytes >= int(lb[sp.fast].sum())


@pytest.fixture(scope="module")
def artifact(tmp_path_factory, small_catalog):
    c = small_catalog
    path = tmp_path_factory.mktemp("plan_tiers") / "m.st"
    build_index(c.embeddings, ids=c.ids, attributes=c.attributes, config=IndexConfig(nlist=64)).save(path)
    return path


def test_plan_from_an_artifact_splits_lists_instead_of_adding_hosts(artifact, tmp_path):
    from sterling.model.tiers import artifact_list_stats

    d = artifact_list_stats(artifact)
    assert d["measured"]
    stats = ListStats(bytes_by_tensor=d["bytes_by_tensor"], probe_freq=d["probe_freq"], nprobe=d["nprobe"],
                      always=d["always"])
    total = int(stats.list_bytes.sum())
    cfg = IndexModelConfig(items=20_000, dim=32, nlist=64, nprobe=8, k0=10, attrs_per_item=0, cache_dim=0,
                           tower_params=0)
    topo = make_topology("cpu", host_dram_bytes=int((total // 2 + (1 << 20)) / 0.8))
    p = plan(cfg, topo, PlanTargets(p99_ms=None), list_stats=stats, cold_window=1 << 20)
    assert p.num_shards == 1
    split = p.devices[0].tiers
    assert 0 < split["fast_lists"] < 64
    assert p.devices[0].storage.mmap > 0 and p.devices[0].storage.dram > 0
    # the fast lists are the most probed per byte budget: their probe share beats their byte share
    fast = np.array([c == "1" for c in split["fast"]])
    probe_share = stats.probe_freq[fast].sum() / stats.probe_freq.sum()
    byte_share = stats.list_bytes[fast].sum() / total
    assert probe_share >= byte_share
    assert p.cost.bytes_per_tier["mmap"] > 0
    assert any("tiers by probe frequency" in x.message for x in p.decisions)


def test_plan_json_records_tier_and_bytes_per_tensor_and_list_range_and_plots_it(artifact, tmp_path):
    out, png = tmp_path / "plan.json", tmp_path / "plan.png"
    size = artifact.stat().st_size
    assert cli.main(["plan", "--model", str(artifact), "--gpu", "cpu", "--host-dram-gb", f"{(size / 2 + 2**20) / 0.8e9:.6f}",
                     "--cold-window-mb", "1", "--k0", "10", "--p99-ms", "0", "--out", str(out), "--plot", str(png), "--quiet"]) == 0
    raw = json.loads(out.read_text())
    tiers = raw["devices"][0]["tiers"]
    assert set(tiers["tensors"]) >= {"codes", "scales", "bloom", "item_ids", "attr_ids", "attr_offsets"}
    h, tensors = read_artifact(artifact, verify=False)
    for name, by_tier in tiers["tensors"].items():
        assert sum(by_tier.values()) == tensors[name].numel() * tensors[name].element_size()
    assert {r["tier"] for r in tiers["ranges"]} == {"dram", "mmap"}
    assert sum(r["end"] - r["start"] for r in tiers["ranges"]) == 64
    assert load_plan(out).devices[0].tiers == tiers  # survives the round trip
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_retier_writes_the_plans_split_atomically_and_the_data_is_unchanged(artifact, tmp_path, small_catalog):
    out = tmp_path / "plan.json"
    size = artifact.stat().st_size
    assert cli.main(["plan", "--model", str(artifact), "--gpu", "cpu", "--host-dram-gb", f"{(size / 3 + 2**20) / 0.8e9:.6f}",
                     "--cold-window-mb", "1", "--p99-ms", "0", "--out", str(out), "--quiet"]) == 0
    copy = tmp_path / "m.st"
    copy.write_bytes(artifact.read_bytes())
    assert cli.main(["retier", "--model", str(copy), "--plan", str(out)]) == 0
    assert sorted(f.name for f in tmp_path.iterdir()) == ["m.st", "plan.json"]  # no temp file left
    want = np.array([c == "1" for c in load_plan(out).devices[0].tiers["fast"]])
    t = ItemIndex.load(copy)
    np.testing.assert_array_equal(t.tiering.fast, want)
    _, a = read_artifact(artifact)
    _, b = read_artifact(copy)
    assert a.keys() == b.keys() and all(bool((a[n] == b[n]).all()) for n in a)
    base = ItemIndex.load(artifact)
    xq = small_catalog.embeddings[:9]
    for where in (None, "lang:en"):
        sa, ia = t.search(xq, k=10, where=where)
        sb, ib = base.search(xq, k=10, where=where)
        assert np.array_equal(sa.numpy(), sb.numpy()) and np.array_equal(ia.numpy(), ib.numpy())
    assert cli.main(["retier", "--model", str(copy), "--all", "slow"]) == 0
    assert not ItemIndex.load(copy).tiering.fast.any()


def test_retier_rejects_a_plan_without_a_split_or_for_other_lists(artifact, tmp_path, capsys):
    other = tmp_path / "other.json"
    assert cli.main(["plan", "--items", "1M", "--dim", "32", "--gpu", "cpu", "--out", str(other), "--quiet"]) == 0
    copy = tmp_path / "m.st"
    copy.write_bytes(artifact.read_bytes())
    assert cli.main(["retier", "--model", str(copy), "--plan", str(other)]) == 2
    assert "sterling plan --model" in capsys.readouterr().err
    assert cli.main(["retier", "--model", str(copy), "--fast-mb", "-1"]) == 2
    assert copy.read_bytes() == artifact.read_bytes()


def test_retier_records_the_plans_slow_advice_and_load_applies_it(artifact, tmp_path, small_catalog):
    """A profile whose single-page fault is far cheaper than a read-around window: the plan picks
    MADV_RANDOM for the slow tier, `retier --plan` records it, and loading applies it."""
    from sterling.planner.profile import MachineProfile

    prof = tmp_path / "profile.json"
    MachineProfile(threads=2, batch=16, overhead_s=1e-4, scan_bytes_per_s=float("inf"), int8_ops_per_s=3e10,
                   mmap_cold_bw=1e8, mmap_read_s=0.0, page_cache_bw=1e10, model=2, list_s=1e-6, direct_s=1e-9,
                   group_s=1e-9, dequant_s=1e-9, probe_s=1e-9, readaround_before=4 << 20, readaround_after=4 << 20,
                   fault_s=5e-3, mmap_touch_bw=1e10, random_fault_s=1e-7).save(prof)
    out = tmp_path / "plan.json"
    size = artifact.stat().st_size
    assert cli.main(["plan", "--model", str(artifact), "--gpu", "cpu", "--host-dram-gb", f"{(size / 3 + 2**20) / 0.8e9:.6f}",
                     "--cold-window-mb", "1", "--p99-ms", "0", "--profile", str(prof), "--out", str(out), "--quiet"]) == 0
    tiers = load_plan(out).devices[0].tiers
    assert tiers["slow_advice"] == "random" and tiers["slow_lists"] > 0
    copy = tmp_path / "m.st"
    copy.write_bytes(artifact.read_bytes())
    assert cli.main(["retier", "--model", str(copy), "--plan", str(out)]) == 0
    t = ItemIndex.load(copy)
    assert t.tiering.advice == "random"
    base = ItemIndex.load(artifact)
    xq = small_catalog.embeddings[:9]
    sa, ia = t.search(xq, k=10)
    sb, ib = base.search(xq, k=10)
    assert np.array_equal(sa.numpy(), sb.numpy()) and np.array_equal(ia.numpy(), ib.numpy())
