"""Catalog input (Parquet, .npy) and the `sterling build` / `query` / `demo` commands."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from sterling.launch.cli import main
from sterling.model import IndexConfig, RetrievalModel, build_index
from sterling.model.catalog import open_catalog
from sterling.model.errors import InvalidInputError
from sterling.model.synthetic import synthetic_catalog


@pytest.fixture(scope="module")
def parquet_catalog(tmp_path_factory):
    c = synthetic_catalog(3000, 16, seed=9)
    path = tmp_path_factory.mktemp("cat") / "catalog.parquet"
    attrs = [c.attributes.terms_of(i) for i in range(3000)]
    table = pa.table(
        {
            "id": pa.array(c.ids.numpy()),
            "embedding": pa.array(list(c.embeddings.numpy()), type=pa.list_(pa.float32())),
            "attributes": pa.array(attrs, type=pa.list_(pa.string())),
        }
    )
    pq.write_table(table, path, row_group_size=700)
    return c, path, attrs


def test_parquet_build_equals_in_memory_build(parquet_catalog):
    c, path, attrs = parquet_catalog
    cfg = IndexConfig(nlist=16, chunk_size=500)
    a = build_index(open_catalog(path), config=cfg)
    b = build_index(c.embeddings, ids=c.ids, attributes=attrs, config=cfg)
    for name, t in a.tensors().items():
        assert torch.equal(t, b.tensors()[name]), name
    assert a.vocab == b.vocab


def test_npy_catalog_is_memory_mapped(tmp_path):
    x = np.random.default_rng(0).standard_normal((500, 8)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "ids.npy", np.arange(500) * 3)
    src = open_catalog(tmp_path / "x.npy", ids_path=tmp_path / "ids.npy")
    assert isinstance(src._emb, np.memmap)
    index = build_index(src, config=IndexConfig(nlist=4, metric="cosine"))
    _, ids = index.search(torch.from_numpy(x[:3]), k=1, nprobe=4)
    assert ids[:, 0].tolist() == [0, 3, 6]


def test_parquet_with_a_wrong_length_embedding_names_the_row(tmp_path):
    path = tmp_path / "bad.parquet"
    pq.write_table(pa.table({"id": [1, 2, 3], "embedding": [[1.0, 2.0], [1.0, 2.0], [1.0]]}), path)
    with pytest.raises(InvalidInputError, match="row 2"):
        build_index(open_catalog(path), config=IndexConfig(nlist=1))


def test_cli_build_then_query(parquet_catalog, tmp_path, capsys):
    c, path, attrs = parquet_catalog
    out = tmp_path / "model.st"
    assert main(["build", "--catalog", str(path), "--out", str(out), "--nlist", "16"]) == 0
    model = RetrievalModel.load(out)
    assert model.index.num_items == 3000
    np.save(tmp_path / "q.npy", c.embeddings[5].numpy())
    capsys.readouterr()
    rc = main(["query", "--model", str(out), "--k", "5", "--vector", str(tmp_path / "q.npy"), "--where", "NOT policy:blocked", "--json"])
    assert rc == 0
    res = json.loads(capsys.readouterr().out.strip())["results"]
    assert len(res) == 5
    assert all("policy:blocked" not in attrs[r["id"] - int(c.ids[0])] for r in res)
    rc = main(["query", "--model", str(out), "--k", "3", "--like", str(int(c.ids[7])), "--json"])
    assert rc == 0 and json.loads(capsys.readouterr().out)["results"][0]["id"] == int(c.ids[7])


def test_cli_reports_bad_input_cleanly(tmp_path, capsys):
    assert main(["build", "--catalog", str(tmp_path / "nope.parquet"), "--out", str(tmp_path / "m.st")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert not (tmp_path / "m.st").exists()


def test_demo_command_prints_its_table(capsys):
    rc = main(["demo", "--items", "20000", "--dim", "16", "--queries", "50", "--nlist", "64", "--no-learned"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "recall@100" in out and "VIOLATION" not in out and "bit-identical results: yes" in out
