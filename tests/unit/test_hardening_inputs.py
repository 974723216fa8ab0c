"""Every bad input of the catalog, the build, the CLI and the launch checks is a typed error.

Each test asserts the error TYPE (and, where the limit is the point, the
value and limit the error carries). docs/reliability.md links each row of
its input-validation matrix to one of these tests.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from sterling.cluster.errors import ClusterConfigError
from sterling.model import IndexConfig, RetrievalModel, build_index
from sterling.model.catalog import load_query_vectors, open_catalog
from sterling.model.errors import (
    ArtifactError,
    CatalogFormatError,
    InvalidInputError,
    LimitExceededError,
    MissingColumnError,
    NonFiniteError,
    SterlingError,
    TooManyAttributesError,
)

D = 8


def _emb(n: int) -> list[list[float]]:
    g = np.random.default_rng(0)
    return g.standard_normal((n, D)).astype(np.float32).tolist()


def _parquet(path: Path, **cols) -> Path:
    pq.write_table(pa.table(cols), path)
    return path


@pytest.fixture(scope="module")
def model_path(tmp_path_factory) -> Path:
    x = torch.randn(400, D, generator=torch.Generator().manual_seed(1))
    idx = build_index(x, attributes=[["lang:en"]] * 400, config=IndexConfig(nlist=8))
    p = tmp_path_factory.mktemp("m") / "model.st"
    RetrievalModel(idx).save(p)
    return p


def _cli(argv: list[str]):
    """Run a subcommand's function directly so the typed error propagates (main() would print it)."""
    from sterling.launch.cli import build_parser

    args = build_parser().parse_args(argv)
    return args.func(args)


# --- catalog columns and file formats -------------------------------------------------------------


@pytest.mark.parametrize("id_name", [None, "item_id", "ID"])
def test_catalog_without_an_id_column_is_refused_not_numbered_0_to_n(tmp_path, id_name):
    cols = {"embedding": pa.array(_emb(20), type=pa.list_(pa.float32()))}
    if id_name:
        cols[id_name] = pa.array(np.arange(100, 120), type=pa.int64())
    p = _parquet(tmp_path / "c.parquet", **cols)
    with pytest.raises(MissingColumnError):
        open_catalog(p)
    with pytest.raises(MissingColumnError):
        build_index(p, config=IndexConfig(nlist=2))


def test_catalog_without_an_embedding_column(tmp_path):
    p = _parquet(tmp_path / "c.parquet", id=pa.array([1, 2], type=pa.int64()))
    with pytest.raises(MissingColumnError):
        open_catalog(p)


@pytest.mark.parametrize("content", [b"", b"hello, not parquet", b"PAR1" + b"\0" * 64])
def test_empty_or_non_parquet_file(tmp_path, content):
    p = tmp_path / "c.parquet"
    p.write_bytes(content)
    with pytest.raises(CatalogFormatError):
        open_catalog(p)


@pytest.mark.parametrize("content", [b"", b"not numpy at all"])
def test_empty_or_non_npy_catalog(tmp_path, content):
    p = tmp_path / "c.npy"
    p.write_bytes(content)
    with pytest.raises(CatalogFormatError):
        open_catalog(p)


def test_pickled_object_npy_is_never_unpickled(tmp_path):
    p = tmp_path / "c.npy"
    np.save(p, np.array([{"x": 1}, None], dtype=object), allow_pickle=True)
    with pytest.raises(CatalogFormatError):
        open_catalog(p)


def test_catalog_path_is_a_directory(tmp_path):
    with pytest.raises(CatalogFormatError):
        open_catalog(tmp_path)


def test_null_embedding_row_names_the_row(tmp_path):
    emb = _emb(30)
    emb[17] = None
    p = _parquet(tmp_path / "c.parquet", id=pa.array(np.arange(30), type=pa.int64()),
                 embedding=pa.array(emb, type=pa.list_(pa.float32())))
    with pytest.raises(NonFiniteError, match="17"):
        build_index(p, config=IndexConfig(nlist=2))


