"""Upserts, deletes, re-packing and compaction against a replayed catalog (plain dicts)."""

from __future__ import annotations

import random

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sterling.kernels import quantize_int8
from sterling.model import IndexConfig, RetrievalModel, build_index
from sterling.model import updates as upd
from sterling.model.bloom import item_signatures, term_words
from sterling.model.errors import (
    DimensionMismatchError,
    DuplicateIdError,
    InvalidAttributeError,
    NonFiniteError,
)
from sterling.model.live import LiveModel
from tests.oracle import exact_topk, holds, random_expr, recall, render

D = 8
TERMS = [f"f{a}:v{b}" for a in range(3) for b in range(3)]


def _catalog(n, seed):
    rng = random.Random(seed)
    x = torch.randn(n, D, generator=torch.Generator().manual_seed(seed))
    attrs = [sorted(rng.sample(TERMS, rng.randint(0, 3))) for _ in range(n)]
    return {i: (x[i], attrs[i]) for i in range(n)}


def _build(catalog, **cfg):
    ids = sorted(catalog)
    x = torch.stack([catalog[i][0] for i in ids])
    return build_index(x, ids=torch.tensor(ids), attributes=[catalog[i][1] for i in ids],
                       config=IndexConfig(**{"nlist": 8, **cfg}))


def _check(index, catalog, rng):
    """The index holds exactly the catalog: ids, int8 codes, exact terms, Bloom rows, search."""
    ids = index.item_ids
    live = (ids >= 0).nonzero().squeeze(1)
    assert sorted(ids[live].tolist()) == sorted(catalog)
    alive = ((index.alive[torch.arange(index.capacity) >> 3] >> (torch.arange(index.capacity) & 7)) & 1).bool()
    assert torch.equal(alive, ids >= 0)
    for p in live.tolist():
        x, terms = catalog[int(ids[p])]
        codes, scales = quantize_int8(x[None])
        assert torch.equal(index.codes[p], codes[0]) and float(index.scales[p]) == float(scales[0])
        s, e = int(index.attr_offsets[p]), int(index.attr_offsets[p + 1])
        assert {index.vocab[t] for t in index.attr_ids[s:e].tolist() if t >= 0} == set(terms)
    words = term_words(index.vocab, index.bloom_spec)
    assert torch.equal(item_signatures(index.attr_ids, index.attr_offsets, words)[live], index.bloom[live])
    assert not bool(index.bloom[ids < 0].any())
    # the slot map the write path keeps: every id where it is (absent ids nowhere), and each
    # list's free-slot stack holding exactly that list's dead slots
    sm = upd.slot_map(index)
    assert sm.lookup(ids[live].tolist()) == live.tolist()
    gone = [i for i in range(400) if i not in catalog]
    assert sm.lookup(gone) == [-1] * len(gone)
    offs = index.list_offsets.tolist()
    for lst in range(index.nlist):
        stack = sorted(sm.free_buf[sm._offs[lst] : sm._offs[lst] + sm.free_top[lst]].tolist())
        assert stack == [p for p in range(offs[lst], offs[lst + 1]) if int(ids[p]) < 0], lst
    # exhaustive search = brute force over the catalog's int8 vectors, with a random filter
    if not catalog:
        return
    keys = sorted(catalog)
    xb = torch.stack([catalog[i][0] for i in keys])
    c, sc = quantize_int8(xb)
    deq = c.float() * sc[:, None]
    xq = torch.randn(2, D, generator=torch.Generator().manual_seed(rng.randrange(1 << 30)))
    expr = random_expr(rng, TERMS, depth=2)
    mask = torch.tensor([holds(expr, set(catalog[i][1])) for i in keys])
    ts, ti = exact_topk(xq, deq, 10, mask[None].expand(2, -1))
    gs, gi = index.search(xq, k=10, nprobe=index.nlist, where=render(expr), adaptive=False)
    want = [[keys[j] for j in row if j >= 0] for row in ti.tolist()]
    got = [[i for i in row if i >= 0] for row in gi.tolist()]
    # the same items in the same order, except where two scores are within fp32 rounding
    full = (xq.double() @ deq.double().T).tolist()
    for r in range(2):
        score = {keys[j]: full[r][j] for j in range(len(keys))}
        assert len(got[r]) == len(want[r]), render(expr)
        g = [score[i] for i in got[r]]
        assert all(g[j] >= g[j + 1] - 1e-4 for j in range(len(g) - 1)), render(expr)
        kth = min((score[i] for i in want[r]), default=0.0)
        assert {i for i in want[r] if score[i] > kth + 1e-4} <= set(got[r]), render(expr)
    assert torch.allclose(gs[torch.isfinite(gs)], ts[torch.isfinite(ts)], atol=1e-4)


