"""Streaming upserts of a learned model: item features → item tower → index entry + OverArch cache row.

Oracles: a plain dict of id → row for the cache alone (hypothesis); a fresh
model built from the final catalog with the same weights (``with_catalog``)
for a stream of feature upserts and deletes; replay of the committed batches
for concurrent readers; a second open of the data directory for recovery.
"""

from __future__ import annotations

import random
import threading
import time
from collections import defaultdict

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sterling.model.learned import EmbeddingCache

C = 6


# ------------------------------------------------------------------ the cache alone
@settings(max_examples=60, deadline=None)
@given(
    dtype=st.sampled_from(["fp32", "bf16", "int8"]),
    start=st.lists(st.integers(0, 60), unique=True, max_size=20),
    ops=st.lists(
        st.tuples(st.sampled_from(["upsert", "delete", "compact"]), st.lists(st.integers(0, 80), unique=True, max_size=12)),
        max_size=25,
    ),
    seed=st.integers(0, 2**16),
)
def test_cache_updates_match_a_dict_of_rows(dtype, start, ops, seed):
    g = torch.Generator().manual_seed(seed)
    ids0 = torch.tensor(start, dtype=torch.int64)
    x0 = torch.randn(len(start), C, generator=g)
    cache = EmbeddingCache.build(ids0, x0, dtype)
    want = {i: EmbeddingCache.encode(x0[j : j + 1], dtype) for j, i in enumerate(start)}
    for op, ids in ops:
        t = torch.tensor(ids, dtype=torch.int64)
        if op == "upsert":
            x = torch.randn(len(ids), C, generator=g)
            cache.apply(cache.plan_upsert(t, x, slack=0.2))
            want.update({i: EmbeddingCache.encode(x[j : j + 1], dtype) for j, i in enumerate(ids)})
        elif op == "delete":
            cache.apply(cache.plan_delete(t))
            for i in ids:
                want.pop(i, None)
        else:
            cache.apply(cache.plan_compact(slack=0.0))
            assert cache.data.shape[0] == len(want) + 64  # memory back to the live rows (+ the minimum spare)
        assert cache.num_items == len(want)
    probe = torch.tensor([[-1, *range(0, 82)]], dtype=torch.int64)
    got, valid = cache.gather(probe)
    for k, i in enumerate(probe[0].tolist()):
        assert bool(valid[0, k]) == (i in want), i
        if i in want:
            data, scale = want[i]
            expect = data.to(torch.float32) * (scale[:, None] if dtype == "int8" else 1.0)
            assert torch.equal(got[0, k], expect[0]), i


def test_cache_round_trips_through_an_artifact_after_updates(tmp_path):
    from sterling.model.artifact import read_artifact, write_artifact

    cache = EmbeddingCache.build(torch.arange(10), torch.randn(10, C))
    cache.apply(cache.plan_upsert(torch.tensor([3, 40, 41]), torch.randn(3, C)))
    cache.apply(cache.plan_delete(torch.tensor([4, 41])))
    write_artifact(tmp_path / "c.st", kind="cache", meta={}, tensors=dict(cache.state_dict()))
    t = read_artifact(tmp_path / "c.st")[1]
    again = EmbeddingCache(t["ids"], t["data"], t["scale"], t["live"], t["delta_ids"], t["delta_rows"])
    probe = torch.arange(-1, 45)[None]
    a, b = cache.gather(probe), again.gather(probe)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not bool(b[1][0, 5]) and bool(b[1][0, 41]) and not bool(b[1][0, 42])


# ------------------------------------------------------------------ the learned model


def _table(items, ids, src):
    """A FeatureTable for ``ids`` whose features are those of ``items`` rows ``src`` (the id is the item's own)."""
    from sterling.model.data import FeatureTable, csr_take

    src = np.asarray(src, dtype=np.int64)
    sparse = {}
    for k, (v, o) in items.sparse.items():
        vv, ln = csr_take(v, o, src)
        sparse[k] = (vv, np.concatenate([[0], np.cumsum(ln)]).astype(np.int64))
    return FeatureTable(ids=np.asarray(ids, dtype=np.int64), sparse=sparse,
                        dense={k: v[src] for k, v in items.dense.items()},
                        attributes=[list(items.attributes[i]) for i in src])


