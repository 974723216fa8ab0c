"""ANN search against the brute-force oracle, and the scan against its reference."""

from __future__ import annotations

import pytest
import torch

from sterling.kernels import ivf_topk, ivf_topk_reference, probe_lists
from sterling.model import IndexConfig, build_index
from tests.oracle import exact_topk, recall


def test_recall_at_nprobe_nlist_over_8_matches_brute_force(small_catalog, small_index):
    from sterling.model.synthetic import synthetic_queries

    xq = synthetic_queries(small_catalog, 200, seed=11)
    _, rows = exact_topk(xq, small_catalog.embeddings, 100)
    truth = small_catalog.ids[rows]
    _, ids = small_index.search(xq, k=100, nprobe=small_index.nlist // 8)
    assert recall(ids, truth) >= 0.95


def test_full_probe_finds_the_exact_top1_almost_always(small_catalog, small_index):
    xq = small_catalog.embeddings[:100] * 0.9 + 0.1 * small_catalog.embeddings[100:200]
    _, rows = exact_topk(xq, small_catalog.embeddings, 1)
    _, ids = small_index.search(xq, k=1, nprobe=small_index.nlist)
    # int8 may swap near-ties, never more than a few
    assert (ids[:, 0] == small_catalog.ids[rows[:, 0]]).float().mean() >= 0.97


def test_scores_are_sorted_and_match_dequantized_dot_products(small_index, small_catalog):
    xq = small_catalog.embeddings[:20]
    scores, ids = small_index.search(xq, k=50, nprobe=8)
    assert torch.all(scores[:, :-1] >= scores[:, 1:])
    slot_of = {int(i): s for s, i in enumerate(small_index.item_ids.tolist())}
    for q in range(3):
        for j in range(50):
            s = slot_of[int(ids[q, j])]
            expect = (small_index.codes[s].float() * small_index.scales[s]) @ xq[q]
            assert torch.isclose(scores[q, j], expect, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("k", [1, 7, 100, 1000])
def test_grouped_scan_equals_reference_scan(small_index, small_catalog, k):
    idx = small_index
    xq = small_catalog.embeddings[:40] + 0.05
    probe = probe_lists(xq, idx.centroids, 6)
    args = dict(codes=idx.codes, scales=idx.scales, list_offsets=idx.list_offsets, alive=idx.alive, k=k)
    s1, p1 = ivf_topk(xq, probe, **args)
    s2, p2 = ivf_topk_reference(xq, probe, **args)
    assert torch.allclose(s1, s2, atol=1e-5)
    # equal ids except where scores tie within float noise
    same = (p1 == p2) | torch.isclose(s1, s2, atol=1e-6)
    assert bool(same.all())


def test_k_larger_than_catalog_returns_everything_padded():
    xb = torch.randn(50, 8)
    index = build_index(xb, config=IndexConfig(nlist=4))
    scores, ids = index.search(torch.randn(3, 8), k=80, nprobe=4)
    assert ids.shape == (3, 80)
    for row in ids:
        assert sorted(row[row >= 0].tolist()) == list(range(50))
    assert bool((ids[:, 50:] == -1).all()) and bool(torch.isneginf(scores[:, 50:]).all())


def test_cosine_metric_normalizes_items_and_queries():
    g = torch.Generator().manual_seed(0)
    xb = torch.randn(500, 16, generator=g) * torch.rand(500, 1, generator=g) * 10
    index = build_index(xb, config=IndexConfig(nlist=8, metric="cosine"))
    xq = torch.randn(10, 16, generator=g) * 100
    scores, ids = index.search(xq, k=5, nprobe=8)
    assert float(scores.max()) <= 1.0 + 1e-3
    xbn = torch.nn.functional.normalize(xb, dim=1)
    _, truth = exact_topk(torch.nn.functional.normalize(xq, dim=1), xbn, 5)
    assert recall(ids, truth) >= 0.9


def test_list_slack_leaves_empty_slots_that_are_never_returned():
    xb = torch.randn(400, 8)
    index = build_index(xb, config=IndexConfig(nlist=4, list_slack=0.5))
    assert index.capacity > 400 and index.num_items == 400
    _, ids = index.search(torch.randn(5, 8), k=400, nprobe=4)
    for row in ids:
        assert sorted(row.tolist()) == list(range(400))


@pytest.mark.parametrize("k", [1, 50, 5000])
def test_small_batch_lean_path_equals_the_general_path(small_index, small_catalog, k):
    from sterling.model import search as search_mod

    xq = small_catalog.embeddings[:6] + 0.03
    nlist = small_index.nlist
    for nprobe in (1, nlist // 4, nlist):
        run = dict(k=k, nprobe=nprobe, filters=None, exact=True, adaptive=False, stats=True)
        s1, i1, st1 = search_mod.run(small_index, xq, small_batch=32, **run)
        s2, i2, st2 = search_mod.run(small_index, xq, small_batch=0, **run)
        assert torch.equal(i1, i2) and torch.equal(s1, s2)
        if search_mod.cpu_scan.HAVE_NUMBA:
            assert st1.backend == "cpu-lean" and st2.backend == "cpu-fused"
        assert st1.lists_probed == st2.lists_probed == nprobe * xq.shape[0]
        assert st1.items_scanned == st2.items_scanned
    # and the lean path's answer is the exact answer over the scanned lists
    from sterling.kernels.bits import unpack_bits_range

    deq = small_index.codes.float() * small_index.scales[:, None]
    alive = unpack_bits_range(small_index.alive, 0, small_index.capacity)
    truth_s, _ = exact_topk(xq, deq, k, mask=alive[None, :].expand(xq.shape[0], -1))
    s, _ = small_index.search(xq, k=k, nprobe=nlist)
    assert torch.allclose(s[:, : truth_s.shape[1]], truth_s, atol=1e-5)
