"""`sterling bench e2e --quick` runs end to end (real `sterling serve` and mesh processes) and its JSON holds.

Checked against independent facts, not against itself: the exact answers of
the benchmark equal a full sort over every eligible item (plain-Python
filter evaluator) followed by the model's rerank; both systems reach the
recall the one-process model reaches; the ratio key is the quotient of
the two max-QPS figures it prints.
"""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

pytest.importorskip("torchrec")
pytest.importorskip("faiss")
pytest.importorskip("pyroaring")


@pytest.fixture(scope="module")
def artifact(tiny_model, tmp_path_factory):
    path = tmp_path_factory.mktemp("e2e") / "learned.st"
    tiny_model[0].save(path)
    return path


def test_exact_answers_equal_a_full_sort_over_eligible_items_then_the_rerank(tiny_model):
    from sterling.benchmarks.e2e import WHERES, exact_answers
    from sterling.benchmarks.evaluation import holds
    from sterling.benchmarks.loadgen import request_set
    from sterling.model.filter import parse_filter

    model, _ = tiny_model
    idx = model.index
    reqs = request_set(model.users.ids.numpy(), 15, wheres=WHERES, k=5, k0=40, seed=3)
    got = exact_answers(model, reqs)
    xb = (idx.codes.double() * idx.scales.double()[:, None]).numpy()
    ids, offs = idx.attr_ids.numpy(), idx.attr_offsets.numpy()
    for i, r in enumerate(reqs):
        node = parse_filter(r.where)
        elig = [p for p in range(idx.capacity) if idx.item_ids[p] >= 0 and
                (node is None or holds(node, {idx.vocab[t] for t in ids[offs[p]:offs[p + 1]]}))]
        with torch.no_grad():
            u = model.user_embedding(user_ids=torch.tensor([r.user_id]))
        s = xb[elig] @ u.double().numpy()[0]
        top = np.asarray(elig)[np.argsort(-s, kind="stable")[:40]]
        cand = idx.item_ids[torch.from_numpy(top)][None]
        sc = torch.from_numpy(np.sort(s)[::-1][:40].copy()).float()[None]
        with torch.no_grad():
            want = model.rank(u, sc, cand, 5).ids.numpy()[0]
        np.testing.assert_array_equal(got[i][want >= 0], want[want >= 0])


def test_bench_e2e_quick_prints_steps_and_a_summary_with_the_ratio(artifact, tmp_path):
    out = subprocess.run([sys.executable, "-m", "sterling.launch.cli", "bench", "e2e", "--quick", "--artifact",
                          str(artifact), "--work-dir", str(tmp_path), "--plot", str(tmp_path / "e2e.png")],
                         capture_output=True, text=True, timeout=240)
    assert out.returncode == 0, out.stderr[-3000:]
    recs = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
    steps = [r for r in recs if r["system"] in ("sterling", "mesh")]
    assert {r["system"] for r in steps} == {"sterling", "mesh"}
    for r in steps:
        s = r["step"]
        assert s["ok"] + s["failed"] == s["sent"] and s["cpu_s"] >= 0
    (summary,) = [r for r in recs if r["system"] == "summary"]
    m, s = summary["mesh_max_qps_p99_200ms"], summary["sterling_max_qps_p99_200ms"]
    assert m > 0 and s > 0, summary
    assert summary["qps_ratio_p99_200ms"] == pytest.approx(s / m)
    # same lists, vectors and nprobe: both systems answer what the one-process model answers
    assert summary["agreement_at_k"] == pytest.approx(1.0)
    assert summary["sterling_recall_at_10"] == pytest.approx(summary["mesh_recall_at_10"])
    assert summary["sterling_recall_at_10"] > 0.5
    assert summary["mesh_processes"] == 5 and summary["sterling_processes"] == 1
    assert (tmp_path / "e2e.png").stat().st_size > 1000
