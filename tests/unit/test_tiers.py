"""Memory tiers of the item index on CPU: resident lists + the memory-mapped artifact.

Oracle: the same catalog's untiered, in-memory index (built, never saved).
A tiered index must return bit-identical ids and scores for any split of
the lists, with and without filters, on every search path (small-batch
fused scan, chunked scan, filtered scan with rescans and pre-filtering).
Residency is read back from the kernel (/proc/self/smaps of the artifact's
mapping), not from our own bookkeeping.
"""

from __future__ import annotations

import sys
import threading

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sterling.model import IndexConfig, ItemIndex, build_index
from sterling.model.errors import InvalidInputError
from sterling.model.tiers import PAGE_BYTES, TierLayout, pick_fast

linux = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/smaps")
WHERES = [None, "lang:en", "lang:es AND NOT lang:en", "(lang:ja OR lang:ko) AND NOT lang:en", "lang:zz"]


@pytest.fixture(scope="module")
def built(small_catalog):
    c = small_catalog
    return build_index(c.embeddings, ids=c.ids, attributes=c.attributes, config=IndexConfig(nlist=64))


@pytest.fixture(scope="module")
def artifact(built, tmp_path_factory):
    path = tmp_path_factory.mktemp("tiers") / "index.st"
    built.save(path)
    return path


def _mapping(addr: int) -> dict[str, int]:
    """smaps fields (bytes) of the mapping that holds ``addr``."""
    fields: dict[str, int] = {}
    inside = False
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split()[0]
            if "-" in head and not head.endswith(":"):
                lo, hi = (int(x, 16) for x in head.split("-"))
                if inside:
                    break
                inside = lo <= addr < hi
                continue
            if inside and line.split()[-1] == "kB":
                fields[head.rstrip(":")] = int(line.split()[1]) * 1024
    return fields


def _same(a, b):
    assert torch.equal(a[0], b[0]), "scores differ"
    assert torch.equal(a[1], b[1]), "ids differ"


def test_build_measures_probe_frequency_from_a_query_sample(built, small_catalog):
    layout = built.tier_layout
    assert layout is not None and layout.nlist == built.nlist
    assert layout.probe_freq.sum() == pytest.approx(built.default_nprobe())
    # independent count: probe the first items (the default sample is items) with torch topk
    xq = torch.as_tensor(small_catalog.embeddings[:4096]).float()
    sample = build_index(small_catalog.embeddings, config=IndexConfig(nlist=64), query_sample=xq)
    top = (xq @ sample.centroids.T).topk(sample.default_nprobe(), dim=1).indices
    want = np.bincount(top.reshape(-1).numpy(), minlength=64) / xq.shape[0]
    np.testing.assert_allclose(sample.tier_layout.probe_freq, want)
    assert sample.tier_layout.source == "queries"


def test_old_artifact_without_tiers_loads_and_searches(built, tmp_path, small_catalog):
    meta = built.meta()
    meta.pop("tiers")
    old = ItemIndex.from_parts(meta, built.tensors())
    old.save(tmp_path / "old.st")
    back = ItemIndex.load(tmp_path / "old.st")
    assert back.tier_layout is None and back.tiering is None
    xq = small_catalog.embeddings[:5]
    _same(back.search(xq, k=10), built.search(xq, k=10))


@given(
    seed=st.integers(0, 2**31 - 1),
    fast_p=st.sampled_from([0.0, 0.2, 0.5, 1.0]),
    batch=st.sampled_from([1, 7, 40]),
    nprobe=st.sampled_from([1, 8, 64]),
    where=st.sampled_from(WHERES),
    k=st.sampled_from([1, 10, 50]),
)
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_tiered_search_is_bit_identical_to_the_untiered_index(
    built, artifact, small_catalog, seed, fast_p, batch, nprobe, where, k
):
    rng = np.random.default_rng(seed)
    tiered = ItemIndex.load(artifact, verify=False)
    tiered.apply_tiers(rng.random(64) < fast_p, cold_window=int(rng.integers(0, 1 << 20)))
    rows = rng.choice(small_catalog.embeddings.shape[0], batch, replace=False)
    xq = torch.as_tensor(small_catalog.embeddings[rows]) + 0.05 * torch.randn(batch, 32, generator=torch.Generator().manual_seed(seed))
    for _ in range(2):  # the second pass reads pages the first one released
        _same(tiered.search(xq, k=k, nprobe=nprobe, where=where), built.search(xq, k=k, nprobe=nprobe, where=where))


