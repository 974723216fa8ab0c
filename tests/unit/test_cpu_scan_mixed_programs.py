"""The fused scan with many distinct filter programs per list, against a plain-Python oracle.

Per-query filters make a probed list's queries use many different programs:
most program groups are scored from their gathered eligible items, a few
(four or more queries sharing a program) on the compacted 4 × 2 path, with
more than 64 groups in a list, tombstones, duplicate items (tied scores),
NOT under exact and Bloom semantics, and more distinct attribute patterns
per list than the kernel's memo holds. The oracle evaluates each program by
walking its postfix ops over the item's attribute set (or its Bloom hits)
and ranks the scanned items by a float64 brute force.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sterling.kernels import cpu_scan
from sterling.kernels.filter_eval import OP_AND, OP_FALSE, OP_NOT, OP_OR, OP_TERM, OP_TRUE

pytestmark = pytest.mark.skipif(not cpu_scan.HAVE_NUMBA, reason="numba not installed")


def _oracle_eval(prog, hit, *, bloom: bool = False):
    """Postfix program over ``hit(t) -> bool``.

    ``bloom=True`` gives Bloom semantics: a Bloom match cannot decide a
    negation, so NOT of anything is True (a candidate the exact check decides).
    """
    stack = []
    for op, arg in prog:
        if op == OP_TERM:
            stack.append(hit(arg))
        elif op == OP_TRUE:
            stack.append(True)
        elif op == OP_FALSE:
            stack.append(False)
        elif op == OP_NOT:
            v = stack.pop()
            stack.append(True if bloom else not v)
        else:
            b, a = stack.pop(), stack.pop()
            stack.append((a and b) if op == OP_AND else (a or b))
    return stack[0]


def _random_program(rng, T, depth=3):
    kind = rng.choice(["term", "term", "not", "and", "or", "const"] if depth else ["term", "term", "const"])
    if kind == "term":
        return [(OP_TERM, int(rng.integers(T)))]
    if kind == "const":
        return [(OP_TRUE if rng.random() < 0.5 else OP_FALSE, 0)]
    if kind == "not":
        return _random_program(rng, T, depth - 1) + [(OP_NOT, 0)]
    return (_random_program(rng, T, depth - 1) + _random_program(rng, T, depth - 1)
            + [(OP_AND if kind == "and" else OP_OR, 0)])


def _case(seed, n_lists, per_list, D, T, P, B, nprobe, tomb, dup):
    rng = np.random.default_rng(seed)
    N = n_lists * per_list
    codes = rng.integers(-127, 128, size=(N, D), dtype=np.int64).astype(np.int8)
    codes[:, 0] = rng.integers(-3, 4, size=N)  # few distinct values: more equal partial sums
    scales = rng.choice(np.array([0.5, 0.25, 0.125], dtype=np.float32), size=N)
    sizes = rng.multinomial(N - n_lists, np.ones(n_lists) / n_lists) + 1
    list_offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
    # duplicate items (tied scores): copy an item over its successor in the same list
    for p in rng.choice(N - 1, size=int(dup * N), replace=False):
        codes[p + 1], scales[p + 1] = codes[p], scales[p]
    live = rng.random(N) >= tomb
    alive = np.packbits(live, bitorder="little")
    # exact attributes: each item holds a random subset of the T batch terms (+ unknown vocab)
    terms_of = [sorted(set(rng.choice(T + 3, size=int(rng.integers(0, 5))).tolist())) for _ in range(N)]
    attr_offsets = np.concatenate([[0], np.cumsum([len(t) for t in terms_of])]).astype(np.int64)
    attr_ids = np.array([v for t in terms_of for v in t] or [0], dtype=np.int32)
    term_vocab = np.arange(T, dtype=np.int64)  # term t has vocabulary id t; ids ≥ T are unknown terms
    # tiny Bloom (2 words, one bit per term, colliding) so Bloom programs see false positives
    W = 2
    term_words = np.zeros((T, W), dtype=np.int64)
    for t in range(T):
        term_words[t, rng.integers(W)] |= np.int64(1) << np.int64(rng.integers(0, 5))
    bloom = np.zeros((N, W), dtype=np.int64)
    for p, ts in enumerate(terms_of):
        for v in ts:
            if v < T:
                bloom[p] |= term_words[v]
            else:  # unknown terms still set signature bits
                bloom[p, v % W] |= np.int64(1) << np.int64(v % 5)
    progs = [_random_program(rng, T) for _ in range(P)]
    exact = rng.random(P) < 0.7
    qprog = rng.integers(-1, P, size=B).astype(np.int64)  # −1: unfiltered queries in the same batch
    xq = rng.standard_normal((B, D)).astype(np.float32)
    probe = np.stack([rng.choice(n_lists, size=nprobe, replace=False) for _ in range(B)]).astype(np.int64)
    return dict(codes=codes, scales=scales, list_offsets=list_offsets, live=live, alive=alive, terms_of=terms_of,
                attr_ids=attr_ids, attr_offsets=attr_offsets, term_vocab=term_vocab, term_words=term_words,
                bloom=bloom, progs=progs, exact=exact, qprog=qprog, xq=xq, probe=probe)


def _check(c, k):
    flt = cpu_scan.kernel_filter(c["bloom"], c["term_words"], c["progs"], c["qprog"], exact=c["exact"],
                                 attr_ids=c["attr_ids"], attr_offsets=c["attr_offsets"], term_vocab=c["term_vocab"])
    ids = np.arange(c["codes"].shape[0], dtype=np.int64) * 3 + 1
    out_s, out_p, counts, out_i = cpu_scan.fused_topk(c["xq"], c["probe"], c["codes"], c["scales"],
                                                      c["list_offsets"], c["alive"], k, flt, item_ids=ids)
    deq = c["codes"].astype(np.float64) * c["scales"].astype(np.float64)[:, None]
    offs = c["list_offsets"]
    tw, bloom = c["term_words"], c["bloom"]
    for q in range(c["xq"].shape[0]):
        pos = np.concatenate([np.arange(offs[lst], offs[lst + 1]) for lst in c["probe"][q]])
        live = [p for p in pos.tolist() if c["live"][p]]
        pr = int(c["qprog"][q])
        if pr < 0:
            ok = live
        elif c["exact"][pr]:
            ok = [p for p in live if _oracle_eval(c["progs"][pr], lambda t, p=p: t in c["terms_of"][p])]
        else:
            ok = [p for p in live
                  if _oracle_eval(c["progs"][pr], lambda t, p=p: bool(((bloom[p] & tw[t]) == tw[t]).all()),
                               bloom=True)]
        assert counts[q].tolist() == [len(live), len(ok)]
        score = deq[ok] @ c["xq"][q].astype(np.float64)
        want = np.sort(score)[::-1][:k]
        got_n = int((out_p[q] >= 0).sum())
        assert got_n == min(k, len(ok))
        assert np.all(np.isneginf(out_s[q, got_n:])) and np.all(out_p[q, got_n:] == -1)
        got = out_p[q, :got_n]
        assert set(got.tolist()) <= set(ok), "an ineligible, dead or unscanned item was returned"
        assert len(set(got.tolist())) == got_n
        np.testing.assert_allclose(out_s[q, :got_n], want, rtol=1e-5, atol=1e-3)
        exact_of = dict(zip(ok, score))
        np.testing.assert_allclose(out_s[q, :got_n], [exact_of[p] for p in got.tolist()], rtol=1e-5, atol=1e-3)
        assert np.array_equal(out_i[q, :got_n], ids[got])
        # descending scores; exactly equal scores in position order
        s = out_s[q, :got_n]
        assert np.all(s[:-1] >= s[1:])
        tie = s[:-1] == s[1:]
        assert np.all(got[:-1][tie] < got[1:][tie])


# what every random case draws: seed, list count, duplicates (tied scores), and the nprobe draw
_CASE = dict(seed=st.integers(0, 2**31 - 1), n_lists=st.integers(1, 6), dup=st.sampled_from([0.0, 0.1]),
             data=st.data())
_SETTINGS = dict(deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])


@settings(max_examples=25, **_SETTINGS)
@given(**_CASE, per_list=st.integers(1, 120), T=st.integers(1, 12), P=st.integers(1, 40), B=st.integers(1, 48),
       k=st.sampled_from([1, 5, 37, 300]), tomb=st.sampled_from([0.0, 0.2, 0.7]))
def test_many_programs_per_list_equal_the_python_oracle(seed, n_lists, per_list, T, P, B, k, tomb, dup, data):
    nprobe = data.draw(st.integers(1, n_lists))
    _check(_case(seed, n_lists, per_list, 8, T, P, B, nprobe, tomb, dup), k)


@pytest.mark.parametrize("seed", [0, 1])
def test_more_than_64_groups_and_a_full_memo_in_one_list(seed):
    """Lists probed by 150 queries over 100 programs (> 64: two program words per item) and 2,000
    items over 12 terms (more distinct attribute patterns than a thread's memo keeps: the rest are
    evaluated directly)."""
    c = _case(seed, 2, 1000, 16, 12, 100, 150, 2, 0.1, 0.05)
    patterns = {tuple(t for t in ts if t < 12) for ts in c["terms_of"]}
    assert len(patterns) > cpu_scan.MEMO_SLOTS // 2  # the memo fills up
    _check(c, 50)


@settings(max_examples=30, **_SETTINGS)
@given(**_CASE, per_list=st.integers(1, 150), B=st.integers(1, 40), k=st.sampled_from([1, 7, 64, 500]),
       tomb=st.sampled_from([0.0, 0.05, 0.4, 0.8]), tail=st.sampled_from([0.0, 0.2, 0.6, 1.0]))
def test_unfiltered_lists_with_dead_slots_equal_the_python_oracle(seed, n_lists, per_list, B, k, tomb, tail, dup,
                                                                  data):
    """Unfiltered batches over lists with tombstones and a dead tail (unused slack): the masked
    fast path (dense live extent: scored whole, dead items masked, tail skipped) and the gathered
    path (sparse) both return the brute-force top-k of the live items and count only live items.
    Batches of 1 to 40 queries take the straight-from-codes and the dequantized 4 × 2 scoring."""
    nprobe = data.draw(st.integers(1, n_lists))
    c = _case(seed, n_lists, per_list, 8, 1, 1, B, nprobe, tomb, dup)
    rng = np.random.default_rng(seed + 1)
    offs = c["list_offsets"]
    live = c["live"]
    for lst in range(n_lists):  # a dead tail of a random share of each list, as slack leaves it
        n = int(offs[lst + 1] - offs[lst])
        cut = int(round(n * tail * rng.random()))
        live[offs[lst + 1] - cut: offs[lst + 1]] = False
    c["alive"] = np.packbits(live, bitorder="little")
    c["qprog"] = np.full(B, -1, dtype=np.int64)
    _check(c, k)
