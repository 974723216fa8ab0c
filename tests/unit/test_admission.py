"""Admission control: bounded in-flight and queue, per-client limits, queue wait and deadlines.

Pure threading (no gRPC): the oracle is counting — with P places and Q queue
slots, exactly P + Q callers are admitted or waiting and every other caller
is refused at once.
"""

from __future__ import annotations

import logging
import threading
import time

import pytest

from sterling.cluster.admission import Admission, AdmissionConfig, RateLimitedLog
from sterling.cluster.errors import (
    ClusterConfigError,
    DeadlineExceededError,
    OverloadedError,
    status_code_name,
)


def _waiter(adm: Admission, client: str, out: list, deadline: float | None = None) -> threading.Thread:
    def run():
        try:
            out.append(("ok", adm.acquire(client, deadline)))
        except Exception as e:  # recorded for the assertion
            out.append((type(e).__name__, e))

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


def _until(cond, timeout=5.0):
    t0 = time.monotonic()
    while not cond():
        assert time.monotonic() - t0 < timeout, "condition not reached"
        time.sleep(0.001)


def test_places_then_queue_then_refusal_and_release_admits_the_waiter():
    adm = Admission(AdmissionConfig(max_in_flight=2, max_queue=1, max_queue_wait_ms=5000))
    adm.acquire("a")
    adm.acquire("b")
    out: list = []
    t = _waiter(adm, "c", out)
    _until(lambda: adm.waiting == 1)
    with pytest.raises(OverloadedError) as e:
        adm.acquire("d")
    assert e.value.reason == "queue_full" and status_code_name(e.value) == "RESOURCE_EXHAUSTED"
    adm.release("a")
    t.join(5)
    assert out and out[0][0] == "ok"
    assert (adm.running, adm.waiting) == (2, 0)
    adm.release("b")
    adm.release("c")
    assert (adm.running, adm.waiting) == (0, 0)
    assert adm._per_client == {}


def test_queue_wait_is_bounded():
    adm = Admission(AdmissionConfig(max_in_flight=1, max_queue=4, max_queue_wait_ms=30))
    adm.acquire("a")
    t0 = time.monotonic()
    with pytest.raises(OverloadedError) as e:
        adm.acquire("b")
    assert e.value.reason == "queue_timeout"
    assert 0.02 <= time.monotonic() - t0 < 2.0
    assert adm.waiting == 0


def test_deadline_shorter_than_the_queue_wait_is_deadline_exceeded():
    adm = Admission(AdmissionConfig(max_in_flight=1, max_queue=4, max_queue_wait_ms=5000))
    adm.acquire("a")
    with pytest.raises(DeadlineExceededError):
        adm.acquire("b", deadline=time.monotonic() + 0.02)
    with pytest.raises(DeadlineExceededError):
        adm.acquire("b", deadline=time.monotonic() - 1)  # already past
    assert adm.waiting == 0 and adm.running == 1


def test_per_client_limit_counts_running_and_queued():
    adm = Admission(AdmissionConfig(max_in_flight=2, max_queue=8, max_client_in_flight=2, max_queue_wait_ms=5000))
    adm.acquire("greedy")
    adm.acquire("greedy")
    with pytest.raises(OverloadedError) as e:
        adm.acquire("greedy")
    assert e.value.reason == "client"
    out: list = []
    t = _waiter(adm, "polite", out)  # another client still gets a queue slot
    _until(lambda: adm.waiting == 1)
    adm.release("greedy")
    t.join(5)
    assert out[0][0] == "ok"


def test_many_threads_never_exceed_the_places():
    P, Q, N = 3, 5, 40
    adm = Admission(AdmissionConfig(max_in_flight=P, max_queue=Q, max_queue_wait_ms=2000))
    peak = [0]
    lock = threading.Lock()
    results = []
    gate = threading.Event()

    def worker(i):
        try:
            with adm.slot(f"c{i}"):
                with lock:
                    peak[0] = max(peak[0], adm.running)
                gate.wait(5)
            results.append("ok")
        except OverloadedError:
            results.append("refused")

    threads = [threading.Thread(target=worker, args=(i,), daemon=True) for i in range(N)]
    for t in threads:
        t.start()
    _until(lambda: len(results) >= N - P - Q)  # everyone beyond places + queue is refused at once
    assert results.count("refused") == N - P - Q
    gate.set()
    for t in threads:
        t.join(5)
    assert results.count("ok") == P + Q and peak[0] <= P
    assert (adm.running, adm.waiting) == (0, 0)


@pytest.mark.parametrize("kw", [dict(max_in_flight=0), dict(max_queue=-1), dict(max_queue_wait_ms=-1),
                                dict(max_client_in_flight=-1)])
def test_bad_admission_config(kw):
    with pytest.raises(ClusterConfigError):
        AdmissionConfig(**kw)


def test_rate_limited_log_says_how_many_it_suppressed(caplog):
    now = [0.0]
    rl = RateLimitedLog(logging.getLogger("t.rl"), interval_s=10, clock=lambda: now[0])
    with caplog.at_level(logging.WARNING, logger="t.rl"):
        assert rl.warning("bad %s", 1)
        for _ in range(50):
            assert not rl.warning("bad %s", 2)
        now[0] = 11.0
        assert rl.warning("bad %s", 3)
    assert len(caplog.records) == 2
    assert "50 similar suppressed" in caplog.records[1].getMessage()