def test_null_value_inside_an_embedding(tmp_path):
    emb = _emb(10)
    emb[3][2] = None
    p = _parquet(tmp_path / "c.parquet", id=pa.array(np.arange(10), type=pa.int64()),
                 embedding=pa.array(emb, type=pa.list_(pa.float32())))
    with pytest.raises(NonFiniteError):
        build_index(p, config=IndexConfig(nlist=2))


def test_first_row_null_still_takes_the_dimension_from_a_valid_row(tmp_path):
    emb = _emb(10)
    emb[0] = None
    p = _parquet(tmp_path / "c.parquet", id=pa.array(np.arange(10), type=pa.int64()),
                 embedding=pa.array(emb, type=pa.list_(pa.float32())))
    assert open_catalog(p).dim == D
    with pytest.raises(NonFiniteError, match="row 0"):
        build_index(p, config=IndexConfig(nlist=2))


@pytest.mark.parametrize(
    "column, values",
    [
        ("attributes", pa.array(["lang:en"] * 10)),  # a plain string, not a list
        ("embedding", pa.array([["a", "b"]] * 10)),  # strings, not floats
        ("id", pa.array([f"x{i}" for i in range(10)])),  # string ids
    ],
)
def test_wrong_column_types(tmp_path, column, values):
    cols = {"id": pa.array(np.arange(10), type=pa.int64()),
            "embedding": pa.array(_emb(10), type=pa.list_(pa.float32()))}
    cols[column] = values
    p = _parquet(tmp_path / "c.parquet", **cols)
    with pytest.raises(CatalogFormatError):
        open_catalog(p)


def test_array_source_rejects_non_numeric_embeddings_and_ids():
    with pytest.raises(InvalidInputError):
        build_index([["a", "b"], ["c", "d"]], config=IndexConfig(nlist=1))
    with pytest.raises(InvalidInputError):
        build_index(np.array([["a", "b"]] * 4), config=IndexConfig(nlist=1))
    with pytest.raises(InvalidInputError):
        build_index(torch.randn(4, D), ids=np.array([0.5, 1.5, 2.5, 3.5]), config=IndexConfig(nlist=1))


def test_parquet_catalog_with_ids_beside_it_is_refused(tmp_path):
    p = _parquet(tmp_path / "c.parquet", id=pa.array(np.arange(4), type=pa.int64()),
                 embedding=pa.array(_emb(4), type=pa.list_(pa.float32())))
    with pytest.raises(InvalidInputError):
        open_catalog(p, ids_path=tmp_path / "ids.npy")


# --- limits: k, attributes per item ----------------------------------------------------------------


def test_k_is_bounded_by_a_configurable_limit():
    x = torch.randn(300, D, generator=torch.Generator().manual_seed(2))
    idx = build_index(x, config=IndexConfig(nlist=4, max_k=50))
    with pytest.raises(LimitExceededError) as e:
        idx.search(x[:2], k=51)
    assert (e.value.name, e.value.value, e.value.limit) == ("k", 51, 50)
    D_, I_ = idx.search(x[:2], k=50)
    assert I_.shape == (2, 50)
    with pytest.raises(LimitExceededError):
        idx.search(x[:1], k=10**9)  # the Python API: no allocation of 10^9 slots


def test_default_k_limit_holds_for_a_billion(model_path):
    model = RetrievalModel.load(model_path)
    with pytest.raises(LimitExceededError) as e:
        model(query=torch.randn(1, D), k=1_000_000_000)
    assert e.value.limit == IndexConfig().max_k


def test_cli_query_k_limit_and_override(model_path, tmp_path, capsys):
    q = tmp_path / "q.npy"
    np.save(q, np.ones(D, np.float32))
    with pytest.raises(LimitExceededError):
        _cli(["query", "--model", str(model_path), "--vector", str(q), "--k", "1000000000", "--json"])
    assert _cli(["query", "--model", str(model_path), "--vector", str(q), "--k", "300000", "--max-k", "300000", "--nprobe", "8",
                 "--json"]) == 0
    hits = json.loads(capsys.readouterr().out.splitlines()[-1])["results"]
    assert len(hits) == 400  # every item, no more


def test_item_with_ten_thousand_attributes_is_refused_with_the_limit():
    attrs = [["lang:en"]] * 63 + [[f"tag:{i}" for i in range(10_000)]]
    with pytest.raises(TooManyAttributesError) as e:
        build_index(torch.randn(64, D), attributes=attrs, config=IndexConfig(nlist=2))
    assert (e.value.value, e.value.limit) == (10_000, 1024)
    assert isinstance(e.value, LimitExceededError)


