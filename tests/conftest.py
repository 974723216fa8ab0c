"""Shared fixtures: small deterministic catalogs and brute-force oracles."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("TQDM_DISABLE", "1")
if not torch.cuda.is_available():
    # Without a GPU, Triton kernels can only run interpreted; this must be set before any
    # module decorates them (test collection may import sterling.kernels.triton_ivf early).
    os.environ.setdefault("TRITON_INTERPRET", "1")
torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture(scope="session")
def small_catalog():
    from sterling.model.synthetic import synthetic_catalog

    return synthetic_catalog(20_000, 32, seed=3)


@pytest.fixture(scope="session")
def small_index(small_catalog):
    from sterling.model import IndexConfig, build_index

    c = small_catalog
    return build_index(c.embeddings, ids=c.ids, attributes=c.attributes, config=IndexConfig(nlist=64))


@pytest.fixture(scope="session")
def tiny_rec_files(tmp_path_factory):
    """A small synthetic interactions/users/items set in the documented Parquet layout."""
    from sterling.model.synthetic_rec import write_synthetic_rec

    return write_synthetic_rec(tmp_path_factory.mktemp("rec"), n_users=150, n_items=300, n_topics=6, per_user=(10, 25))


@pytest.fixture(scope="session")
def tiny_model(tiny_rec_files):
    """(LearnedRetrievalModel, Dataset) trained for a few epochs on ``tiny_rec_files``."""
    pytest.importorskip("torchrec")
    from sterling.model.data import read_features, read_interactions
    from sterling.model.train import TrainConfig, train

    p = tiny_rec_files
    cfg = TrainConfig(dim=16, emb_dim=8, hidden_dims=(32,), tower_epochs=2, overarch_epochs=2, k0_train=50, k0=100,
                      progress=False, batch_size=256)
    model, data, _ = train(read_interactions(p["interactions"]), read_features(p["users"], "user_id"),
                           read_features(p["items"], "item_id"), cfg, evaluate_k=20)
    return model, data


@pytest.fixture(scope="module")
def learned_path(tiny_model, tmp_path_factory):
    """The tiny learned model saved as an artifact (the updates tests' starting point)."""
    path = tmp_path_factory.mktemp("learned") / "m.st"
    tiny_model[0].save(path)
    return path


@pytest.fixture(scope="module")
def items(tiny_rec_files):
    """The tiny catalog's items table as a ``FeatureTable`` (the feature-upsert format)."""
    from sterling.model.data import read_features

    return read_features(tiny_rec_files["items"], "item_id")
