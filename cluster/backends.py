"""How the router reaches its shards: fan-out with a deadline, replica failover, health.

``ShardBackend`` holds the replica-routing logic once; subclasses say how to
submit one request to one replica and how to wait for answers:

* ``LocalBackend`` — ``ShardServer`` objects in this process, on a thread
  pool (``sterling serve``: the embedded one-process default);
* ``sterling.cluster.ray_backend.RayBackend`` — Ray actors, one per
  (shard, replica).

Routing: each shard goes to a healthy replica first (round-robin among the
healthy ones), then to the others. A replica that fails is marked unhealthy
and the shard is retried on the next replica while the deadline allows; a
replica that is slow past ``hedge_fraction`` of the remaining time gets a
hedge request on another replica. A background thread probes unhealthy
replicas and marks them healthy once they answer. Shards with no answer by
the deadline are reported missing, never waited for.
"""

from __future__ import annotations

import concurrent.futures as cf
import itertools
import logging
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from sterling.cluster.shard import ShardReply, ShardRequest, ShardServer
from sterling.model.errors import InvalidInputError

__all__ = ["FanOutResult", "ShardBackend", "LocalBackend"]

log = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True, slots=True)
class FanOutResult:
    """Replies by shard; ``missing`` shards gave none by the deadline; ``errors`` says why, per shard."""

    replies: dict[int, ShardReply]
    missing: list[int]
    errors: dict[int, str]


class ShardBackend(ABC):
    """Replica routing over ``num_shards`` shards × their replicas."""

    def __init__(self, replicas_per_shard: Sequence[int], *, hedge_fraction: float = 0.5,
                 probe_interval_s: float = 0.25, sick_after_s: float = 0.25) -> None:
        if not replicas_per_shard or min(replicas_per_shard) < 1:
            raise ValueError(f"every shard needs ≥ 1 replica, got {list(replicas_per_shard)}")
        if not 0.0 < hedge_fraction <= 1.0:
            raise ValueError(f"hedge_fraction ({hedge_fraction}) must be in (0, 1]")
        self.num_shards = len(replicas_per_shard)
        self.replicas = list(replicas_per_shard)
        if sick_after_s < 0:
            raise ValueError(f"sick_after_s ({sick_after_s}) must be ≥ 0")
        self.hedge_fraction = hedge_fraction
        # a replica that misses a deadline is marked unhealthy only if it had at
        # least this long to answer: a 2 ms client deadline says nothing about
        # the replica, and must not make every replica "sick" at once
        self.sick_after_s = sick_after_s
        self._healthy = [[True] * r for r in self.replicas]
        self._rr = [itertools.count() for _ in self.replicas]
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._probe_interval = probe_interval_s
        self._prober: threading.Thread | None = None
        self._listeners: list = []

    # ---------------------------------------------------------- subclasses
    @abstractmethod
    def _submit(self, shard: int, replica: int, req: ShardRequest) -> Any:
        """Start one request; returns a handle."""

    @abstractmethod
    def _wait(self, handles: list[Any], timeout: float) -> list[Any]:
        """Handles that finished (successfully or not) within ``timeout`` seconds."""

    @abstractmethod
    def _result(self, handle: Any) -> ShardReply:
        """The reply of a finished handle; raises the shard's error."""

    @abstractmethod
    def _probe(self, shard: int, replica: int, timeout: float) -> bool:
        """True when the replica answers a readiness call within ``timeout``."""

    @abstractmethod
    def shard_infos(self) -> list[dict]:
        """Per shard: ``info()`` of one answering replica, plus replica counts."""

    def close(self) -> None:
        self._stop.set()
        if self._prober is not None:
            self._prober.join(timeout=2)

    # ------------------------------------------------------------- routing
    def healthy(self) -> list[list[bool]]:
        with self._lock:
            return [list(h) for h in self._healthy]

    def complete(self) -> bool:
        """True when every shard has at least one healthy replica (complete answers are possible)."""
        with self._lock:
            return all(any(h) for h in self._healthy)

    def on_health_change(self, fn) -> None:
        """Call ``fn(complete: bool)`` whenever a replica's health flips (the gRPC health service listens)."""
        self._listeners.append(fn)

    def _mark(self, shard: int, replica: int, ok: bool) -> None:
        with self._lock:
            was = self._healthy[shard][replica]
            self._healthy[shard][replica] = ok
        if was != ok:
            log.warning("shard %d replica %d is now %s", shard, replica, "healthy" if ok else "unhealthy")
            complete = self.complete()
            for fn in self._listeners:
                fn(complete)
        if not ok:
            self._ensure_prober()

    def _order(self, shard: int) -> list[int]:
        """Healthy replicas first (rotated round-robin), then the unhealthy ones."""
        n = self.replicas[shard]
        start = next(self._rr[shard]) % n
        rot = [(start + i) % n for i in range(n)]
        with self._lock:
            h = self._healthy[shard]
            return [r for r in rot if h[r]] + [r for r in rot if not h[r]]

    def fan_out(self, req: ShardRequest, deadline: float) -> FanOutResult:
        """Send ``req`` to every shard; collect answers until ``deadline`` (``time.monotonic()``)."""
        queue = {s: self._order(s) for s in range(self.num_shards)}
        pending: dict[Any, tuple[int, int, float]] = {}
        replies: dict[int, ShardReply] = {}
        errors: dict[int, str] = {}

        def launch(s: int) -> bool:
            while queue[s]:
                r = queue[s].pop(0)
                try:
                    pending[self._submit(s, r, req)] = (s, r, time.monotonic())
                    return True
                except Exception as e:  # submission itself failed: next replica
                    self._mark(s, r, False)
                    errors[s] = f"replica {r}: {e!r}"
            return False

        for s in range(self.num_shards):
            launch(s)
        hedged: set[int] = set()
        while pending:
            now = time.monotonic()
            left = deadline - now
            if left <= 0:
                break
            # hedge: a shard whose oldest request is slow gets a second replica
            waits = [left]
            for s, _, t0 in pending.values():
                if s not in replies and s not in hedged and queue[s]:
                    waits.append(max(0.0, t0 + self.hedge_fraction * (deadline - t0) - now))
            done = self._wait(list(pending), min(waits))
            for h in done:
                s, r, _ = pending.pop(h)
                try:
                    rep = self._result(h)
                except InvalidInputError:
                    raise
                except Exception as e:
                    self._mark(s, r, False)
                    errors[s] = f"replica {r}: {e!r}"
                    if s not in replies and not any(p[0] == s for p in pending.values()):
                        launch(s)
                    continue
                self._mark(s, r, True)
                replies.setdefault(s, rep)
                for h2 in [h2 for h2, p in pending.items() if p[0] == s]:
                    pending.pop(h2)  # the other (hedged) request is no longer needed
            now = time.monotonic()
            for s, _, t0 in list(pending.values()):
                if (s not in replies and s not in hedged and queue[s]
                        and now >= t0 + self.hedge_fraction * (deadline - t0)):
                    hedged.add(s)
                    launch(s)
        missing = [s for s in range(self.num_shards) if s not in replies]
        for s in missing:
            errors.setdefault(s, "no answer before the deadline")
        now = time.monotonic()
        for s, r, t0 in pending.values():
            if s in missing and now - t0 >= self.sick_after_s:
                self._mark(s, r, False)  # missed the deadline: others first until the prober sees it answer
        return FanOutResult(replies=replies, missing=missing, errors=errors)

    # -------------------------------------------------------------- health
    def _ensure_prober(self) -> None:
        with self._lock:
            if self._prober is not None and self._prober.is_alive():
                return
            self._prober = threading.Thread(target=self._probe_loop, name="sterling-shard-prober", daemon=True)
            self._prober.start()

    def _probe_loop(self) -> None:
        while not self._stop.wait(self._probe_interval):
            sick = [(s, r) for s, h in enumerate(self.healthy()) for r, ok in enumerate(h) if not ok]
            if not sick:
                return
            for s, r in sick:
                if self._stop.is_set():
                    return
                try:
                    ok = self._probe(s, r, timeout=max(self._probe_interval, 0.5))
                except Exception:
                    ok = False
                if ok:
                    self._mark(s, r, True)


