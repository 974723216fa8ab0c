"""One document-shard replica served by a process group of ranks on its host (``launch ray --ranks-per-host N``).

The three levels of the product's shape together: Ray places one shard
actor per plan host (``sterling.cluster.ray_backend``); the actor's process
is **rank 0** of a process group whose other ranks are
``python -m sterling.launch.worker`` processes it starts on the same host
(the worker ``sterling launch torchrun`` runs); every rank memory-maps its
own slice of the shard's IVF lists (``sharding.ranks.write_rank_slices``)
and its index searches inside the device with the tiers the artifact was
built with. A ``ShardRequest`` from the router is one collective request on
rank 0's ``RankGroup`` (no second network hop): every rank searches its
lists with the fixed probe, rank 0 gathers and merges exactly, and the
reply is that shard's top-k, bit for bit the single shard's.

gloo on CPU, NCCL when the actor sees GPUs (``backend_for_device``; the
ranks' ``LOCAL_RANK`` picks their GPU among the actor's), a fresh TCP store
on a free port per group. A rank that dies is noticed by a monitor thread
(or by the collective that fails): calls raise ``RankFailedError`` naming
the shard, replica and rank while rank 0 restarts the whole group (up to
``max_group_restarts`` times); ``ready()`` raises until every rank is up
again, so the router's health probe keeps the replica out meanwhile.
"""

from __future__ import annotations

import datetime
import logging
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import torch

from sterling.cluster.errors import RankFailedError, ReplicaBehindError
from sterling.cluster.shard import ShardReply, ShardRequest

__all__ = ["GroupShardServer"]

log = logging.getLogger(__name__)

_STORE_PREFIX = "sterling/restart-0"  # what launch.worker uses outside an elastic restart


