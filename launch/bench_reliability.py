"""`sterling bench reliability`: fuzz a live server, inject faults, soak it at 2× its sustainable rate.

One run, loopback only, bounded in count and time:

1. build a synthetic model and serve it (``sterling serve``'s one-process
   server, 2 in-memory shards, admission control on);
2. **fuzz**: ``--fuzz`` seeded random requests — raw bytes, valid messages
   with bytes flipped or cut, structured messages with random fields and
   filters — counting status codes; a crash is an INTERNAL/UNKNOWN status,
   a hang a call over 20 s; afterwards the server must answer a canary
   query exactly as before, and its RSS growth is reported;
3. **faults**: a damaged artifact (byte flipped), a truncated artifact, and
   a disk that fills up while an artifact is rewritten (``RLIMIT_FSIZE`` in
   a child process): each must end in a typed error with the old artifact
   intact and no temp file left;
4. **soak**: the sustainable rate of one closed-loop client, then open-loop
   load at ``--soak-factor`` × that rate for ``--soak-seconds``; reports the
   p99 of admitted calls, the refused fraction, and the recovery time (from
   the end of the overload until a call is back within 2× the unloaded p50).

5. **writes**: ``sterling serve --data-dir`` in a child process (2 shards,
   a snapshot every few batches) takes ``--writes`` Upsert/Delete batches
   over gRPC; once half are acknowledged the server is killed with SIGKILL
   mid-stream, restarted on the same directory, and an exact filtered read
   (every upserted item carries the term ``bench:w``) counts acknowledged
   upserts missing (``acknowledged_writes_lost``) and acknowledged deletes
   that came back (``deleted_ids_reappeared``); both must be 0. The batch in
   flight at the kill is unacknowledged and counted in neither.

Prints one JSON line; exits 1 when any of these checks fails.
"""

from __future__ import annotations

import argparse
import json
import signal
import subprocess
import sys
import tempfile
import threading
import time
from concurrent import futures
from pathlib import Path

__all__ = ["register", "run", "soak", "sustainable_rate", "random_message"]

_HANG_S = 20.0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("reliability", help="fuzz a live server, inject faults, soak at 2× load (prints JSON)")
    p.add_argument("--items", type=int, default=30_000, help="synthetic catalog size")
    p.add_argument("--dim", type=int, default=32, help="embedding dimension")
    p.add_argument("--nlist", type=int, default=64, help="IVF lists")
    p.add_argument("--fuzz", type=int, default=2000, help="fuzzed requests (the long run uses 10000)")
    p.add_argument("--soak-seconds", type=float, default=5.0, help="length of the overload phase")
    p.add_argument("--soak-factor", type=float, default=2.0, help="offered load as a multiple of the sustainable rate")
    p.add_argument("--soak-max-calls", type=int, default=5000, help="cap on calls in the overload phase")
    p.add_argument("--batch", type=int, default=16, help="queries per soak request")
    p.add_argument("--writes", type=int, default=60, help="Upsert/Delete batches sent to the killed server")
    p.add_argument("--seed", type=int, default=0, help="fuzzer seed")
    p.add_argument("--out", help="append the JSON line to this file")
    p.set_defaults(func=run)


def random_message(rng, dim: int, valid: bytes) -> bytes:
    """One fuzzed ``RetrieveRequest`` payload (raw, mutated or structured), from a ``random.Random``."""
    from sterling.cluster import retrieval_pb2 as pb

    kind = rng.choice(("raw", "mutated", "structured", "structured", "structured"))
    if kind == "raw":
        return rng.randbytes(rng.randint(0, 300))
    if kind == "mutated":
        buf = bytearray(valid)
        for _ in range(rng.randint(1, 4)):
            buf[rng.randrange(len(buf))] = rng.randrange(256)
        return bytes(buf[: rng.randint(0, len(buf))] if rng.random() < 0.5 else buf)
    b = rng.randint(0, 4)
    n = max(b, 1) * dim if rng.random() < 0.6 else rng.randint(0, 3 * dim + 3)
    special = (float("nan"), float("inf"), -float("inf"), 3.4e38, -0.0)
    emb = [rng.choice(special) if rng.random() < 0.02 else rng.uniform(-4, 4) for _ in range(n)]
    terms = ["lang:en", "lang:es", "country:US", "device:ios", "policy:blocked", "no:such", "x", "AND", "(", ")"]
    words = [rng.choice(terms + ["OR", "AND", "NOT"]) for _ in range(rng.randint(0, 8))]
    if rng.random() < 0.3:  # junk text: any code point, distinct every time
        words.append("".join(chr(rng.choice((rng.randrange(32, 127), rng.randrange(0x80, 0xD800))))
                             for _ in range(rng.randint(1, 30))))
    req = pb.RetrieveRequest(
        query_embedding=emb, batch_size=b,
        k=rng.choice((rng.randint(0, 50), rng.randint(0, 2**32 - 1))),
        nprobe=rng.choice((0, rng.randint(1, 80), rng.randint(0, 2**32 - 1))),
        filter=" ".join(words), deadline_ms=rng.choice((0, rng.randint(0, 3000))),
        require_complete=rng.random() < 0.5, approximate_filter=rng.random() < 0.5,
        adaptive=rng.choice((0, 1, 2, 9)),
    )
    return req.SerializeToString()