op = st.tuples(st.sampled_from(["upsert", "move", "delete", "attrs", "compact"]), st.integers(1, 60), st.integers(0, 1 << 20))


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops=st.lists(op, min_size=1, max_size=8), slack=st.sampled_from([0.0, 0.1, 0.5]),
       nlist=st.sampled_from([8, 32]))
def test_upserts_deletes_and_repacks_match_the_replayed_catalog(ops, slack, nlist):
    """A list that fills makes room by a local re-layout of its neighbours (``local_repack``; with
    32 lists a window is allowed 8 of them) or, when that would span more, a whole re-pack."""
    catalog = _catalog(200, 0)
    live = LiveModel.open(RetrievalModel(_build(catalog, list_slack=slack, nlist=nlist)),
                          LiveModel.Config(compact_waste=0))
    index = live.model.index
    v = live.version
    rng = random.Random(1)
    for step, (kind, n, seed) in enumerate(ops):
        g = torch.Generator().manual_seed(seed * 64 + step)  # distinct vectors per step: no score ties
        r = random.Random(seed)
        if kind == "compact":
            live.compact()
            continue
        if kind == "upsert":  # new ids and replacements, with or without attributes
            ids = r.sample(range(400), n)
            x = torch.randn(n, D, generator=g)
            attrs = [sorted(r.sample(TERMS, r.randint(0, 4))) for _ in ids] if seed % 2 else None
            v2 = live.upsert(ids, x, attrs)
            for j, i in enumerate(ids):
                terms = attrs[j] if attrs is not None else (catalog[i][1] if i in catalog else [])
                catalog[i] = (x[j], terms)
        elif kind == "move":  # an existing vector pushed to another list
            ids = r.sample(sorted(catalog), min(n, len(catalog)))
            x = torch.stack([catalog[i][0] for i in ids]) * -1.0
            v2 = live.upsert(ids, x)
            for j, i in enumerate(ids):
                catalog[i] = (x[j], catalog[i][1])
        elif kind == "delete":
            ids = r.sample(range(400), n)
            v2 = live.delete(ids)
            for i in ids:
                catalog.pop(i, None)
        else:
            ids = r.sample(sorted(catalog), min(n, len(catalog)))
            attrs = [sorted(r.sample(TERMS, r.randint(0, 5))) + ["new:t"] * (seed % 2) for _ in ids]
            v2 = live.update_attributes(ids, attrs)
            for j, i in enumerate(ids):
                catalog[i] = (catalog[i][0], attrs[j])
        assert v2 == v + 1
        v = v2
        _check(index, catalog, rng)


def test_deleted_items_never_appear_in_any_result():
    catalog = _catalog(300, 3)
    live = LiveModel.open(RetrievalModel(_build(catalog, list_slack=0.2)))
    gone = list(range(0, 300, 3))
    live.delete(gone)
    xq = torch.randn(16, D)
    for where in (None, "f0:v0 OR NOT f0:v0", "NOT f1:v1"):
        out = live(query=xq, k=300, nprobe=8, where=where)
        assert not set(out.ids.reshape(-1).tolist()) & set(gone)
    # re-adding one brings back only that one
    live.upsert([0], torch.randn(1, D))
    out = live(query=xq, k=300, nprobe=8)
    assert set(out.ids.reshape(-1).tolist()) & set(gone) == {0}


def test_bad_upserts_raise_typed_errors_and_change_nothing():
    catalog = _catalog(50, 4)
    live = LiveModel.open(RetrievalModel(_build(catalog, list_slack=0.2)))
    v = live.version
    with pytest.raises(DimensionMismatchError):
        live.upsert([1], torch.randn(1, D + 1))
    with pytest.raises(NonFiniteError):
        live.upsert([1, 2], torch.tensor([[0.0] * D, [float("nan")] * D]))
    with pytest.raises(DuplicateIdError):
        live.upsert([3, 3], torch.randn(2, D))
    with pytest.raises(DuplicateIdError):
        live.delete([-4])
    with pytest.raises(InvalidAttributeError):
        live.upsert([1], torch.randn(1, D), [["no-colon"]])
    assert live.version == v
    _check(live.model.index, catalog, random.Random(0))