def test_tiers_survive_save_and_load(built, artifact, tmp_path, small_catalog):
    t = ItemIndex.load(artifact)
    fast = np.arange(64) % 3 == 0
    t.apply_tiers(fast)
    t.save(tmp_path / "tiered.st")
    back = ItemIndex.load(tmp_path / "tiered.st")  # the layout records a tier per list: applied on load
    assert back.tiering is not None
    np.testing.assert_array_equal(back.tiering.fast, fast)
    np.testing.assert_allclose(back.tier_layout.probe_freq, built.tier_layout.probe_freq, rtol=1e-5)
    xq = small_catalog.embeddings[:33]
    _same(back.search(xq, k=20, where="lang:en"), built.search(xq, k=20, where="lang:en"))
    assert ItemIndex.load(tmp_path / "tiered.st", tiers=False).tiering is None


@linux
def test_fast_lists_are_private_resident_and_slow_lists_are_released(artifact, small_catalog):
    t = ItemIndex.load(artifact, verify=False)
    addr = t.codes.data_ptr()
    fast = np.zeros(64, dtype=bool)
    fast[::4] = True
    st_ = t.apply_tiers(fast, cold_window=0)
    m = _mapping(addr)
    # promoted pages are private copies (Anonymous), up to edge pages shared between tensors
    want = st_.fast_resident_bytes()
    assert want > 0
    assert want - 8 * PAGE_BYTES <= m["Anonymous"] <= want
    # a search over every list faults the slow pages in, then gives them back (window 0)
    xq = small_catalog.embeddings[:4]
    t.search(xq, k=10, nprobe=64)
    t.search(xq, k=10, nprobe=64, where="lang:en")
    m2 = _mapping(addr)
    small = sum(getattr(t, n).numel() * getattr(t, n).element_size()
                for n in ("centroids", "list_offsets", "alive", "version"))
    file_backed = m2["Rss"] - m2["Anonymous"]
    # what may stay: the small tensors, edge pages, and the ids of the final answers (mapped after the scan)
    assert file_backed <= small + (4 * 10 + 16) * PAGE_BYTES, (file_backed, small)
    assert m2["Anonymous"] <= want
    assert st_.releases >= 2


@linux
def test_a_list_changed_in_place_is_never_released(artifact, built, small_catalog):
    t = ItemIndex.load(artifact, verify=False)
    t.apply_tiers(np.zeros(64, dtype=bool), cold_window=0)
    off = t.list_offsets
    lst = 5
    rows = slice(int(off[lst]), int(off[lst + 1]))
    t.codes[rows] = -t.codes[rows]  # an in-place edit (streaming upserts write codes like this)
    t.scales[rows] = t.scales[rows] * 2
    t.tiering.release(t.tier_tensors())
    t.search(small_catalog.embeddings[:3], k=5, nprobe=64)
    assert torch.equal(t.codes[rows], -built.codes[rows])
    assert torch.equal(t.scales[rows], built.scales[rows] * 2)


def test_tiers_need_the_mapped_artifact_and_a_valid_mask(built, artifact):
    with pytest.raises(InvalidInputError):
        built.apply_tiers(np.ones(64, dtype=bool))  # built in memory: no slow tier to map
    t = ItemIndex.load(artifact, verify=False)
    with pytest.raises(InvalidInputError):
        t.apply_tiers(np.ones(63, dtype=bool))
    with pytest.raises(InvalidInputError):
        t.apply_tiers(np.ones(64, dtype=bool), cold_window=-1)
    with pytest.raises(InvalidInputError):
        t.apply_tiers()  # the artifact records probe statistics but no tier per list
    with pytest.raises(InvalidInputError):
        TierLayout(probe_freq=np.array([1.0, np.nan]), nprobe=1, queries=1)


