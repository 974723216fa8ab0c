"""Two-tier CUDA index: hot lists in HBM, cold lists in pinned host memory (skipped without CUDA).

Oracle: the same index held whole on the GPU (``ItemIndex.cuda()``), which
runs the same Triton kernels over one array: ids and scores must be equal
bit for bit, filtered and unfiltered, in both tier modes.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

WHERES = [None, "lang:en AND NOT policy:blocked", "(country:US OR country:BR) AND NOT device:tv", "lang:ja"]


@pytest.fixture(scope="module")
def setup():
    from sterling.model import IndexConfig, build_index
    from sterling.model.synthetic import synthetic_catalog, synthetic_queries

    c = synthetic_catalog(60_000, 64, seed=3)
    cpu = build_index(c.embeddings, ids=c.ids, attributes=c.attributes, config=IndexConfig(nlist=128))
    gpu = build_index(c.embeddings, ids=c.ids, attributes=c.attributes, config=IndexConfig(nlist=128)).cuda()
    return cpu, gpu, synthetic_queries(c, 64, seed=4).cuda()


@pytest.mark.parametrize("mode", ["stream", "zero-copy"])
@pytest.mark.parametrize("hot_share", [0.0, 0.3, 1.0])
def test_tiered_cuda_search_equals_the_whole_gpu_index(setup, mode, hot_share):
    cpu, gpu, xq = setup
    fast = np.random.default_rng(1).random(cpu.nlist) < hot_share
    sizes = (cpu.list_offsets[1:] - cpu.list_offsets[:-1]).numpy()
    staging = 3 * int(sizes.max()) * (cpu.dim + 4 + 8 * cpu.bloom.shape[1] + 1)  # forces several chunks
    t = cpu.to_tiers(fast, device="cuda", mode=mode, staging_bytes=staging)
    assert t.cold.codes.is_pinned() or not (~fast).any()
    for where in WHERES:
        for adaptive in (False, True):
            a = gpu.search(xq, k=50, nprobe=16, where=where, adaptive=adaptive)
            b = t.search(xq, k=50, nprobe=16, where=where, adaptive=adaptive)
            assert b[0].device.type == "cuda" and b[1].device.type == "cuda"
            assert torch.equal(a[0], b[0]), (mode, where, adaptive)
            assert torch.equal(a[1], b[1]), (mode, where, adaptive)
    if mode == "stream" and (~fast).any():
        assert t.stage_stats.chunks > 1 and t.stage_stats.peak_rows <= t.stage_stats.slot_rows
        assert t.staging_bytes() <= staging
    hot_items = int(sizes[fast].sum())
    assert t.hot.codes.device.type == "cuda" and t.hot.codes.shape[0] == hot_items
    assert t.cold.codes.device.type == "cpu" and t.cold.codes.shape[0] == cpu.capacity - hot_items