def _raw_call(channel, data: bytes):
    import grpc

    call = channel.unary_unary("/sterling.v1.Retrieval/Retrieve", request_serializer=None,
                               response_deserializer=None)
    try:
        call(data, timeout=_HANG_S + 5)
        return grpc.StatusCode.OK
    except grpc.RpcError as e:
        return e.code()


def soak(address: str, xq, *, seconds: float, rate: float, max_calls: int, threads: int = 16, k: int = 10,
         nprobe: int = 16) -> tuple[list[tuple[str, float]], float]:
    """Open-loop load (calls start on a fixed schedule whatever the answers): ([(code, latency s)], wall s)."""
    import grpc

    from sterling.cluster.client import Client

    out: list[tuple[str, float]] = []
    lock = threading.Lock()
    n = max(1, min(max_calls, int(seconds * rate)))
    local = threading.local()
    t_start = time.perf_counter()

    def call(i):
        delay = t_start + i / rate - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
        if not hasattr(local, "c"):
            local.c = Client(address, timeout_s=10)
        t0 = time.perf_counter()
        try:
            local.c.retrieve(query=xq, k=k, nprobe=nprobe)
            code = "OK"
        except grpc.RpcError as e:
            code = e.code().name
        with lock:
            out.append((code, time.perf_counter() - t0))

    with futures.ThreadPoolExecutor(threads) as ex:
        list(ex.map(call, range(n)))
    return out, time.perf_counter() - t_start


def sustainable_rate(address: str, xq, *, calls: int = 30, k: int = 10, nprobe: int = 16) -> tuple[float, float]:
    """(calls per second, p50 latency s) of one closed-loop client after a warm-up call."""
    import numpy as np

    from sterling.cluster.client import Client

    with Client(address, timeout_s=10) as c:
        # The warm-up may JIT-compile the batch scan (numba, tens of seconds on a cold cache): no 10 s limit.
        c.retrieve(query=xq, k=k, nprobe=nprobe, timeout_s=600)
        lat = []
        t0 = time.perf_counter()
        for _ in range(calls):
            t = time.perf_counter()
            c.retrieve(query=xq, k=k, nprobe=nprobe)
            lat.append(time.perf_counter() - t)
        return calls / (time.perf_counter() - t0), float(np.median(lat))


def _rss_mb() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) / 1024


_FULL_DISK_CHILD = """
import resource, signal, sys
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
from sterling.model import RetrievalModel
m = RetrievalModel.load(sys.argv[1])
resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))
try:
    m.save(sys.argv[1])
except OSError as e:
    print("ERROR", type(e).__name__)
else:
    print("SAVED")
"""


