"""Two routers over the same model: each restarts in turn while a client with both addresses loses no request.

Real gRPC servers on loopback. A client thread sends a bounded loop of
``Retrieve`` calls through ``Client("IP:A,IP:B")``; meanwhile router A is
stopped and started again on the same port, then router B. Every call must
succeed and equal the single-process model's answer (the oracle).
"""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
import torch

from sterling.cluster.client import Client
from sterling.cluster.embedded import local_router
from sterling.cluster.router import RouterConfig
from sterling.cluster.server import RetrievalServer, ServerConfig
from sterling.model import IndexConfig, RetrievalModel, build_index

D, N, NLIST, K, NPROBE = 16, 3000, 16, 10, 8


def _start(model, port=0):
    router = local_router(model, num_shards=2, config=RouterConfig(max_k=100))
    return RetrievalServer(router, ServerConfig(port=port, workers=2)).start()


@pytest.mark.parametrize("schedule", ["one_at_a_time", "both_down_at_once"])
def test_a_router_restarting_while_another_serves_loses_no_request(schedule):
    """``one_at_a_time``: A restarts, then B (B may stop before the client has
    reconnected to A, as in a rolling restart). ``both_down_at_once``: both are
    down for 0.5 s; calls issued meanwhile wait within their deadline."""
    g = torch.Generator().manual_seed(9)
    model = RetrievalModel(build_index(torch.randn(N, D, generator=g), config=IndexConfig(nlist=NLIST)))
    xq = np.random.default_rng(1).standard_normal((4, D)).astype(np.float32)
    ref = model(query=torch.from_numpy(xq), k=K, nprobe=NPROBE)
    servers = [_start(model), _start(model)]
    ports = [int(s.address.rsplit(":", 1)[1]) for s in servers]
    errors: list[str] = []
    wrong = 0
    calls = 0
    done = threading.Event()

    def loop():
        nonlocal wrong, calls
        with Client(",".join(f"127.0.0.1:{p}" for p in ports), timeout_s=20) as c:
            c.wait_ready(10)
            while calls < 3000 and (not done.is_set() or calls < 50):
                try:
                    got = c.retrieve(query=xq, k=K, nprobe=NPROBE)
                except Exception as e:  # noqa: BLE001 - any failure is a lost request
                    errors.append(repr(e))
                else:
                    wrong += not (np.array_equal(got.ids, ref.ids.numpy())
                                  and np.allclose(got.scores, ref.scores.numpy(), atol=1e-5))
                calls += 1

    t = threading.Thread(target=loop, daemon=True)
    t.start()
    try:
        if schedule == "one_at_a_time":
            for i in (0, 1):
                before = calls
                while calls < before + 20 and t.is_alive():
                    time.sleep(0.01)
                servers[i].stop(grace=1.0)
                time.sleep(0.3)  # calls keep flowing to the other router only
                servers[i] = _start(model, port=ports[i])
        else:
            before = calls
            while calls < before + 20 and t.is_alive():
                time.sleep(0.01)
            for s in servers:
                s.stop(grace=1.0)
            time.sleep(0.5)  # no router at all: calls wait for one to come back
            servers = [_start(model, port=p) for p in ports]
        before = calls
        while calls < before + 20 and t.is_alive():
            time.sleep(0.01)
        done.set()
        t.join(120)
        assert not t.is_alive()
    finally:
        for s in servers:
            s.stop()
    assert errors == [], errors
    assert wrong == 0
    assert calls >= (60 if schedule == "one_at_a_time" else 50)
