"""The benchmarks' shared plotting: recall vs QPS from `bench ann` rows, PNGs written whole."""

from __future__ import annotations

import matplotlib.image
import pytest

from sterling.benchmarks.plots import plot_recall_qps


def _row(nprobe: int, **kw) -> dict:
    return {"case": "unfiltered", "items": 1000, "dim": 8, "nlist": 16, "threads": 2, "batch": 10, "k": 10,
            "nprobe": nprobe, "sterling_qps": 100.0 / nprobe, "faiss_sq8_qps": 50.0 / nprobe,
            "faiss_flat_qps": 20.0 / nprobe, "recall_sterling": 1 - 1 / nprobe, "recall_faiss_sq8": 1 - 1 / nprobe,
            "recall_faiss_flat": 1 - 0.9 / nprobe, **kw}


def test_recall_qps_plot_is_a_png_and_leaves_no_temporary_file(tmp_path):
    rows = [_row(16), {"case": "batch1"}, _row(4), _row(64)]
    out = plot_recall_qps(rows, tmp_path / "sub" / "ann.png")
    assert out == tmp_path / "sub" / "ann.png"
    img = matplotlib.image.imread(out)
    assert img.ndim == 3 and img.shape[0] > 100 and img.shape[1] > 100
    assert sorted(p.name for p in out.parent.iterdir()) == ["ann.png"]


def test_recall_qps_plot_without_unfiltered_rows_says_so_and_writes_nothing(tmp_path, capsys):
    assert plot_recall_qps([{"case": "batch1"}], tmp_path / "ann.png") is None
    assert not (tmp_path / "ann.png").exists()
    assert "no unfiltered rows" in capsys.readouterr().err


@pytest.mark.parametrize("drop", ["faiss_flat"])
def test_recall_qps_plot_draws_only_the_systems_the_run_measured(tmp_path, drop):
    rows = [{k: v for k, v in _row(p).items() if not k.endswith(drop + "_qps")} for p in (4, 16)]
    assert plot_recall_qps(rows, tmp_path / "ann.png").exists()
