"""`sterling bench tiers` runs end to end on a tiny catalog: the three layouts and the peer
answer identically (exit 0), and every row carries the planner's prediction next to the figure."""

from __future__ import annotations

import json

from sterling.launch import cli
from sterling.planner.profile import MachineProfile


def test_bench_tiers_reports_all_layouts_with_predictions(tmp_path):
    out = tmp_path / "tiers.json"
    prof = tmp_path / "profile.json"
    MachineProfile(threads=2, batch=16, overhead_s=1e-4, scan_bytes_per_s=3e9, int8_ops_per_s=3e10,
                   mmap_cold_bw=5e8, mmap_read_s=2e-5, page_cache_bw=2e9).save(prof)
    rc = cli.main(["bench", "tiers", "--profile", str(prof), "--items", "4000", "--nlist", "32", "--nprobe", "4", "--queries", "96",
                   "--repeat", "1", "--cache", "warm", "--cold-window-mb", "0.05", "--workdir", str(tmp_path),
                   "--json", str(out)])
    assert rc == 0  # identical answers across layouts
    doc = json.loads(out.read_text())
    rows = {r["config"]: r for r in doc["rows"]}
    assert set(rows) == {"untiered in-memory (peer)", "all fast", "planner split", "all slow"}
    assert doc["summary"]["identical_answers"] is True
    assert rows["all fast"]["fast_lists"] == 32 and rows["all slow"]["fast_lists"] == 0
    assert 0 < rows["planner split"]["fast_lists"] < 32
    for name in ("all fast", "planner split", "all slow"):
        r = rows[name]
        assert r["qps"] > 0 and r["p99_ms"] >= r["p50_ms"] > 0 and r["predicted_batch_ms"] > 0
        assert r["prediction_error_pct"] == round(100 * (r["predicted_batch_ms"] - r["mean_batch_ms"])
                                                  / r["mean_batch_ms"], 1)
    assert doc["summary"]["profile"] == f"profile {prof}"
    assert len({r["recall@10"] for r in rows.values()}) == 1
    assert {rows[n]["slow_advice"] for n in ("all fast", "planner split", "all slow")} == {"normal"}


def test_bench_tiers_serves_each_layout_with_the_imposed_slow_advice(tmp_path):
    """--slow-advice random: every tiered layout is served with MADV_RANDOM (read back from the
    index), priced by the profile's single-page fault cost, and still answers identically (exit 0)."""
    out = tmp_path / "tiers.json"
    prof = tmp_path / "profile.json"
    MachineProfile(threads=2, batch=16, overhead_s=1e-4, scan_bytes_per_s=float("inf"), int8_ops_per_s=3e10,
                   mmap_cold_bw=1e9, mmap_read_s=0.0, page_cache_bw=1e10, model=2, list_s=1e-6, direct_s=1e-9,
                   group_s=1e-9, dequant_s=1e-9, probe_s=1e-9, readaround_before=1 << 20, readaround_after=1 << 20,
                   fault_s=1e-3, mmap_touch_bw=1e10, random_fault_s=5e-5).save(prof)
    rc = cli.main(["bench", "tiers", "--profile", str(prof), "--items", "4000", "--nlist", "32", "--nprobe", "4",
                   "--queries", "64", "--repeat", "1", "--cache", "cold", "--cold-window-mb", "0.05",
                   "--slow-advice", "random", "--workdir", str(tmp_path), "--json", str(out)])
    assert rc == 0
    rows = {r["config"]: r for r in json.loads(out.read_text())["rows"]}
    assert {rows[n]["slow_advice"] for n in ("all fast", "planner split", "all slow")} == {"random"}
    assert rows["all slow"]["predicted_batch_ms"] > rows["all fast"]["predicted_batch_ms"]
