"""`sterling plan`: help, plan.json, plot, clean typed failures."""

from __future__ import annotations

import argparse

import pytest

from sterling.launch import cli
from sterling.launch.plan_cmd import parse_count
from sterling.planner.io import load_plan


def test_plan_help_lists_the_options(capsys):
    with pytest.raises(SystemExit) as ei:
        cli.main(["plan", "--help"])
    assert ei.value.code == 0
    out = capsys.readouterr().out
    for opt in ("--items", "--dim", "--gpu", "--gpus-per-host", "--max-hosts", "--qps",
                "--p99-ms", "--nlist", "--nprobe", "--k0", "--sparse-tables", "--model",
                "--out", "--plot"):
        assert opt in out


@pytest.mark.parametrize(
    "text,value",
    [("500M", 500_000_000), ("1B", 10**9), ("100k", 100_000), ("1e9", 10**9), ("1_000", 1000)],
)
def test_counts_accept_suffixes(text, value):
    assert parse_count(text) == value


@pytest.mark.parametrize("text", ["", "abc", "0", "1.5"])
def test_bad_counts_are_rejected(text):
    with pytest.raises(argparse.ArgumentTypeError):
        parse_count(text)


def test_plan_writes_json_and_plot(tmp_path, capsys):
    out, png = tmp_path / "plan.json", tmp_path / "plan.png"
    rc = cli.main([
        "plan", "--items", "500M", "--dim", "128", "--gpu", "h100-80g", "--gpus-per-host", "8",
        "--qps", "20000", "--p99-ms", "100", "--out", str(out), "--plot", str(png),
    ])
    assert rc == 0
    p = load_plan(out)
    assert p.items == 500_000_000 and p.dim == 128
    assert p.cost.qps_total >= 20_000
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not [f for f in tmp_path.iterdir() if f.name.startswith(".")]  # no temp files left
    text = capsys.readouterr().out
    assert "Decisions" in text and "[up]" in text


def test_sparse_tables_yaml_is_planned(tmp_path):
    y = tmp_path / "tables.yaml"
    y.write_text(
        "tables:\n"
        "  - {name: user_id, num_embeddings: 1000000, embedding_dim: 64, pooling_factor: 1}\n"
        "  - {name: page_ids, rows: 50000, dim: 32, pooling: 20, dtype: fp16}\n"
    )
    out = tmp_path / "plan.json"
    rc = cli.main(["plan", "--items", "10M", "--dim", "64", "--sparse-tables", str(y),
                   "--out", str(out), "--quiet"])
    assert rc == 0
    p = load_plan(out)
    assert {t.name for t in p.sparse_tables} == {"user_id", "page_ids"}


def test_infeasible_plan_exits_2_with_remedies(capsys):
    rc = cli.main(["plan", "--items", "10B", "--dim", "256", "--max-hosts", "1", "--quiet"])
    assert rc == 2
    err = capsys.readouterr().err
    assert "Possible solutions" in err


def test_missing_size_is_a_clean_error():
    assert cli.main(["plan", "--dim", "64"]) == 2


def test_model_artifact_inventory_matches_its_header(tmp_path):
    pytest.importorskip("sterling.model.artifact", reason="model artifact format not built yet")
    from sterling.model.artifact import read_header

    from .test_planner_rss import _write_index  # tests/unit is a package

    path, out = tmp_path / "index.st", tmp_path / "plan.json"
    _write_index(path, 20_000, 64)
    assert cli.main(["plan", "--model", str(path), "--gpu", "cpu", "--out", str(out), "--quiet"]) == 0
    p = load_plan(out)
    header = read_header(path)
    assert (p.items, p.dim, p.nlist) == (20_000, 64, 64)
    assert p.devices[0].storage.dram == sum(t["nbytes"] for t in header["tensors"])