class LocalBackend(ShardBackend):
    """Shards as ``ShardServer`` objects in this process, searched concurrently on threads.

    ``servers[s][r]`` is replica ``r`` of shard ``s``. Torch releases the GIL
    in its kernels, so shards overlap on a multi-core host.
    """

    def __init__(self, servers: Sequence[Sequence[ShardServer]], *, max_workers: int | None = None,
                 hedge_fraction: float = 0.5, sick_after_s: float = 0.25) -> None:
        super().__init__([len(r) for r in servers], hedge_fraction=hedge_fraction, sick_after_s=sick_after_s)
        self.servers = [list(r) for r in servers]
        for row in self.servers:
            for srv in row:
                srv.warmup()
        self._pool = cf.ThreadPoolExecutor(
            max_workers=max_workers or max(2, 2 * sum(self.replicas)), thread_name_prefix="sterling-shard"
        )

    def _submit(self, shard: int, replica: int, req: ShardRequest) -> cf.Future:
        return self._pool.submit(self.servers[shard][replica].search, req)

    def _wait(self, handles: list[cf.Future], timeout: float) -> list[cf.Future]:
        done, _ = cf.wait(handles, timeout=timeout, return_when=cf.FIRST_COMPLETED)
        return list(done)

    def _result(self, handle: cf.Future) -> ShardReply:
        return handle.result()

    def _probe(self, shard: int, replica: int, timeout: float) -> bool:
        return self.servers[shard][replica].ready()

    def shard_infos(self) -> list[dict]:
        healthy = self.healthy()
        return [
            {**reps[0].info(), "replicas": len(reps), "healthy_replicas": sum(healthy[s])}
            for s, reps in enumerate(self.servers)
        ]

    def close(self) -> None:
        super().close()
        self._pool.shutdown(wait=False, cancel_futures=True)
