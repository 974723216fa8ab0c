"""`sterling bench e2e`: Sterling (`sterling serve`, one process) vs the microservice mesh, same requests.

Both systems serve the SAME learned artifact with filtering and scoring on:
every request is one user, a filter expression (or none), k and K0. The run

1. trains the artifact (unless one is given) and builds the deterministic
   request set;
2. computes the exact answers: brute-force top-K0 over the eligible items
   (fp32 inner products against the index's own item vectors, codes ×
   scales; eligibility from the NumPy forward-index peer), then the same
   OverArch + heads + Value Model rerank down to k;
3. starts `sterling serve` (a subprocess) and the mesh (five subprocesses);
4. per system: answers to the whole request set (recall@k against exact,
   and agreement between the two systems), a closed-loop capacity guess,
   then an open-loop sweep at fractions of that guess (``loadgen.sweep``);
5. prints one JSON line per step and a summary line with the max QPS under
   each p99 budget, their ratios (``qps_ratio_p99_200ms``, …), recall@k and
   CPU seconds per request (all processes of a system, from /proc).
"""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from sterling.benchmarks.evaluation import ForwardIndex, commit, exact_topk, machine, recall
from sterling.benchmarks.loadgen import Request, closed_loop_qps, max_qps, request_set, sweep
from sterling.model.errors import InvalidInputError

__all__ = ["E2EConfig", "make_artifact", "exact_answers", "run_e2e", "WHERES", "plot"]

# Filters of the request set: none, a broad one, a negation, a disjunction, a selective conjunction.
WHERES: list[str | None] = [None, "lang:en", "NOT lang:en", "topic:t1 OR topic:t2 OR topic:t3",
                            "lang:es AND NOT topic:t0"]
FRACTIONS = (0.2, 0.4, 0.6, 0.8, 0.9, 1.0, 1.1, 1.25, 1.5)  # of the closed-loop capacity guess


@dataclass(kw_only=True, slots=True)
class E2EConfig:
    """One `sterling bench e2e` run (the CLI flags, one to one)."""

    artifact: str | None = None
    work_dir: str = "bench-e2e"
    n_users: int = 2000
    n_items: int = 20000
    n_requests: int = 2000
    k: int = 50
    k0: int = 500
    step_s: float = 4.0
    budgets_ms: tuple[float, ...] = (200.0, 50.0)
    fractions: tuple[float, ...] = FRACTIONS
    shards: int = 1
    batch_wait_ms: float = 20.0
    batch_max_queries: int = 64
    seed: int = 0
    plot: str | None = None
    extra: dict = field(default_factory=dict)  # "serve_args" / "serve_env": extra flags / env of `sterling serve`

    def __post_init__(self) -> None:
        if self.k < 1 or self.k0 < self.k or self.n_requests < 1 or self.step_s <= 0:
            raise InvalidInputError(f"need 1 ≤ k ({self.k}) ≤ k0 ({self.k0}), n_requests ({self.n_requests}) ≥ 1 "
                                    f"and step_s ({self.step_s}) > 0")


def make_artifact(path: str | Path, *, n_users: int, n_items: int, seed: int = 0, quiet: bool = True) -> Path:
    """Train the learned model on the synthetic recommendation set and write it to ``path`` (atomic)."""
    from sterling.model.data import read_features, read_interactions
    from sterling.model.synthetic_rec import write_synthetic_rec
    from sterling.model.train import TrainConfig, train

    path = Path(path)
    small = n_items < 2000
    rec = write_synthetic_rec(path.parent / f"rec-{n_users}x{n_items}", n_users=n_users, n_items=n_items,
                              n_topics=6 if small else 24, per_user=(10, 25) if small else (10, 40), seed=seed)
    cfg = TrainConfig(dim=16 if small else 32, emb_dim=8 if small else 16, hidden_dims=(32,) if small else (64,),
                      tower_epochs=2, overarch_epochs=2, k0_train=50 if small else 100, k0=100 if small else 500,
                      batch_size=256 if small else 512, seed=seed, progress=not quiet)
    model, _, _ = train(read_interactions(rec["interactions"]), read_features(rec["users"], "user_id"),
                        read_features(rec["items"], "item_id"), cfg, evaluate_k=20 if small else 50)
    model.save(path)  # write_artifact writes a temp file and renames it
    return path


