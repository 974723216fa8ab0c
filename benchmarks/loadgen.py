"""An open-loop load generator: a deterministic request set replayed at fixed rates, bounded in count and time.

Open loop (as serving benchmarks must be, or queueing hides behind the
client): request i is *scheduled* at ``t0 + i / rate`` whether or not earlier
ones have come back, and its latency runs from that scheduled time to its
completion — a late send (the generator itself behind) counts against the
system, not for it. A request that fails (an error status, a refusal) or is
not back within the drain bound counts as an infinite latency, so a step
that sheds load cannot pass a p99 budget.

CPU time is read from ``/proc/<pid>/stat`` (utime + stime of all threads) of
the processes a system runs, before and after each step.
"""

from __future__ import annotations

import math
import os
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import numpy as np

from sterling.benchmarks.evaluation import percentiles_ms
from sterling.model.errors import InvalidInputError

__all__ = ["Request", "request_set", "StepResult", "open_loop_step", "sweep", "max_qps", "cpu_seconds",
           "closed_loop_qps"]

_TICK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


@dataclass(frozen=True, kw_only=True, slots=True)
class Request:
    user_id: int
    where: str | None
    k: int
    k0: int


def request_set(user_ids, n: int, *, wheres: list[str | None], k: int, k0: int, seed: int = 0) -> list[Request]:
    """``n`` requests: users drawn with replacement, filters cycled in a seeded order (deterministic)."""
    if n < 1 or not len(user_ids) or not wheres:
        raise InvalidInputError(f"need n ≥ 1 ({n}), some user ids ({len(user_ids)}) and filters ({len(wheres)})")
    rng = np.random.default_rng(seed)
    users = rng.choice(np.asarray(user_ids), n)
    w = rng.integers(0, len(wheres), n)
    return [Request(user_id=int(u), where=wheres[j], k=k, k0=k0) for u, j in zip(users.tolist(), w.tolist())]


def cpu_seconds(pids: list[int]) -> float:
    """utime + stime (all threads) of these processes, in seconds."""
    total = 0
    for pid in pids:
        try:
            fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])  # utime, stime (fields 14, 15 of stat(5))
    return total / _TICK


@dataclass(kw_only=True, slots=True)
class StepResult:
    rate: float  # offered requests / s
    sent: int
    ok: int
    failed: int
    achieved_qps: float  # completed OK / (last completion − first scheduled send)
    p50_ms: float
    p99_ms: float
    cpu_s: float
    cpu_s_per_request: float
    wall_s: float

    def to_dict(self) -> dict:
        return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in asdict(self).items()}


def open_loop_step(send: Callable[[int], object], n: int, rate: float, *, pids: list[int],
                   drain_s: float = 2.0) -> StepResult:
    """Send requests 0..n-1 at ``rate`` per second; ``send(i)`` returns a gRPC future.

    Waits at most ``drain_s`` after the last scheduled send for answers.
    """
    if n < 1 or rate <= 0:
        raise InvalidInputError(f"n ({n}) must be ≥ 1 and rate ({rate}) > 0")
    done_at = np.full(n, np.inf)
    lock = threading.Lock()
    left = [n]
    all_done = threading.Event()

    def finish(i: int, fut) -> None:
        ok = fut.exception() is None
        t = time.perf_counter()
        with lock:
            if ok:
                done_at[i] = t
            left[0] -= 1
            if left[0] == 0:
                all_done.set()

    cpu0 = cpu_seconds(pids)
    t0 = time.perf_counter() + 0.01
    sched = t0 + np.arange(n) / rate
    for i in range(n):
        delay = sched[i] - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
        try:
            fut = send(i)
        except Exception:  # noqa: BLE001 — a refused send is a failed request
            finish(i, _Failed())
            continue
        fut.add_done_callback(lambda f, i=i: finish(i, f))
    all_done.wait(max(0.0, sched[-1] + drain_s - time.perf_counter()))
    wall = time.perf_counter() - t0
    cpu = cpu_seconds(pids) - cpu0
    with lock:
        lat = done_at - sched
        ok = int(np.isfinite(lat).sum())
        last = float(np.max(done_at[np.isfinite(done_at)])) if ok else t0
    p50, p99 = percentiles_ms(np.where(np.isfinite(lat), lat, 1e9))  # failures: beyond any budget
    return StepResult(rate=float(rate), sent=n, ok=ok, failed=n - ok,
                      achieved_qps=ok / max(last - t0, 1e-9), p50_ms=p50 if p50 < 1e9 else float("inf"),
                      p99_ms=p99 if p99 < 1e9 else float("inf"),
                      cpu_s=cpu, cpu_s_per_request=cpu / max(ok, 1), wall_s=wall)


class _Failed:
    def exception(self):
        return RuntimeError("send failed")


def closed_loop_qps(call: Callable[[int], object], n: int, concurrency: int) -> float:
    """Throughput of ``concurrency`` clients each calling ``call(i)`` (blocking) back to back: a capacity guess."""
    import concurrent.futures as cf

    t = time.perf_counter()
    with cf.ThreadPoolExecutor(concurrency) as ex:
        list(ex.map(call, range(n)))
    return n / (time.perf_counter() - t)


def sweep(send: Callable[[int], object], *, n_requests: int, rates: list[float], step_s: float, pids: list[int],
          stop_ms: float, drain_s: float = 2.0) -> list[StepResult]:
    """``open_loop_step`` at each rate (ascending), ``min(n_requests, rate × step_s)`` requests each
    (request i of a step is request ``i mod n_requests`` of the set); stops after the first step
    whose p99 exceeds ``stop_ms`` or that fails more than 1 % of its requests."""
    out = []
    for rate in sorted(rates):
        n = max(20, min(n_requests, int(rate * step_s)))
        r = open_loop_step(send, n, rate, pids=pids, drain_s=drain_s)
        out.append(r)
        if r.p99_ms > stop_ms or r.failed > 0.01 * r.sent:
            break
    return out


def max_qps(steps: list[StepResult], budget_ms: float) -> float:
    """Highest achieved QPS over the steps that held the p99 budget with ≤ 1 % failures (0 if none)."""
    good = [s.achieved_qps for s in steps if s.p99_ms <= budget_ms and s.failed <= 0.01 * s.sent]
    return max(good, default=0.0)