def test_pick_fast_takes_the_hottest_lists_that_fit():
    freq = np.array([0.1, 0.9, 0.5, 0.9, 0.0])
    size = np.array([10, 30, 10, 30, 5])
    np.testing.assert_array_equal(pick_fast(freq, size, 60), [False, True, False, True, False])
    np.testing.assert_array_equal(pick_fast(freq, size, 45), [False, True, True, False, True])
    assert not pick_fast(freq, size, 0).any()


def test_online_retier_keeps_answers_equal_while_queries_run(built, artifact, small_catalog):
    t = ItemIndex.load(artifact, verify=False)
    t.apply_tiers(np.zeros(64, dtype=bool), cold_window=1 << 16)
    xq = torch.as_tensor(small_catalog.embeddings[:24])
    cases = [(xq[:1], None), (xq, None), (xq[:9], "lang:en"), (xq, "lang:es AND NOT lang:en")]
    want = [built.search(q, k=10, nprobe=8, where=w) for q, w in cases]
    stop = threading.Event()
    bad: list[str] = []
    done = [0]

    def reader():
        while not stop.is_set():
            for (q, w), ref in zip(cases, want):
                got = t.search(q, k=10, nprobe=8, where=w)
                if not (torch.equal(got[0], ref[0]) and torch.equal(got[1], ref[1])):
                    bad.append(f"{w} differs")
            done[0] += 1

    th = threading.Thread(target=reader)
    th.start()
    rng = np.random.default_rng(1)
    try:
        for _ in range(6):
            t.retier(rng.random(64) < 0.5)
        budget = int(t.tiering.list_bytes.sum() // 3)
        fast = t.retier_from_observed(budget)
        while done[0] < 3:
            stop.wait(0.01)
    finally:
        stop.set()
        th.join()
    assert not bad, bad[:3]
    assert int(t.tiering.list_bytes[fast].sum()) <= budget
    # the observed probes decide: lists the reader probed most are fast
    obs = t.tiering.observed
    assert obs[fast].mean() >= obs[~fast].mean()


def test_a_model_artifact_serves_with_its_recorded_tiers(built, tmp_path, small_catalog):
    from sterling.model import RetrievalModel
    from sterling.model.tiers import retier_artifact

    path = tmp_path / "model.st"
    RetrievalModel(built).save(path)
    assert RetrievalModel.load(path).index.tiering is None  # probe statistics only: nothing applied
    fast = np.arange(64) % 2 == 1
    retier_artifact(path, fast)
    model = RetrievalModel.load(path)
    np.testing.assert_array_equal(model.index.tiering.fast, fast)
    xq = small_catalog.embeddings[:12]
    _same(model.index.search(xq, k=10, where="lang:en"), built.search(xq, k=10, where="lang:en"))
    with pytest.raises(InvalidInputError):
        retier_artifact(path, np.ones(3, dtype=bool))


def test_tiers_follow_an_artifact_into_document_shards_and_their_rank_slices(built, tmp_path, small_catalog):
    """The three levels together on one artifact: a tiered model cut into document shards
    (``launch ray``) and each shard into rank slices (``--ranks-per-host``); every rank slice
    loads with the original tier of each of its lists applied, and the exact merge of all
    slices' answers equals the untiered index's."""
    from sterling.cluster.merge import merge_topk
    from sterling.model import RetrievalModel
    from sterling.model.tiers import retier_artifact
    from sterling.sharding.documents import write_shards
    from sterling.sharding.ranks import rank_ranges_within, write_rank_slices

    path = tmp_path / "model.st"
    RetrievalModel(built).save(path)
    fast = np.arange(64) % 3 == 0
    retier_artifact(path, fast)
    shards = write_shards(path, tmp_path / "shards", num_shards=2)
    xq = small_catalog.embeddings[:12]
    for where in (None, "lang:en"):
        parts, covered = [], []
        for s in shards.shards:
            shard_index = RetrievalModel.load(s.path).index
            ranges = rank_ranges_within(shard_index, tuple(s.lists), 2)
            ranks = write_rank_slices(s.path, tmp_path / f"ranks-{s.index}", ranges=ranges)
            for r in ranks.shards:
                index = RetrievalModel.load(r.path).index
                assert index.tiering is not None, f"rank slice {r.path} lost its tiers"
                np.testing.assert_array_equal(index.tiering.fast, fast)
                covered.append(tuple(r.lists))
                scores, ids = index.search(xq, k=10, nprobe=8, where=where)
                parts.append((ids.numpy(), scores.numpy()))
        assert sorted(covered)[0][0] == 0 and sorted(covered)[-1][1] == 64
        ids, scores = merge_topk(parts, 10)
        want_s, want_i = built.search(xq, k=10, nprobe=8, where=where)
        np.testing.assert_array_equal(ids, want_i.numpy())
        np.testing.assert_array_equal(scores, want_s.numpy())


@linux
@pytest.mark.parametrize("batched", [True, False], ids=["process_madvise", "one-madvise-per-run"])
def test_madvise_many_drops_exactly_the_given_runs(tmp_path, batched, monkeypatch):
    """Release of many runs (one process_madvise call, or the per-run fallback): the private copies
    in the runs revert to the file's bytes (read independently from the file), pages between them keep
    theirs. 1,500 runs: more than one call's 1,024 ranges."""
    import mmap

    from sterling.model import tiers as tiers_mod

    n = 1500
    data = np.random.default_rng(3).integers(0, 250, (2 * n + 1) * PAGE_BYTES, dtype=np.uint8)
    path = tmp_path / "pages.bin"
    path.write_bytes(data.tobytes())
    monkeypatch.setitem(tiers_mod._batched, "ok", batched and tiers_mod._batched["ok"])
    with open(path, "rb") as f:
        m = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
        arr = np.frombuffer(m, dtype=np.uint8)
        arr_w = np.ndarray(arr.shape, dtype=np.uint8, buffer=m)
        base = arr.ctypes.data
        assert base % PAGE_BYTES == 0
        arr_w[::PAGE_BYTES] = 255  # a private copy of every page, differing from the file (values < 250)
        runs = [(base + (2 * i + 1) * PAGE_BYTES, PAGE_BYTES) for i in range(n)]  # every odd page
        assert tiers_mod.madvise_many(runs, tiers_mod._MADV_DONTNEED) == n * PAGE_BYTES
        firsts = arr[::PAGE_BYTES].copy()
        want = np.full(2 * n + 1, 255, dtype=np.uint8)
        want[1::2] = data[PAGE_BYTES::PAGE_BYTES][: 2 * n : 2]  # odd pages: the file's byte again
        np.testing.assert_array_equal(firsts, want)
        del arr, arr_w
        m.close()


def _vm_flags(lo: int, hi: int) -> list[set[str]]:
    """The VmFlags of every mapping (area) that overlaps [lo, hi), read from /proc/self/smaps."""
    out, cur = [], None
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split()[0]
            if "-" in head and not head.endswith(":"):
                a, b = (int(x, 16) for x in head.split("-"))
                cur = a < hi and lo < b
            elif cur and head == "VmFlags:":
                out.append(set(line.split()[1:]))
    return out


@linux
def test_random_advice_marks_the_slow_pages_and_answers_stay_identical(built, artifact, small_catalog):
    """MADV_RANDOM on the slow tier: the kernel's own record (VmFlags ``rr`` in smaps) covers every
    slow list's pages of every per-item tensor; back to ``normal`` it is gone; answers never change
    (filtered and unfiltered, before and after an online re-tier, which reads the promoted pages
    with one WILLNEED instead of a page a write fault)."""
    from sterling.model.tiers import PER_ITEM_TENSORS

    t = ItemIndex.load(artifact, verify=False)
    fast = np.arange(64) % 5 == 0
    st_ = t.apply_tiers(fast, cold_window=1 << 16, slow_advice="random")
    assert st_.advice == "random" and t.tier_layout.slow_advice == "random"
    off = t.list_offsets.numpy()
    slow_lists = np.flatnonzero(~fast & (off[1:] > off[:-1]))
    checked = 0
    for name in ("codes", "scales", "item_ids"):
        ten = getattr(t, name)
        row = ten.element_size() * (ten[0].numel() if ten.ndim > 1 else 1)
        for lst in slow_lists[::7]:
            lo = ten.data_ptr() + int(off[lst]) * row
            hi = ten.data_ptr() + int(off[lst + 1]) * row
            flags = _vm_flags(lo, hi)
            assert flags and all("rr" in f for f in flags), (name, lst, flags)
            checked += 1
    assert checked >= 9
    xq = small_catalog.embeddings[:17]
    for where in (None, "lang:en", "lang:es AND NOT lang:en"):
        for nprobe in (4, 64):
            _same(t.search(xq, k=10, nprobe=nprobe, where=where), built.search(xq, k=10, nprobe=nprobe, where=where))
    t.retier(np.arange(64) % 2 == 0)  # promote under MADV_RANDOM
    _same(t.search(xq, k=10, nprobe=64), built.search(xq, k=10, nprobe=64))
    st_.advise(t.tier_tensors(), "normal")
    for name in PER_ITEM_TENSORS:
        ten = getattr(t, name)
        if ten.numel():
            lo = ten.data_ptr()
            # whole pages inside the tensor (an edge page may lie in a neighbour's area)
            a, b = -(-lo // PAGE_BYTES) * PAGE_BYTES, (lo + ten.numel() * ten.element_size()) // PAGE_BYTES * PAGE_BYTES
            if b > a:
                assert all("rr" not in f for f in _vm_flags(a, b)), name
    with pytest.raises(InvalidInputError, match="sequential"):
        t.apply_tiers(fast, slow_advice="sequential")


def test_the_recorded_slow_advice_is_applied_on_load(built, artifact, tmp_path, small_catalog):
    from sterling.model.tiers import retier_artifact

    out = tmp_path / "random.st"
    fast = np.arange(64) % 4 == 0
    retier_artifact(artifact, fast, out=out, cold_window=1 << 20, slow_advice="random")
    t = ItemIndex.load(out)
    assert t.tiering.advice == "random" and t.tier_layout.slow_advice == "random"
    assert t.tiering.cold_window == 1 << 20
    assert ItemIndex.load(out, slow_advice="normal").tiering.advice == "normal"  # an explicit choice wins
    retier_artifact(artifact, fast, out=tmp_path / "plain.st")  # none recorded: the read-around
    assert ItemIndex.load(tmp_path / "plain.st").tiering.advice == "normal"
    xq = small_catalog.embeddings[:11]
    _same(t.search(xq, k=10, where="lang:en"), built.search(xq, k=10, where="lang:en"))
    with pytest.raises(InvalidInputError):
        retier_artifact(artifact, fast, out=tmp_path / "bad.st", slow_advice="willneed")


@linux
def test_madvise_many_falls_back_when_no_pidfd_can_be_opened(tmp_path, monkeypatch):
    """A sandbox without pidfd_open: the runs are still released (one madvise each), and the
    batched path is switched off instead of failing on every release."""
    import mmap
    import os

    from sterling.model import tiers as tiers_mod

    def refuse(pid):
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(os, "pidfd_open", refuse)
    monkeypatch.setitem(tiers_mod._batched, "pid", -1)
    monkeypatch.setitem(tiers_mod._batched, "ok", True)
    path = tmp_path / "pages.bin"
    path.write_bytes(bytes(range(8)) * (4 * PAGE_BYTES // 8))
    with open(path, "rb") as f:
        m = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
        arr = np.ndarray((4 * PAGE_BYTES,), dtype=np.uint8, buffer=m)
        arr[::PAGE_BYTES] = 255
        base = arr.ctypes.data
        assert tiers_mod.madvise_many([(base + PAGE_BYTES, PAGE_BYTES), (base + 3 * PAGE_BYTES, PAGE_BYTES)],
                                      tiers_mod._MADV_DONTNEED) == 2 * PAGE_BYTES
        assert arr[::PAGE_BYTES].tolist() == [255, 0, 255, 0]  # the file's byte 0 back on the released pages
        assert tiers_mod._batched["ok"] is False
        del arr
        m.close()