def _concat(tables):
    from sterling.model.data import FeatureTable

    sparse = {}
    for k in tables[0].sparse:
        vals, lens = [], []
        for t in tables:
            v, o = t.sparse[k]
            vals.append(v)
            lens.append(np.diff(o))
        sparse[k] = (np.concatenate(vals), np.concatenate([[0], np.cumsum(np.concatenate(lens))]).astype(np.int64))
    return FeatureTable(ids=np.concatenate([t.ids for t in tables]), sparse=sparse,
                        dense={k: np.concatenate([t.dense[k] for t in tables]) for k in tables[0].dense},
                        attributes=[a for t in tables for a in t.attributes])


def _stream(items, rng: random.Random, steps: int):
    """Batches (op, ids, src rows) over the catalog's ids and new ones; the final catalog as id → src row."""
    n = len(items)
    catalog = {int(i): r for r, i in enumerate(items.ids)}
    ops = []
    for _ in range(steps):
        if rng.random() < 0.3 and catalog:
            ids = rng.sample(sorted(catalog), min(len(catalog), rng.randint(1, 12)))
            ops.append(("delete", ids, None))
            for i in ids:
                catalog.pop(i)
        else:
            ids = rng.sample(list(items.ids[: n // 2]) + list(range(10_000, 10_060)), rng.randint(1, 15))
            src = [rng.randrange(n) for _ in ids]
            ops.append(("upsert", [int(i) for i in ids], src))
            catalog.update({int(i): s for i, s in zip(ids, src)})
    return ops, catalog


def _same_ranking(a, b):
    """Equal answers; items whose values tie may come in either order."""
    torch.testing.assert_close(a.values, b.values, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(a.task_scores, b.task_scores, rtol=1e-5, atol=1e-6)
    for q in range(a.ids.shape[0]):
        va = a.values[q]
        for j in range(a.ids.shape[1]):
            ties = (va - va[j]).abs() <= 1e-6
            assert int(a.ids[q, j]) in set(b.ids[q][ties].tolist()), (q, j)


@pytest.mark.parametrize("seed", [0, 1])
def test_feature_upserts_and_deletes_equal_a_fresh_model_of_the_final_catalog(learned_path, items, seed):
    from sterling.model.learned import LearnedRetrievalModel
    from sterling.model.live import LiveModel

    base = LearnedRetrievalModel.load(learned_path)
    live = LiveModel.open(base, LiveModel.Config(compact_waste=0))
    ops, catalog = _stream(items, random.Random(seed), 25)
    for op, ids, src in ops:
        if op == "delete":
            live.delete(ids)
        else:
            t = _table(items, ids, src)
            live.upsert(ids, item_features=t, attributes=t.attributes)
    if seed == 1:
        live.compact()  # the re-laid-out index and cache answer the same
    final = sorted(catalog)
    fresh = LearnedRetrievalModel.load(learned_path).with_catalog(
        _table(items, final, [catalog[i] for i in final]), index_config=base.index.config).eval()
    users = base.users.ids[:12]
    n_live = len(final)
    assert live.model.index.num_items == n_live and live.model.cache.num_items == n_live
    with torch.no_grad():
        for where in (None, "lang:en"):
            # every list probed and every item a candidate: the answer depends only on the catalog
            kw = dict(user_ids=users, k=20, k0=n_live, nprobe=base.index.nlist, where=where)
            got, want = live(**kw), fresh(**kw)
            _same_ranking(got, want)
            assert not set(got.ids[got.ids >= 0].tolist()) - set(final)


def test_vector_upserts_on_a_learned_model_and_features_on_an_index_model_are_refused(learned_path, items):
    from sterling.model import IndexConfig, RetrievalModel, build_index
    from sterling.model.errors import ItemFeaturesError
    from sterling.model.learned import LearnedRetrievalModel
    from sterling.model.live import LiveModel

    live = LiveModel.open(LearnedRetrievalModel.load(learned_path))
    v = live.version
    with pytest.raises(ItemFeaturesError):
        live.upsert([1], np.zeros((1, live.model.index.dim), np.float32))
    with pytest.raises(ItemFeaturesError):
        live.upsert([1])
    t = _table(items, [5, 6], [0, 1])
    with pytest.raises(ItemFeaturesError):
        live.upsert([5, 6], np.zeros((2, live.model.index.dim), np.float32), item_features=t)
    from sterling.model.errors import InvalidInputError

    with pytest.raises(InvalidInputError):
        live.upsert([6, 5], item_features=t)  # rows in another order than the ids
    assert live.version == v
    plain = LiveModel.open(RetrievalModel(build_index(torch.randn(50, 4), config=IndexConfig(nlist=2))))
    with pytest.raises(ItemFeaturesError):
        plain.upsert([1], item_features=t)


def test_recovery_replays_item_features_into_the_same_index_and_cache(learned_path, items, tmp_path):
    from sterling.model.live import LiveModel

    cfg = LiveModel.Config(data_dir=tmp_path / "data", fsync=False, compact_waste=0)
    live = LiveModel.open(learned_path, cfg)
    ops, _ = _stream(items, random.Random(7), 14)
    for j, (op, ids, src) in enumerate(ops):
        if op == "delete":
            live.delete(ids)
        else:
            t = _table(items, ids, src)
            live.upsert(ids, item_features=t, attributes=t.attributes)
        if j == 6:
            live.snapshot()  # recovery = this snapshot (cache included) + the records after it
    users = live.model.users.ids[:8]
    kw = dict(user_ids=users, k=15, k0=100)
    want = live(**kw)
    state = {n: t.clone() for n, t in live.model.cache.state_dict().items()}
    codes = live.model.index.codes.clone()
    live.close()
    again = LiveModel.open(learned_path, cfg)
    assert again.version == want.version and again.learned
    got = again(**kw)
    assert torch.equal(got.ids, want.ids) and torch.equal(got.values, want.values)
    assert torch.equal(got.task_scores, want.task_scores)
    for n, t in again.model.cache.state_dict().items():
        assert torch.equal(t, state[n]), n
    assert torch.equal(again.model.index.codes, codes)
    again.close()


def test_a_feature_record_round_trips_and_a_newer_format_is_refused():
    from sterling.model.data import ItemInputs
    from sterling.model.errors import CorruptLogError
    from sterling.model.wal import _FRAME, LogRecord, RecordKind

    f = ItemInputs(keys=("item_id", "topic"), lengths=np.array([[1, 1, 1], [2, 0, 1]], np.int32),
                   values=np.array([4, 9, 2, 7, 7, 1], np.int64), dense=np.arange(6, dtype=np.float32).reshape(3, 2))
    rec = LogRecord(RecordKind.UPSERT_FEATURES, 5, np.array([10, 11, 12]), np.zeros((3, 0), np.float32),
                    [["a:1"], [], ["b:2"]], f)
    frame = rec.encode()
    back = LogRecord.decode(frame[_FRAME.size :])
    assert back.kind is RecordKind.UPSERT_FEATURES and back.seq == 5 and back.meta == rec.meta
    assert np.array_equal(back.ids, rec.ids) and back.features.keys == f.keys
    assert np.array_equal(back.features.lengths, f.lengths) and np.array_equal(back.features.values, f.values)
    assert np.array_equal(back.features.dense, f.dense)
    newer = frame[_FRAME.size :].replace(b'"format":1', b'"format":9')
    with pytest.raises(CorruptLogError):
        LogRecord.decode(newer)


@pytest.mark.parametrize("front", ["model", "router"])
def test_concurrent_readers_never_mix_a_batch_with_old_cache_rows(learned_path, items, tmp_path, front):
    """Writers move a fixed set of items between two feature sets (and add / delete others) while
    readers query; every answer equals the replayed single-process model's at the version it
    reports. ``router``: two document shards + the router's cache (``live_router``), no sockets."""
    from sterling.model.learned import LearnedRetrievalModel
    from sterling.model.live import LiveModel

    kw = dict(k=10, k0=60, adaptive=False)
    if front == "model":
        live = LiveModel.open(LearnedRetrievalModel.load(learned_path), LiveModel.Config(compact_waste=0))
        users = live.model.users.ids[:4]

        def query(q):
            out = live(user_ids=users[q : q + 1], **kw)
            return out.version, out.ids[0].tolist(), out.values[0].numpy(), out.task_scores[0].numpy()

        upsert = lambda ids, t: live.upsert(ids, item_features=t)  # noqa: E731
        delete = live.delete
        close = live.close
    else:
        from sterling.cluster.live import live_router

        router, shards = live_router(learned_path, data_dir=tmp_path / "data", num_shards=2)
        users = shards.learned.model.users.ids[:4]

        def query(q):
            r = router.retrieve(user_ids=users[q : q + 1].numpy(), **kw)
            assert not r.version_skew  # all shards of a request are applied under one hold
            return r.version, r.ids[0].tolist(), r.scores[0], r.task_scores[0]

        upsert = lambda ids, t: shards.upsert(ids, item_features=t)[1]  # noqa: E731
        delete = lambda ids: shards.delete(ids)[1]  # noqa: E731
        close = shards.close
    hot = [int(i) for i in items.ids[:20]]
    stop = time.monotonic() + 3.0
    seen, committed, errors = [], [], []

    def reader(seed):
        r = random.Random(seed)
        try:
            while time.monotonic() < stop:
                q = r.randrange(len(users))
                seen.append((q, *query(q)))
        except BaseException as e:  # pragma: no cover - surfaced below
            errors.append(e)

    def writer():
        r = random.Random(5)
        try:
            flip = 0
            while time.monotonic() < stop:
                if r.random() < 0.2:
                    ids = r.sample(range(10_000, 10_040), r.randint(1, 5))
                    committed.append((delete(ids), ("delete", ids, None)))
                    continue
                flip ^= 1
                ids = hot + r.sample(range(10_000, 10_040), r.randint(0, 5))
                src = [(j * 7 + 3 * flip) % len(items) for j in range(len(ids))]
                committed.append((upsert(ids, _table(items, ids, src)), ("upsert", ids, src)))
        except BaseException as e:  # pragma: no cover
            errors.append(e)

    threads = [threading.Thread(target=reader, args=(s,)) for s in (1, 2)] + [threading.Thread(target=writer)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    close()
    assert not errors, errors
    oracle = LiveModel.open(LearnedRetrievalModel.load(learned_path), LiveModel.Config(compact_waste=0))
    versions = [v for v, _ in committed]
    assert versions == sorted(versions) and len(set(versions)) == len(versions)
    step = {oracle.version: 0, **{v: r + 1 for r, v in enumerate(versions)}}  # front version → requests applied
    want = defaultdict(set)
    for q, v, *_ in seen:
        want[step[v]].add(q)
    answers = {}

    def record(r):
        for q in want.get(r, ()):
            out = oracle(user_ids=users[q : q + 1], **kw)
            answers[r, q] = (out.ids[0].tolist(), out.values[0].numpy(), out.task_scores[0].numpy())

    record(0)
    for r, (_, (op, ids, src)) in enumerate(committed):
        if op == "delete":
            oracle.delete(ids)
        else:
            oracle.upsert(ids, item_features=_table(items, ids, src))
        record(r + 1)
    assert len(seen) > 20 and len(committed) > 5 and len({v for _, v, *_ in seen}) > 3
    for q, v, ids, values, task_scores in seen:
        w_ids, w_values, w_tasks = answers[step[v], q]
        assert ids == w_ids, (v, q)
        np.testing.assert_allclose(values, w_values, rtol=1e-6, atol=1e-7)
        np.testing.assert_allclose(task_scores, w_tasks, rtol=1e-6, atol=1e-7)


def test_a_torn_feature_record_is_dropped_and_the_rest_replays(learned_path, items, tmp_path):
    """The last record (an upsert with item features) cut short, as by a crash mid-write: recovery
    keeps the batches before it — index and cache equal a model given only those batches."""
    from sterling.model.live import LiveModel

    cfg = LiveModel.Config(data_dir=tmp_path / "data", fsync=False, compact_waste=0)
    live = LiveModel.open(learned_path, cfg)
    oracle = LiveModel.open(learned_path)
    ops, _ = _stream(items, random.Random(11), 6)
    ops.append(("upsert", [10_001, 10_002, int(items.ids[0])], [5, 6, 7]))
    for j, (op, ids, src) in enumerate(ops):
        last = j == len(ops) - 1
        for m in (live, oracle) if not last else (live,):
            if op == "delete":
                m.delete(ids)
            else:
                m.upsert(ids, item_features=_table(items, ids, src))
    live.close()
    (seg,) = sorted((tmp_path / "data").glob("wal-*.log"))
    seg.write_bytes(seg.read_bytes()[:-7])
    again = LiveModel.open(learned_path, cfg)
    assert again.version == oracle.version
    kw = dict(user_ids=oracle.model.users.ids[:8], k=15, k0=100)
    got, want = again(**kw), oracle(**kw)
    assert torch.equal(got.ids, want.ids) and torch.equal(got.values, want.values)
    a, b = again.model.cache, oracle.model.cache
    probe = torch.tensor([[*items.ids.tolist(), *range(10_000, 10_060)]])
    assert torch.equal(a.gather(probe)[0], b.gather(probe)[0]) and torch.equal(a.gather(probe)[1], b.gather(probe)[1])
    again.close()


def test_mapped_item_inputs_out_of_range_are_refused_before_logging(learned_path, tmp_path):
    from sterling.model.data import ItemInputs
    from sterling.model.errors import InvalidInputError
    from sterling.model.live import LiveModel

    live = LiveModel.open(learned_path, LiveModel.Config(data_dir=tmp_path / "d", fsync=False))
    tower = live.model.item_tower
    K, dd = len(tower.keys), tower.config.dense_dim
    ok = ItemInputs(keys=tuple(tower.keys), lengths=np.ones((K, 2), np.int32), values=np.zeros(2 * K, np.int64),
                    dense=np.zeros((2, dd), np.float32))
    v = live.upsert([90_001, 90_002], item_features=ok)
    for bad in (ItemInputs(keys=ok.keys, lengths=ok.lengths, values=np.full(2 * K, 10**9), dense=ok.dense),
                ItemInputs(keys=ok.keys, lengths=ok.lengths * 2, values=ok.values, dense=ok.dense),
                ItemInputs(keys=ok.keys[::-1] + ("x",), lengths=ok.lengths, values=ok.values, dense=ok.dense)):
        with pytest.raises(InvalidInputError):
            live.upsert([90_003, 90_004], item_features=bad)
    assert live.version == v and live.holding([90_001, 90_003]) == [True, False]
    live.close()


def _fill_free_slots(live, items, first_id: int) -> tuple[np.ndarray, bool]:
    """Upsert, as new ids, copies of catalog items — per list at most as many as it has free slots (at least one
    per list with items), one item per batch (its embedding is then the one computed here, bit for bit);
    returns (new ids, whether the index was re-packed)."""
    from sterling.model import updates as upd

    index = live.model.index
    offs = index.list_offsets.clone()
    free = [int((index.item_ids[offs[i]:offs[i + 1]] < 0).sum()) for i in range(index.nlist)]
    sizes = [int((index.item_ids[offs[i]:offs[i + 1]] >= 0).sum()) for i in range(index.nlist)]
    used: dict[int, int] = defaultdict(int)
    new = []
    for row in range(len(items)):
        t = _table(items, [first_id + row], [row])
        lst = int(upd.prepare_upsert(index, t.ids, live.model.embed_items(live.model.item_inputs(t))).lists[0])
        if sizes[lst] and used[lst] < max(free[lst], 1):
            used[lst] += 1
            live.upsert(t.ids, item_features=t)
            new.append(first_id + row)
    repacked = not torch.equal(index.list_offsets, offs)
    assert all(live.holding(new))
    return np.asarray(new, dtype=np.int64), repacked


def test_a_freshly_trained_artifact_takes_new_items_in_its_list_slack_without_repacking(learned_path, items):
    """`sterling train` reserves per-list slack (TrainConfig.list_slack, default 0.125): new items land in
    their lists' spare slots in place; the same model rebuilt with list_slack=0 re-packs for them."""
    from sterling.model.config import IndexConfig
    from sterling.model.learned import LearnedRetrievalModel
    from sterling.model.live import LiveModel
    from sterling.model.train import TrainConfig

    model = LearnedRetrievalModel.load(learned_path)
    assert model.index.config.list_slack == TrainConfig().list_slack == 0.125
    assert model.index.capacity > model.index.num_items
    live = LiveModel.open(model)
    new, repacked = _fill_free_slots(live, items, 90_000)
    assert not repacked and len(new) >= live.model.index.nlist // 2
    n = live.model.index.num_items
    got = live(user_ids=torch.tensor([1]), k=n, k0=n, nprobe=live.model.index.nlist, adaptive=False)
    assert set(new.tolist()) <= set(got.ids.reshape(-1).tolist())  # every new item is served

    tight = LearnedRetrievalModel.load(learned_path).with_catalog(
        items, index_config=IndexConfig.from_dict({**model.index.config.to_dict(), "list_slack": 0.0}))
    assert _fill_free_slots(LiveModel.open(tight), items, 90_000)[1]
