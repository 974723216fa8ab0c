"""The shared evaluation toolkit agrees with independent computations (so the benchmarks it serves can trust it)."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sterling.benchmarks.evaluation import (
    ForwardIndex,
    RoaringIndex,
    assert_same_topk,
    best_time,
    exact_topk,
    holds,
    percentiles_ms,
    recall,
)
from sterling.model.filter import parse_filter
from tests import oracle


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 9), st.integers(1, 40), st.integers(1, 50), st.booleans(), st.integers(0, 2**31 - 1))
def test_exact_topk_equals_a_full_sort(b, n, k, masked, seed):
    g = torch.Generator().manual_seed(seed)
    xq, xb = torch.randn(b, 8, generator=g), torch.randn(n, 8, generator=g)
    mask = torch.rand(b, n, generator=g) < 0.5 if masked else None
    s, rows = exact_topk(xq, xb, k, mask, chunk=3)
    sc = (xq @ xb.T).numpy()
    for q in range(b):
        ok = np.ones(n, bool) if mask is None else mask[q].numpy()
        want = sorted(np.flatnonzero(ok), key=lambda i: -sc[q, i])[: min(k, n)]
        got = [int(i) for i in rows[q] if i >= 0]
        assert got == [int(i) for i in want]
        assert (rows[q] < 0).sum() == min(k, n) - len(want) and torch.isneginf(s[q][rows[q] < 0]).all()


def test_recall_ignores_pads_and_counts_each_true_id_once():
    assert recall([[1, 2, -1]], [[2, 3, -1]]) == 0.5
    assert recall(torch.tensor([[5, 6]]), torch.tensor([[-1, -1]])) == 0.0  # nothing to find
    assert recall([[1, 2], [3, 4]], [[1, 2], [9, 8]]) == 0.5


def test_assert_same_topk_allows_tie_swaps_only():
    ids = np.array([[1, 2, 3]])
    s = np.array([[0.9, 0.5, 0.5]], np.float32)
    assert_same_topk(np.array([[1, 3, 2]]), s, ids, s)  # a tie swapped: fine
    with pytest.raises(AssertionError):
        assert_same_topk(np.array([[2, 1, 3]]), s, ids, s)  # a real reorder
    with pytest.raises(AssertionError):
        assert_same_topk(ids, s + 0.01, ids, s)


def test_timers_and_percentiles():
    calls = []
    t, out = best_time(lambda: calls.append(1) or len(calls), 3)
    assert len(calls) == 4 and out == 4 and t >= 0  # one warm-up, three timed
    p50, p99 = percentiles_ms([0.001] * 99 + [1.0])
    assert p50 == pytest.approx(1.0) and p99 > 10


@settings(max_examples=60, deadline=None)
@given(st.integers(0, 2**31 - 1))
def test_three_filter_evaluators_agree_with_the_tests_tree_oracle(seed):
    """``holds`` (plain Python over Sterling's parse tree), the roaring peer and the NumPy peer give
    the eligible set the tests' own tree evaluator gives (it never sees Sterling's parser)."""
    rng = random.Random(seed)
    vocab = [f"f{a}:{v}" for a in range(3) for v in range(3)]
    n = 40
    items = [set(rng.sample(vocab, rng.randint(0, 4))) for _ in range(n)]
    vid = {t: i for i, t in enumerate(vocab)}
    offsets = np.cumsum([0] + [len(t) for t in items])
    ids = np.array([vid[t] for terms in items for t in sorted(terms)], dtype=np.int64)
    roaring, forward = RoaringIndex(ids, offsets, vocab, n), ForwardIndex(ids, offsets, vocab)
    tree = oracle.random_expr(rng, vocab, depth=3)
    node = parse_filter(oracle.render(tree))
    want = [oracle.holds(tree, terms) for terms in items]
    assert [holds(node, terms) for terms in items] == want
    assert sorted(roaring.eval(node)) == [i for i in range(n) if want[i]]
    assert forward.eval(node).tolist() == want
