"""The fused scan's selection at every k against a plain-numpy brute force, exactly.

Integer codes, integer queries and a power-of-two scale make every score exact in fp32
whatever the code path (4 x 2 blocking, direct, compacted), so the oracle can demand the
same positions in the same order: scores descending, equal scores by ascending position.
Small integer ranges make ties common, and k crosses the heap / sampled-bound boundary
(``HEAP_K``) and the number of candidates.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sterling.kernels import cpu_scan

pytestmark = pytest.mark.skipif(not cpu_scan.HAVE_NUMBA, reason="numba not installed")

SCALE = np.float32(0.5)


def _case(seed, n, nlist, nb, dead, skew):
    """Codes, list offsets, packed alive bits, Bloom words and integer queries.

    ``skew``: items 0 and 8 of every 16-item block of a list score far above the rest (the
    selection's sample reads those items, so its bound falls short of k and it must take
    everything), else scores are small random integers.
    """
    rng = np.random.default_rng(seed)
    D = 8
    cuts = np.sort(rng.integers(0, n + 1, nlist - 1))
    offs = np.concatenate([[0], cuts, [n]]).astype(np.int64)
    codes = rng.integers(-3, 4, (n, D)).astype(np.int8)
    if skew:
        for lst in range(nlist):
            s, e = offs[lst], offs[lst + 1]
            rel = np.arange(e - s)
            codes[s:e][rel % 8 == 0] = 100
    alive = rng.random(n) >= dead
    packed = np.packbits(alive, bitorder="little")
    bloom = rng.integers(0, 4, (n, 1)).astype(np.int64)  # bit 0: the filter's one term
    xq = rng.integers(1 if skew else -2, 3, (nb, D)).astype(np.float32)
    return codes, offs, alive, packed, bloom, xq


def _oracle(xq, probe, codes, offs, ok, k):
    """(scores [B, k], positions [B, k]): every eligible live item of the probed lists, ordered
    by score descending then position ascending, padded with (-inf, -1)."""
    B = xq.shape[0]
    out_s = np.full((B, k), -np.inf, dtype=np.float32)
    out_p = np.full((B, k), -1, dtype=np.int64)
    for q in range(B):
        pos = np.concatenate([np.arange(offs[lst], offs[lst + 1]) for lst in probe[q]])
        pos = pos[ok[q][pos]]
        sc = (codes[pos].astype(np.float32) @ xq[q]) * SCALE
        order = np.lexsort((pos, -sc))[:k]
        out_s[q, : order.size] = sc[order]
        out_p[q, : order.size] = pos[order]
    return out_s, out_p


@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    n=st.integers(1500, 12_000),
    nlist=st.integers(1, 12),
    nb=st.integers(1, 9),
    k_frac=st.floats(0.01, 1.3),
    dead=st.sampled_from([0.0, 0.15]),
    filtered=st.sampled_from(["none", "some", "all"]),
    skew=st.booleans(),
    parallel=st.booleans(),
)
def test_fused_topk_equals_the_brute_force_at_every_k(seed, n, nlist, nb, k_frac, dead, filtered, skew, parallel):
    codes, offs, alive, packed, bloom, xq = _case(seed, n, nlist, nb, dead, skew)
    rng = np.random.default_rng(seed + 1)
    nprobe = int(rng.integers(1, nlist + 1))
    probe = np.stack([rng.permutation(nlist)[:nprobe] for _ in range(nb)]).astype(np.int64)
    cand = int(max(offs[probe[q] + 1].sum() - offs[probe[q]].sum() for q in range(nb)))
    k = max(1, int(k_frac * cand))
    if filtered == "none":
        qprog = np.full(nb, -1, dtype=np.int64)
    elif filtered == "all":
        qprog = np.zeros(nb, dtype=np.int64)
    else:
        qprog = np.where(rng.random(nb) < 0.5, 0, -1).astype(np.int64)
    flt = cpu_scan.kernel_filter(bloom, np.ones((1, 1), dtype=np.int64), [[(0, 0)]], qprog)
    ids = rng.permutation(n).astype(np.int64) + 1000
    scales = np.full(n, SCALE, dtype=np.float32)
    s, p, counts, got_ids = cpu_scan.fused_topk(xq, probe, codes, scales, offs, packed, k, flt, item_ids=ids,
                                                parallel=parallel)
    passes = (bloom[:, 0] & 1) == 1
    ok = np.stack([alive & (passes if qprog[q] >= 0 else True) for q in range(nb)])
    want_s, want_p = _oracle(xq, probe, codes, offs, ok, k)
    np.testing.assert_array_equal(p, want_p)
    np.testing.assert_array_equal(s, want_s)
    np.testing.assert_array_equal(got_ids, np.where(want_p >= 0, ids[np.maximum(want_p, 0)], -1))


@pytest.mark.parametrize("k", [2000, 5000])
def test_a_sample_bound_that_falls_short_still_gives_the_exact_top_k(k):
    """Sampled items far above the rest: the bound keeps about one item in eight, fewer than k."""
    codes, offs, alive, packed, bloom, xq = _case(3, 12_000, 4, 5, 0.0, True)
    probe = np.tile(np.arange(4, dtype=np.int64), (5, 1))
    scales = np.full(codes.shape[0], SCALE, dtype=np.float32)
    s, p, _, _ = cpu_scan.fused_topk(xq, probe, codes, scales, offs, packed, k)
    want_s, want_p = _oracle(xq, probe, codes, offs, np.ones((5, codes.shape[0]), dtype=bool), k)
    assert int((want_s[:, 0:1] == want_s).sum(1).min()) < k  # the top scores alone do not fill k
    np.testing.assert_array_equal(p, want_p)
    np.testing.assert_array_equal(s, want_s)
