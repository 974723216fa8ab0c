"""Triton kernels on CPU under the interpreter (small shapes) vs the int8 PyTorch reference.

The interpreter must be switched on before the kernels are decorated, so
this module sets ``TRITON_INTERPRET=1`` before importing them.
"""

from __future__ import annotations

import os

os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("triton")

from sterling.kernels import pack_bits, probe_lists  # noqa: E402
from sterling.kernels.ivf import ScanFilter  # noqa: E402
from sterling.kernels.triton_ivf import (  # noqa: E402
    ivf_topk_int8_reference,
    ivf_topk_triton,
    truth_tables,
)
from sterling.model import IndexConfig, build_index  # noqa: E402
from sterling.model.synthetic import synthetic_catalog  # noqa: E402


@pytest.fixture(scope="module")
def small():
    c = synthetic_catalog(700, 16, seed=2)
    index = build_index(c.embeddings, ids=c.ids, attributes=c.attributes, config=IndexConfig(nlist=8))
    alive = (index.item_ids >= 0) & (torch.arange(index.capacity) % 11 != 5)
    args = dict(codes=index.codes, scales=index.scales, list_offsets=index.list_offsets, alive=pack_bits(alive))
    return index, c.embeddings[:4] + 0.01, args


@pytest.mark.parametrize("k", [1, 7, 40])
def test_triton_scan_equals_int8_reference_unfiltered(small, k):
    index, xq, args = small
    probe = probe_lists(xq, index.centroids, 3)
    s1, p1 = ivf_topk_triton(xq, probe, k=k, **args)
    s2, p2 = ivf_topk_int8_reference(xq, probe, k=k, **args)
    assert torch.equal(s1, s2) and torch.equal(p1, p2)


def test_triton_scan_equals_int8_reference_with_per_query_filters(small):
    index, xq, args = small
    probe = probe_lists(xq, index.centroids, 4)
    f = index.compile_filters(["lang:en OR NOT policy:blocked", None, "country:US AND tier:free", "nosuch:x"], 4)
    fa = dict(scan_filter=ScanFilter(index.bloom, f.term_words, f.programs, f.query_program))
    counts = torch.zeros(4, 2, dtype=torch.int64)
    s1, p1 = ivf_topk_triton(xq, probe, k=30, counts=counts, **args, **fa)
    s2, p2 = ivf_topk_int8_reference(xq, probe, k=30, **args, **fa)
    assert torch.equal(s1, s2) and torch.equal(p1, p2)
    assert bool((p1[3] == -1).all())  # unknown term matches nothing
    assert bool((counts[:, 1] <= counts[:, 0]).all()) and int(counts[1, 0]) == int(counts[1, 1])


def test_truth_table_matches_program_evaluation():
    from sterling.kernels.filter_eval import OP_AND, OP_NOT, OP_OR, OP_TERM

    prog = [(OP_TERM, 5), (OP_TERM, 9), (OP_NOT, 0), (OP_OR, 0), (OP_TERM, 2), (OP_AND, 0)]
    terms, tables = truth_tables([prog], torch.zeros(10, 1, dtype=torch.int64))
    assert terms[0, :3].tolist() == [5, 9, 2]
    word = int(tables[0, 0]) & 0xFFFFFFFF
    for a in range(8):
        t2 = (a >> 2) & 1  # bits: 0 = term 5, 1 = term 9, 2 = term 2
        expect = t2  # Bloom semantics: NOT t9 is "maybe", so (t5 OR maybe) AND t2 = t2
        assert ((word >> a) & 1) == int(bool(expect))


def test_host_list_stats_bound_every_query_and_give_the_same_answer(small):
    from sterling.kernels.ivf import BLOCK, ListStats

    index, xq, args = small
    stats = ListStats.of(index.list_offsets)
    sizes = index.list_offsets[1:] - index.list_offsets[:-1]
    assert stats.max_size == int(sizes.max())
    for nprobe in (1, 3, 8):
        probe = probe_lists(xq, index.centroids, nprobe)
        widths = ((sizes[probe] + BLOCK - 1) // BLOCK).sum(1)
        assert int(widths.max()) <= stats.max_width(nprobe)  # a valid bound for every query
        got = ivf_topk_triton(xq, probe, k=25, list_stats=stats, **args)
        ref = ivf_topk_int8_reference(xq, probe, k=25, **args)
        assert torch.equal(got[0], ref[0]) and torch.equal(got[1], ref[1])
