"""``SearchStats`` against independent counts: probed lists and live items from the centroids and
the alive bits, Bloom survivors and false positives from a plain-Python evaluator of the filter.
"""

from __future__ import annotations

import random

import pytest
import torch

from sterling.kernels import cpu_scan
from sterling.kernels.bits import unpack_bits_range
from sterling.model import IndexConfig, build_index
from sterling.model import search as search_mod
from sterling.model.bloom import term_words
from tests.oracle import A, N, O, T, holds, render

FEATURES = ("lang", "country", "tier", "policy")
EXPRS = [
    T("lang:v0"),
    A((T("lang:v0"), N(T("policy:v1")))),
    A((O((T("country:v1"), T("country:v2"))), T("tier:v0"))),
    A((N(T("lang:v0")), N(T("policy:v0")))),
    O((T("tier:v1"), T("lang:v2"), T("lang:klingon"))),
]


@pytest.fixture(scope="module")
def catalog():
    rng = random.Random(7)
    lists = [sorted({f"{f}:v{rng.randrange(3)}" for f in rng.choices(FEATURES, k=rng.randint(0, 4))})
             for _ in range(3000)]
    x = torch.randn(3000, 8, generator=torch.Generator().manual_seed(7))
    ids = torch.arange(3000, dtype=torch.int64)
    # 64 Bloom bits, 1 hash: false positives are common, so the exact check rejects many
    cfg = IndexConfig(nlist=16, bloom_bits=64, bloom_hashes=1, kmeans_iters=3)
    index = build_index(x, ids=ids, attributes=lists, config=cfg)
    return index, lists


def _bloom_holds(e, sig: list[int], words: dict[str, list[int]]) -> bool:
    """Plain-Python Bloom pass: a term hits when all its bits are set; NOT is "maybe"."""
    if isinstance(e, T):
        w = words.get(e.term)
        return w is not None and all(s & t == t for s, t in zip(sig, w))
    if isinstance(e, N):
        return True
    if isinstance(e, A):
        return all(_bloom_holds(c, sig, words) for c in e.kids)
    return any(_bloom_holds(c, sig, words) for c in e.kids)


def _probed_positions(index, xq, nprobe):
    """Live positions of each query's nprobe nearest lists, from the centroids and the alive bits."""
    probe = (xq @ index.centroids.T).topk(nprobe, dim=1).indices
    alive = unpack_bits_range(index.alive, 0, index.capacity)
    offs = index.list_offsets.tolist()
    return probe, [[p for lst in row for p in range(offs[lst], offs[lst + 1]) if alive[p]] for row in probe.tolist()]


def test_unfiltered_stats_count_nprobe_lists_per_query_and_their_live_items(catalog):
    index, _ = catalog
    xq = torch.randn(50, 8, generator=torch.Generator().manual_seed(1))
    s0, i0 = index.search(xq, k=20, nprobe=5)
    s, i, st = index.search(xq, k=20, nprobe=5, return_stats=True)
    assert torch.equal(s, s0) and torch.equal(i, i0)  # counting changes no answer
    _, pos = _probed_positions(index, xq, 5)
    assert st.queries == 50 and st.nprobe == 5 and st.nprobe_used == (5,) * 50
    assert st.lists_probed == 5 * 50
    assert st.items_scanned == sum(len(p) for p in pos)
    assert (st.verified, st.rejected, st.refills, st.widened, st.prefiltered) == (0, 0, 0, 0, 0)
    assert st.chunks == 1


