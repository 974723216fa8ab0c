"""`sterling bench cluster` runs end to end (tiny sizes) and reports both sides for 1/2/4 shards,
with router batching off and on (answers equal the in-process model either way)."""

from __future__ import annotations

import json


def test_bench_cluster_reports_router_and_in_process_figures(capsys, tmp_path):
    from sterling.launch.cli import main

    rc = main(["bench", "cluster", "--backend", "local", "--items", "6000", "--dim", "16", "--nlist", "32",
               "--requests", "20", "--concurrency", "2", "--k", "10", "--nprobe", "4",
               "--out", str(tmp_path / "rows.jsonl")])
    assert rc == 0
    rows = [json.loads(x) for x in capsys.readouterr().out.splitlines() if x.startswith("{")]
    assert [(r["shards"], r["batch_wait_ms"]) for r in rows] == [(n, w) for n in (1, 2, 4) for w in (0.0, 20.0)]
    for r in rows:
        assert r["router_qps"] > 0 and r["inprocess_qps"] > 0
        assert r["router_p50_ms"] <= r["router_p99_ms"] and r["ids_equal"] and r["partial"] == 0
    assert len((tmp_path / "rows.jsonl").read_text().splitlines()) == 6