def test_replacing_half_the_catalog_keeps_recall_and_compaction_returns_memory():
    N, dim, nlist, k = 12_000, 32, 64, 100
    g = torch.Generator().manual_seed(7)
    centers = torch.randn(200, dim, generator=g)
    def sample(n):
        return centers[torch.randint(0, 200, (n,), generator=g)] + 0.6 * torch.randn(n, dim, generator=g)
    xb = sample(N)
    cfg = IndexConfig(nlist=nlist, list_slack=0.1, nprobe=8)
    live = LiveModel.open(RetrievalModel(build_index(xb, config=cfg)), LiveModel.Config(compact_waste=0))
    replaced = torch.randperm(N, generator=g)[: N // 2]
    for s in range(0, replaced.numel(), 1000):  # batches of 1,000 upserts of changed vectors
        ids = replaced[s : s + 1000]
        x = sample(ids.numel())
        live.upsert(ids, x)
        xb[ids] = x
    xq = sample(200)
    _, truth = exact_topk(xq, xb, k)
    got = live(query=xq, k=k).ids
    fresh = build_index(xb, config=cfg)
    r_live, r_fresh = recall(got, truth), recall(fresh.search(xq, k=k)[1], truth)
    assert r_live >= r_fresh - 0.01, (r_live, r_fresh)
    index = live.model.index
    live.compact()
    assert upd.footprint(index) <= 1.10 * upd.footprint(fresh), (upd.footprint(index), upd.footprint(fresh))
    assert torch.equal(live(query=xq, k=k).ids, got)  # compaction moves slots, not results


def test_a_full_list_borrows_its_neighbours_slack_and_nothing_else_moves():
    """``local_repack`` lays out again only a window of neighbouring lists around the list that lacks
    room: every slot, list offset and exact-list entry outside the window is unchanged, inside it each
    list keeps its items (id, codes, scale, Bloom row, terms) and the full list gets the room asked;
    asking for more than a quarter of the lists can give falls back to None (a whole re-pack)."""
    catalog = _catalog(2000, 7)
    index = _build(catalog, nlist=64, list_slack=0.3)
    before = {n: getattr(index, n).clone() for n in ("list_offsets", "codes", "scales", "item_ids", "bloom",
                                                      "attr_ids", "attr_offsets", "alive")}
    sizes = (index.list_offsets[1:] - index.list_offsets[:-1])
    lst = int(sizes.argmax())
    extra = torch.zeros(index.nlist, dtype=torch.int64)
    free = int(upd.slot_map(index).free_top[lst])
    extra[lst] = free + 25
    layout = upd.local_repack(index, extra)
    assert layout is not None and len(layout.windows) == 1
    a, b, _, s0, *_, attr_offsets = layout.windows[0]
    s1 = int(before["list_offsets"][b + 1])
    assert a <= lst <= b and s0 == int(before["list_offsets"][a])
    A0, A1 = int(attr_offsets[0]), int(attr_offsets[-1])
    upd.install_local(index, layout)
    offs = index.list_offsets
    assert torch.equal(offs[: a + 1], before["list_offsets"][: a + 1])
    assert torch.equal(offs[b + 1 :], before["list_offsets"][b + 1 :])
    for n in ("codes", "scales", "item_ids", "bloom"):
        assert torch.equal(getattr(index, n)[:s0], before[n][:s0]) and torch.equal(getattr(index, n)[s1:], before[n][s1:])
    assert torch.equal(index.attr_offsets[: s0 + 1], before["attr_offsets"][: s0 + 1])
    assert torch.equal(index.attr_offsets[s1:], before["attr_offsets"][s1:])
    assert torch.equal(index.attr_ids[:A0], before["attr_ids"][:A0]) and torch.equal(index.attr_ids[A1:], before["attr_ids"][A1:])
    for l2 in range(a, b + 1):  # same items per list
        old = before["item_ids"][before["list_offsets"][l2] : before["list_offsets"][l2 + 1]]
        new = index.item_ids[offs[l2] : offs[l2 + 1]]
        assert sorted(old[old >= 0].tolist()) == sorted(new[new >= 0].tolist())
    assert int(upd.slot_map(index).free_top[lst]) >= free + 25
    _check(index, catalog, random.Random(0))
    too_much = torch.zeros(index.nlist, dtype=torch.int64)
    too_much[lst] = index.capacity // 2
    assert upd.local_repack(index, too_much) is None
