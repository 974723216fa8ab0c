"""Start the mesh as five OS processes on loopback, and a client for its orchestrator.

Example:
    >>> with Mesh("model.st") as mesh:
    ...     ids, values, tasks = mesh.client().recommend([17], k=10, k0=500, where="lang:en")
    ...     mesh.pids  # every process, for CPU accounting
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from dataclasses import dataclass, field

import grpc
import numpy as np

from sterling.benchmarks.mesh import mesh_pb2 as pb
from sterling.benchmarks.mesh import mesh_pb2_grpc as pbg
from sterling.benchmarks.mesh.services import _OPTIONS, from_ranked
from sterling.model.errors import SterlingError

__all__ = ["MeshConfig", "Mesh", "MeshClient", "MeshStartError", "spawn", "wait_ready", "spawn_ready"]


class MeshStartError(SterlingError):
    """A mesh (or `sterling serve`) process did not come up."""


@dataclass(kw_only=True, slots=True)
class MeshConfig:
    """Every tuning knob of the mesh (docs/mesh.md, "Tuning", says why each default)."""

    threads: dict[str, int] = field(default_factory=lambda: {"tower": 1, "filter": 1, "ann": 1, "scoring": 1})
    workers: int = 4  # gRPC handler threads of each backend service
    orchestrator_workers: int = 256  # handler threads park on a future while their batch runs
    refine: int = 2
    batch_wait_ms: float = 20.0
    batch_max_queries: int = 64
    pipelines: int = 2
    start_timeout_s: float = 120.0


def spawn(cmd: list[str], env: dict | None = None) -> subprocess.Popen:
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def wait_ready(proc: subprocess.Popen, marker: str, timeout_s: float) -> str:
    """Wait for a stdout line of ``proc`` holding ``marker``; the rest of that line."""
    found: list[str] = []
    ready = threading.Event()

    def read() -> None:
        for line in proc.stdout:
            if not found and marker in line:
                found.append(line.split(marker, 1)[1].strip())
                ready.set()
        ready.set()

    threading.Thread(target=read, daemon=True).start()
    if not ready.wait(timeout_s) or not found:
        proc.kill()
        proc.wait(10)
        raise MeshStartError(f"{' '.join(map(str, proc.args[:6]))}… did not print {marker!r} within "
                             f"{timeout_s:.0f} s; stderr tail: {proc.stderr.read()[-2000:]}")
    threading.Thread(target=proc.stderr.read, daemon=True).start()  # drain, never block the child
    return found[0]


def spawn_ready(cmd: list[str], marker: str, timeout_s: float, env: dict | None = None) -> tuple[subprocess.Popen, str]:
    """Start ``cmd`` and wait for a stdout line holding ``marker``; (process, rest of that line)."""
    proc = spawn(cmd, env)
    return proc, wait_ready(proc, marker, timeout_s)


class Mesh:
    """The five mesh processes (tower, filter, ANN, scoring, orchestrator), started in that order."""

    def __init__(self, artifact: str, config: MeshConfig | None = None) -> None:
        self.artifact, self.config = str(artifact), config or MeshConfig()
        self.procs: dict[str, subprocess.Popen] = {}
        self.addresses: dict[str, str] = {}

    def _cmd(self, role: str, *extra: str) -> list[str]:
        return [sys.executable, "-m", "sterling.benchmarks.mesh.services", role, "--port", "0", *extra]

    def start(self) -> Mesh:
        cfg = self.config
        env = {**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"}
        try:
            starting = {}
            for role in ("tower", "filter", "ann", "scoring"):
                extra = ["--artifact", self.artifact, "--threads", str(cfg.threads.get(role, 1)),
                         "--workers", str(cfg.workers)]
                if role == "ann":
                    extra += ["--refine", str(cfg.refine)]
                starting[role] = self._cmd(role, *extra)
            for role, cmd in starting.items():
                self.procs[role] = spawn(cmd, env)
            for role in starting:
                port = wait_ready(self.procs[role], "MESH READY", cfg.start_timeout_s)
                self.addresses[role] = f"127.0.0.1:{port}"
            extra = [f"--{r}={a}" for r, a in self.addresses.items()]
            extra += ["--workers", str(cfg.orchestrator_workers), "--batch-wait-ms", str(cfg.batch_wait_ms),
                      "--batch-max-queries", str(cfg.batch_max_queries), "--pipelines", str(cfg.pipelines)]
            proc, port = spawn_ready(self._cmd("orchestrator", *extra), "MESH READY", cfg.start_timeout_s, env)
            self.procs["orchestrator"], self.addresses["orchestrator"] = proc, f"127.0.0.1:{port}"
        except BaseException:
            self.stop()
            raise
        return self

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self.procs.values()]

    @property
    def address(self) -> str:
        return self.addresses["orchestrator"]

    def client(self) -> MeshClient:
        return MeshClient(self.address)

    def stop(self) -> None:
        for proc in reversed(list(self.procs.values())):
            if proc.poll() is None:
                proc.terminate()
        for proc in self.procs.values():
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
        self.procs.clear()

    def __enter__(self) -> Mesh:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


class MeshClient:
    """Calls the orchestrator; ``stub`` is public for the open-loop load generator."""

    def __init__(self, address: str) -> None:
        self.channel = grpc.insecure_channel(address, options=_OPTIONS)
        self.stub = pbg.OrchestratorStub(self.channel)

    @staticmethod
    def request(user_ids, *, k: int, k0: int, where: str | None = None, value_formula: str | None = None,
                nprobe: int = 0) -> pb.RecommendRequest:
        return pb.RecommendRequest(user_ids=[int(u) for u in np.asarray(user_ids).reshape(-1)], k=k, k0=k0,
                                   where=where or "", value_formula=value_formula or "", nprobe=nprobe)

    def recommend(self, user_ids, *, k: int, k0: int, where: str | None = None, value_formula: str | None = None,
                  nprobe: int = 0, timeout_s: float = 60.0):
        """(ids [B, k], values [B, k], task scores [B, k, T])."""
        req = self.request(user_ids, k=k, k0=k0, where=where, value_formula=value_formula, nprobe=nprobe)
        return from_ranked(self.stub.Recommend(req, timeout=timeout_s))

    def wait_ready(self, timeout_s: float = 30.0) -> None:
        grpc.channel_ready_future(self.channel).result(timeout=timeout_s)

    def close(self) -> None:
        self.channel.close()