def test_chunks_are_counted_and_change_no_answer(catalog):
    index, _ = catalog
    xq = torch.randn(40, 8, generator=torch.Generator().manual_seed(2))
    f = index.compile_filters("lang:v0", 40)
    run = dict(k=10, nprobe=4, filters=f, exact=True, adaptive=False, stats=True)
    s1, i1, st1 = search_mod.run(index, xq, **run)
    per_query = 4 * (index.capacity // index.nlist) * 2 + 160  # a budget that takes ~4 queries per chunk
    s2, i2, st2 = search_mod.run(index, xq, chunk_budget=4 * per_query, **run)
    # (a chunk's batch fixes each list's scoring code path, so scores may differ in the last bits)
    assert torch.allclose(s1, s2, atol=1e-5) and bool(((i1 == i2) | torch.isclose(s1, s2, atol=1e-5)).all())
    assert st1.chunks == 1 and st2.chunks > 4
    assert (st2.lists_probed, st2.items_scanned, st2.verified, st2.rejected) == \
        (st1.lists_probed, st1.items_scanned, st1.verified, st1.rejected)


@pytest.mark.parametrize("backend", ["cpu-fused", "cpu-torch"])
def test_verify_rejects_exactly_the_bloom_false_positives_of_the_probed_lists(catalog, backend, monkeypatch):
    """k above every probed item: each Bloom survivor is checked once, so verified = Bloom survivors
    and rejected = survivors the exact attributes exclude, both counted by the plain-Python evaluators."""
    if backend == "cpu-fused" and not cpu_scan.HAVE_NUMBA:
        pytest.skip("numba not installed")
    if backend == "cpu-torch":
        monkeypatch.setattr(cpu_scan, "HAVE_NUMBA", False)
    index, lists = catalog
    B = 2 * len(EXPRS) + 2
    wheres = [render(e) for e in EXPRS] * 2 + [None, None]
    exprs = EXPRS * 2 + [None, None]
    xq = torch.randn(B, 8, generator=torch.Generator().manual_seed(3))
    _, _, st = index.search(xq, k=2000, nprobe=3, where=wheres, adaptive=False, return_stats=True)
    _, pos = _probed_positions(index, xq, 3)
    assert max(len(p) for p in pos) < 2000
    words = {t: term_words([t], index.bloom_spec)[0].tolist() for t in index.vocab}
    bloom = index.bloom.tolist()
    row = index.item_ids.tolist()  # ids are catalog rows
    survivors = rejected = 0
    for q, e in enumerate(exprs):
        if e is None:
            continue
        for p in pos[q]:
            if _bloom_holds(e, bloom[p], words):
                survivors += 1
                rejected += not holds(e, set(lists[row[p]]))
    assert st.backend == backend
    assert st.verified == survivors and st.rejected == rejected
    assert rejected > 0 and st.refills == 0
    assert st.lists_probed == 3 * B and st.items_scanned == sum(len(p) for p in pos)


def test_widening_stats_say_which_nprobe_each_query_ended_with(catalog, monkeypatch):
    """A selective filter widens: each widened group's answer is its first answer merged with a scan
    of the lists ranked nprobe..w (what a shard answers to ``skip_lists``), the items of a fixed-nprobe
    search at the w its stats report (scores up to the rounding of the path that scored them, which
    the batch fixes); pre-filtered queries report nlist. (The measured rule alone: an index without a
    selectivity sample, as built before it existed; with one, see the next test.)"""
    index, _ = catalog
    monkeypatch.setattr(index, "selectivity_sample", None)
    xq = torch.randn(30, 8, generator=torch.Generator().manual_seed(4))
    where = ["lang:v0 AND tier:v1 AND country:v2"] * 20 + ["lang:v1"] * 10
    s, i, st = index.search(xq, k=10, nprobe=2, where=where, adaptive=True, return_stats=True)
    used = torch.tensor(st.nprobe_used)
    widened = (used > 2) & (used < index.nlist)
    assert st.widened == int(widened.sum()) > 0
    assert st.prefiltered == int((used == index.nlist).sum())
    assert st.widen_rounds == len(used[widened].unique())
    assert st.nprobe_max == int(used.max()) and st.nprobe_mean == pytest.approx(float(used.double().mean()))
    fs, fi = index.search(xq, k=10, nprobe=2, where=where, adaptive=False)
    pos = {int(v): p for p, v in enumerate(index.item_ids.tolist())}

    def positions(ids):
        return torch.tensor([[pos.get(int(v), -1) for v in row] for row in ids.tolist()])

    for w in used[widened].unique().tolist():
        sel = (used == w).nonzero().squeeze(1)
        sub = [where[j] for j in sel]
        ws, wi = index.search(xq[sel], k=10, nprobe=w, where=sub, adaptive=False)
        assert torch.equal(wi, i[sel])
        torch.testing.assert_close(ws, s[sel], rtol=1e-6, atol=1e-5)
        xs, xi = index.search(xq[sel], k=10, nprobe=w, where=sub, adaptive=False, skip_lists=2)
        ms, mp = search_mod.merge_widened(fs[sel], positions(fi[sel]), xs, positions(xi), 10)
        assert torch.equal(mp, positions(i[sel])) and torch.equal(ms, s[sel])
    assert st.lists_probed == 2 * 30 + int((used[widened] - 2).sum())


def test_presized_first_scans_are_one_fixed_nprobe_scan_each(catalog):
    """With the build's selectivity sample a selective filter's first scan already has the widened size:
    each group of queries sharing a first size is answered exactly (bit for bit) as one fixed-nprobe
    search of those queries at that size; queries whose sampled need is half of all lists or more are
    scored on their eligible set at once (nlist, no list scanned for them)."""
    index, lists = catalog
    assert index.selectivity_sample is not None
    xq = torch.randn(30, 8, generator=torch.Generator().manual_seed(4))
    where = ["lang:v0 AND tier:v1 AND country:v2"] * 20 + ["lang:v1"] * 10
    s, i, st = index.search(xq, k=10, nprobe=2, where=where, adaptive=True, return_stats=True)
    used = torch.tensor(st.nprobe_used)
    assert st.presized == int((used > 2).sum()) > 0 and st.widened == 0
    for w in used.unique().tolist():
        sel = (used == w).nonzero().squeeze(1)
        sub = [where[j] for j in sel]
        if w == index.nlist:
            ws, wi = search_mod._prefilter_topk(index, xq[sel], 10, index.compile_filters(sub, len(sub)), 0,
                                                verify_exact=True)
            wi = index.positions_to_ids(wi)
            assert st.prefiltered == sel.numel()
        else:
            ws, wi = index.search(xq[sel], k=10, nprobe=w, where=sub, adaptive=False)
        assert torch.equal(wi, i[sel]) and torch.equal(ws, s[sel])
    scanned = torch.where(used == index.nlist, torch.zeros_like(used), used)
    assert st.lists_probed == int(scanned.sum())