def test_raised_attribute_limit_builds_and_measures_fpr_in_bounded_chunks():
    from sterling.model import bloom

    attrs = [["lang:en"]] * 63 + [[f"tag:{i}" for i in range(3000)]]
    idx = build_index(torch.randn(64, D), attributes=attrs,
                      config=IndexConfig(nlist=2, max_attributes_per_item=5000))
    fpr = bloom.measure_fpr(idx, samples=20_000)
    # oracle: the same samples, membership by a plain-Python set per slot
    g = torch.Generator().manual_seed(0)
    live = (idx.item_ids >= 0).nonzero().squeeze(1)
    items = live[torch.randint(0, live.numel(), (20_000,), generator=g)]
    terms = torch.randint(0, len(idx.vocab), (20_000,), generator=g)
    words = bloom.term_words(idx.vocab, idx.bloom_spec)
    sets = [set(idx.attr_ids[int(idx.attr_offsets[i]):int(idx.attr_offsets[i + 1])].tolist())
            for i in range(idx.item_ids.numel())]
    neg = claimed = 0
    for it, t in zip(items.tolist(), terms.tolist()):
        if t not in sets[it]:
            neg += 1
            claimed += bool(((idx.bloom[it] & words[t]) == words[t]).all())
    assert fpr == claimed / neg


# --- artifacts: directories, umask, pickle ----------------------------------------------------------


def test_out_and_model_that_are_directories(tmp_path, model_path):
    from sterling.launch.build_cmd import check_output_path

    with pytest.raises(ArtifactError):
        check_output_path(str(tmp_path))
    with pytest.raises(ArtifactError):
        RetrievalModel.load(model_path).save(tmp_path)
    with pytest.raises(ArtifactError):
        RetrievalModel.load(tmp_path)
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(ArtifactError):
        check_output_path(str(blocker / "sub" / "m.st"))


def test_cli_build_out_directory_fails_before_building(tmp_path):
    cat = tmp_path / "c.npy"
    np.save(cat, np.random.default_rng(0).standard_normal((50, D)).astype(np.float32))
    with pytest.raises(ArtifactError):
        _cli(["build", "--catalog", str(cat), "--out", str(tmp_path)])


def test_artifact_files_get_the_process_umask(tmp_path, model_path):
    model = RetrievalModel.load(model_path)
    old = os.umask(0o027)
    try:
        model.save(tmp_path / "m.st")
    finally:
        os.umask(old)
    assert (tmp_path / "m.st").stat().st_mode & 0o777 == 0o640


def test_no_code_path_unpickles():
    """Artifacts, catalogs and vectors are read without pickle: no pickle import, no torch.load,
    no allow_pickle=True anywhere in the package."""
    root = Path(__file__).resolve().parents[2]
    offenders = []
    for sub in ("model", "cluster", "sharding", "planner", "launch", "kernels"):
        for f in (root / sub).rglob("*.py"):
            text = f.read_text()
            for bad in ("import pickle", "torch.load(", "allow_pickle=True", "cloudpickle", "pickle.load"):
                if bad in text:
                    offenders.append(f"{f.relative_to(root)}: {bad}")
    assert offenders == []


# --- query vectors --------------------------------------------------------------------------------


@pytest.mark.parametrize("name, write", [
    ("v.npy", lambda p: np.save(p, np.array(["a", "b", "c"]))),
    ("v.json", lambda p: p.write_text('["a", "b"]')),
    ("v.json", lambda p: p.write_text("{not json")),
    ("v.json", lambda p: p.write_text("[[1, 2], [3]]")),
    ("v.json", lambda p: p.write_text("[]")),
    ("v.npy", lambda p: p.write_bytes(b"")),
    ("v.txt", lambda p: p.write_text("1 2 3")),
])
def test_vector_files_that_are_not_numbers(tmp_path, name, write):
    p = tmp_path / name
    write(p)
    with pytest.raises(CatalogFormatError):
        load_query_vectors(p)


