"""Dynamic batching in the router: concurrent small ``Retrieve`` calls coalesced into one search.

A batch search costs far less per query than the same queries one by one
(one probe GEMM, one fan-out, one merge, one pass of the Python stack). So
calls that could share a search — same k, nprobe, exact/adaptive mode,
``require_complete``, learned-model K0 and formula, and the same kind of user
input — are gathered while they arrive ("batch while busy"): a call that
finds a search running waits behind it — until that search ends, until
``max_queries`` queries are in, or at most ``max_wait_ms`` — then its group
runs as ONE ``Router.retrieve`` with the queries stacked and one filter per
query, and each caller gets its own rows. So under load the queue builds
into one batch per search (batches grow with the load, extra latency is at
most one search), and a call that finds no search running does not wait at
all: a lone client pays nothing for batching.

Semantics are the un-batched ones: each caller gets exactly the rows of its
own queries (the router's answer for a query does not depend on the other
queries of the batch: per-query filters, per-query top-k); the group runs
within the *earliest* deadline of its members and reads at least the *newest*
per-shard version floor any member carries (read-your-writes holds for each).
If the group's call fails, each member is re-run alone, so one bad request (a NaN, a filter syntax error)
gets its own typed error and never fails its neighbours.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

__all__ = ["BatchingConfig", "Batcher"]


@dataclass(kw_only=True, slots=True)
class BatchingConfig:
    """``max_wait_ms = 0`` turns batching off.

    Args:
        max_wait_ms: longest the first call of a group waits, behind a running
            search, for others to join (it goes as soon as that search ends).
        max_queries: most queries in one coalesced search (a single call
            larger than this runs alone).
    """

    max_wait_ms: float = 20.0
    max_queries: int = 64

    def __post_init__(self) -> None:
        if self.max_wait_ms < 0 or self.max_queries < 1:
            raise ValueError(f"BatchingConfig: max_wait_ms ({self.max_wait_ms}) must be ≥ 0 and max_queries "
                             f"({self.max_queries}) ≥ 1")

    @property
    def enabled(self) -> bool:
        return self.max_wait_ms > 0 and self.max_queries > 1


_STACKED = ("query", "user_features", "user_ids")  # per-query inputs that concatenate along rows


@dataclass(slots=True)
class _Call:
    kwargs: dict
    rows: int
    deadline: float | None  # time.monotonic() by which the caller needs its answer
    done: threading.Event = field(default_factory=threading.Event)
    result: object = None
    error: BaseException | None = None


@dataclass(slots=True)
class _Group:
    calls: list[_Call] = field(default_factory=list)
    rows: int = 0
    closed: bool = False
    full: threading.Event = field(default_factory=threading.Event)


class Batcher:
    """Coalesces ``retrieve(**kwargs)`` calls (see the module docstring).

    ``retrieve`` is ``Router.retrieve``; ``kwargs`` are its keyword arguments.
    """

    def __init__(self, retrieve: Callable[..., object], config: BatchingConfig) -> None:
        self._retrieve = retrieve
        self.config = config
        self._lock = threading.Lock()
        self._open: dict[tuple, _Group] = {}
        self._running = 0  # searches executing now
        self._idle = threading.Condition(self._lock)  # notified when a search ends or a group fills
        self.calls = 0  # searches run (for tests and metrics)
        self.coalesced = 0  # calls answered by a search shared with another call

    @staticmethod
    def _key(kwargs: dict) -> tuple | None:
        """Calls with equal keys can share a search; None = run alone."""
        if kwargs.get("sparse") is not None:
            return None  # jagged inputs: not stacked here
        kinds = tuple(n for n in _STACKED if kwargs.get(n) is not None)
        if len(kinds) != 1:
            return None  # let the router raise its own error for this call
        return (kinds, kwargs.get("k"), kwargs.get("nprobe"), kwargs.get("exact", True), kwargs.get("adaptive"),
                kwargs.get("require_complete", False), kwargs.get("k0"), kwargs.get("value_formula"))

    @staticmethod
    def _rows(kwargs: dict) -> int | None:
        for n in _STACKED:
            v = kwargs.get(n)
            if v is not None:
                a = np.asarray(v)
                return 1 if a.ndim == 1 and n != "user_ids" else (len(a) if a.ndim >= 1 else None)
        return None

    def retrieve(self, **kwargs):
        if not self.config.enabled:
            return self._retrieve(**kwargs)
        key, rows = self._key(kwargs), self._rows(kwargs)
        if key is None or rows is None or rows >= self.config.max_queries:
            return self._retrieve(**kwargs)
        budget = kwargs.get("deadline_s")
        call = _Call(kwargs=kwargs, rows=rows, deadline=None if budget is None else time.monotonic() + budget)
        with self._lock:
            busy = self._running > 0
            group = self._open.get(key)
            leader = group is None or group.rows + rows > self.config.max_queries
            if leader:
                if group is not None:
                    group.closed = True
                    group.full.set()  # that group's leader stops waiting
                group = self._open[key] = _Group()
            group.calls.append(call)
            group.rows += rows
            if group.rows >= self.config.max_queries:
                group.full.set()
                self._idle.notify_all()
        if not leader:
            call.done.wait()
            if call.error is not None:
                raise call.error
            return call.result
        with self._lock:
            # batch while busy: while another search runs, calls queue up behind it; this group goes
            # when no search is running, when it is full, or after max_wait_ms, whichever is first
            end = time.monotonic() + self.config.max_wait_ms / 1e3
            while busy and self._running > 0 and not group.full.is_set():
                left = end - time.monotonic()
                if left <= 0:
                    break
                self._idle.wait(left)
            if self._open.get(key) is group:
                del self._open[key]
            group.closed = True
            self._running += 1
        try:
            self._run(group)
        finally:
            with self._lock:
                self._running -= 1
                self._idle.notify_all()
            for c in group.calls:  # never leave a follower waiting, whatever happened
                if not c.done.is_set():
                    c.error = c.error or RuntimeError("batched call was not answered")
                    c.done.set()
        if call.error is not None:
            raise call.error
        return call.result

    # ------------------------------------------------------------------ run
    def _run(self, group: _Group) -> None:
        calls = group.calls
        with self._lock:
            self.calls += 1
            self.coalesced += len(calls) if len(calls) > 1 else 0
        if len(calls) == 1:
            self._alone(calls[0])
            return
        first = calls[0].kwargs
        merged = {k: v for k, v in first.items() if k not in (*_STACKED, "where", "deadline_s")}
        name = next(n for n in _STACKED if first.get(n) is not None)
        merged[name] = np.concatenate([_as_rows(c.kwargs[name], name) for c in calls])
        wheres: list[str | None] = []
        for c in calls:
            w = c.kwargs.get("where")
            wheres += list(w) if isinstance(w, (list, tuple)) else [w] * c.rows
        merged["where"] = wheres if any(w for w in wheres) else None
        floors = [c.kwargs["shard_min_versions"] for c in calls if c.kwargs.get("shard_min_versions") is not None]
        if floors:  # the freshest floor of the group: no member reads older than its acknowledged writes
            merged["shard_min_versions"] = [max(v) for v in zip(*floors)]
        deadlines = [c.deadline for c in calls if c.deadline is not None]
        if deadlines:
            merged["deadline_s"] = max(0.0, min(deadlines) - time.monotonic())
        try:
            res = self._retrieve(**merged)
        except Exception:  # noqa: BLE001 - some member is bad (or the group failed): each runs alone
            for c in calls:
                self._alone(c)
            return
        start = 0
        for c in calls:
            c.result = _slice(res, start, start + c.rows)
            start += c.rows
            c.done.set()

    def _alone(self, call: _Call) -> None:
        try:
            kw = dict(call.kwargs)
            if call.deadline is not None:
                kw["deadline_s"] = max(0.0, call.deadline - time.monotonic())
            call.result = self._retrieve(**kw)
        except BaseException as e:  # noqa: BLE001 - handed to the caller's thread
            call.error = e
        finally:
            call.done.set()


def _as_rows(v, name: str) -> np.ndarray:
    a = np.asarray(v)
    if name == "user_ids":
        return a.reshape(-1).astype(np.int64)
    return a.reshape(1, -1) if a.ndim == 1 else a


def _slice(res, a: int, b: int):
    """The rows [a, b) of a ``RouterResult`` (shared facts — version, partial, timing — kept)."""
    import dataclasses

    return dataclasses.replace(
        res, ids=res.ids[a:b], scores=res.scores[a:b],
        task_scores=None if res.task_scores is None else res.task_scores[a:b],
        timing={**res.timing, "batched_queries": int(res.ids.shape[0])},
    )
