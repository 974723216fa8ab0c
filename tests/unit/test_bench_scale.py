"""`sterling bench scale --quick` runs end to end (child build and serve processes) and its JSON holds.

Checked against independent facts: bytes per item against the artifact's own header and file size, recall
against a plain NumPy brute force over the catalog on disk and the artifact's own search, the planner's
figures against a direct planner call.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest


def test_bench_scale_quick_prints_a_record_per_size_with_the_planner_beside_it(tmp_path):
    saved, png = tmp_path / "scale.json", tmp_path / "scale.png"
    out = subprocess.run([sys.executable, "-m", "sterling.launch.cli", "bench", "scale", "--quick", "--keep",
                          "--work-dir", str(tmp_path), "--json", str(saved), "--plot", str(png)],
                         capture_output=True, text=True, timeout=240)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "[build]" in out.stderr and "[scale]" in out.stderr  # progress goes to stderr, JSON to stdout
    recs = [json.loads(line) for line in out.stdout.splitlines()]
    (rec,) = [r for r in recs if not r.get("summary")]
    (summary,) = [r for r in recs if r.get("summary")]
    n, k = rec["items"], rec["k"]
    assert summary["items"] == [n] and summary["build_s"] == [rec["build_s"]]

    from sterling.launch.bench_scale import QUICK
    from sterling.model.artifact import read_header
    from sterling.model.index import ItemIndex

    work = next(Path(tmp_path).glob(f"n{n}-*"))
    artifact = work / "index.st"
    assert rec["artifact_bytes"] == artifact.stat().st_size
    nbytes = {t["name"]: t["nbytes"] for t in read_header(artifact)["tensors"]}
    D = QUICK["dim"]
    assert nbytes["codes"] == n * D and nbytes["scales"] == 4 * n and nbytes["item_ids"] == 8 * n
    assert rec["scan_path_bytes_per_item"] == pytest.approx(
        (nbytes["codes"] + nbytes["scales"] + nbytes["item_ids"] + nbytes["bloom"]) / n)
    assert rec["planned_scan_path_bytes_per_item"] == pytest.approx(rec["scan_path_bytes_per_item"])

    # recall: brute force in NumPy over the catalog file, and the artifact's own answers
    xb = np.load(work / "catalog" / "embeddings.npy")
    xq = np.load(work / "queries.npy")
    truth = np.argsort(-(xq @ xb.T), axis=1, kind="stable")[:, :k] + 1_000_000_000
    agree = np.mean([len(set(a) & set(b)) / k for a, b in zip(truth, np.load(work / "truth.npy"))])
    assert agree > 0.999
    index = ItemIndex.load(artifact)
    (srv,) = rec["serve"]
    _, ids = index.search(xq, k=k, nprobe=srv["nprobe"])
    want = np.mean([len(set(a) & set(b)) / k for a, b in zip(truth, ids.numpy())])
    assert srv[f"recall@{k}"] == pytest.approx(want, abs=2e-3)
    assert srv["qps"] > 0 and srv["predicted_qps"] > 0 and rec["exact_qps_peer"] > 0

    # the planner's resident bytes: every list fits the 24 GB host, so the whole index is resident
    assert rec["planned_fast_lists"] == rec["nlist"]
    stored = sum(nbytes.values())  # resident pages are whole 4 KiB pages per list and tensor
    scratch = srv["planned_scan_scratch"]  # + the scan's kept score buffer and block maxima
    assert scratch > 0 and srv["planned_resident_bytes"] == rec["planned_resident_bytes"]
    assert stored + scratch <= rec["planned_resident_bytes"] <= stored + scratch + rec["nlist"] * len(nbytes) * 4096
    assert srv["scan_scratch_kept"] > 0 and srv["rss_index"] > 0
    assert rec["rss_after_load"] - rec["rss_before_load"] > 0.5 * rec["planned_resident_bytes"]
    assert rec["build_peak_rss_bytes"] > 0 and rec["predicted"]["build_s"] > 0

    # --json holds exactly the printed per-size records; --plot drew them; --from-json redraws them
    from sterling.benchmarks.scale import read_records

    assert json.loads(saved.read_text()) == [rec]
    assert read_records(saved) == [rec]
    import matplotlib.image

    assert matplotlib.image.imread(png).shape[2] in (3, 4)
    again = tmp_path / "again.png"
    redraw = subprocess.run([sys.executable, "-m", "sterling.launch.cli", "bench", "scale", "--from-json", str(saved),
                             "--plot", str(again)], capture_output=True, text=True, timeout=120)
    assert redraw.returncode == 0, redraw.stderr[-2000:]
    assert matplotlib.image.imread(again).shape == matplotlib.image.imread(png).shape


def test_scale_records_that_are_not_records_get_a_typed_error_naming_the_file(tmp_path):
    from sterling.benchmarks.scale import read_records
    from sterling.model.errors import InvalidInputError

    bad = tmp_path / "bad.json"
    bad.write_text("not json at all\n")
    with pytest.raises(InvalidInputError, match="bad.json"):
        read_records(bad)
    bad.write_text(json.dumps([{"bench": "ann"}]))
    with pytest.raises(InvalidInputError, match="no per-size"):
        read_records(bad)
    with pytest.raises(InvalidInputError, match="cannot read"):
        read_records(tmp_path / "missing.json")
    printed = tmp_path / "printed.jsonl"  # the JSON lines a run printed on stdout also read back
    printed.write_text("\n".join(json.dumps(r) for r in (
        {"bench": "scale", "items": 10, "serve": []}, {"bench": "scale", "summary": True}, {"bench": "scale",
                                                                                            "items": 5, "serve": []})))
    assert [r["items"] for r in read_records(printed)] == [5, 10]
