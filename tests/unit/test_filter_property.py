"""Property tests: Sterling's filter against the plain-Python oracle (tests/oracle.py).

Random catalogs (few features, few values, 0–6 terms per item, so filters
range from empty to everything) and random AND/OR/NOT trees with unknown
terms mixed in. Tiny Bloom signatures make false positives common, so the
exact check is really exercised.
"""

from __future__ import annotations

import random

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sterling.kernels.bloom_sliced import filter_sliced, positions_from_words, words_to_positions
from sterling.kernels.filter_eval import (
    OP_AND,
    OP_FALSE,
    OP_NOT,
    OP_OR,
    OP_TERM,
    OP_TRUE,
    FilterPlan,
    bloom_term_hits,
    bloom_term_hits_reference,
    eval_programs,
    eval_programs_reference,
    exact_term_hits,
)
from sterling.model import IndexConfig, build_index
from sterling.model.bloom import bit_slice
from tests.oracle import holds, random_expr, render

FEATURES = ("lang", "country", "tier", "policy")
_SETTINGS = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True)


@st.composite
def catalogs(draw):
    n = draw(st.integers(12, 160))
    seed = draw(st.integers(0, 2**31 - 1))
    rng = random.Random(seed)
    nvals = {f: rng.randint(1, 5) for f in FEATURES}
    lists = []
    for _ in range(n):
        k = rng.randint(0, 6)
        terms = {f"{f}:v{rng.randrange(nvals[f])}" for f in rng.choices(FEATURES, k=k)}
        lists.append(sorted(terms))
    x = torch.randn(n, 4, generator=torch.Generator().manual_seed(seed))
    return x, lists, seed


def _build(x, lists, nlist, bloom_bits, hashes):
    ids = torch.arange(len(lists), dtype=torch.int64) * 7 + 3
    cfg = IndexConfig(nlist=nlist, bloom_bits=bloom_bits, bloom_hashes=hashes, kmeans_iters=3)
    return build_index(x, ids=ids, attributes=lists, config=cfg), ids


def _vocab(lists):
    return sorted({t for terms in lists for t in terms}) or ["lang:v0"]


@settings(max_examples=30, **_SETTINGS)
@given(
    cat=catalogs(),
    nlist=st.sampled_from([1, 2, 4]),
    bloom=st.sampled_from([(64, 1), (64, 2), (None, None)]),
    data=st.data(),
)
def test_exact_search_returns_exactly_the_eligible_items_of_the_scanned_lists(cat, nlist, bloom, data):
    x, lists, seed = cat
    nlist = min(nlist, len(lists))
    index, ids = _build(x, lists, nlist, *bloom)
    rng = random.Random(seed + 1)
    exprs = [random_expr(rng, _vocab(lists)) for _ in range(4)]
    nprobe = data.draw(st.integers(1, nlist))
    xq = torch.randn(len(exprs), 4, generator=torch.Generator().manual_seed(seed + 2))
    _, got = index.search(
        xq, k=len(lists), nprobe=nprobe, where=[render(e) for e in exprs], exact=True, adaptive=False
    )
    # oracle: lists probed = the nprobe best centroids; items of those lists
    probed = (xq @ index.centroids.T).topk(nprobe, dim=1).indices
    offs = index.list_offsets.tolist()
    row_of = {int(i): r for r, i in enumerate(ids.tolist())}
    for q, e in enumerate(exprs):
        scanned = set()
        for lst in probed[q].tolist():
            scanned |= {int(i) for i in index.item_ids[offs[lst] : offs[lst + 1]].tolist() if i >= 0}
        want = {i for i in scanned if holds(e, set(lists[row_of[i]]))}
        have = {int(i) for i in got[q].tolist() if i >= 0}
        assert have == want, render(e)