def test_cli_query_with_string_vector_file(tmp_path, model_path):
    p = tmp_path / "v.npy"
    np.save(p, np.array(["x"] * D))
    with pytest.raises(CatalogFormatError):
        _cli(["query", "--model", str(model_path), "--vector", str(p)])


# --- serving inputs: token files, shard/head artifacts ----------------------------------------------


@pytest.mark.parametrize("content", ["", "   \n\t\n", "short", "two words-abcdefghijklmnop"])
def test_bad_token_files_are_refused(tmp_path, content):
    from sterling.launch.cli import build_parser
    from sterling.launch.serve_cmd import server_config_from_args

    tok = tmp_path / "token"
    tok.write_text(content)
    args = build_parser().parse_args(["serve", "--model", "m.st", "--token-file", str(tok)])
    with pytest.raises(ClusterConfigError) as e:
        server_config_from_args(args)
    for word in content.split():
        assert word not in str(e.value).replace(str(tok), "")  # the secret is never echoed


def test_missing_token_file_and_a_good_one(tmp_path):
    from sterling.cluster.access import read_token_file

    with pytest.raises(ClusterConfigError):
        read_token_file(tmp_path / "nope")
    (tmp_path / "t").write_text("0123456789abcdef0123\n")
    assert read_token_file(tmp_path / "t") == "0123456789abcdef0123"


def test_serve_refuses_a_head_or_shard_artifact(tmp_path, model_path):
    from sterling.cluster.embedded import local_router
    from sterling.launch.serve_cmd import check_servable
    from sterling.sharding.documents import write_shards

    m = write_shards(model_path, tmp_path / "shards", num_shards=2)
    with pytest.raises(InvalidInputError):
        check_servable(str(Path(m.head)))
    with pytest.raises(InvalidInputError):
        check_servable(str(Path(m.shards[0].path)))
    check_servable(str(model_path))  # the whole model is fine
    with pytest.raises(InvalidInputError):
        local_router(Path(m.head))


def test_server_limits_from_the_cli_are_typed_errors():
    from sterling.launch.cli import build_parser
    from sterling.launch.serve_cmd import router_config_from_args, server_config_from_args

    args = build_parser().parse_args(["serve", "--model", "m.st", "--max-k", "0"])
    with pytest.raises(ClusterConfigError):
        router_config_from_args(args)
    for bad in (["--max-queue", "-1"], ["--workers", "0"], ["--port", "70000"], ["--metrics-port", "-2"],
                ["--max-message-mb", "0"]):
        args = build_parser().parse_args(["serve", "--model", "m.st", *bad])
        with pytest.raises(ClusterConfigError):
            server_config_from_args(args)


# --- launch ray: capacity and stale shard files ------------------------------------------------------


def test_more_shard_actors_than_cpus_fails_fast_with_fixes_that_apply():
    from sterling.cluster.ray_backend import check_capacity

    with pytest.raises(ClusterConfigError) as e:
        check_capacity([8.0], [2.0], strategy="PACK", cpus_per_actor=1.0, local=True)
    msg = str(e.value)
    assert "--num-cpus 8" in msg and "--cpus-per-shard 0.25" in msg and "--spread" not in msg
    with pytest.raises(ClusterConfigError) as e:
        check_capacity([2.0, 2.0], [4.0, 1.0], strategy="STRICT_SPREAD", cpus_per_actor=1.0, local=False)
    assert "--num-cpus" not in str(e.value) and "ray start" in str(e.value)
    check_capacity([2.0, 2.0], [2.0, 2.0], strategy="STRICT_SPREAD", cpus_per_actor=1.0)
    check_capacity([3.5], [4.0], strategy="PACK", cpus_per_actor=0.5)


def test_reshard_with_another_count_leaves_no_stale_shard_files(tmp_path, model_path):
    from sterling.launch.launch_cmd import ensure_shards
    from sterling.sharding.documents import read_manifest

    out = tmp_path / "shards"
    ensure_shards(model_path, out, num_shards=4, plan=None, plan_path=None)
    assert len(list(out.glob("shard-*.st"))) == 4
    m = ensure_shards(model_path, out, num_shards=2, plan=None, plan_path=None)
    files = sorted(p.name for p in out.glob("shard-*.st"))
    assert files == sorted(Path(s.path).name for s in m.shards) and len(files) == 2
    assert read_manifest(out).num_shards == 2


