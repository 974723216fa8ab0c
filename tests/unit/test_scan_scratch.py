"""The CPU scan's scratch pools stay bounded, and the planner predicts what they keep.

Oracle for the prediction: the bytes the pools actually hold after a search
(``cpu_scan.scratch_bytes``) against ``planner.tiers.scan_scratch_bytes`` fed
the items the search really scanned.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sterling.kernels import cpu_scan
from sterling.kernels.cpu_scan import _ScratchPool
from sterling.model import IndexConfig, build_index
from sterling.model.search import CHUNK_BUDGET
from sterling.planner.tiers import SCRATCH_MAX_BYTES, SEARCH_CHUNK_SCORES, scan_scratch_bytes


def test_pool_keeps_the_largest_buffers_within_its_bounds():
    pool = _ScratchPool(keep=3, max_bytes=5000, max_total=8000)
    bufs = [pool.take(n) for n in (100, 200, 400)]
    assert [b.size for b in bufs] == [112, 225, 450]  # fresh: what was asked + 1/8 headroom
    for b in bufs:
        pool.give(b)
    # 112 floats is under half of 450: stale once the 450 came back; 225 is kept
    assert pool.kept_bytes() == 4 * (225 + 450)
    assert pool.take(150).size == 225  # the smallest that fits
    pool.give(np.empty(10, dtype=np.float32))  # lighter than half the largest kept: not kept
    assert pool.kept_bytes() == 4 * 450
    pool.give(np.empty(1300, dtype=np.float32))  # over max_bytes (5,200 B): never kept
    assert pool.kept_bytes() == 4 * 450
    for n in (900, 900, 950):  # 4 × (450 + 900 + 900 + 950) > max_total: the smallest go
        pool.give(np.empty(n, dtype=np.float32))
    assert sorted(b.size for b in pool._free) == [900, 950] and pool.kept_bytes() <= 8000
    # a request nothing fits: the new buffer replaces the largest free one, it does not add to it
    got = pool.take(960)
    assert got.size == 1080 and sorted(b.size for b in pool._free) == [900]
    assert pool.take(1200).size == 1200  # 1/8 headroom would pass max_bytes: exactly what was asked
    pool.clear()
    assert pool.kept_bytes() == 0


def test_batches_of_varying_size_reuse_one_buffer():
    pool = _ScratchPool()
    rng = np.random.default_rng(0)
    for n in rng.integers(90_000, 100_000, size=50):  # a serving loop: each batch scans a bit more or less
        pool.give(pool.take(int(n)))
    assert len(pool._free) == 1 and pool.kept_bytes() <= 4 * 100_000 * 1.125


def test_constants_match_the_search_and_the_pool():
    assert SEARCH_CHUNK_SCORES == CHUNK_BUDGET
    assert SCRATCH_MAX_BYTES == cpu_scan._SCRATCH.max_bytes == cpu_scan._BMAX.max_bytes


@pytest.mark.skipif(not cpu_scan.HAVE_NUMBA, reason="the fused CPU scan needs numba")
@pytest.mark.parametrize(("batch", "nprobe"), [(4, 8), (48, 16)])
def test_planner_predicts_the_scratch_a_search_keeps(batch, nprobe):
    g = torch.Generator().manual_seed(batch * 100 + nprobe)
    n, nlist = 40_000, 64
    index = build_index(torch.randn(n, 32, generator=g), config=IndexConfig(nlist=nlist, seed=1))
    xq = torch.randn(batch, 32, generator=g)
    index.search(xq, k=10, nprobe=nprobe)  # compile
    cpu_scan._SCRATCH.clear()
    cpu_scan._BMAX.clear()
    index.search(xq, k=10, nprobe=nprobe)
    kept = cpu_scan.scratch_bytes()
    # the items this batch really scanned, per query
    off = index.list_offsets.numpy()
    sizes = np.diff(off)
    probe = torch.topk(xq @ index.centroids.T, nprobe, dim=1).indices.numpy()
    per_query = float(sizes[probe].sum(1).mean())
    want = scan_scratch_bytes(per_query, batch=batch, nprobe=nprobe)
    assert kept > 0
    assert abs(kept - want) <= 0.05 * want + 8192, (kept, want)
    # a larger batch replaces, not adds to, what the pool keeps (its buffers are under half the new ones)
    big = torch.randn(4 * batch, 32, generator=g)
    index.search(big, k=10, nprobe=nprobe)
    probe = torch.topk(big @ index.centroids.T, nprobe, dim=1).indices.numpy()
    want_big = scan_scratch_bytes(float(sizes[probe].sum(1).mean()), batch=4 * batch, nprobe=nprobe)
    assert abs(cpu_scan.scratch_bytes() - want_big) <= 0.05 * want_big + 8192


def test_scratch_is_bounded_by_a_search_chunk():
    # one query past a chunk: its score buffer is freed after it, its block maxima (1/16) are kept
    assert scan_scratch_bytes(1e9, batch=64, nprobe=1024) == pytest.approx(4 * (1e9 / 16 + 512), rel=1e-3)
    assert scan_scratch_bytes(1e10, batch=64, nprobe=1024) == 0
    assert scan_scratch_bytes(6e7, batch=64, nprobe=1024) <= SCRATCH_MAX_BYTES * 1.1
    assert scan_scratch_bytes(0, batch=16, nprobe=8) == 0
    # past the chunk the batch no longer matters
    assert scan_scratch_bytes(2e6, batch=1000, nprobe=64) == scan_scratch_bytes(2e6, batch=10_000, nprobe=64)