@settings(max_examples=20, **_SETTINGS)
@given(cat=catalogs(), bloom=st.sampled_from([(64, 1), (64, 3), (128, 2)]))
def test_verify_over_every_item_equals_the_oracle_and_bloom_pass_is_a_superset(cat, bloom):
    x, lists, seed = cat
    index, ids = _build(x, lists, 1, *bloom)
    rng = random.Random(seed)
    exprs = [random_expr(rng, _vocab(lists)) for _ in range(6)]
    filters = index.compile_filters([render(e) for e in exprs], len(exprs))
    pos = torch.arange(index.capacity)
    live = index.item_ids >= 0
    ok = index.verify(pos.expand(len(exprs), -1), filters.query_program, filters)
    row_of = {int(i): r for r, i in enumerate(ids.tolist())}
    plan = filters.plan(bloom=True)
    approx = plan.eval(bloom_term_hits(index.bloom, filters.term_words[plan.terms]))
    sliced = filter_sliced(
        bit_slice(index.bloom), plan, positions_from_words(filters.term_words[plan.terms]), n_items=index.capacity
    )
    for q, e in enumerate(exprs):
        truth = torch.tensor(
            [bool(live[p]) and holds(e, set(lists[row_of[int(index.item_ids[p])]])) for p in range(index.capacity)]
        )
        assert torch.equal(ok[q] & live, truth), render(e)
        p = int(filters.query_program[q])
        assert bool((approx[p] | ~truth).all()), f"Bloom pass dropped a true match of {render(e)}"
        on = torch.zeros(index.capacity, dtype=torch.bool)
        on[words_to_positions(sliced[p])] = True
        assert torch.equal(on, approx[p]), "bit-sliced and item-major Bloom passes differ"


# ------------------------------------------------------------------ kernels


@st.composite
def programs(draw, n_terms: int, depth: int = 4):
    def expr(d):
        kind = draw(st.sampled_from(["term", "term", "const", "not", "and", "or"] if d else ["term", "const"]))
        if kind == "term":
            return [(OP_TERM, draw(st.integers(0, n_terms - 1)))]
        if kind == "const":
            return [(draw(st.sampled_from([OP_TRUE, OP_FALSE])), 0)]
        if kind == "not":
            return expr(d - 1) + [(OP_NOT, 0)]
        out = expr(d - 1)
        for _ in range(draw(st.integers(1, 3))):
            out += expr(d - 1) + [(OP_AND if kind == "and" else OP_OR, 0)]
        return out

    return expr(depth)


