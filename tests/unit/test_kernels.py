"""Scan kernels against their references: fused (numba) = op-by-op (PyTorch) = per-query reference."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sterling.kernels import cpu_scan, ivf_topk, ivf_topk_reference, pack_bits, probe_lists
from sterling.kernels.filter_eval import bloom_term_hits_reference, eval_programs_reference
from sterling.kernels.ivf import ScanFilter
from sterling.model import IndexConfig, build_index
from sterling.model.synthetic import synthetic_catalog

needs_numba = pytest.mark.skipif(not cpu_scan.HAVE_NUMBA, reason="numba not installed")


@pytest.fixture(scope="module")
def setup():
    c = synthetic_catalog(6000, 16, seed=4)
    index = build_index(c.embeddings, ids=c.ids, attributes=c.attributes, config=IndexConfig(nlist=32))
    alive = (index.item_ids >= 0) & (torch.arange(index.capacity) % 7 != 3)  # tombstones
    xq = c.embeddings[:24] + 0.02
    wheres = [None, "lang:en", "NOT policy:blocked", "(country:US OR country:BR) AND NOT device:tv"] * 6
    f = index.compile_filters(wheres, 24)
    args = dict(codes=index.codes, scales=index.scales, list_offsets=index.list_offsets, alive=pack_bits(alive))
    return index, xq, f, args


def _bloom_mask(index, f, qprog):
    """[B, N_cap] Bloom-pass oracle: one term at a time, stack-machine programs, all-true for −1."""
    hits = bloom_term_hits_reference(index.bloom, f.term_words)
    ev = eval_programs_reference(hits, f.programs, bloom=True)  # [P, N_cap]
    ones = torch.ones(1, index.capacity, dtype=torch.bool)
    return torch.cat([ev, ones])[torch.where(qprog >= 0, qprog, len(f.programs))]


def _same(a, b, atol=1e-5):
    (s1, p1), (s2, p2) = a, b
    assert torch.allclose(s1, s2, atol=atol)
    assert bool(((p1 == p2) | torch.isclose(s1, s2, atol=1e-6)).all())


@needs_numba
@pytest.mark.parametrize("k", [1, 10, 250, 3000])
def test_fused_scan_equals_torch_scan_and_reference(setup, k):
    index, xq, f, args = setup
    probe = probe_lists(xq, index.centroids, 6)
    sf = ScanFilter(index.bloom, f.term_words, f.programs, f.query_program)
    fused = ivf_topk(xq, probe, k=k, scan_filter=sf, fused=True, **args)
    plain = ivf_topk(xq, probe, k=k, scan_filter=sf, fused=False, **args)
    ref = ivf_topk_reference(xq, probe, k=k, mask=_bloom_mask(index, f, f.query_program), **args)
    _same(fused, ref)
    _same(plain, ref)


@needs_numba
def test_fused_scan_counts_live_and_bloom_eligible_items(setup):
    index, xq, f, args = setup
    args = {**args, "alive": index.alive}
    probe = probe_lists(xq, index.centroids, 4)
    counts = torch.zeros(24, 2, dtype=torch.int64)
    sf = ScanFilter(index.bloom, f.term_words, f.programs, f.query_program)
    ivf_topk(xq, probe, k=5, scan_filter=sf, counts=counts, fused=True, **args)
    expect = torch.zeros(24, 2, dtype=torch.int64)
    ivf_topk(xq, probe, k=5, scan_filter=ScanFilter(index.bloom, f.term_words, f.programs, f.query_program),
             counts=expect, fused=False, **args)
    # the PyTorch scan counts only blocks holding a filtered query; compare the filtered queries
    filtered = f.query_program >= 0
    assert torch.equal(counts[filtered], expect[filtered])
    # and both equal the oracle: live items of the probed lists, and of those the Bloom survivors
    mask = _bloom_mask(index, f, f.query_program)
    alive = torch.from_numpy(np.unpackbits(index.alive.numpy(), bitorder="little")[: index.capacity]).bool()
    offs = index.list_offsets.tolist()
    for q in range(24):
        pos = torch.cat([torch.arange(offs[lst], offs[lst + 1]) for lst in probe[q].tolist()])
        live = pos[alive[pos]]
        assert counts[q].tolist() == [live.numel(), int(mask[q, live].sum())]
    assert bool((counts[:, 1] <= counts[:, 0]).all()) and bool((counts[:, 0] > 0).all())


def test_k_262144_returns_the_exact_top_k_of_the_scanned_items():
    g = torch.Generator().manual_seed(0)
    xb = torch.randn(270_000, 4, generator=g)
    index = build_index(xb, config=IndexConfig(nlist=16, kmeans_iters=2))
    xq = torch.randn(2, 4, generator=g)
    scores, ids = index.search(xq, k=262_144, nprobe=16)
    deq = index.codes.float() * index.scales[:, None]
    for q in range(2):
        truth = (deq @ xq[q]).topk(262_144)
        assert torch.allclose(scores[q], truth.values, atol=1e-5)
        # same set up to ties at the boundary
        got = set(ids[q].tolist())
        want = set(index.item_ids[truth.indices].tolist())
        assert len(got ^ want) <= 4


@needs_numba
@pytest.mark.parametrize("k", [700, 1500, 5000, 20_000])  # heap, radix select, radix select, more than scanned
def test_large_k_selection_equals_the_reference(k):
    c = synthetic_catalog(20_000, 8, seed=9)
    index = build_index(c.embeddings, config=IndexConfig(nlist=16, kmeans_iters=3))
    xq = torch.randn(3, 8, generator=torch.Generator().manual_seed(1))  # mixed-sign scores
    probe = probe_lists(xq, index.centroids, 8)
    args = dict(codes=index.codes, scales=index.scales, list_offsets=index.list_offsets, alive=index.alive)
    s, p, ids = ivf_topk(xq, probe, k=k, fused=True, item_ids=index.item_ids, **args)
    ref = ivf_topk_reference(xq, probe, k=k, **args)
    _same((s, p), ref)
    assert bool((s[:, :-1] >= s[:, 1:]).all())
    assert torch.equal(ids, torch.where(p >= 0, index.item_ids[p.clamp(min=0)], -1))
    if k == 20_000:  # every scanned item: scores of both signs, then padding
        assert bool((s < 0).any()) and bool((s > 0).any()) and bool((p == -1).any())


@needs_numba
def test_equal_scores_come_in_position_order():
    xb = torch.randn(300, 8, generator=torch.Generator().manual_seed(2)).repeat_interleave(7, dim=0)
    index = build_index(xb, config=IndexConfig(nlist=4, kmeans_iters=2))
    xq = xb[:2] + 0.01
    probe = probe_lists(xq, index.centroids, 4)
    args = dict(codes=index.codes, scales=index.scales, list_offsets=index.list_offsets, alive=index.alive)
    for k in (50, 2000):
        s, p = ivf_topk(xq, probe, k=k, fused=True, **args)
        tie = s[:, 1:] == s[:, :-1]
        assert bool(tie.any())
        assert bool((p[:, 1:] > p[:, :-1])[tie].all())


@needs_numba
def test_score_keys_order_descending_and_round_trip():
    import numpy as np

    v = np.array([3.4e38, 2.5, 1.0, 1e-45, 0.0, -0.0, -1e-45, -1.0, -7.5, -3.4e38], dtype=np.float32)
    keys = np.array([cpu_scan._desc_key(u) for u in v.view(np.uint32)], dtype=np.int64)
    assert keys[4] == keys[5]  # −0.0 is +0.0
    assert (np.diff(np.delete(keys, 5)) > 0).all()
    back = np.array([cpu_scan._score_bits(h) for h in keys], dtype=np.uint32).view(np.float32)
    assert np.array_equal(back, np.where(v == 0, np.float32(0), v)) and not np.signbit(back[5])


@needs_numba
@pytest.mark.parametrize("n", [10, 64, 65, 5000])
def test_radix_sort_and_select_equal_numpy(n):
    import numpy as np

    rng = np.random.default_rng(n)
    hi = rng.integers(0, 1 << 32, size=n, dtype=np.uint64)
    hi[: n // 2] = hi[n // 2 : 2 * (n // 2)]  # duplicates
    if n > 64:
        hi[::3] = (hi[::3] & np.uint64(0xFF)) | np.uint64(0xAB000000)  # a shared top byte for a third
    words = (hi << np.uint64(32)) | np.arange(n, dtype=np.uint64)
    sorted_words = words.copy()
    cpu_scan._radix_sort_high(sorted_words, np.empty(n, dtype=np.uint64))
    order = np.argsort(hi, kind="stable")
    assert np.array_equal(sorted_words & np.uint64(0xFFFFFFFF), order.astype(np.uint64))
    ref = np.sort(hi)
    for kk in {1, n // 3 + 1, n}:
        assert cpu_scan._kth_smallest_heap(words, n, kk) == ref[kk - 1]
        assert cpu_scan._kth_smallest_radix(words, n, kk) == ref[kk - 1]


def _exact_mask(index, f, qprog):
    """[B, N_cap] oracle eligibility from the exact attribute store (``ItemIndex.verify``)."""
    pos = torch.arange(index.capacity).expand(len(qprog), -1)
    return index.verify(pos, qprog, f)


@needs_numba
@pytest.mark.parametrize("k", [1, 10, 250, 3000])
@pytest.mark.parametrize("nprobe", [2, 6, 32])
def test_fused_scan_with_exact_programs_equals_the_exact_reference(setup, k, nprobe):
    """Exact in-scan filtering (compacted groups of >= 4 queries and direct scoring of smaller
    ones, tombstones, unfiltered queries in the same batch) = per-query reference over the exact set."""
    index, xq, f, args = setup
    probe = probe_lists(xq, index.centroids, nprobe)
    sf = ScanFilter(index.bloom, f.term_words, f.programs, f.query_program,
                    exact=torch.ones(len(f.programs), dtype=torch.bool), attr_ids=index.attr_ids,
                    attr_offsets=index.attr_offsets, term_vocab=f.term_vocab)
    counts = torch.zeros(24, 2, dtype=torch.int64)
    fused = ivf_topk(xq, probe, k=k, scan_filter=sf, counts=counts, fused=True, **args)
    ref = ivf_topk_reference(xq, probe, k=k, mask=_exact_mask(index, f, f.query_program), **args)
    _same(fused, ref)
    # counts: live items scanned and how many of them are exactly eligible
    alive = torch.from_numpy(np.unpackbits(args["alive"].numpy(), bitorder="little")).bool()
    offs = index.list_offsets.tolist()
    for q in range(24):
        pos = torch.cat([torch.arange(offs[lst], offs[lst + 1]) for lst in probe[q].tolist()])
        live = pos[alive[pos]]
        ok = index.verify(live[None, :], f.query_program[q : q + 1], f)[0]
        assert counts[q].tolist() == [live.numel(), int(ok.sum())]


@needs_numba
def test_a_shared_program_is_compacted_and_scored_like_the_reference():
    """A batch where every query shares one program (the compacted 4x2 path everywhere)."""
    c = synthetic_catalog(5000, 16, seed=9)
    index = build_index(c.embeddings, ids=c.ids, attributes=c.attributes, config=IndexConfig(nlist=8))
    xq = c.embeddings[:37] + 0.01
    for where in ["lang:en AND NOT policy:blocked", "NOT lang:en", "country:US OR device:tv", "lang:zz"]:
        f = index.compile_filters(where, 37)
        probe = probe_lists(xq, index.centroids, 5)
        sf = ScanFilter(index.bloom, f.term_words, f.programs, f.query_program,
                        exact=torch.ones(len(f.programs), dtype=torch.bool), attr_ids=index.attr_ids,
                        attr_offsets=index.attr_offsets, term_vocab=f.term_vocab)
        args = dict(codes=index.codes, scales=index.scales, list_offsets=index.list_offsets, alive=index.alive)
        fused = ivf_topk(xq, probe, k=50, scan_filter=sf, fused=True, **args)
        ref = ivf_topk_reference(xq, probe, k=50, mask=_exact_mask(index, f, f.query_program), **args)
        _same(fused, ref)
