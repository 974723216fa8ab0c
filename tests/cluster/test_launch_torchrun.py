"""`sterling launch torchrun`: real ranks (torch.distributed.run + gloo), real gRPC from rank 0, a rank killed."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import grpc
import pytest

from sterling.cluster.client import Client
from sterling.model.synthetic import synthetic_queries
from tests.cluster.test_grpc_service import _read_address, _sterling
from tests.distributed.conftest import dist_catalog, learned_path  # noqa: F401, F811 (fixtures)
from tests.distributed.harness import free_port

pytestmark = pytest.mark.timeout(400)


def _rank_pids(launcher_pid: int) -> dict[int, int]:
    """RANK → pid of the worker processes the launcher (which runs torchrun's agent in-process) started."""
    out = {}
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            if ppid != launcher_pid:
                continue
            env = dict(kv.split("=", 1) for kv in (d / "environ").read_bytes().decode().split("\0") if "=" in kv)
        except (OSError, ValueError, IndexError):
            continue
        if "RANK" in env and "TORCHELASTIC_RUN_ID" in env:
            out[int(env["RANK"])] = int(d.name)
    return out


def _wait_ranks(proc, n, old=(), timeout_s=120.0):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        pids = _rank_pids(proc.pid)
        if len(pids) == n and not set(pids.values()) & set(old):
            return pids
        assert proc.poll() is None, proc.stderr.read()[-3000:]
        time.sleep(0.2)
    raise AssertionError(f"{n} ranks did not appear within {timeout_s} s")


def _retrieve_until_ok(address, xq, timeout_s=120.0):
    deadline = time.monotonic() + timeout_s
    last = None
    while time.monotonic() < deadline:
        try:
            with Client(address, timeout_s=10) as c:
                return c.retrieve(query=xq, k=100, nprobe=8, where="lang:en")
        except (grpc.RpcError, Exception) as e:  # not listening yet / group restarting
            last = e
            time.sleep(0.5)
    raise AssertionError(f"no answer from {address} within {timeout_s} s: {last!r}")


def test_ranks_serve_exactly_and_a_killed_rank_restarts_then_stops_the_launcher(cluster_model, cluster_catalog,
                                                                              tmp_path):
    model, path = cluster_model
    port = free_port()
    proc = _sterling("launch", "torchrun", "--nproc-per-node", "2", "--max-restarts", "1", "--model", str(path),
                     "--ranks-dir", str(tmp_path / "ranks"), "--port", str(port), "--monitor-interval", "0.2")
    try:
        address = _read_address(proc, timeout_s=180)
        assert address.endswith(f":{port}")
        xq = synthetic_queries(cluster_catalog, 16, seed=41)
        ref = model(query=xq, k=100, nprobe=8, where="lang:en", adaptive=False)
        with Client(address, timeout_s=60) as c:
            info = c.info()
            assert info.backend == "torchrun" and info.items == model.index.num_items
            assert [(s.list_start, s.list_end) for s in info.shards][0][0] == 0 and len(info.shards) == 2
            for where in (None, "lang:en", "lang:en AND NOT policy:blocked"):
                for k in (1, 100, 5000):
                    res = c.retrieve(query=xq.numpy(), k=k, nprobe=8, where=where)
                    r = model(query=xq, k=k, nprobe=8, where=where, adaptive=False)
                    assert (res.ids == r.ids.numpy()).all() and (res.scores == r.scores.numpy()).all()

        pids = _wait_ranks(proc, 2)
        os.kill(pids[1], signal.SIGKILL)  # mid-serving: the agent restarts the whole group (--max-restarts 1)
        pids2 = _wait_ranks(proc, 2, old=pids.values())
        res = _retrieve_until_ok(address, xq.numpy())
        assert (res.ids == ref.ids.numpy()).all() and (res.scores == ref.scores.numpy()).all()

        os.kill(pids2[1], signal.SIGKILL)  # restarts used up: the launcher stops and names the rank
        rc = proc.wait(timeout=120)
        err = proc.stderr.read()
        assert rc == 1, err[-3000:]
        assert "rank 1 (local rank 1" in err and "SIGKILL" in err
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)


def test_a_learned_model_is_served_over_ranks_like_in_process(learned_path, tmp_path):  # noqa: F811
    """The router's LearnedHead on rank 0 reranks the K0 merged from 2 ranks: the in-process model's answer."""
    from tests.cluster.learned_launch import assert_serves_learned_like_in_process

    proc = _sterling("launch", "torchrun", "--nproc-per-node", "2", "--model", str(learned_path),
                     "--ranks-dir", str(tmp_path / "ranks"), "--port", "0")
    assert_serves_learned_like_in_process(proc, learned_path, timeout_s=180)
