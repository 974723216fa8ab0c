"""The chunked, resumable builder: equal to ``build_index`` on the same data, and a build interrupted at any
stage boundary or mid-chunk (raised, or the process killed) resumes to the same artifact bytes."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import sterling.model.build_chunked as bc
from sterling.benchmarks import scale
from sterling.benchmarks.evaluation import exact_topk
from sterling.model import IndexConfig, ItemIndex, build_index
from sterling.model import bloom as bloom_mod
from sterling.model.build_chunked import ResumeMismatchError, build_chunked


@pytest.fixture(scope="module")
def catalog(tmp_path_factory):
    return scale.write_catalog(tmp_path_factory.mktemp("cat") / "c", 9_000, 16, seed=5)


class _Stop(Exception):
    pass


def _reference(cat, cfg):
    x, ids, _ = cat.read(0, cat.num_items)
    return build_index(x, ids=ids, attributes=cat.attributes(), config=cfg)


@pytest.mark.parametrize("cfg", [
    IndexConfig(nlist=32, chunk_size=1024, list_slack=0.3),
    IndexConfig(nlist=50, chunk_size=2048, metric="cosine", seed=3, target_fpr=1e-2),
])
def test_chunked_build_equals_build_index(catalog, cfg, tmp_path, monkeypatch):
    monkeypatch.setattr(bc, "BUCKET_BYTES", 128 << 10)  # several buckets
    info = build_chunked(catalog, tmp_path / "a.st", config=cfg, work_dir=tmp_path / "w", rows_per_commit=4096)
    assert info["buckets"] > 2
    got = ItemIndex.load(tmp_path / "a.st")
    ref = _reference(catalog, cfg)
    assert got.meta() == ref.meta()
    for name, want in ref.tensors().items():
        have = got.tensors()[name]
        assert have.dtype == want.dtype and torch.equal(have, want), name
    assert info["artifact_bytes"] == (tmp_path / "a.st").stat().st_size
    xq = scale.scale_queries(catalog, 8)
    s1, i1 = got.search(xq, k=10, nprobe=8, where="lang:en AND NOT policy:blocked")
    s2, i2 = ref.search(xq, k=10, nprobe=8, where="lang:en AND NOT policy:blocked")
    assert torch.equal(i1, i2) and torch.equal(s1, s2)


CFG = IndexConfig(nlist=24, chunk_size=1024, list_slack=0.1)


def _build(cat, out, work, **kw):
    return build_chunked(cat, out, config=CFG, work_dir=work, rows_per_commit=2048, **kw)


@pytest.fixture(scope="module")
def uninterrupted(catalog, tmp_path_factory):
    d = tmp_path_factory.mktemp("clean")
    mp = pytest.MonkeyPatch()
    mp.setattr(bc, "BUCKET_BYTES", 128 << 10)
    try:
        _build(catalog, d / "clean.st", d / "w")
    finally:
        mp.undo()
    return (d / "clean.st").read_bytes()


@pytest.mark.parametrize("point,at", [
    ("sample:done", 0), ("assign:chunk", 0), ("assign:chunk", 2), ("assign:done", 0), ("layout:done", 0),
    ("write:bucket", 0), ("write:bucket", 3), ("write:done", 0), ("assign:commit", 1), ("finalize:renamed", 0),
])
def test_interrupted_build_resumes_to_identical_bytes(catalog, uninterrupted, point, at, tmp_path, monkeypatch):
    monkeypatch.setattr(bc, "BUCKET_BYTES", 128 << 10)

    def stop(p, i):
        if (p, i) == (point, at):
            raise _Stop

    with pytest.raises(_Stop):
        _build(catalog, tmp_path / "m.st", tmp_path / "w", hook=stop)
    if point != "finalize:renamed":
        assert not (tmp_path / "m.st").exists()  # nothing half-written at the output path
    seen = []
    _build(catalog, tmp_path / "m.st", tmp_path / "w", hook=lambda p, i: seen.append((p, i)))
    assert (tmp_path / "m.st").read_bytes() == uninterrupted
    stage = point.split(":")[0]
    order = ["sample", "assign", "layout", "write", "finalize"]
    finished = order[: order.index(stage) + (1 if point.endswith(":done") else 0)]
    for s in finished:  # completed stages are skipped, not redone
        assert not any(p.startswith(s + ":") for p, _ in seen), (s, seen)
    if point == "assign:chunk":  # completed super-chunks are skipped
        assert min(i for p, i in seen if p == "assign:chunk") == at
    if point == "write:bucket":
        assert min(i for p, i in seen if p == "write:bucket") == at
    assert not list((tmp_path / "w").glob("bucket-*"))  # bucket files are removed once written


_KILL = """
import os, signal, sys
import sterling.model.build_chunked as bc
from sterling.benchmarks.scale import CatalogDir
from sterling.model import IndexConfig
bc.BUCKET_BYTES = 128 << 10
def hook(p, i):
    if (p, i) == (sys.argv[4], int(sys.argv[5])):
        os.kill(os.getpid(), signal.SIGKILL)
bc.build_chunked(CatalogDir(sys.argv[1]), sys.argv[2], config=IndexConfig(nlist=24, chunk_size=1024, list_slack=0.1),
                 work_dir=sys.argv[3], rows_per_commit=2048, hook=hook)