@settings(max_examples=150, deadline=None, derandomize=True)
@given(data=st.data(), T=st.integers(1, 6), M=st.integers(1, 70), P=st.integers(1, 5))
def test_vectorised_plan_equals_the_stack_machine_on_bools_and_packed_words(data, T, M, P):
    progs = [data.draw(programs(T)) for _ in range(P)]
    g = torch.Generator().manual_seed(data.draw(st.integers(0, 10**6)))
    hits = torch.rand(T, M, generator=g) < 0.5
    fps = torch.rand(T, M, generator=g) < 0.2
    for bloom in (False, True):
        ref = eval_programs_reference(hits, progs, bloom=bloom)
        assert torch.equal(eval_programs(hits, progs, bloom=bloom), ref)
        # packed: 64 items per word
        NW = (M + 63) // 64
        words = torch.zeros(T, NW, dtype=torch.int64)
        for m in range(M):
            words[:, m // 64] |= hits[:, m].long() << (m % 64)
        got = eval_programs(words, progs, bloom=bloom)
        unpacked = ((got[:, :, None] >> torch.arange(64)) & 1).reshape(P, -1)[:, :M].bool()
        assert torch.equal(unpacked, ref)
    # Bloom semantics: more hits (false positives) never lose an exact match
    exact = eval_programs_reference(hits, progs, bloom=False)
    assert bool((eval_programs(hits | fps, progs, bloom=True) | ~exact).all())


@settings(max_examples=60, deadline=None, derandomize=True)
@given(seed=st.integers(0, 10**6), M=st.integers(0, 300), T=st.integers(0, 9), W=st.integers(1, 4))
def test_vectorised_bloom_term_hits_equal_the_reference(seed, M, T, W):
    g = torch.Generator().manual_seed(seed)
    sig = torch.randint(-(2**62), 2**62, (M, W), generator=g)
    words = torch.zeros(T, W, dtype=torch.int64)
    for t in range(T):
        for b in torch.randint(0, 64 * W, (int(torch.randint(1, 5, (1,), generator=g)),), generator=g).tolist():
            words[t, b // 64] |= 1 << (b % 64)
    sig[: M // 2] |= words[torch.randint(0, max(T, 1), (M // 2,), generator=g) % max(T, 1)] if T else 0
    assert torch.equal(bloom_term_hits(sig, words), bloom_term_hits_reference(sig, words))


@settings(max_examples=60, deadline=None, derandomize=True)
@given(seed=st.integers(0, 10**6), N=st.integers(1, 40), V=st.integers(1, 12))
def test_exact_term_hits_equal_set_membership(seed, N, V):
    rng = random.Random(seed)
    lists = [[rng.randrange(V) if rng.random() > 0.1 else -1 for _ in range(rng.randint(0, 5))] for _ in range(N)]
    offsets = torch.tensor([0] + [len(x) for x in lists]).cumsum(0)
    flat = torch.tensor([a for x in lists for a in x], dtype=torch.int32)
    terms = rng.sample(range(-1, V + 3), k=min(V + 4, rng.randint(1, 6)))
    positions = torch.tensor([rng.randrange(-1, N) for _ in range(rng.randint(0, 30))], dtype=torch.int64)
    got = exact_term_hits(flat, offsets, positions, torch.tensor(terms, dtype=torch.int64))
    for t, v in enumerate(terms):
        for m, p in enumerate(positions.tolist()):
            assert bool(got[t, m]) == (p >= 0 and v >= 0 and v in lists[p])


def test_bloom_plan_reads_no_term_that_appears_only_under_not():
    plan = FilterPlan.build([[(OP_TERM, 0), (OP_TERM, 1), (OP_NOT, 0), (OP_AND, 0)]], bloom=True)
    assert plan.terms.tolist() == [0]
    exact = FilterPlan.build([[(OP_TERM, 0), (OP_TERM, 1), (OP_NOT, 0), (OP_AND, 0)]], bloom=False)
    assert sorted(exact.terms.tolist()) == [0, 1]


@settings(max_examples=40, deadline=None, derandomize=True)
@given(data=st.data(), T=st.integers(1, 6), NW=st.integers(1, 70), P=st.integers(1, 5), K=st.integers(1, 4))
def test_fused_numba_bitsliced_filter_equals_the_reference(data, T, NW, P, K):
    from sterling.kernels.bloom_numba import HAVE_NUMBA, filter_sliced_fused
    from sterling.kernels.bloom_sliced import filter_sliced

    if not HAVE_NUMBA:
        return
    progs = [data.draw(programs(T)) for _ in range(P)]
    g = torch.Generator().manual_seed(data.draw(st.integers(0, 10**6)))
    R = 64
    # dense rows so that AND of k rows still leaves bits on
    sliced = torch.randint(-(2**62), 2**62, (R, NW), generator=g) | torch.randint(-(2**62), 2**62, (R, NW), generator=g)
    positions = torch.randint(0, R, (T, K), generator=g)
    n_items = 64 * NW - data.draw(st.integers(0, 63))
    for bloom in (True, False):
        plan = FilterPlan.build(progs, bloom=bloom)
        pos = positions[plan.terms]
        ref = filter_sliced(sliced, plan, pos, n_items=n_items)
        assert torch.equal(filter_sliced_fused(sliced, plan, pos, n_items=n_items), ref)


@pytest.mark.parametrize("per_program_min_items", [1, 10**9])
def test_per_program_and_batch_bloom_passes_give_the_oracle_answer(monkeypatch, per_program_min_items):
    import sterling.kernels.ivf as ivf_mod

    monkeypatch.setattr(ivf_mod, "PER_PROGRAM_MIN_ITEMS", per_program_min_items)
    monkeypatch.setattr("sterling.kernels.cpu_scan.HAVE_NUMBA", False)  # the PyTorch scan: ScanFilter.block_eligible
    built = []
    real_build = ivf_mod.FilterPlan.build
    monkeypatch.setattr(ivf_mod.FilterPlan, "build", lambda progs, **kw: built.append(len(progs)) or real_build(progs, **kw))
    rng = random.Random(4)
    lists = [sorted({f"{f}:v{rng.randrange(3)}" for f in rng.choices(FEATURES, k=rng.randint(0, 5))}) for _ in range(400)]
    x = torch.randn(400, 4, generator=torch.Generator().manual_seed(4))
    index, ids = _build(x, lists, 8, 64, 1)
    exprs = [random_expr(rng, _vocab(lists)) for _ in range(24)]
    xq = torch.randn(len(exprs), 4, generator=torch.Generator().manual_seed(5))
    _, got = index.search(xq, k=400, nprobe=1, where=[render(e) for e in exprs], adaptive=False)
    probed = (xq @ index.centroids.T).topk(1, dim=1).indices
    offs = index.list_offsets.tolist()
    row_of = {int(i): r for r, i in enumerate(ids.tolist())}
    for q, e in enumerate(exprs):
        scanned = {int(i) for lst in probed[q].tolist() for i in index.item_ids[offs[lst] : offs[lst + 1]].tolist() if i >= 0}
        want = {i for i in scanned if holds(e, set(lists[row_of[i]]))}
        assert {int(i) for i in got[q].tolist() if i >= 0} == want, render(e)
    assert (1 in built) == (per_program_min_items == 1)  # the per-program path really ran
