"""Acceptance: recall@100 ≥ 0.95 at nprobe = nlist/8 on the demo catalog (1M × 64).

Oracle: fp32 brute force over the whole catalog.
"""

from __future__ import annotations

import pytest
import torch

from sterling.model import IndexConfig, build_index
from sterling.model.synthetic import synthetic_catalog, synthetic_queries
from tests.oracle import recall


@pytest.mark.slow
def test_demo_catalog_recall_at_100_vs_brute_force():
    cat = synthetic_catalog(1_000_000, 64, seed=0)
    index = build_index(cat.embeddings, ids=cat.ids, config=IndexConfig(nlist=1024))
    xq = synthetic_queries(cat, 200, seed=1)
    truth = torch.cat([(xq[s : s + 50] @ cat.embeddings.T).topk(100).indices for s in range(0, 200, 50)])
    _, ids = index.search(xq, k=100, nprobe=1024 // 8)
    assert recall(ids, cat.ids[truth]) >= 0.95
