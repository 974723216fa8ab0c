"""The mechanism CPU cost model (planner/cpu_cost.py): expected scan work, the read-around
simulation, a profile's hand-computed prediction, and the calibration fits recovering known rates."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sterling.planner import IndexModelConfig, PlanTargets, make_topology, plan
from sterling.planner.cpu_cost import (
    GROUP_MIN,
    SIM_PAGE,
    cold_terms,
    readaround,
    scan_terms,
    scan_terms_of_probe,
)
from sterling.planner.profile import MachineProfile, _nnls, fit_cold, fit_scan
from sterling.planner.tiers import ListStats

PROFILE2 = MachineProfile(threads=2, batch=4, overhead_s=2e-3, scan_bytes_per_s=float("inf"), int8_ops_per_s=1e10,
                          mmap_cold_bw=1e9, mmap_read_s=0.0, page_cache_bw=1e10, model=2, list_s=3e-6,
                          direct_s=5e-9, dequant_s=7e-9, group_s=2e-9, probe_s=1e-8, readaround_before=1 << 20,
                          readaround_after=1 << 20, fault_s=2e-3, mmap_touch_bw=2e9)


def test_scan_terms_of_a_probe_count_each_scoring_path():
    items = np.array([10.0, 20.0, 30.0, 40.0])
    # list 0 probed by 5 queries and list 2 by 4 (each dequantized once, grouped), list 1 by 1, list 3 by none
    probe = np.array([[0, 1], [0, 2], [0, 2], [0, 2], [0, 2]])
    t = scan_terms_of_probe(probe, items)
    c = np.bincount(probe.reshape(-1), minlength=4)
    assert c.tolist() == [5, 1, 4, 0]
    assert t.lists == 3
    assert t.direct == 1 * 20  # only list 1 has fewer than GROUP_MIN queries
    assert t.dequant == 10 + 30 and t.group == 5 * 10 + 4 * 30
    assert t.probe == 5 * 4


@given(st.integers(1, 24), st.integers(0, 2**31 - 1))
@settings(max_examples=20, deadline=None)
def test_expected_scan_terms_match_sampled_batches(batch, seed):
    rng = np.random.default_rng(seed)
    nlist = 12
    items = rng.integers(1, 500, nlist).astype(np.float64)
    f = rng.random(nlist) * rng.choice([0.2, 1.0])
    t = scan_terms(items, f, batch)
    # oracle: batches of independent queries, each probing list l with probability f_l
    n = 4000
    c = (rng.random((n, batch, nlist)) < f).sum(axis=1)  # [n, nlist] queries per list
    small = (c > 0) & (c < GROUP_MIN)
    big = c >= GROUP_MIN
    want = {"lists": (c > 0).sum(1).mean(), "direct": ((c * items) * small).sum(1).mean(),
            "dequant": (items * big).sum(1).mean(), "group": ((c * items) * big).sum(1).mean()}
    scale = float((batch * f * items).sum()) + 1.0
    for name, w in want.items():
        got = getattr(t, name)
        ref = nlist if name == "lists" else scale
        assert abs(got - w) <= 0.05 * ref + 1e-9, (name, got, w)


def test_readaround_counts_only_the_uncached_pages_and_starts_windows_at_the_file_start():
    page = SIM_PAGE
    size = 64 * page
    # touches at page 10 then page 13: window [8, 13), then [11, 16) of which 13, 14, 15 are new
    assert readaround([(10 * page, 1), (13 * page, 1)], size, before=2 * page, after=3 * page) == (2, 8 * page)
    # near the start the window is shifted, not cut: [0, 5)
    assert readaround([(0, 1)], size, before=2 * page, after=3 * page) == (1, 5 * page)
    # pages the process still maps (whole 64 KiB fault-around blocks) do not fault
    assert readaround([(3 * page, 1)], size, before=2 * page, after=3 * page, cached=[(0, 1)]) == (0, 0)
    assert readaround([(20 * page, 1)], size, before=2 * page, after=3 * page, cached=[(0, 1)]) == (1, 5 * page)


def test_a_scan_in_order_through_the_mark_reads_ahead_without_faulting():
    """By hand, 64-page file, read-ahead 8 pages (4 before, 4 after a fault; the mark 8 / 4 = 2
    pages before the window's end). Touching page 20: one fault reading [16, 24), mark 22. Pages
    21..29 in order: 22 is the mark of the latest read, so the kernel reads on [24, 32) without a
    fault and marks 24; touching 24 reads [32, 40), marked 32, never touched: 1 fault, 24 pages.
    Without the asynchronous readahead, 24 faults reading [20, 28) (4 pages new) and 28 faults
    reading [24, 32) (4 new): 3 faults, 16 pages."""
    page = SIM_PAGE
    touches = [(20 * page, 1)] + [(p * page, 1) for p in range(21, 30)]
    assert readaround(touches, 64 * page, before=4 * page, after=4 * page) == (1, 24 * page)
    assert readaround(touches, 64 * page, before=4 * page, after=4 * page, readahead=False) == (3, 16 * page)
    # a mark that is not the latest read's (a fault elsewhere came between): page 20 faults [16, 24)
    # (mark 22), page 50 faults [46, 54) (mark 52, now the latest); touching 22 reads on from the first
    # uncached page after it, 24, twice the distance 22..24: [24, 30)
    mixed = [(20 * page, 1), (50 * page, 1), (22 * page, 1)]
    assert readaround(mixed, 64 * page, before=4 * page, after=4 * page) == (2, (8 + 8 + 6) * page)


def _stats(nlist=8, items=1200, layout=True):
    n = np.full(nlist, items, dtype=np.int64)
    by = {"codes": n * 64, "scales": n * 4, "item_ids": n * 8}
    starts, off = {}, 0
    for name, b in by.items():  # tensors back to back, page-aligned, lists in order inside each
        starts[name] = off + np.concatenate(([0], np.cumsum(b)[:-1]))
        off += -(-int(b.sum()) // SIM_PAGE) * SIM_PAGE
    return ListStats(bytes_by_tensor=by, probe_freq=np.ones(nlist), nprobe=nlist, always=4096,
                     file_starts=starts if layout else None, file_bytes=off if layout else 0), n, off


def test_cold_terms_without_a_file_layout_or_a_slow_tier():
    stats, _, _ = _stats(layout=False)
    assert cold_terms(stats, np.zeros(8, dtype=bool), batch=4, k=8, before=1 << 20, after=1 << 20) is None
    stats, _, _ = _stats()
    ct = cold_terms(stats, np.ones(8, dtype=bool), batch=4, k=8, before=1 << 20, after=1 << 20)
    assert (ct.faults, ct.bytes_read, ct.bytes_touched) == (0.0, 0.0, 0.0)


def test_a_mechanism_profile_gives_the_hand_computed_prediction():
    """Every list probed by every query (f = 1, batch 4 = GROUP_MIN): every list dequantized once and
    scored 4 × 2; all lists slow and the window (2 MiB) covering the whole file, released after
    every batch (cold_window 0): one fault per batch reading the file, every list's bytes touched."""
    stats, n, file_bytes = _stats()
    assert file_bytes <= 2 << 20
    B, nlist = 4, 8
    cfg = IndexModelConfig(items=int(n.sum()), dim=64, nlist=nlist, nprobe=nlist, k0=nlist, k=nlist, batch=B,
                           attrs_per_item=0, cache_dim=0, tower_params=0)
    topo = make_topology("cpu")
    p = plan(cfg, topo, list_stats=stats, list_fast=np.zeros(nlist, dtype=bool), profile=PROFILE2, cold_window=0)
    pr = PROFILE2
    items = float(n.sum())
    assert B * items >= 32_768  # the parallel regime: no serial factor
    scan = B * nlist * pr.probe_s + nlist * pr.list_s + items * pr.dequant_s + B * items * pr.group_s
    touched = float((stats.bytes_by_tensor["codes"] + stats.bytes_by_tensor["scales"]
                     + stats.bytes_by_tensor["item_ids"]).sum())  # k ≥ nprobe: every list holds a result
    cold = pr.fault_s + (file_bytes // SIM_PAGE) * SIM_PAGE / pr.mmap_cold_bw + touched / pr.mmap_touch_bw
    want = pr.overhead_s + scan + cold
    assert math.isclose(p.cost.latency_ms, want * 1e3, rel_tol=1e-9), (p.cost.latency_ms, want * 1e3)
    assert p.cost.compute_s == pytest.approx(scan)
    assert p.cost.memory_s == pytest.approx(cold)
    # all fast: no mapped-tier term at all
    fast = plan(cfg, topo, list_stats=stats, list_fast=np.ones(nlist, dtype=bool), profile=PROFILE2, cold_window=0)
    assert math.isclose(fast.cost.latency_ms, (pr.overhead_s + scan) * 1e3, rel_tol=1e-9)


def test_a_small_batch_is_charged_one_thread():
    stats, n, _ = _stats(items=100)
    cfg = IndexModelConfig(items=int(n.sum()), dim=64, nlist=8, nprobe=8, k0=8, k=8, batch=4, attrs_per_item=0,
                           cache_dim=0, tower_params=0)
    topo = make_topology("cpu")
    p = plan(cfg, topo, list_stats=stats, list_fast=np.ones(8, dtype=bool), profile=PROFILE2)
    items = float(n.sum())
    work = 8 * PROFILE2.list_s + items * PROFILE2.dequant_s + 4 * items * PROFILE2.group_s
    want = PROFILE2.overhead_s + 4 * 8 * PROFILE2.probe_s + PROFILE2.threads * work
    assert math.isclose(p.cost.latency_ms, want * 1e3, rel_tol=1e-9)


def test_config_only_planning_with_a_mechanism_profile_uses_uniform_lists():
    cfg = IndexModelConfig(items=400_000, dim=64, nlist=1024, nprobe=32, k0=10, k=10, batch=16, attrs_per_item=0,
                           cache_dim=0, tower_params=0)
    p = plan(cfg, make_topology("cpu"), profile=PROFILE2)
    t = scan_terms(np.full(1024, cfg.n_cap / 1024), np.full(1024, 32 / 1024), 16)
    want = PROFILE2.overhead_s + t.probe * PROFILE2.probe_s + (
        t.lists * PROFILE2.list_s + t.direct * PROFILE2.direct_s + t.dequant * PROFILE2.dequant_s
        + t.group * PROFILE2.group_s)
    assert math.isclose(p.cost.latency_ms, want * 1e3, rel_tol=1e-6)


def test_the_scan_fit_recovers_known_rates_from_a_fake_timer():
    rng = np.random.default_rng(3)
    items = rng.integers(50, 800, 256).astype(np.float64)
    f = rng.random(256) ** 3
    f *= 16 / f.sum()
    feats = []
    for b in (8, 16, 32):
        for nprobe in (8, 16, 32, 64):
            for _ in range(2):
                probe = np.stack([rng.choice(256, nprobe, replace=False, p=f / f.sum()) for _ in range(b)])
                feats.append(scan_terms_of_probe(probe, items).features())
    feats = np.array(feats)
    rates = np.array([4e-4, 2e-6, 6e-9, 9e-9, 2.5e-9])
    coef, err = fit_scan(feats, feats @ rates)  # the fake timer: exactly the model
    assert err < 1e-6
    assert np.allclose(coef, rates, rtol=1e-4)


def test_the_cold_fit_recovers_fault_and_byte_costs_from_a_fake_timer():
    stats, _, _ = _stats(nlist=64, items=900)
    stats = dataclasses.replace(stats, probe_freq=np.random.default_rng(0).random(64) * 0.3)
    rows = []
    for before in (64 << 10, 256 << 10):
        for cut in (0, 16, 32, 48):
            ct = cold_terms(stats, np.arange(64) < cut, batch=8, k=10, before=before, after=before, cold_window=0)
            rows.append([ct.faults, ct.bytes_read, ct.bytes_touched])
    a = np.array(rows)
    want = np.array([1.5e-3, 1 / 1.2e9, 1 / 3e9])
    got = _nnls(a, a @ want)
    assert np.allclose(got, want, rtol=1e-4)
    # the calibration's fit: bytes at the sequential bandwidth given, faults and scanned bytes fitted
    fault_s, per_touched, err = fit_cold(a, a @ want, 1.2e9)
    assert err < 1e-9 and math.isclose(fault_s, 1.5e-3, rel_tol=1e-6) and math.isclose(per_touched, 1 / 3e9, rel_tol=1e-6)
    # a disk slower than its sequential figure: the rest goes to the faults and scanned bytes, never
    # below zero, and the bytes keep the given price (no second charge for them)
    fault_s, per_touched, _ = fit_cold(a, a @ want + 2e-3 * a[:, 0], 1.2e9)
    assert math.isclose(fault_s, 3.5e-3, rel_tol=1e-6) and math.isclose(per_touched, 1 / 3e9, rel_tol=1e-6)
    fault_s, per_touched, _ = fit_cold(a, a[:, 1] / 2.4e9, 1.2e9)  # faster than its figure: nothing to add
    assert fault_s == 0.0 and per_touched == 0.0


def test_artifact_file_offsets_point_at_each_lists_bytes(tmp_path):
    from sterling.model import IndexConfig, build_index
    from sterling.model.synthetic import synthetic_catalog
    from sterling.model.tiers import artifact_list_stats

    cat = synthetic_catalog(3000, 16, seed=1, with_attributes=True)
    index = build_index(cat.embeddings, ids=cat.ids, attributes=cat.attributes, config=IndexConfig(nlist=16))
    path = tmp_path / "a.st"
    index.save(path)
    stats = ListStats.from_artifact(artifact_list_stats(path))
    raw = path.read_bytes()
    assert stats.file_bytes == len(raw)
    off = index.list_offsets.numpy()
    for name in ("codes", "scales", "item_ids"):
        t = getattr(index, name).contiguous()
        row = t.element_size() * (t[0].numel() if t.ndim > 1 else 1)
        flat = t.reshape(-1).view(torch.uint8).numpy().tobytes()
        for lst in range(16):
            s, nb = int(stats.file_starts[name][lst]), int(stats.bytes_by_tensor[name][lst])
            assert nb == (off[lst + 1] - off[lst]) * row
            assert raw[s : s + nb] == flat[off[lst] * row : off[lst + 1] * row]


def test_random_advice_reads_one_page_a_fault_and_is_priced_per_fault():
    """MADV_RANDOM on the slow tier, by hand: every list probed and holding a result, all slow,
    released after every batch: each batch faults every page of the touched tensors once (they
    are page-aligned and the lists contiguous), reading one page each — codes 150 pages, scales
    ceil(9.375) = 10, ids ceil(18.75) = 19 — and the plan charges random_fault_s per fault."""
    stats, n, _ = _stats()
    fast = np.zeros(8, dtype=bool)
    ct = cold_terms(stats, fast, batch=4, k=8, before=1 << 20, after=1 << 20, cold_window=0, advice="random")
    pages = 150 + 10 + 19
    assert (ct.faults, ct.bytes_read, ct.advice) == (pages, pages * SIM_PAGE, "random")
    assert ct.bytes_touched == float((n * (64 + 4 + 8)).sum())
    # fault-around blocks of one page: a page mapped earlier is cached, its neighbour is not
    assert readaround([(4 * SIM_PAGE, 1)], 64 * SIM_PAGE, before=0, after=SIM_PAGE, cached=[(3 * SIM_PAGE, 1)],
                      around=SIM_PAGE, readahead=False) == (1, SIM_PAGE)
    with pytest.raises(Exception) as e:
        cold_terms(stats, fast, batch=4, k=8, before=0, after=SIM_PAGE, advice="sequential")
    assert type(e.value).__name__ == "InvalidPlanConfigError"

    cfg = IndexModelConfig(items=int(n.sum()), dim=64, nlist=8, nprobe=8, k0=8, k=8, batch=4, attrs_per_item=0,
                           cache_dim=0, tower_params=0)
    topo = make_topology("cpu")
    items = float(n.sum())
    pr = PROFILE2
    scan = 4 * 8 * pr.probe_s + 8 * pr.list_s + items * pr.dequant_s + 4 * items * pr.group_s
    normal = cold_terms(stats, fast, batch=4, k=8, before=pr.readaround_before, after=pr.readaround_after,
                        cold_window=0)
    normal_s = normal.faults * pr.fault_s + normal.bytes_read / pr.mmap_cold_bw + normal.bytes_touched / pr.mmap_touch_bw
    for random_fault_s, want_advice in ((1e-6, "random"), (1e-3, "normal")):
        prof = dataclasses.replace(PROFILE2, random_fault_s=random_fault_s)
        p = plan(cfg, topo, list_stats=stats, list_fast=fast, profile=prof, cold_window=0)
        assert p.devices[0].tiers["slow_advice"] == want_advice
        want = pr.overhead_s + scan + min(pages * random_fault_s, normal_s)
        assert math.isclose(p.cost.latency_ms, want * 1e3, rel_tol=1e-9), (random_fault_s, p.cost.latency_ms)
        forced = plan(cfg, topo, PlanTargets(p99_ms=None), list_stats=stats, list_fast=fast, profile=prof,
                      cold_window=0, slow_advice="random")
        assert forced.devices[0].tiers["slow_advice"] == "random"
        assert math.isclose(forced.cost.latency_ms, (pr.overhead_s + scan + pages * random_fault_s) * 1e3, rel_tol=1e-9)


def test_random_advice_needs_a_profile_that_measured_it():
    stats, n, _ = _stats()
    cfg = IndexModelConfig(items=int(n.sum()), dim=64, nlist=8, nprobe=8, k0=8, k=8, batch=4, attrs_per_item=0,
                           cache_dim=0, tower_params=0)
    topo = make_topology("cpu")
    fast = np.zeros(8, dtype=bool)
    # a profile without the single-page cost never picks it, and cannot be asked to price it
    assert plan(cfg, topo, list_stats=stats, list_fast=fast, profile=PROFILE2).devices[0].tiers["slow_advice"] == "normal"
    for kwargs in ({"profile": PROFILE2}, {"profile": None}, {"profile": PROFILE2, "slow_advice_value": "willneed"}):
        advice = kwargs.pop("slow_advice_value", "random")
        with pytest.raises(Exception) as e:
            plan(cfg, topo, list_stats=stats, list_fast=fast, slow_advice=advice, **kwargs)
        assert type(e.value).__name__ == "InvalidPlanConfigError", kwargs