def exact_answers(model, requests: list[Request], value_formula: str | None = None) -> np.ndarray:
    """[n, k] exact ids: brute-force top-K0 over the eligible items, then the model's rerank."""
    import torch

    from sterling.model.filter import parse_filter

    idx = model.index
    xb = idx.codes.float() * idx.scales[:, None]
    live = torch.from_numpy(idx.item_ids.numpy() >= 0)
    fwd = ForwardIndex(idx.attr_ids.numpy(), idx.attr_offsets.numpy(), idx.vocab)
    k, k0 = requests[0].k, requests[0].k0
    out = np.full((len(requests), k), -1, np.int64)
    by_where: dict[str | None, list[int]] = {}
    for i, r in enumerate(requests):
        by_where.setdefault(r.where, []).append(i)
    with torch.inference_mode():
        for where, rows in by_where.items():
            node = parse_filter(where)
            mask = live if node is None else live & torch.from_numpy(fwd.eval(node))
            users = torch.tensor([requests[i].user_id for i in rows])
            u = model.user_embedding(user_ids=users)
            s, p = exact_topk(u, xb, k0, mask)
            ids = torch.where(p >= 0, idx.item_ids[p.clamp(min=0)], torch.full_like(p, -1))
            out[rows] = model.rank(u, s, ids, k, value_formula).ids.numpy()
    return out


# ------------------------------------------------------------------ the two systems
class _Sterling:
    name = "sterling"

    def __init__(self, cfg: E2EConfig, artifact: str) -> None:
        import grpc

        from sterling.benchmarks.mesh.launcher import spawn, wait_ready
        from sterling.cluster import retrieval_pb2 as pb
        from sterling.cluster import retrieval_pb2_grpc as pbg

        cmd = [sys.executable, "-m", "sterling.launch.cli", "serve", "--model", artifact, "--port", "0",
               "--shards", str(cfg.shards), "--workers", "64", "--max-queue", "1024", "--max-queue-wait-ms", "5000",
               "--batch-wait-ms", str(cfg.batch_wait_ms), "--batch-max-queries", str(cfg.batch_max_queries),
               "--max-k0", str(max(cfg.k0, 1000)), *cfg.extra.get("serve_args", [])]
        # One intra-op thread, as every mesh service gets (measured: 170 vs 136 QPS under 200 ms with
        # torch's default of 2 threads on the 2-core VM, where 64 handler threads share the cores).
        env = {**os.environ, "TQDM_DISABLE": "1", "OMP_NUM_THREADS": "1", "NUMBA_NUM_THREADS": "1"}
        self.proc = spawn(cmd, {**env, **cfg.extra.get("serve_env", {})})
        self.address = wait_ready(self.proc, "listening on ", 120).split()[0]
        self.pb = pb
        self.channel = grpc.insecure_channel(self.address, options=[("grpc.max_receive_message_length", 64 << 20)])
        self.stub = pbg.RetrievalStub(self.channel)
        grpc.channel_ready_future(self.channel).result(timeout=30)
        self.pids = [self.proc.pid]

    def requests(self, reqs: list[Request]) -> list:
        pb = self.pb
        return [pb.RetrieveRequest(user_ids=[r.user_id], batch_size=1, k=r.k, k0=r.k0, filter=r.where or "",
                                   adaptive=pb.ADAPTIVE_MODE_OFF) for r in reqs]

    def future(self, msg, timeout_s: float = 30.0):
        return self.stub.Retrieve.future(msg, timeout=timeout_s)

    def ids(self, reply, k: int) -> np.ndarray:
        out = np.full(k, -1, np.int64)
        got = list(reply.results[0].ids)
        out[: len(got)] = got
        return out

    def stop(self) -> None:
        self.channel.close()
        self.proc.terminate()
        try:
            self.proc.wait(15)
        except Exception:  # noqa: BLE001
            self.proc.kill()
            self.proc.wait(5)


class _MeshSystem:
    name = "mesh"

    def __init__(self, cfg: E2EConfig, artifact: str) -> None:
        from sterling.benchmarks.mesh.launcher import Mesh, MeshConfig

        self.mesh = Mesh(artifact, MeshConfig(batch_wait_ms=cfg.batch_wait_ms,
                                              batch_max_queries=cfg.batch_max_queries)).start()
        self.client = self.mesh.client()
        self.client.wait_ready(30)
        self.pids = self.mesh.pids

    def requests(self, reqs: list[Request]) -> list:
        return [self.client.request([r.user_id], k=r.k, k0=r.k0, where=r.where) for r in reqs]

    def future(self, msg, timeout_s: float = 30.0):
        return self.client.stub.Recommend.future(msg, timeout=timeout_s)

    def ids(self, reply, k: int) -> np.ndarray:
        return np.frombuffer(reply.ids, np.int64).reshape(reply.rows, reply.k)[0]

    def stop(self) -> None:
        self.client.close()
        self.mesh.stop()


def _answers(system, msgs: list, k: int, concurrency: int = 8) -> np.ndarray:
    import concurrent.futures as cf

    with cf.ThreadPoolExecutor(concurrency) as ex:
        rows = list(ex.map(lambda m: system.ids(system.future(m).result(), k), msgs))
    return np.stack(rows)


def _measure(system, reqs: list[Request], cfg: E2EConfig):
    """(answers [n, k], closed-loop capacity guess, open-loop steps) of one running system."""
    msgs = system.requests(reqs)
    answers = _answers(system, msgs, cfg.k)  # also the warm-up
    cap = closed_loop_qps(lambda i: system.future(msgs[i % len(msgs)]).result(),
                          min(len(msgs), max(64, int(100 * cfg.step_s))), concurrency=32)
    steps = sweep(lambda i: system.future(msgs[i % len(msgs)]), n_requests=cfg.n_requests,
                  rates=[f * cap for f in cfg.fractions], step_s=cfg.step_s, pids=system.pids,
                  stop_ms=max(cfg.budgets_ms))
    return answers, cap, steps


