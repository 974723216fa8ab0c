"""`sterling bench updates --over serve`: a tiny run over real gRPC reports the phases and consistent logs."""

from __future__ import annotations

import json


def test_bench_updates_over_serve_reports_acknowledged_upserts_and_reader_qps(capsys):
    from sterling.launch.cli import main

    rc = main(["bench", "updates", "--over", "serve", "--items", "4000", "--dim", "16", "--nlist", "16",
               "--seconds", "0.5", "--batch", "50", "--grpc-batches", "400", "--shards", "2"])
    assert rc == 0
    rows = [json.loads(x) for x in capsys.readouterr().out.splitlines() if x.startswith("{")]
    assert len(rows) == 1 and rows[0]["over"] == "serve"
    r = rows[0]
    assert r["qps_alone"] > 0 and r["qps_with_writer"] > 0 and r["upserts_per_s_alone"] > 0
    assert r["upserts_per_s_with_reader"] > 0 and r["p99_ms_alone"] > 0
    # every acknowledged request applied one upsert + one delete batch on each of the 2 shards, none lost
    assert r["replica_seqs"] == [2 * r["upsert_requests"]] and r["model_version"] == 1 + 2 * r["upsert_requests"]
