"""Incremental adaptive widening against a brute force over the same lists.

A widened query scans only the lists ranked nprobe..w and merges their top-k
into its first answer (``model/search.py``). Whatever ``nprobe_used`` its
stats report, its answer must be the exact filtered top-k over its w
best-ranked lists: brute force here scores the dequantized codes in float64
and evaluates the filter with the plain-Python oracle, over the alive items
only (tombstones), with and without the compiled scan (the op-by-op path
verifies and refills), and at exact score ties (lower position first).
"""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sterling.cluster.merge import merge_widened_ids
from sterling.kernels import cpu_scan
from sterling.kernels.bits import pack_bits, unpack_bits_range
from sterling.model import IndexConfig, build_index
from sterling.model.search import merge_widened
from tests.oracle import holds, random_expr, render

FEATURES = ("lang", "country", "tier")
_SETTINGS = dict(deadline=None, derandomize=True,
                 suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])


def _catalog(seed: int, n: int, dim: int):
    rng = random.Random(seed)
    lists = [sorted({f"{f}:v{rng.randrange(3)}" for f in rng.choices(FEATURES, k=rng.randint(0, 3))})
             for _ in range(n)]
    x = torch.randn(n, dim, generator=torch.Generator().manual_seed(seed))
    return x, lists


def _build(x, lists, nlist, tombstone_every: int):
    ids = torch.arange(len(lists), dtype=torch.int64) * 7 + 3
    # 64 Bloom bits, 1 hash: false positives are common, so verification and refills really run
    cfg = IndexConfig(nlist=nlist, bloom_bits=64, bloom_hashes=1, kmeans_iters=3)
    index = build_index(x, ids=ids, attributes=lists, config=cfg)
    if tombstone_every:
        alive = unpack_bits_range(index.alive, 0, index.capacity).bool()
        alive &= torch.arange(index.capacity) % tombstone_every != 1
        index.alive.copy_(pack_bits(alive))
    return index


