"""The gRPC service on loopback (one-process backend): bad requests, health, reflection, security, CLI."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import grpc
import numpy as np
import pytest
import torch

from sterling.benchmarks.evaluation import assert_same_topk
from sterling.cluster import retrieval_pb2 as pb
from sterling.cluster.client import Client
from sterling.cluster.embedded import local_router
from sterling.cluster.router import RouterConfig
from sterling.cluster.server import RetrievalServer, SecurityConfig, ServerConfig
from sterling.model.synthetic import synthetic_queries

MAX_K = 1000


@pytest.fixture(scope="module")
def server(cluster_model):
    model, _ = cluster_model
    router = local_router(model, num_shards=3, config=RouterConfig(max_k=MAX_K, max_batch=256))
    srv = RetrievalServer(router, ServerConfig(port=0, workers=4, max_message_bytes=1 << 20)).start()
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def client(server):
    c = Client(server.address, timeout_s=30)
    c.wait_ready(10)
    yield c
    c.close()


def _code(fn) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as e:
        fn()
    assert e.value.details()  # a message that says what to fix
    return e.value.code()


def test_malformed_requests_get_clear_status_codes_and_the_server_keeps_serving(client, cluster_model,
                                                                              cluster_catalog):
    model, _ = cluster_model
    xq = synthetic_queries(cluster_catalog, 4, seed=1).numpy()
    stub = client.stub
    INVALID, EXHAUSTED = grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED
    cases = [
        (INVALID, lambda: client.retrieve(query=np.zeros((2, 31), np.float32), k=5)),  # wrong dim
        (INVALID, lambda: client.retrieve(query=np.full((1, 32), np.nan, np.float32), k=5)),
        (INVALID, lambda: client.retrieve(query=np.full((1, 32), np.inf, np.float32), k=5)),
        (INVALID, lambda: client.retrieve(query=xq, k=0)),
        (INVALID, lambda: client.retrieve(query=xq, k=MAX_K + 1)),
        (INVALID, lambda: client.retrieve(query=xq, k=5, nprobe=10_000)),
        (INVALID, lambda: client.retrieve(query=xq, k=5, where="lang:en AND (country:US")),
        (INVALID, lambda: client.retrieve(query=xq, k=5, where="lang:en OR OR x:y")),
        (INVALID, lambda: client.retrieve(query=xq, k=5, where=" OR ".join(f"a:{i}" for i in range(300)))),
        (INVALID, lambda: client.retrieve(query=xq, k=5, where=["lang:en", "lang:es"])),  # 2 filters, 4 queries
        (INVALID, lambda: client.retrieve(user_features=np.zeros((1, 8), np.float32), k=5)),  # no tower
        (INVALID, lambda: stub.Retrieve(pb.RetrieveRequest(k=5))),  # no query at all
        (INVALID, lambda: stub.Retrieve(pb.RetrieveRequest(k=5, batch_size=3, query_embedding=[0.1] * 32))),
        (INVALID, lambda: stub.Retrieve(pb.RetrieveRequest(k=5, query_embedding=[0.1] * 32, user_features=[1.0]))),
        (EXHAUSTED, lambda: client.retrieve(query=np.ones((300, 32), np.float32), k=1)),  # > max_batch
        (EXHAUSTED, lambda: client.retrieve(query=np.ones((9000, 32), np.float32), k=1)),  # > 1 MiB message
    ]
    for want, call in cases:
        assert _code(call) == want
    res = client.retrieve(query=xq, k=10, nprobe=8)  # still serving, still right
    ref = model(query=torch.from_numpy(xq), k=10, nprobe=8, adaptive=False)
    assert_same_topk(res.ids, res.scores, ref.ids, ref.scores, exact=True)
    per_query = ["lang:en", None, "NOT policy:blocked", "country:US AND device:ios"]
    res = client.retrieve(query=xq, k=10, nprobe=8, where=per_query)
    ref = model(query=torch.from_numpy(xq), k=10, nprobe=8, where=per_query, adaptive=False)
    assert_same_topk(res.ids, res.scores, ref.ids, ref.scores)


def test_update_rpcs_answer_unimplemented_without_data_dir(client):
    assert _code(lambda: client.stub.Delete(pb.DeleteRequest(ids=[1]))) == grpc.StatusCode.UNIMPLEMENTED
    assert _code(lambda: client.stub.Upsert(iter([pb.UpsertRequest(ids=[1])]))) == grpc.StatusCode.UNIMPLEMENTED


def test_health_service_reports_serving(server):
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with grpc.insecure_channel(server.address) as ch:
        stub = health_pb2_grpc.HealthStub(ch)
        for name in ("", "sterling.v1.Retrieval"):
            assert stub.Check(health_pb2.HealthCheckRequest(service=name), timeout=5).status == (
                health_pb2.HealthCheckResponse.SERVING
            )
        with pytest.raises(grpc.RpcError) as e:
            stub.Check(health_pb2.HealthCheckRequest(service="no.such.Service"), timeout=5)
        assert e.value.code() == grpc.StatusCode.NOT_FOUND


def test_a_client_built_only_from_server_reflection_works(server, cluster_model, cluster_catalog):
    """No generated code of ours: descriptors come from the server, messages from a fresh pool."""
    from google.protobuf import descriptor_pool, message_factory
    from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
        ProtoReflectionDescriptorDatabase,
    )

    model, _ = cluster_model
    with grpc.insecure_channel(server.address) as ch:
        db = ProtoReflectionDescriptorDatabase(ch)
        assert "sterling.v1.Retrieval" in db.get_services()
        pool = descriptor_pool.DescriptorPool(db)
        svc = pool.FindServiceByName("sterling.v1.Retrieval")
        method = svc.methods_by_name["Retrieve"]
        Req = message_factory.GetMessageClass(method.input_type)
        Resp = message_factory.GetMessageClass(method.output_type)
        assert Req is not pb.RetrieveRequest
        call = ch.unary_unary(f"/{svc.full_name}/{method.name}", request_serializer=Req.SerializeToString,
                              response_deserializer=Resp.FromString)
        xq = synthetic_queries(cluster_catalog, 3, seed=2)
        resp = call(Req(query_embedding=xq.reshape(-1).tolist(), batch_size=3, k=7, nprobe=8, filter="lang:en"),
                    timeout=10)
        ref = model(query=xq, k=7, nprobe=8, where="lang:en", adaptive=False)
        assert [list(r.ids) for r in resp.results] == ref.ids.tolist()
        assert resp.model_version == int(model.index.version) and not resp.partial
        info = ch.unary_unary(f"/{svc.full_name}/Info",
                              request_serializer=message_factory.GetMessageClass(
                                  svc.methods_by_name["Info"].input_type).SerializeToString,
                              response_deserializer=message_factory.GetMessageClass(
                                  svc.methods_by_name["Info"].output_type).FromString)
        assert info(message_factory.GetMessageClass(svc.methods_by_name["Info"].input_type)(), timeout=10).items == (
            model.index.num_items
        )


def test_user_features_go_through_the_tower_once(cluster_catalog, tmp_path):
    from sterling.model import IndexConfig, RetrievalModel, UserTower, build_index

    c = cluster_catalog
    index = build_index(c.embeddings[:5000], ids=c.ids[:5000], attributes=None, config=IndexConfig(nlist=16))
    torch.manual_seed(0)
    model = RetrievalModel(index, UserTower(UserTower.Config(input_dim=12, hidden_dims=(16,), output_dim=32)))
    srv = RetrievalServer(local_router(model, num_shards=2), ServerConfig(port=0)).start()
    try:
        with Client(srv.address) as cl:
            feats = torch.randn(5, 12)
            res = cl.retrieve(user_features=feats.numpy(), k=20, nprobe=4)
            ref = model(user_features=feats, k=20, nprobe=4, adaptive=False)
            assert_same_topk(res.ids, res.scores, ref.ids, ref.scores, atol=1e-5)
            assert cl.info().has_user_tower and cl.info().user_feature_dim == 12
            assert _code(lambda: cl.retrieve(user_features=np.ones((1, 11), np.float32), k=3)) == (
                grpc.StatusCode.INVALID_ARGUMENT
            )
    finally:
        srv.stop()


def _openssl(*args, cwd):
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    if shutil.which("openssl") is None:
        pytest.skip("openssl not installed")
    d = tmp_path_factory.mktemp("certs")
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.pem", "-days", "2",
             "-subj", "/CN=sterling-test-ca", cwd=d)
    (d / "san.cnf").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    for name in ("server", "client"):
        _openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key", "-out", f"{name}.csr",
                 "-subj", f"/CN={name}", cwd=d)
        _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
                 "-out", f"{name}.pem", "-days", "2", "-extfile", "san.cnf", cwd=d)
    return d


def test_tls_with_client_certs_and_bearer_token(cluster_model, cluster_catalog, certs):
    model, _ = cluster_model
    sec = SecurityConfig(cert=str(certs / "server.pem"), key=str(certs / "server.key"),
                         client_ca=str(certs / "ca.pem"), token="s3cret")
    srv = RetrievalServer(local_router(model, num_shards=2), ServerConfig(port=0, security=sec)).start()
    ca = (certs / "ca.pem").read_bytes()
    cert, key = (certs / "client.pem").read_bytes(), (certs / "client.key").read_bytes()
    xq = synthetic_queries(cluster_catalog, 2, seed=3).numpy()
    try:
        with Client(srv.address, token="s3cret", root_certificates=ca, client_cert=cert, client_key=key) as ok:
            assert (ok.retrieve(query=xq, k=5, nprobe=8).ids >= 0).all()
        with Client(srv.address, token="wrong", root_certificates=ca, client_cert=cert, client_key=key) as bad:
            assert _code(lambda: bad.retrieve(query=xq, k=5)) == grpc.StatusCode.UNAUTHENTICATED
        with Client(srv.address, root_certificates=ca, client_cert=cert, client_key=key) as none:
            assert _code(lambda: none.retrieve(query=xq, k=5)) == grpc.StatusCode.UNAUTHENTICATED
        with Client(srv.address, token="s3cret", root_certificates=ca, timeout_s=3) as nocert:  # no client cert
            assert _code(lambda: nocert.retrieve(query=xq, k=5)) == grpc.StatusCode.UNAVAILABLE
        with Client(srv.address, token="s3cret", timeout_s=3) as plain:  # plaintext to a TLS port
            assert _code(lambda: plain.retrieve(query=xq, k=5)) == grpc.StatusCode.UNAVAILABLE
    finally:
        srv.stop()


def _sterling(*args, **kw):
    return subprocess.Popen([sys.executable, "-m", "sterling.launch.cli", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **kw)


def _read_address(proc, timeout_s=120.0) -> str:
    """Wait (bounded) for the "listening on HOST:PORT" line; a reader thread avoids buffered-pipe stalls."""
    import queue
    import threading

    q: queue.Queue = queue.Queue()

    def pump():
        for line in proc.stdout:
            q.put(line)
        q.put(None)

    threading.Thread(target=pump, daemon=True).start()
    proc.lines_read = []
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            line = q.get(timeout=0.5)
        except queue.Empty:
            continue
        if line is None:
            proc.wait(timeout=10)
            raise AssertionError(f"exited {proc.returncode}: {proc.stderr.read()[-2000:]}")
        proc.lines_read.append(line)
        if "listening on" in line:
            proc.line_queue = q
            return line.split("listening on ")[1].split()[0]
    proc.kill()
    raise AssertionError(f"no address printed within {timeout_s} s")


def test_sterling_shard_serve_and_query_cli(cluster_model, cluster_catalog, tmp_path, capsys):
    model, path = cluster_model
    out = subprocess.run([sys.executable, "-m", "sterling.launch.cli", "shard", "--model", str(path), "--shards", "2",
                          "--out", str(tmp_path / "sh")], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert (tmp_path / "sh" / "manifest.json").exists() and (tmp_path / "sh" / "head.st").exists()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = _sterling("serve", "--model", str(path), "--shards", "2", "--port", "0", env=env)
    try:
        address = _read_address(proc)
        xq = synthetic_queries(cluster_catalog, 2, seed=4)
        np.save(tmp_path / "q.npy", xq.numpy())
        from argparse import Namespace

        from sterling.cluster.client import query_remote

        capsys.readouterr()
        rc = query_remote(Namespace(address=address, vector=str(tmp_path / "q.npy"), k=5, nprobe=8, where=None,
                                    json=True, approx=False))
        assert rc == 0
        import json

        lines = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
        ref = model(query=xq, k=5, nprobe=8, adaptive=False)
        assert [[h["id"] for h in ln["results"]] for ln in lines] == ref.ids.tolist()
        proc.send_signal(signal.SIGINT)  # `launch ray` is stopped with SIGTERM in test_launch_ray.py
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)


def test_serve_refuses_a_public_address_without_tls(cluster_model):
    _, path = cluster_model
    proc = _sterling("serve", "--model", str(path), "--host", "0.0.0.0", "--port", "0")
    assert proc.wait(timeout=120) == 2
    assert "TLS" in proc.stderr.read()
    _ = Path


def test_deadlines_over_grpc_partial_unavailable_and_deadline_exceeded(cluster_model, cluster_catalog):
    """Slow shards (injected 1.5 s delay): the request deadline bounds the wait, and the status says why."""
    from sterling.cluster.backends import LocalBackend
    from sterling.cluster.router import Router
    from sterling.cluster.shard import ShardServer
    from sterling.sharding.documents import balanced_list_ranges, slice_model

    class Slow(ShardServer):
        def search(self, req):
            time.sleep(1.5)
            return super().search(req)

    model, _ = cluster_model
    ranges = balanced_list_ranges(model.index, 2)

    def serve(slow: set[int]):
        servers = [[(Slow if s in slow else ShardServer)(slice_model(model, r), shard=s, lists=r)]
                   for s, r in enumerate(ranges)]
        router = Router(slice_model(model, (0, 0)), LocalBackend(servers))
        return RetrievalServer(router, ServerConfig(port=0)).start()

    xq = synthetic_queries(cluster_catalog, 2, seed=8).numpy()
    one, both = serve({1}), serve({0, 1})
    try:
        with Client(one.address) as c:
            t0 = time.monotonic()
            res = c.retrieve(query=xq, k=10, nprobe=8, deadline_ms=300)
            assert time.monotonic() - t0 < 1.2 and res.partial and res.missing_shards == [1]
            assert (res.ids >= 0).all()
            assert _code(lambda: c.retrieve(query=xq, k=10, deadline_ms=300, require_complete=True)) == (
                grpc.StatusCode.UNAVAILABLE
            )
            # the gRPC deadline alone bounds the request too
            t0 = time.monotonic()
            assert c.retrieve(query=xq, k=10, nprobe=8, timeout_s=0.4).partial
            assert time.monotonic() - t0 < 1.2
        with Client(both.address) as c:
            assert _code(lambda: c.retrieve(query=xq, k=10, deadline_ms=300)) == grpc.StatusCode.DEADLINE_EXCEEDED
    finally:
        one.stop(grace=0.1)
        both.stop(grace=0.1)


def test_adaptive_mode_over_grpc_widens_selective_filters(client, cluster_model, cluster_catalog):
    model, _ = cluster_model
    xq = synthetic_queries(cluster_catalog, 16, seed=9).numpy()
    where = "lang:ja AND device:tv"
    fixed = client.retrieve(query=xq, k=50, nprobe=4, where=where, adaptive=False)
    wide = client.retrieve(query=xq, k=50, nprobe=4, where=where, adaptive=True)
    ref = model(query=torch.from_numpy(xq), k=50, nprobe=4, where=where, adaptive=True)
    assert (wide.ids >= 0).sum() > (fixed.ids >= 0).sum()
    assert (wide.ids >= 0).sum() >= 0.95 * (ref.ids >= 0).sum().item()
    unspecified = client.retrieve(query=xq, k=50, nprobe=4, where=where)  # server default: off
    np.testing.assert_array_equal(unspecified.ids, fixed.ids)
