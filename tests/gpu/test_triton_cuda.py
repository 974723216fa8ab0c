"""Triton scan on a real GPU vs the int8 reference (skipped without CUDA)."""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def test_cuda_scan_equals_reference_and_index_search_runs_on_gpu():
    from sterling.kernels import probe_lists
    from sterling.kernels.ivf import ScanFilter
    from sterling.kernels.triton_ivf import ivf_topk_int8_reference, ivf_topk_triton
    from sterling.model import IndexConfig, build_index
    from sterling.model.synthetic import synthetic_catalog

    c = synthetic_catalog(50_000, 64, seed=1)
    index = build_index(c.embeddings, ids=c.ids, attributes=c.attributes, config=IndexConfig(nlist=128))
    xq = c.embeddings[:64] + 0.01
    probe = probe_lists(xq, index.centroids, 16)
    args = dict(codes=index.codes, scales=index.scales, list_offsets=index.list_offsets, alive=index.alive, k=100)
    f = index.compile_filters("lang:en AND NOT policy:blocked", 64)
    sf = ScanFilter(index.bloom, f.term_words, f.programs, f.query_program)
    ref = ivf_topk_int8_reference(xq, probe, **args, scan_filter=sf)
    cuda = {k: (v.cuda() if isinstance(v, torch.Tensor) else v) for k, v in args.items()}
    got = ivf_topk_triton(xq.cuda(), probe.cuda(), **cuda, scan_filter=sf.to("cuda"))
    assert torch.equal(got[0].cpu(), ref[0]) and torch.equal(got[1].cpu(), ref[1])


def test_cuda_search_issues_no_host_sync():
    from sterling.kernels import probe_lists
    from sterling.kernels.ivf import ListStats
    from sterling.kernels.triton_ivf import ivf_topk_int8_reference, ivf_topk_triton
    from sterling.model import IndexConfig, build_index
    from sterling.model.synthetic import synthetic_catalog

    c = synthetic_catalog(20_000, 64, seed=3)
    index = build_index(c.embeddings, config=IndexConfig(nlist=64))
    xq = c.embeddings[:32] + 0.01
    probe = probe_lists(xq, index.centroids, 8)
    args = dict(codes=index.codes, scales=index.scales, list_offsets=index.list_offsets, alive=index.alive, k=50)
    ref = ivf_topk_int8_reference(xq, probe, **args)
    stats = ListStats.of(index.list_offsets)
    cuda = {k: (v.cuda() if isinstance(v, torch.Tensor) else v) for k, v in args.items()}
    xq_c, probe_c = xq.cuda(), probe.cuda()
    ivf_topk_triton(xq_c, probe_c, list_stats=stats, **cuda)  # compile the kernels first
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        got = ivf_topk_triton(xq_c, probe_c, list_stats=stats, **cuda)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.equal(got[0].cpu(), ref[0]) and torch.equal(got[1].cpu(), ref[1])