class GroupShardServer:
    """Rank 0 of one shard replica's process group; the ranks > 0 are child processes on this host.

    Args:
        rank_dir: a ``write_rank_slices`` directory over this shard's artifact (its manifest says the world size).
        shard, replica: which replica this is (named in errors and replies).
        lists: the shard's IVF lists ``[a, b)`` (reported by ``info``).
        threads: torch / numba threads per rank.
        timeout_s: bound on the group's start and on one collective (a rank that hangs rather than dies).
        max_group_restarts: restarts of the whole group after a rank failure; then the replica stays failed.

    Only one per process: rank 0 holds this process's default ``torch.distributed`` group.
    """

    def __init__(self, rank_dir: str | Path, *, shard: int = 0, replica: int = 0, lists: tuple[int, int] | None = None,
                 threads: int = 1, timeout_s: float = 300.0, max_group_restarts: int = 10) -> None:
        from sterling.sharding.documents import read_manifest

        self.rank_dir = Path(rank_dir)
        self.manifest = read_manifest(self.rank_dir)
        self.world_size = self.manifest.num_shards
        self.shard, self.replica = int(shard), int(replica)
        self.lists = tuple(lists) if lists is not None else (self.manifest.shards[0].lists[0],
                                                             self.manifest.shards[-1].lists[1])
        self.threads = int(threads)
        self.timeout_s = float(timeout_s)
        self.restarts_left = int(max_group_restarts)
        self.restarts = 0
        self.group = None
        self.procs: dict[int, subprocess.Popen] = {}
        self._failure: RankFailedError | None = None
        self._state = threading.Lock()
        self._closed = threading.Event()
        self._start()
        self._monitor = threading.Thread(target=self._watch, name=f"sterling-group-{shard}-{replica}", daemon=True)
        self._monitor.start()

    # ------------------------------------------------------------- the group
    def _start(self) -> None:
        """Start ranks 1..N-1, join the group as rank 0, load this rank's slice; returns once every rank serves."""
        import torch.distributed as dist

        from sterling.sharding.group import RankGroup, backend_for_device, set_rank_threads

        if dist.is_initialized():
            raise RankFailedError(
                f"shard {self.shard} replica {self.replica}: this process already holds a process group; "
                "one group shard per process (one Ray actor each)", shard=self.shard, replica=self.replica, rank=0)
        set_rank_threads(self.threads)
        os.environ["LOCAL_RANK"] = "0"
        backend, device = backend_for_device()
        if device.type == "cuda":
            torch.cuda.set_device(device)
        timeout = datetime.timedelta(seconds=self.timeout_s)
        store = dist.TCPStore("127.0.0.1", 0, self.world_size, is_master=True, wait_for_workers=False,
                              timeout=timeout)
        env = {k: v for k, v in os.environ.items() if not k.startswith("TORCHELASTIC_")}
        env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(store.port), WORLD_SIZE=str(self.world_size),
                   LOCAL_WORLD_SIZE=str(self.world_size), STERLING_PARENT_PID=str(os.getpid()), TQDM_DISABLE="1")
        self.procs = {}
        for r in range(1, self.world_size):
            cmd = [sys.executable, "-m", "sterling.launch.worker", "--model", self.manifest.source,
                   "--ranks-dir", str(self.rank_dir), "--threads", str(self.threads)]
            self.procs[r] = subprocess.Popen(cmd, env={**env, "RANK": str(r), "LOCAL_RANK": str(r)},
                                             stdin=subprocess.DEVNULL)
        try:
            dist.init_process_group(backend, store=dist.PrefixStore(_STORE_PREFIX, store), rank=0,
                                    world_size=self.world_size, timeout=timeout)
            dist.barrier()  # the worker's "slices are written" barrier: here they were written before the actor
            group = RankGroup.load(self.rank_dir, rank=0, device=device)
            group.max_k = 1 << 24  # the router bounds k (RouterConfig.max_k / max_k0); shards trust it
            self.infos = group.shard_infos()  # a collective: every rank has loaded its slice and serves
            idx = group.part.index
            xq = idx.centroids[:1].numpy()
            for where in (None, idx.vocab[0] if idx.vocab else None):  # no lazy set-up in the first real request
                group.search(xq, k=1, nprobe=1, where=where)
        except BaseException as e:
            self._kill_ranks()
            if dist.is_initialized():
                dist.destroy_process_group()
            dead = self._dead_rank()
            raise RankFailedError(
                f"shard {self.shard} replica {self.replica}: its {self.world_size}-rank group did not start"
                + (f" (rank {dead[0]} exited with {dead[1]})" if dead else "") + f": {str(e).splitlines()[0][:200]}",
                shard=self.shard, replica=self.replica, rank=dead[0] if dead else None,
            ) from e
        self.group, self.backend, self.device = group, backend, device
        log.info("shard %d replica %d: %d ranks up (%s, %s), pids %s", self.shard, self.replica, self.world_size,
                 backend, device, self.pids())

    def _dead_rank(self) -> tuple[int, str] | None:
        for r, p in sorted(self.procs.items()):
            rc = p.poll()
            if rc is not None:
                return r, (f"signal {-rc}" if rc < 0 else f"exit code {rc}")
        return None

    def _kill_ranks(self) -> None:
        for p in self.procs.values():
            if p.poll() is None:
                p.kill()
        for p in self.procs.values():
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass

    def _fail(self, rank: int | None, how: str) -> RankFailedError:
        with self._state:
            if self._failure is None:
                self._failure = RankFailedError(
                    f"shard {self.shard} replica {self.replica}: rank {rank} of its {self.world_size}-rank group "
                    f"{how}; " + ("the group is restarting, ask another replica" if self.restarts_left > 0 else
                                  "no group restarts left: relaunch the service"),
                    shard=self.shard, replica=self.replica, rank=rank,
                )
                log.warning("%s", self._failure)
            return self._failure

    def _watch(self) -> None:
        """Notice a dead rank; restart the group (kill the rest, a new store and port, new ranks)."""
        import torch.distributed as dist

        while not self._closed.wait(0.1):
            if self._failure is None:
                dead = self._dead_rank()
                if dead is None:
                    continue
                self._fail(dead[0], f"died ({dead[1]})")
            if self.restarts_left <= 0:
                continue
            with self.group._lock:  # no request is inside a collective while the group is torn down
                self._kill_ranks()
                if dist.is_initialized():
                    dist.destroy_process_group()
                self.restarts_left -= 1
                self.restarts += 1
                try:
                    self._start()
                except RankFailedError as e:
                    log.warning("restart %d failed: %s", self.restarts, e)
                    continue
            with self._state:
                self._failure = None

    def pids(self) -> dict[int, int]:
        """RANK → pid (rank 0 is this process)."""
        return {0: os.getpid(), **{r: p.pid for r, p in self.procs.items()}}

    # ------------------------------------------------------------ shard API
    def search(self, req: ShardRequest) -> ShardReply:
        """One collective request over the group: this shard's exactly merged top-k."""
        if self._failure is not None:
            raise self._failure
        t0 = time.perf_counter()
        group = self.group
        if req.min_versions is not None and self.shard < len(req.min_versions):
            have, need = int(group.part.index.version), int(req.min_versions[self.shard])
            if have < need:
                raise ReplicaBehindError(f"shard {self.shard} replica {self.replica} is at version {have}, "
                                         f"below the acknowledged {need}; ask another replica")
        xq = np.ascontiguousarray(req.xq, dtype=np.float32)
        try:
            res = group.search(xq, k=req.k, nprobe=req.nprobe, where=req.where, exact=req.exact, counts=req.counts,
                               skip_lists=req.skip_lists)
        except RuntimeError as e:  # a collective failed: a peer is gone (the monitor names it) or the group broke
            deadline = time.monotonic() + 2.0
            dead = self._dead_rank()
            while dead is None and time.monotonic() < deadline:
                time.sleep(0.05)
                dead = self._dead_rank()
            if self._failure is not None:
                raise self._failure from e
            raise self._fail(dead[0] if dead else None,
                             f"died ({dead[1]})" if dead else f"failed a collective ({str(e).splitlines()[0][:160]})"
                             ) from e
        return ShardReply(shard=self.shard, replica=self.replica, ids=res.ids, scores=res.scores,
                          version=res.version, ms=(time.perf_counter() - t0) * 1e3, counts=res.counts)

    def info(self) -> dict:
        if self._failure is not None:
            raise self._failure
        return {"shard": self.shard, "replica": self.replica, "lists": list(self.lists),
                "items": sum(int(i["items"]) for i in self.infos), "version": int(self.group.part.index.version),
                "ranks": self.world_size, "backend": self.backend}

    def ready(self) -> bool:
        """True once every rank is up; raises ``RankFailedError`` while a rank is dead or the group restarts."""
        if self._failure is not None:
            raise self._failure
        return True

    def warmup(self) -> None:
        """Done by the constructor (the group is warm before it reports ready)."""

    def close(self) -> None:
        """Release the ranks (bounded: a dead peer could block the stop broadcast) and leave the group."""
        import torch.distributed as dist

        self._closed.set()
        if self.group is not None and self._failure is None:
            t = threading.Thread(target=self.group.stop, daemon=True)
            t.start()
            t.join(5.0)
        self._kill_ranks()
        if dist.is_initialized():
            dist.destroy_process_group()
