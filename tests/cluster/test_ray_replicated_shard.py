"""``ReplicatedShard`` against real Ray actors whose batches fail at chosen points (deterministic faults).

Each actor is a real ``LiveReplica`` in a Ray actor with a switch that makes
the next ``apply`` fail either *before* it logs the batch or *after* (the batch
is durable there but the call errors, as when a replica dies right after its
fsync). Oracle: a plain ``LiveModel`` fed the batches the shard must end up
holding.
"""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch

from sterling.cluster.errors import ShardsUnavailableError
from sterling.model import IndexConfig, RetrievalModel, build_index
from sterling.model.live import LiveModel

ray = pytest.importorskip("ray")

D, N = 8, 600


class _Backend:
    """The two things ``ReplicatedShard`` needs of a ``RayBackend``: actors and health marks."""

    def __init__(self, actors) -> None:
        self.actors = [actors]
        self.marks: list[tuple[int, int, bool]] = []

    def _mark(self, s: int, r: int, ok: bool) -> None:
        self.marks.append((s, r, ok))


def _wait_dead(actor, timeout_s: float = 60.0) -> None:
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        try:
            ray.get(actor.applied.remote(), timeout=5)
        except ray.exceptions.RayActorError:
            return
        except ray.exceptions.GetTimeoutError:
            continue
        time.sleep(0.05)
    raise AssertionError("the killed actor still answers")


def test_failed_batches_keep_replicas_identical_and_no_acknowledged_batch_is_lost(ray_cluster, tmp_path):
    from sterling.cluster.ray_live import ReplicatedShard

    path = tmp_path / "m.st"
    g = torch.Generator().manual_seed(0)
    RetrievalModel(build_index(torch.randn(N, D, generator=g), config=IndexConfig(nlist=4))).save(path)

    @ray.remote(num_cpus=0.1)
    class Faulty:
        def __init__(self, path: str, d: str, replica: int) -> None:
            from sterling.cluster.live import LiveReplica
            from sterling.model.retrieval import RetrievalModel

            self.rep = LiveReplica(RetrievalModel.load(path), d, shard=0, replica=replica, snapshot_every=3)
            self.fail = None

        def arm(self, when: str | None) -> None:
            self.fail = when

        def apply(self, rec):
            when, self.fail = self.fail, None
            if when == "before":
                raise RuntimeError("replica died before logging")
            out = self.rep.apply(rec)
            if when == "after":
                raise RuntimeError("replica died after its fsync")
            return out

        def applied(self):
            return self.rep.applied()

        def apply_many(self, recs):
            return self.rep.apply_many(recs)

        def records_after(self, seq, limit):
            return self.rep.records_after(seq, limit)

        def state(self):
            return self.rep.state()

        def install_state(self, state):
            return self.rep.install_state(state)

        def holding(self, ids):
            return self.rep.holding(ids)

        def search(self, xq):
            from sterling.cluster.shard import ShardRequest

            return self.rep.server.search(ShardRequest(xq=xq, k=30, nprobe=4)).ids

    actors = [Faulty.remote(str(path), str(tmp_path / f"r{r}"), r) for r in range(2)]
    try:
        # actors start (model load, a cold numba cache JIT-compiles) before the timed part begins
        ray.get([a.applied.remote() for a in actors], timeout=300)
        backend = _Backend(actors)
        shard = ReplicatedShard(backend, 0, write_timeout_s=30, straggler_s=5)
        assert shard.reconcile(timeout_s=60)  # start-up: both answer, both at batch 0
        oracle = LiveModel.open(RetrievalModel.load(path))
        rng = np.random.default_rng(0)

        def upsert(n0: int, *, expect_fail: bool = False):
            ids = np.arange(n0, n0 + 20)
            x = rng.standard_normal((20, D)).astype(np.float32)
            if expect_fail:
                with pytest.raises(ShardsUnavailableError):
                    shard.upsert(ids, x)
            else:
                shard.upsert(ids, x)
            return ids, x

        for b in range(4):
            oracle.upsert(*upsert(10_000 + 20 * b))
        # replica 1 fails one batch: acknowledged by replica 0, replica 1 drops out, then is caught up
        ray.get(actors[1].arm.remote("before"))
        oracle.upsert(*upsert(20_000))
        assert shard.in_sync == [True, False] and (0, 1, False) in backend.marks
        oracle.delete(np.arange(10_000, 10_010))
        shard.delete(np.arange(10_000, 10_010))  # only replica 0 gets it
        assert shard.rejoin(1) and shard.in_sync == [True, True]
        # every replica fails the same batch, one of them after logging it: the shard is uncertain
        ray.get([actors[0].arm.remote("after"), actors[1].arm.remote("before")])
        ids, x = upsert(30_000, expect_fail=True)
        oracle.upsert(ids, x)  # durable on replica 0: the reconciled shard must hold it everywhere
        oracle.upsert(*upsert(40_000))  # the next write reconciles first (both answer), then applies
        assert shard.in_sync == [True, True]
        states = ray.get([a.applied.remote() for a in actors])
        assert states[0] == states[1] == (shard.seq, shard.version) == (oracle.applied_seq, oracle.version)
        # both replicas hold exactly the oracle's items, and answer as it does
        want = sorted(int(i) for i in np.asarray(oracle.index.item_ids) if i >= 0)
        xq = rng.standard_normal((4, D)).astype(np.float32)
        ref = oracle(query=torch.from_numpy(xq), k=30, nprobe=4, adaptive=False)
        for a in actors:
            holds = ray.get(a.holding.remote(want + [10_000, 10_005]))
            assert all(holds[:-2]) and not any(holds[-2:])
            np.testing.assert_array_equal(ray.get(a.search.remote(xq)), ref.ids.numpy())
        # an uncertain shard with a replica away takes no writes
        ray.get([actors[0].arm.remote("before"), actors[1].arm.remote("before")])
        upsert(50_000, expect_fail=True)
        ray.kill(actors[1], no_restart=True)
        _wait_dead(actors[1])  # ray.kill returns before the actor is gone: a call could still reach it
        upsert(60_000, expect_fail=True)
        assert not shard.reconcile(timeout_s=2)
    finally:
        for a in actors:
            ray.kill(a, no_restart=True)