"""


@pytest.mark.parametrize("point,at", [("assign:chunk", 1), ("write:bucket", 2)])
def test_killed_build_process_resumes_to_identical_bytes(catalog, uninterrupted, point, at, tmp_path, monkeypatch):
    out, work = tmp_path / "k.st", tmp_path / "w"
    proc = subprocess.run([sys.executable, "-c", _KILL, str(catalog.path), str(out), str(work), point, str(at)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == -9, proc.stderr[-2000:]
    assert not out.exists()
    monkeypatch.setattr(bc, "BUCKET_BYTES", 128 << 10)
    _build(catalog, out, work)
    assert out.read_bytes() == uninterrupted


def test_resume_with_other_settings_is_refused(catalog, tmp_path, monkeypatch):
    monkeypatch.setattr(bc, "BUCKET_BYTES", 128 << 10)
    with pytest.raises(_Stop):
        _build(catalog, tmp_path / "m.st", tmp_path / "w", hook=lambda p, i: (_ for _ in ()).throw(_Stop()))
    with pytest.raises(ResumeMismatchError):
        build_chunked(catalog, tmp_path / "m.st", config=IndexConfig(nlist=25, chunk_size=1024),
                      work_dir=tmp_path / "w", rows_per_commit=2048)


@settings(max_examples=40, deadline=None)
@given(st.lists(st.integers(0, 40), min_size=1, max_size=300), st.sampled_from([1e-1, 1e-2, 1e-3, 1e-4]))
def test_bloom_sizing_from_a_histogram_equals_sizing_from_counts(counts, fpr):
    c = np.asarray(counts)
    hist = np.bincount(c)
    h = bloom_mod.TermsHistogram(np.flatnonzero(hist), hist[hist > 0])
    assert bloom_mod.size_bloom(h, fpr) == bloom_mod.size_bloom(torch.from_numpy(c), fpr)
    assert bloom_mod.expected_fpr(h, 128, 5) == bloom_mod.expected_fpr(torch.from_numpy(c), 128, 5)


def test_exact_truth_over_chunks_equals_one_brute_force(catalog):
    xq = scale.scale_queries(catalog, 12, seed=4)
    s, ids, _ = scale.exact_truth(catalog, xq, 25, rows_per_read=1000)
    x, item_ids, _ = catalog.read(0, catalog.num_items)
    ref_s, ref_rows = exact_topk(xq, x, 25)
    np.testing.assert_allclose(s.numpy(), ref_s.numpy(), rtol=0, atol=1e-6)
    assert (ids.numpy() == item_ids[ref_rows.numpy()]).mean() > 0.999  # only exact ties may swap


def test_catalog_generation_resumes_to_identical_bytes(tmp_path, monkeypatch):
    monkeypatch.setattr(scale, "GEN_CHUNK", 1000)
    a = scale.write_catalog(tmp_path / "a", 4_500, 8, seed=2)
    b = scale.write_catalog(tmp_path / "b", 4_500, 8, seed=2)
    meta = json.loads((b.path / "catalog.json").read_text())
    meta["chunks_done"] = 2  # as if killed after two chunks; later bytes are garbage
    (b.path / "catalog.json").write_text(json.dumps(meta))
    with open(b.path / "embeddings.npy", "r+b") as f:
        f.seek(-4000, os.SEEK_END)
        f.write(b"\xff" * 4000)
    with pytest.raises(Exception, match="partly written"):
        scale.CatalogDir(b.path)
    scale.write_catalog(tmp_path / "b", 4_500, 8, seed=2)
    for name in ("embeddings.npy", "attributes.npy"):
        assert (a.path / name).read_bytes() == (b.path / name).read_bytes()
    x = torch.from_numpy(np.load(a.path / "embeddings.npy"))
    assert torch.allclose(x.norm(dim=1), torch.ones(4_500), atol=1e-5)


def test_sterling_build_with_a_work_dir_equals_the_in_memory_build(tmp_path):
    from sterling.launch.cli import main

    g = np.random.default_rng(0)
    xb = g.standard_normal((3000, 12)).astype(np.float32)
    ids = g.permutation(10_000)[:3000].astype(np.int64)  # unsorted: the builder checks uniqueness at the end
    np.save(tmp_path / "x.npy", xb)
    np.save(tmp_path / "ids.npy", ids)
    assert main(["build", "--catalog", str(tmp_path / "x.npy"), "--ids", str(tmp_path / "ids.npy"), "--out",
                 str(tmp_path / "m.st"), "--nlist", "16", "--work-dir", str(tmp_path / "w")]) == 0
    got = ItemIndex.load(tmp_path / "m.st")
    ref = build_index(torch.from_numpy(xb), ids=ids, config=IndexConfig(nlist=16))
    assert got.meta() == ref.meta()
    for name, want in ref.tensors().items():
        assert torch.equal(got.tensors()[name], want), name


def test_duplicate_ids_are_refused_by_the_chunked_build(tmp_path):
    from sterling.model.build_chunked import NpyCatalog
    from sterling.model.errors import DuplicateIdError

    np.save(tmp_path / "x.npy", np.random.default_rng(1).standard_normal((500, 4)).astype(np.float32))
    np.save(tmp_path / "ids.npy", np.r_[np.arange(499), 7].astype(np.int64))
    with pytest.raises(DuplicateIdError):
        build_chunked(NpyCatalog(tmp_path / "x.npy", tmp_path / "ids.npy"), tmp_path / "m.st",
                      config=IndexConfig(nlist=4, chunk_size=128), work_dir=tmp_path / "w", rows_per_commit=256)
    assert not (tmp_path / "m.st").exists()