# ------------------------------------------------------------------ the run
def run_e2e(cfg: E2EConfig, emit=None) -> dict:
    """The whole benchmark; ``emit(dict)`` gets every JSON record (default: print it). Returns the summary."""
    import torch

    from sterling.model.learned import LearnedRetrievalModel

    emit = emit or (lambda rec: print(json.dumps(rec), flush=True))
    t_start = time.perf_counter()
    work = Path(cfg.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    artifact = Path(cfg.artifact) if cfg.artifact else work / f"learned-{cfg.n_users}x{cfg.n_items}.st"
    if not artifact.exists():
        if cfg.artifact:
            raise InvalidInputError(f"--artifact {artifact} does not exist; omit it to train one into --work-dir")
        make_artifact(artifact, n_users=cfg.n_users, n_items=cfg.n_items, seed=cfg.seed)
    model = LearnedRetrievalModel.load(artifact).eval()
    torch.set_num_threads(1)
    reqs = request_set(model.users.ids.numpy(), cfg.n_requests, wheres=WHERES, k=cfg.k, k0=cfg.k0, seed=cfg.seed)
    exact = exact_answers(model, reqs)
    idx = model.index
    common = {"bench": "e2e", "items": idx.num_items, "nlist": idx.nlist, "nprobe": model.nprobe_for(cfg.k0),
              "k": cfg.k, "k0": cfg.k0, "requests": cfg.n_requests, "filters": WHERES, "overarch":
              type(model.overarch).__name__, "machine": machine(), "commit": commit()}
    results: dict[str, dict] = {}
    answers: dict[str, np.ndarray] = {}
    for cls in (_Sterling, _MeshSystem):
        system = cls(cfg, str(artifact))
        try:
            answers[system.name], cap, steps = _measure(system, reqs, cfg)
        finally:
            system.stop()
        for s in steps:
            emit({**common, "system": system.name, "step": s.to_dict()})
        best = {f"max_qps_p99_{int(b)}ms": max_qps(steps, b) for b in cfg.budgets_ms}
        held = [s for s in steps if s.p99_ms <= max(cfg.budgets_ms) and s.failed <= 0.01 * s.sent]
        top = max(held, key=lambda s: s.achieved_qps) if held else None
        results[system.name] = {
            **best, "capacity_guess_qps": cap, f"recall_at_{cfg.k}": recall(answers[system.name], exact),
            "cpu_s_per_request_at_max": None if top is None else top.cpu_s_per_request,
            "processes": len(system.pids), "steps": [s.to_dict() for s in steps],
        }
    summary = {**common, "system": "summary",
               **{f"{n}_{key}": v for n, r in results.items() for key, v in r.items() if key != "steps"},
               "agreement_at_k": recall(answers["mesh"], answers["sterling"]),
               "wall_s": time.perf_counter() - t_start}
    for b in cfg.budgets_ms:
        key = f"max_qps_p99_{int(b)}ms"
        m, s = results["mesh"][key], results["sterling"][key]
        summary[f"qps_ratio_p99_{int(b)}ms"] = (s / m) if m > 0 else None
    cm, cs = results["mesh"]["cpu_s_per_request_at_max"], results["sterling"]["cpu_s_per_request_at_max"]
    summary["cpu_per_request_ratio"] = (cm / cs) if cm and cs else None
    emit(summary)
    if cfg.plot:
        plot(results, cfg.plot, title=f"{idx.num_items:,} items, k={cfg.k}, K0={cfg.k0}, filters + rerank on")
    return {**summary, "results": results}


def plot(results: dict, path: str, *, title: str = "") -> Path | None:
    """p99 latency vs achieved QPS per system (and the budgets); PNG at ``path``; None without matplotlib."""
    from sterling.benchmarks.plots import pyplot, save

    plt = pyplot("e2e")
    if plt is None:
        return None
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for name, r in results.items():
        st = [s for s in r["steps"] if s["p99_ms"] is not None]
        ax.plot([s["achieved_qps"] for s in st], [s["p99_ms"] for s in st], marker="o", label=name)
    for b, style in ((200, "--"), (50, ":")):
        ax.axhline(b, color="grey", linestyle=style, linewidth=1)
        ax.text(ax.get_xlim()[0], b, f" p99 {b} ms", va="bottom", fontsize=8, color="grey")
    ax.set_yscale("log")
    ax.set_xlabel("achieved QPS (open loop)")
    ax.set_ylabel("p99 latency, ms (log)")
    ax.set_title(f"Sterling vs microservice mesh — {title}", fontsize=9)
    ax.legend()
    fig.tight_layout()
    return save(fig, path)
