"""One artifact: atomic, checksummed, bit-identical on reload."""

from __future__ import annotations

import os

import pytest
import torch

from sterling.model import ItemIndex, RetrievalModel, UserTower
from sterling.model import artifact as artifact_mod
from sterling.model.errors import (
    ArtifactError,
    CorruptArtifactError,
    ForeignArtifactError,
    UnsupportedVersionError,
)

WHERE = "lang:en AND NOT policy:blocked"


@pytest.fixture
def saved(tmp_path, small_index):
    tower = UserTower(UserTower.Config(input_dim=12, hidden_dims=(16,), output_dim=small_index.dim))
    model = RetrievalModel(small_index, tower)
    path = tmp_path / "m.st"
    model.save(path)
    return model, path


def test_reload_is_bit_identical(saved, small_catalog):
    model, path = saved
    loaded = RetrievalModel.load(path)
    for name, t in model.state_dict().items():
        assert torch.equal(t, loaded.state_dict()[name]), name
    xq = small_catalog.embeddings[:30]
    a = model(query=xq, k=25, nprobe=8, where=WHERE)
    b = loaded(query=xq, k=25, nprobe=8, where=WHERE)
    assert torch.equal(a.ids, b.ids) and torch.equal(a.scores, b.scores)
    feats = torch.randn(4, 12)
    assert torch.equal(model(user_features=feats, k=5).ids, loaded(user_features=feats, k=5).ids)
    assert loaded.index.vocab == model.index.vocab


def test_item_index_load_reads_a_model_artifact(saved, small_catalog):
    model, path = saved
    index = ItemIndex.load(path)
    xq = small_catalog.embeddings[:5]
    assert torch.equal(index.search(xq, k=5)[1], model.index.search(xq, k=5)[1])


@pytest.mark.parametrize("where", ["magic", "header", "early_data", "late_data", "padding"])
def test_a_flipped_byte_is_detected(saved, tmp_path, where):
    _, path = saved
    raw = bytearray(path.read_bytes())
    h = artifact_mod.read_header(path)
    data_start = len(raw) - h["data_len"]
    entries = {e["name"]: e for e in h["tensors"]}
    codes = entries["index.codes"]
    offset = {
        "magic": 2,
        "header": 40,
        "early_data": data_start + 1,
        "late_data": data_start + codes["offset"] + codes["nbytes"] - 1,
        "padding": data_start + entries["index.version"]["offset"] + 8 + 3,
    }[where]
    raw[offset] ^= 0x10
    bad = tmp_path / "bad.st"
    bad.write_bytes(bytes(raw))
    with pytest.raises(ArtifactError):
        RetrievalModel.load(bad)


def test_truncated_foreign_and_future_files_are_rejected(saved, tmp_path):
    _, path = saved
    raw = path.read_bytes()
    (tmp_path / "trunc.st").write_bytes(raw[:-100])
    with pytest.raises(CorruptArtifactError):
        RetrievalModel.load(tmp_path / "trunc.st")
    (tmp_path / "foreign.st").write_bytes(b"PK\x03\x04" + raw[4:])
    with pytest.raises(ForeignArtifactError):
        RetrievalModel.load(tmp_path / "foreign.st")
    future = bytearray(raw)
    future[8] = 99
    (tmp_path / "future.st").write_bytes(bytes(future))
    with pytest.raises(UnsupportedVersionError):
        RetrievalModel.load(tmp_path / "future.st")
    with pytest.raises(ArtifactError):
        RetrievalModel.load(tmp_path / "missing.st")


def test_failed_save_leaves_no_partial_file_and_keeps_the_old_one(saved, tmp_path, monkeypatch):
    model, path = saved
    before = path.read_bytes()

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(artifact_mod.os, "fsync", boom)
    with pytest.raises(OSError):
        model.save(path)
    assert path.read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["m.st"]
    with pytest.raises(OSError):
        model.save(tmp_path / "new.st")
    assert sorted(os.listdir(tmp_path)) == ["m.st"]


def test_loaded_tensors_are_memory_mapped_copy_on_write(saved):
    _, path = saved
    before = path.read_bytes()
    loaded = RetrievalModel.load(path)
    loaded.index.scales.mul_(2)  # in-place update never touches the file
    assert path.read_bytes() == before
