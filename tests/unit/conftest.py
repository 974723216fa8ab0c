"""Unit tests never start Ray or open sockets to a cluster."""

import pytest


@pytest.fixture(autouse=True)
def _no_ray(monkeypatch):
    try:
        import ray
    except ImportError:
        return

    def refuse(*a, **k):
        raise RuntimeError("unit tests must not start Ray; put this test in tests/cluster/")

    monkeypatch.setattr(ray, "init", refuse)


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
