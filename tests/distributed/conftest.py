"""Fixtures for process-group tests: small deterministic models written as artifacts."""

from __future__ import annotations

import numpy as np
import pytest
import torch


@pytest.fixture(scope="session")
def dist_catalog():
    from sterling.model.synthetic import synthetic_catalog

    return synthetic_catalog(6000, 16, seed=11)


@pytest.fixture(scope="session")
def plain_path(dist_catalog, tmp_path_factory):
    from sterling.model import IndexConfig, RetrievalModel, build_index

    c = dist_catalog
    index = build_index(c.embeddings, ids=c.ids, attributes=c.attributes, config=IndexConfig(nlist=32))
    path = tmp_path_factory.mktemp("plain") / "model.st"
    RetrievalModel(index).save(path)
    return path


N_USERS = 64


@pytest.fixture(scope="session")
def learned_path(dist_catalog, tmp_path_factory):
    """A learned model with random (seeded) weights: a 3-table TorchRec user tower + dense, MoL OverArch, 2 heads."""
    pytest.importorskip("torchrec")
    from sterling.model import IndexConfig, build_index
    from sterling.model.heads import TaskHeads
    from sterling.model.learned import EmbeddingCache, LearnedRetrievalModel, UserTable
    from sterling.model.overarch import build_overarch
    from sterling.model.towers import SparseFeature, Tower

    torch.manual_seed(5)
    c = dist_catalog
    index = build_index(c.embeddings, ids=c.ids, attributes=c.attributes, config=IndexConfig(nlist=32))
    tower = Tower(Tower.Config(sparse=(SparseFeature(name="user_id", num_embeddings=N_USERS, dim=8),
                                       SparseFeature(name="region", num_embeddings=12, dim=4),
                                       SparseFeature(name="history", num_embeddings=len(c.ids), dim=8)),
                               dense_dim=2, hidden_dims=(32,), output_dim=16))
    arch = build_overarch("mol", 16).eval()
    heads = TaskHeads(arch.hidden_dim, ["click", "like"])
    with torch.no_grad():
        heads.proj.weight.normal_(0.0, 0.5)
        cache = EmbeddingCache.build(c.ids, arch.item_side(c.embeddings))
    rng = np.random.default_rng(0)
    uid = np.arange(N_USERS, dtype=np.int64)
    hist_len = rng.integers(0, 6, N_USERS)
    sparse = {
        "user_id": (torch.from_numpy(uid), torch.arange(N_USERS + 1)),
        "region": (torch.from_numpy(rng.integers(0, 12, N_USERS)), torch.arange(N_USERS + 1)),
        "history": (torch.from_numpy(rng.integers(0, len(c.ids), int(hist_len.sum()))),
                    torch.from_numpy(np.concatenate([[0], np.cumsum(hist_len)]))),
    }
    users = UserTable(torch.from_numpy(uid + 100), list(sparse), sparse, torch.randn(N_USERS, 2))
    model = LearnedRetrievalModel(index=index, user_tower=tower, overarch=arch, heads=heads, cache=cache, users=users,
                                  value_formula="click + 2*like", k0=200).eval()
    path = tmp_path_factory.mktemp("learned") / "model.st"
    model.save(path)
    return path
