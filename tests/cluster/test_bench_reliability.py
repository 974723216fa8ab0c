"""`sterling bench reliability` runs end to end at tiny sizes and reports every figure BENCHMARKS.md records."""

from __future__ import annotations

import json


def test_bench_reliability_reports_fuzz_faults_writes_soak_and_recovery(capsys, tmp_path):
    from sterling.launch.cli import main

    rc = main(["bench", "reliability", "--items", "4000", "--dim", "16", "--nlist", "16", "--fuzz", "150",
               "--soak-seconds", "0.5", "--soak-max-calls", "300", "--writes", "30", "--out", str(tmp_path / "r.jsonl")])
    assert rc == 0
    row = json.loads([x for x in capsys.readouterr().out.splitlines() if x.startswith("{")][-1])
    fz = row["fuzz"]
    assert fz["requests_fuzzed"] == 150 == sum(fz["codes"].values())
    assert fz["crashes"] == 0 and fz["hangs"] == 0 and fz["canary_identical"]
    assert row["faults_injected"] == len(row["faults"]) == 3
    assert all(f["typed_error"] and not f["corrupt_state_served"] for f in row["faults"])
    w = row["writes"]  # sterling serve --data-dir SIGKILLed after half the batches, restarted, read back exactly
    assert w["killed_after_acks"] == w["acknowledged"] == row["writes_acknowledged"] >= 15
    assert w["acknowledged_ids_upserted"] > 0 and w["acknowledged_ids_deleted"] > 0
    assert row["acknowledged_writes_lost"] == w["acknowledged_writes_lost"] == 0
    assert w["deleted_ids_reappeared"] == 0
    s = row["soak"]
    assert s["calls"] == s["admitted"] + s["refused"] and s["other_codes"] == []
    assert s["admitted_p99_ms"] is not None and s["recovery_ms"] is not None
    assert (tmp_path / "r.jsonl").read_text().count("\n") == 1