def _brute(index, lists, xq, exprs, used, k):
    """Per query: (positions, float64 scores) of the exact eligible top-k over its ``used[q]`` best lists."""
    codes = (index.codes.double() * index.scales.double()[:, None]).numpy()
    alive = unpack_bits_range(index.alive, 0, index.capacity).numpy().astype(bool)
    rows = ((index.item_ids.numpy() - 3) // 7).tolist()
    offs = index.list_offsets.tolist()
    rank = (xq @ index.centroids.T).argsort(dim=1, descending=True, stable=True)
    out = []
    for q in range(xq.shape[0]):
        pos = [p for lst in rank[q, : used[q]].tolist() for p in range(offs[lst], offs[lst + 1])
               if alive[p] and (exprs[q] is None or holds(exprs[q], set(lists[rows[p]])))]
        pos = np.array(pos, dtype=np.int64)
        sc = codes[pos] @ xq[q].double().numpy() if pos.size else np.zeros(0)
        o = np.lexsort((pos, -sc))[:k]
        out.append((pos[o], sc[o]))
    return out


def _positions(index, ids):
    """Item ids [k] → index positions (−1 stays −1)."""
    where = {int(i): p for p, i in enumerate(index.item_ids.tolist()) if i >= 0}
    return torch.tensor([where[int(i)] if i >= 0 else -1 for i in ids.tolist()], dtype=torch.int64)


def _check_against_brute(index, lists, xq, exprs, s, ids, used, k, tol=1e-4):
    for q, (bpos, bsc) in enumerate(_brute(index, lists, xq, exprs, used, k)):
        got = _positions(index, ids[q]).numpy()
        n = int((got >= 0).sum())
        assert n == len(bpos), (q, n, len(bpos))
        np.testing.assert_allclose(s[q, :n].double().numpy(), bsc, atol=tol)
        assert (got[n:] == -1).all() and torch.isneginf(s[q, n:]).all()
        if n:  # same items, except where the float64 order differs within the scan's rounding
            clear = np.abs(bsc - bsc[-1]) > tol
            assert set(bpos[clear]) <= set(got[:n]), q


@pytest.mark.parametrize("fused", [True, False])
@settings(max_examples=12, **_SETTINGS)
@given(seed=st.integers(0, 2**31 - 1), k=st.sampled_from([1, 5, 40]), nprobe=st.sampled_from([1, 2, 3]),
       tomb=st.sampled_from([0, 3]), shared=st.booleans())
def test_widened_answer_is_the_exact_top_k_of_its_lists(monkeypatch, fused, seed, k, nprobe, tomb, shared):
    x, lists = _catalog(seed, 1200, 6)
    index = _build(x, lists, 24, tomb)
    monkeypatch.setattr(cpu_scan, "HAVE_NUMBA", cpu_scan.HAVE_NUMBA and fused)
    rng = random.Random(seed + 1)
    vocab = sorted({t for ts in lists for t in ts})
    B = 12
    exprs = [random_expr(rng, vocab, depth=2) for _ in range(1 if shared else B)] * (B if shared else 1)
    exprs[-1] = None  # an unfiltered query in the batch never widens
    xq = torch.randn(B, 6, generator=torch.Generator().manual_seed(seed + 2))
    where = [None if e is None else render(e) for e in exprs]
    s, ids, stc = index.search(xq, k=k, nprobe=nprobe, where=where, adaptive=True, return_stats=True)
    used = list(stc.nprobe_used)
    _check_against_brute(index, lists, xq, exprs, s, ids, used, k)
    # stats: each query's first scan (sized by the sample's estimate), then only the lists ranked
    # first..w of a query the measured rule widens; a query pre-filtered from the start scans none
    first = _first_scan(lists, exprs, nprobe, index.nlist)
    scanned = [0 if f == index.nlist else (u if u < index.nlist else f) for f, u in zip(first, used)]
    assert stc.lists_probed == sum(scanned)
    live = index.live_per_list()
    rank = (xq @ index.centroids.T).argsort(dim=1, descending=True, stable=True)
    assert stc.items_scanned == sum(int(live[rank[q, :u]].sum()) for q, u in enumerate(scanned))
    assert all(u >= f for f, u in zip(first, used))
    assert stc.presized == sum(f > nprobe for f in first)
    assert stc.widened == sum(f < u < index.nlist for f, u in zip(first, used))
    assert stc.prefiltered == sum(u == index.nlist for u in used)
    assert stc.widen_rounds == len({(f, u) for f, u in zip(first, used) if f < u < index.nlist})


def _first_scan(lists, exprs, nprobe: int, nlist: int) -> list[int]:
    """Per query, the lists its first scan covers (nlist: pre-filtered at once), recomputed plainly:
    the filter's pass rate on the build's sample rows (evenly spaced catalog rows, plain-Python
    evaluation) smoothed (+1 / +2), and the widening rule nprobe / √f in half-steps of nprobe."""
    from sterling.model.selectivity import sample_rows

    rows = sample_rows(len(lists)).tolist()
    out = []
    for e in exprs:
        if e is None:
            out.append(nprobe)
            continue
        f = (sum(holds(e, set(lists[r])) for r in rows) + 1) / (len(rows) + 2)
        need = nprobe / f ** 0.5
        half = max(1, nprobe // 2)
        if need >= 0.5 * nlist:
            out.append(nlist)
        elif need > 1.25 * nprobe:
            out.append(min(nlist, -(-need // half) * half))
        else:
            out.append(nprobe)
    return [int(v) for v in out]


@pytest.mark.parametrize("sampled", [True, False])
def test_widening_breaks_exact_score_ties_by_position_across_lists(sampled):
    """Every item scores exactly the same against e1 (first coordinate 1, the rest ±1/0, one int8
    scale): the answer is the eligible items of the scanned lists with the lowest positions —
    whether the first scan is sized by the selectivity sample (one scan of the widened size) or,
    without a sample (an index built before it existed), widened after it (two scans merged)."""
    g = torch.Generator().manual_seed(5)
    n = 1500
    x = torch.randint(-1, 2, (n, 5), generator=g).float()
    x[:, 0] = 1.0
    rng = random.Random(5)
    lists = [sorted({f"lang:v{rng.randrange(6)}"}) for _ in range(n)]
    index = _build(x, lists, 16, 0)
    if not sampled:
        index.selectivity_sample = None
    assert torch.unique(index.scales).numel() == 1
    xq = torch.zeros(8, 5)
    xq[:, 0] = 1.0
    xq[:, 1:] = torch.randn(8, 4, generator=g) * 1e-3  # distinct probe orders, scores nearly tied
    xq[:4, 1:] = 0.0  # exact ties for the first four
    expr = random_expr(random.Random(1), ["lang:v0"], depth=0)
    s, ids, st_ = index.search(xq, k=30, nprobe=1, where=render(expr), adaptive=True, return_stats=True)
    assert (st_.presized if sampled else st_.widened) > 0
    _check_against_brute(index, lists, xq, [expr] * 8, s, ids, list(st_.nprobe_used), 30, tol=1e-6)
    for q in range(4):  # all tied: positions ascending
        got = _positions(index, ids[q])
        got = got[got >= 0]
        assert torch.equal(got, got.sort().values) and (s[q, : got.numel()] == s[q, 0]).all()


def test_merges_keep_a_position_once_at_its_higher_score():
    """The near-tie case (a list in both scans): the model's and the router's merges drop the copy."""
    s1 = torch.tensor([[5.0, 3.0, float("-inf")]])
    p1 = torch.tensor([[10, 11, -1]])
    s2 = torch.tensor([[4.0, 3.0, 2.9999]])
    p2 = torch.tensor([[12, 11, 13]])
    s, p = merge_widened(s1, p1, s2, p2, 3)
    assert p.tolist() == [[10, 12, 11]] and s.tolist() == [[5.0, 4.0, 3.0]]
    s, p = merge_widened(s1, p1, s2, p2, 5)
    assert p.tolist() == [[10, 12, 11, 13, -1]]
    ids, sc = merge_widened_ids(p1.numpy(), s1.numpy(), p2.numpy(), s2.numpy(), 5)
    assert ids.tolist() == [[10, 12, 11, 13, -1]] and np.isneginf(sc[0, -1])


@pytest.mark.parametrize("bad", [-1, 3, 4, 1.5, True])
def test_skip_lists_out_of_range_is_a_typed_error(small_index, bad):
    from sterling.model.errors import InvalidInputError

    xq = torch.randn(2, small_index.dim, generator=torch.Generator().manual_seed(0))
    with pytest.raises(InvalidInputError, match="skip_lists"):
        small_index.search(xq, k=5, nprobe=3, where="lang:en", adaptive=False, skip_lists=bad)
    with pytest.raises(InvalidInputError, match="adaptive=False"):
        small_index.search(xq, k=5, nprobe=3, where="lang:en", adaptive=True, skip_lists=1)