# --- CLI surface -----------------------------------------------------------------------------------


def test_version_flag(capsys):
    from sterling.launch.cli import main

    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0
    assert capsys.readouterr().out.startswith("sterling ")


def test_every_option_with_a_default_shows_it_in_help():
    import argparse

    from sterling.launch.cli import _all_parsers, build_parser

    missing = []
    for p in _all_parsers(build_parser()):
        text = p.format_help()
        for a in p._actions:
            d = a.default
            if not a.option_strings or d is None or d is False or d == argparse.SUPPRESS:
                continue
            if a.help is None or "(default:" not in p._get_formatter()._get_help_string(a):
                missing.append(f"{p.prog} {a.option_strings[0]}")
        assert "(default:" in text or not any(
            a.option_strings and a.default not in (None, False, argparse.SUPPRESS) for a in p._actions)
    assert missing == []


def test_cli_main_turns_typed_errors_into_exit_code_2(tmp_path, capsys):
    from sterling.launch.cli import main

    p = tmp_path / "c.parquet"
    p.write_bytes(b"")
    rc = main(["build", "--catalog", str(p), "--out", str(tmp_path / "m.st")])
    assert rc == 2
    err = capsys.readouterr().err
    assert "error" in err and "Traceback" not in err
    assert issubclass(CatalogFormatError, SterlingError)


# --- huge finite values -------------------------------------------------------------------------------


@pytest.mark.parametrize("metric", ["ip", "cosine"])
def test_huge_finite_values_that_would_overflow_scores(metric):
    from sterling.model.config import MAX_ABS_VALUE

    x = torch.randn(200, D, generator=torch.Generator().manual_seed(3))
    idx = build_index(x, config=IndexConfig(nlist=2, metric=metric))
    q = x[:3].clone()
    q[1, 4] = 3e38
    with pytest.raises(LimitExceededError) as e:
        idx.search(q, k=5)
    assert e.value.limit == int(MAX_ABS_VALUE) and "row 1" in str(e.value)
    q[1, 4] = MAX_ABS_VALUE  # at the limit: accepted, and the scores stay finite
    s, _ = idx.search(q, k=5, nprobe=2)
    assert torch.isfinite(s).all()
    xb = x.clone()
    xb[7, 0] = -1e20
    with pytest.raises(LimitExceededError):
        build_index(xb, config=IndexConfig(nlist=2, metric=metric))


@pytest.mark.parametrize("bad", [["--shards", "0"], ["--replicas", "0"], ["--cpus-per-shard", "0"],
                                 ["--threads-per-shard", "0"], ["--ready-timeout", "-1"], ["--num-cpus", "0"],
                                 ["--address", "auto", "--num-cpus", "4"]])
def test_launch_ray_options_are_checked_before_ray_starts(bad):
    from sterling.launch.cli import build_parser
    from sterling.launch.launch_cmd import check_launch_args

    args = build_parser().parse_args(["launch", "ray", "--model", "m.st", *bad])
    with pytest.raises(ClusterConfigError):
        check_launch_args(args)


@pytest.mark.parametrize("bad", [["--items", "0"], ["--k", "0"], ["--nlist", "0"], ["--items", "10", "--k", "11"],
                                 ["--items", "10", "--nlist", "16"], ["--dim", "-1"], ["--queries", "0"]])
def test_demo_sizes_are_checked(bad):
    with pytest.raises(InvalidInputError):
        _cli(["demo", *bad])


def test_json_log_lines_are_one_object_each_without_tracebacks():
    import logging

    from sterling.launch.logs import JsonFormatter

    try:
        raise ValueError("bad\nthing")
    except ValueError:
        import sys

        rec = logging.LogRecord("sterling.x", logging.ERROR, __file__, 1, "failed %s", ("once",), sys.exc_info())
    line = JsonFormatter().format(rec)
    assert "\n" not in line
    d = json.loads(line)
    assert (d["level"], d["logger"], d["msg"]) == ("ERROR", "sterling.x", "failed once")
    assert d["exc"] == "ValueError: bad\nthing" and d["ts"].endswith("Z")
