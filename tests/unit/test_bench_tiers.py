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
