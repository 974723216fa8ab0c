"""``LiveReplica`` (the update side of a Ray shard actor), in process: ordered batches, catch-up, state copy.

Oracle: a plain ``LiveModel`` over the same shard slice fed the same batches.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sterling.cluster.errors import ReplicaBehindError, ReplicaOrderError
from sterling.cluster.live import LiveReplica
from sterling.cluster.shard import ShardRequest
from sterling.model import IndexConfig, RetrievalModel, build_index
from sterling.model.live import LiveModel
from sterling.model.wal import LogRecord, RecordKind
from sterling.sharding.documents import balanced_list_ranges, slice_model

D, N, NLIST = 8, 1200, 8


@pytest.fixture()
def shard_model():
    g = torch.Generator().manual_seed(3)
    model = RetrievalModel(build_index(torch.randn(N, D, generator=g), config=IndexConfig(nlist=NLIST, list_slack=0.1)))
    r = balanced_list_ranges(model.index, 2)[0]
    return (lambda: _copy(model, r)), r


def _copy(model, r):
    from sterling.model.index import ItemIndex

    meta = model.index.meta()
    meta["vocab"] = list(model.index.vocab)
    index = ItemIndex.from_parts(meta, {n: t.clone() for n, t in model.index.tensors().items()})
    return slice_model(RetrievalModel(index), r)


def _records(rng, n_batches):
    out = []
    for seq in range(1, n_batches + 1):
        if seq % 3:
            ids = rng.choice(N + 400, 30, replace=False).astype(np.int64)
            out.append(LogRecord(RecordKind.UPSERT, seq, ids, rng.standard_normal((30, D)).astype(np.float32), None))
        else:
            ids = rng.choice(N + 400, 20, replace=False).astype(np.int64)
            out.append(LogRecord(RecordKind.DELETE, seq, ids, np.zeros((20, 0), np.float32), None))
    return out


def _answer(server, xq):
    rep = server.search(ShardRequest(xq=xq, k=20, nprobe=NLIST))
    return rep.ids, rep.scores, rep.version


def test_replicas_apply_in_order_catch_up_from_a_peer_log_or_its_state(shard_model, tmp_path):
    make, r = shard_model
    rng = np.random.default_rng(0)
    recs = _records(rng, 12)
    oracle = LiveModel.open(make())
    a = LiveReplica(make(), tmp_path / "a", shard=0, replica=0, lists=r, snapshot_every=0)
    b = LiveReplica(make(), tmp_path / "b", shard=0, replica=1, lists=r, snapshot_every=0)
    for rec in recs[:8]:
        assert a.apply(rec) == (rec.seq, a.live.version)
        (oracle.upsert if rec.kind is RecordKind.UPSERT else oracle.delete)(
            *((rec.ids, rec.vectors) if rec.kind is RecordKind.UPSERT else (rec.ids,)))
    with pytest.raises(ReplicaOrderError):  # b has nothing: batch 8 is not next
        b.apply(recs[7])
    with pytest.raises(ReplicaOrderError):  # a repeated batch is refused too
        a.apply(recs[7])
    # catch-up from a's log, in two chunks
    got = a.records_after(0, 5)
    assert [x.seq for x in got] == [1, 2, 3, 4, 5]
    b.apply_many(got)
    b.apply_many(a.records_after(5, 100))
    assert b.applied() == a.applied() == (8, oracle.version)
    assert a.records_after(8) == []
    xq = rng.standard_normal((4, D)).astype(np.float32)
    ref = oracle(query=torch.from_numpy(xq), k=20, nprobe=NLIST, adaptive=False)
    for rep in (a, b):
        ids, scores, v = _answer(rep.server, xq)
        np.testing.assert_array_equal(ids, ref.ids.numpy())
        assert v == oracle.version
    # a snapshot truncates a's log: a replica behind it must copy a's whole state
    a.live.snapshot()
    for rec in recs[8:]:
        a.apply(rec)
        (oracle.upsert if rec.kind is RecordKind.UPSERT else oracle.delete)(
            *((rec.ids, rec.vectors) if rec.kind is RecordKind.UPSERT else (rec.ids,)))
    c = LiveReplica(make(), tmp_path / "c", shard=0, replica=2, lists=r)
    c.apply_many(recs[:3])
    assert a.records_after(3) is None
    assert a.records_after(8) is not None and [x.seq for x in a.records_after(8)] == [9, 10, 11, 12]
    assert c.install_state(a.state()) == (12, oracle.version)
    ref = oracle(query=torch.from_numpy(xq), k=20, nprobe=NLIST, adaptive=False)
    np.testing.assert_array_equal(_answer(c.server, xq)[0], ref.ids.numpy())
    # the installed state is durable: reopen c's directory from the original slice
    c.close()
    c2 = LiveReplica(make(), tmp_path / "c", shard=0, replica=2, lists=r)
    assert c2.applied() == (12, oracle.version)
    np.testing.assert_array_equal(_answer(c2.server, xq)[0], ref.ids.numpy())
    extra = LogRecord(RecordKind.DELETE, 13, ref.ids[0, :3].numpy().astype(np.int64), np.zeros((3, 0), np.float32),
                      None)
    c2.apply(extra)  # and it takes the next batch in order
    assert not any(c2.holding(ref.ids[0, :3].tolist()))
    # a replica below the acknowledged version refuses to answer
    with pytest.raises(ReplicaBehindError):
        b.server.search(ShardRequest(xq=xq, k=5, nprobe=NLIST, min_versions=(oracle.version,)))
    for x in (a, b, c2):
        x.close()
