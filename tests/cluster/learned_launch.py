"""Shared check for launchers serving a learned artifact: the served answers are the in-process model's."""

from __future__ import annotations

import signal

import torch

from sterling.cluster.client import Client
from tests.cluster.test_grpc_service import _read_address


def assert_serves_learned_like_in_process(proc, learned_path, *, timeout_s: float) -> None:
    """``proc`` (a launcher started on ``learned_path``): ids and values equal the in-process model
    bit for bit for k 1 and 50, K0 300, with and without a filter; then SIGTERM stops it cleanly."""
    from sterling.model.learned import LearnedRetrievalModel
    from tests.distributed.conftest import N_USERS

    model = LearnedRetrievalModel.load(learned_path).eval()
    try:
        address = _read_address(proc, timeout_s=timeout_s)
        users = [100 + i for i in range(N_USERS // 4)]
        with Client(address, timeout_s=60) as c:
            assert c.info().tasks == ["click", "like"]
            for where in (None, "lang:en AND NOT policy:blocked"):
                for k in (1, 50):
                    res = c.retrieve(user_ids=users, k=k, k0=300, where=where)
                    with torch.no_grad():
                        ref = model(user_ids=users, k=k, k0=300, where=where, adaptive=False)
                    assert (res.ids == ref.ids.numpy()).all()
                    assert (res.scores == ref.values.numpy()).all()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)