def _faults(model_path: Path, work: Path) -> list[dict]:
    """Each fault with whether it ended in a clear error and nothing corrupted was left or loaded."""
    from sterling.model import RetrievalModel
    from sterling.model.errors import ArtifactError

    out = []
    good = model_path.read_bytes()
    for name, damage in (("artifact byte flipped", lambda b: b[: len(b) // 2] + bytes([b[len(b) // 2] ^ 0xFF])
                          + b[len(b) // 2 + 1:]),
                         ("artifact truncated", lambda b: b[: len(b) * 2 // 3])):
        p = work / f"{name.replace(' ', '_')}.st"
        p.write_bytes(damage(good))
        try:
            RetrievalModel.load(p)
            ok = False
        except ArtifactError:
            ok = True
        out.append({"fault": name, "typed_error": ok, "corrupt_state_served": not ok})
    p = work / "full_disk.st"
    p.write_bytes(good)
    r = subprocess.run([sys.executable, "-c", _FULL_DISK_CHILD, str(p)], capture_output=True, text=True,
                       timeout=300)
    intact = p.read_bytes() == good
    leftovers = [x.name for x in work.iterdir() if ".tmp-" in x.name]
    out.append({"fault": "disk full while rewriting an artifact", "typed_error": "ERROR" in r.stdout,
                "old_artifact_intact": intact, "temp_files_left": len(leftovers),
                "corrupt_state_served": not intact})
    return out


def _start_serve(model_path: Path, data_dir: Path, log_path: Path, timeout_s: float = 180.0):
    """``sterling serve --data-dir`` as a child process: (process, address) once it listens."""
    cmd = [sys.executable, "-m", "sterling.launch.cli", "serve", "--model", str(model_path), "--data-dir",
           str(data_dir), "--shards", "2", "--snapshot-every", "7", "--port", "0", "--workers", "2"]
    from sterling.benchmarks.evaluation import start_listening

    return start_listening(cmd, log_path, timeout_s)


def _writes(model_path: Path, work: Path, *, batches: int, dim: int, nlist: int, seed: int) -> dict:
    """Acknowledged writes across a SIGKILL of ``sterling serve --data-dir`` and a restart (see module doc)."""
    import grpc
    import numpy as np

    from sterling.cluster.client import Client

    rng = np.random.default_rng(seed + 99)
    base_id = 10**9
    ops: list[tuple[str, np.ndarray]] = []
    live_ids: list[int] = []
    for b in range(batches):  # fresh ids for every upsert; deletes take ids upserted earlier, never re-upserted
        if b % 3 == 2 and live_ids:
            pick = rng.choice(len(live_ids), min(5, len(live_ids)), replace=False)
            gone = [live_ids[i] for i in sorted(pick, reverse=True)]
            for i in sorted(pick, reverse=True):
                live_ids.pop(i)
            ops.append(("delete", np.array(gone)))
        else:
            ids = base_id + np.arange(20 * b, 20 * (b + 1))
            live_ids.extend(ids.tolist())
            ops.append(("upsert", ids))
    vectors = rng.standard_normal((batches, 20, dim)).astype(np.float32)
    data_dir, log_path = work / "live-data", work / "serve.log"
    acked: list[int] = []
    half = threading.Event()
    proc, address = _start_serve(model_path, data_dir, log_path)
    try:
        def writer():
            with Client(address, timeout_s=30) as c:
                for b, (kind, ids) in enumerate(ops):
                    try:
                        if kind == "upsert":
                            c.upsert([(ids, vectors[b], [["bench:w"]] * len(ids))])
                        else:
                            c.delete(ids)
                    except grpc.RpcError:
                        return
                    acked.append(b)
                    if len(acked) >= batches // 2:
                        half.set()
            half.set()

        t = threading.Thread(target=writer, daemon=True)
        t.start()
        half.wait(300)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        t.join(60)
        killed_after = len(acked)
        t0 = time.perf_counter()
        proc, address = _start_serve(model_path, data_dir, log_path)
        recovery_s = time.perf_counter() - t0
        done = set(acked)
        in_flight = set(ops[killed_after][1].tolist()) if killed_after < len(ops) else set()
        present, absent = set(), set()
        for b, (kind, ids) in enumerate(ops):
            if b in done:
                (present.update if kind == "upsert" else present.difference_update)(ids.tolist())
                if kind == "delete":
                    absent.update(ids.tolist())
        present -= in_flight
        with Client(address, timeout_s=30) as c:
            c.wait_ready(30)
            q = rng.standard_normal((1, dim)).astype(np.float32)
            got = c.retrieve(query=q, k=20 * batches + 1, nprobe=nlist, where="bench:w", adaptive=False)
        seen = set(got.ids.reshape(-1).tolist()) - {-1}
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)
    return {"batches_sent": killed_after + (killed_after < len(ops)), "acknowledged": killed_after,
            "killed_after_acks": killed_after, "acknowledged_ids_upserted": len(present),
            "acknowledged_ids_deleted": len(absent), "acknowledged_writes_lost": len(present - seen),
            "deleted_ids_reappeared": len(absent & seen), "restart_to_serving_s": round(recovery_s, 2)}


def run(args: argparse.Namespace) -> int:
    import random

    import grpc
    import numpy as np
    import torch

    from sterling.cluster import retrieval_pb2 as pb
    from sterling.cluster.admission import AdmissionConfig
    from sterling.cluster.client import Client
    from sterling.cluster.embedded import local_router
    from sterling.cluster.router import RouterConfig
    from sterling.cluster.server import RetrievalServer, ServerConfig
    from sterling.model import IndexConfig, RetrievalModel, build_index
    from sterling.model.synthetic import synthetic_catalog, synthetic_queries

    torch.set_num_threads(1)
    cat = synthetic_catalog(args.items, args.dim, seed=args.seed)
    index = build_index(cat.embeddings, ids=cat.ids, attributes=cat.attributes, config=IndexConfig(nlist=args.nlist))
    result: dict = {"bench": "reliability", "items": args.items, "dim": args.dim}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        model_path = work / "model.st"
        RetrievalModel(index).save(model_path)
        model = RetrievalModel.load(model_path)
        router = local_router(model, num_shards=2, config=RouterConfig(max_k=1000, max_batch=64))
        adm = AdmissionConfig(max_in_flight=2, max_queue=4, max_queue_wait_ms=300)
        srv = RetrievalServer(router, ServerConfig(port=0, workers=2, admission=adm,
                                                   max_message_bytes=1 << 20)).start()
        try:
            canary = synthetic_queries(cat, 2, seed=5).numpy()
            client = Client(srv.address, timeout_s=30)
            before = client.retrieve(query=canary, k=10, nprobe=8, where="lang:en")
            valid = pb.RetrieveRequest(query_embedding=canary[0].tolist(), k=10, filter="lang:en").SerializeToString()
            rng = random.Random(args.seed)
            codes: dict[str, int] = {}
            hangs = 0
            rss0 = _rss_mb()
            t0 = time.perf_counter()
            with grpc.insecure_channel(srv.address) as ch:
                for _ in range(args.fuzz):
                    data = random_message(rng, args.dim, valid)
                    t = time.perf_counter()
                    code = _raw_call(ch, data).name
                    hangs += time.perf_counter() - t > _HANG_S
                    codes[code] = codes.get(code, 0) + 1
            for _ in range(50):  # a replica that missed a fuzzed 1 ms deadline is unhealthy until re-probed
                after = client.retrieve(query=canary, k=10, nprobe=8, where="lang:en")
                if not after.partial:
                    break
                time.sleep(0.2)
            result["fuzz"] = {
                "requests_fuzzed": args.fuzz, "seconds": round(time.perf_counter() - t0, 2), "codes": codes,
                "crashes": codes.get("INTERNAL", 0) + codes.get("UNKNOWN", 0), "hangs": int(hangs),
                "canary_identical": bool(np.array_equal(before.ids, after.ids)
                                         and np.array_equal(before.scores, after.scores)),
                "rss_growth_mb": round(_rss_mb() - rss0, 1),
            }
            faults = _faults(model_path, work)
            result["faults"] = faults
            result["faults_injected"] = len(faults)
            writes = _writes(model_path, work, batches=args.writes, dim=args.dim, nlist=args.nlist, seed=args.seed)
            result["writes"] = writes
            result["acknowledged_writes_lost"] = writes["acknowledged_writes_lost"]
            result["writes_acknowledged"] = writes["acknowledged"]

            xq = synthetic_queries(cat, args.batch, seed=12).numpy()
            rate, p50 = sustainable_rate(srv.address, xq)
            calls, wall = soak(srv.address, xq, seconds=args.soak_seconds, rate=args.soak_factor * rate,
                               max_calls=args.soak_max_calls)
            t_end = time.perf_counter()
            ok = np.array([t for c, t in calls if c == "OK"]) * 1e3
            recovery_ms = None
            with Client(srv.address, timeout_s=10) as c:
                for _ in range(200):
                    t = time.perf_counter()
                    c.retrieve(query=xq, k=10, nprobe=16)
                    if time.perf_counter() - t <= 2 * p50:
                        recovery_ms = (time.perf_counter() - t_end) * 1e3
                        break
            result["soak"] = {
                "sustainable_qps": round(rate, 1), "unloaded_p50_ms": round(p50 * 1e3, 2),
                "offered_qps": round(len(calls) / wall, 1), "calls": len(calls),
                "admitted": int(ok.size), "refused": sum(c == "RESOURCE_EXHAUSTED" for c, _ in calls),
                "other_codes": sorted({c for c, _ in calls} - {"OK", "RESOURCE_EXHAUSTED"}),
                "admitted_p50_ms": round(float(np.percentile(ok, 50)), 2) if ok.size else None,
                "admitted_p99_ms": round(float(np.percentile(ok, 99)), 2) if ok.size else None,
                "p99_budget_ms": round(adm.max_queue_wait_ms + (adm.max_queue // adm.max_in_flight + 1) * 4 * p50 * 1e3,
                                       1),
                "recovery_ms": None if recovery_ms is None else round(recovery_ms, 1),
            }
            client.close()
        finally:
            srv.stop()
    line = json.dumps(result)
    print(line, flush=True)
    if args.out:
        with open(args.out, "a") as f:
            f.write(line + "\n")
    ok = (result["fuzz"]["crashes"] == 0 and result["fuzz"]["hangs"] == 0 and result["fuzz"]["canary_identical"]
          and all(not f["corrupt_state_served"] and f["typed_error"] for f in result["faults"])
          and result["acknowledged_writes_lost"] == 0 and result["writes"]["deleted_ids_reappeared"] == 0)
    return 0 if ok else 1


