"""`torch.compile` of the whole RetrievalModel on CPU gives the eager answer."""

from __future__ import annotations

import torch

from sterling.model import RetrievalModel, UserTower


def test_compiled_model_matches_eager(small_index):
    torch.manual_seed(0)
    tower = UserTower(UserTower.Config(input_dim=12, hidden_dims=(32,), output_dim=small_index.dim))
    model = RetrievalModel(small_index, tower).eval()
    feats = torch.randn(6, 12)
    eager = model(user_features=feats, k=10, nprobe=8, where="NOT policy:blocked")
    compiled = torch.compile(model, backend="aot_eager")
    out = compiled(user_features=feats, k=10, nprobe=8, where="NOT policy:blocked")
    assert torch.equal(out.ids, eager.ids)
    assert torch.allclose(out.scores, eager.scores, atol=1e-6)
