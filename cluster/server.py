"""The gRPC front of the router: ``sterling.v1.Retrieval`` + health + reflection.

Every error is mapped to a status code with the same helpful message
(``sterling.cluster.errors.status_code_name``); nothing a client sends can
stop the server. Binds 127.0.0.1 by default; binding anything else needs
TLS and a bearer token (``SecurityConfig``).
"""

from __future__ import annotations

import hmac
import ipaddress
import logging
import signal
import threading
import time
import uuid
from concurrent import futures
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import numpy as np
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from sterling.cluster import retrieval_pb2 as pb
from sterling.cluster import retrieval_pb2_grpc as pb_grpc
from sterling.cluster.admission import Admission, AdmissionConfig, guarded_service_handler
from sterling.cluster.batching import Batcher, BatchingConfig
from sterling.cluster.errors import ClusterConfigError, NotImplementedYetError, status_code_name
from sterling.cluster.item_features import features_from_proto
from sterling.cluster.learned_head import SparseInput
from sterling.cluster.metrics import NullMetrics, make_metrics
from sterling.cluster.router import Router

__all__ = ["SERVICE_NAME", "SecurityConfig", "ServerConfig", "RetrievalServicer", "RetrievalServer"]

log = logging.getLogger(__name__)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Retrieval"].full_name  # "sterling.v1.Retrieval"
_DEADLINE_MARGIN_S = 0.010  # kept back from the gRPC deadline for merge + serialisation


@dataclass(kw_only=True, slots=True)
class SecurityConfig:
    """TLS and bearer-token settings (paths to PEM files; a token file holds one line).

    Args:
        cert: server certificate chain (PEM).
        key: server private key (PEM).
        client_ca: CA bundle; when given, clients must present a certificate it signed.
        token: bearer token every call must carry as ``authorization: Bearer <token>``
            (the health service is exempt so that load balancers can probe).
    """

    cert: str | None = None
    key: str | None = None
    client_ca: str | None = None
    token: str | None = None

    def __post_init__(self) -> None:
        if (self.cert is None) != (self.key is None):
            raise ClusterConfigError("TLS needs both a certificate (--tls-cert) and its key (--tls-key)")
        if self.client_ca is not None and self.cert is None:
            raise ClusterConfigError("client certificates (--tls-client-ca) need server TLS (--tls-cert/--tls-key)")
        if self.token is not None and not self.token.strip():
            raise ClusterConfigError("the bearer token is empty")

    @property
    def tls(self) -> bool:
        return self.cert is not None

    def credentials(self) -> grpc.ServerCredentials:
        key, cert = Path(self.key).read_bytes(), Path(self.cert).read_bytes()
        ca = Path(self.client_ca).read_bytes() if self.client_ca else None
        return grpc.ssl_server_credentials([(key, cert)], root_certificates=ca, require_client_auth=ca is not None)


@dataclass(kw_only=True, slots=True)
class ServerConfig:
    """Where and how the gRPC server listens.

    Args:
        host: bind address; 127.0.0.1 by default. Anything that is not
            loopback requires TLS and a bearer token.
        port: 0 = an OS-chosen free port (read ``RetrievalServer.port``).
        workers: calls executed at once (``AdmissionConfig.max_in_flight``
            unless ``admission`` is given).
        max_message_bytes: largest request or response; larger requests
            fail with RESOURCE_EXHAUSTED.
        admission: queue and in-flight bounds (``sterling.cluster.admission``).
        metrics_port: serve Prometheus ``/metrics`` on this port (0 = any free
            one, read ``RetrievalServer.metrics_port``); None = no HTTP endpoint.
        batching: dynamic batching of concurrent ``Retrieve`` calls
            (``sterling.cluster.batching``); ``max_wait_ms=0`` turns it off.
    """

    host: str = "127.0.0.1"
    port: int = 50051
    workers: int = 8
    max_message_bytes: int = 64 << 20
    security: SecurityConfig | None = None
    admission: AdmissionConfig | None = None
    metrics_port: int | None = None
    batching: BatchingConfig = field(default_factory=BatchingConfig)

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ClusterConfigError(f"port ({self.port}) must be in 0..65535")
        if self.workers < 1 or self.max_message_bytes < 1024:
            raise ClusterConfigError(f"workers ({self.workers}) ≥ 1 and max_message_bytes ≥ 1024 required")
        if self.admission is None:
            self.admission = AdmissionConfig(max_in_flight=self.workers)
        if self.metrics_port is not None and not 0 <= self.metrics_port <= 65535:
            raise ClusterConfigError(f"metrics_port ({self.metrics_port}) must be in 0..65535")
        if not _is_loopback(self.host):
            sec = self.security
            if sec is None or not sec.tls or sec.token is None:
                raise ClusterConfigError(
                    f"binding {self.host} (not loopback) requires TLS and a bearer token: pass "
                    "--tls-cert/--tls-key and --token-file, or bind 127.0.0.1"
                )


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class _TokenInterceptor(grpc.ServerInterceptor):
    """Rejects calls without ``authorization: Bearer <token>`` (UNAUTHENTICATED); health is exempt."""

    def __init__(self, token: str) -> None:
        self._expect = f"Bearer {token.strip()}".encode()

        def deny(request, context):
            context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or wrong bearer token (authorization metadata)")

        self._deny = deny

    def intercept_service(self, continuation, details):
        if details.method.startswith("/grpc.health.v1.Health/"):
            return continuation(details)
        got = dict(details.invocation_metadata or ()).get("authorization", "")
        if hmac.compare_digest(got.encode() if isinstance(got, str) else got, self._expect):
            return continuation(details)
        handler = continuation(details)
        if handler is None:
            return None
        if handler.unary_unary:
            return grpc.unary_unary_rpc_method_handler(self._deny)
        if handler.stream_unary:
            return grpc.stream_unary_rpc_method_handler(lambda it, ctx: self._deny(None, ctx))
        if handler.unary_stream:
            return grpc.unary_stream_rpc_method_handler(self._deny)
        return grpc.stream_stream_rpc_method_handler(lambda it, ctx: self._deny(None, ctx))


def _abort(context: grpc.ServicerContext, exc: BaseException) -> None:
    code = status_code_name(exc)
    if code == "INTERNAL":
        ref = uuid.uuid4().hex[:12]
        log.exception("internal error %s", ref, exc_info=exc)
        context.abort(grpc.StatusCode.INTERNAL, f"internal error (reference {ref}); see the server log")
    context.abort(getattr(grpc.StatusCode, code), str(exc))


def _to_proto(ids: np.ndarray, scores: np.ndarray, task_scores: np.ndarray | None = None,
              tasks: tuple[str, ...] = ()) -> list[pb.QueryResult]:
    out = []
    for q, (row_ids, row_s) in enumerate(zip(ids, scores)):
        n = int((row_ids >= 0).sum())  # results are packed at the front
        r = pb.QueryResult(ids=row_ids[:n].tolist(), scores=row_s[:n].tolist())
        if task_scores is not None:
            r.task_scores.extend(pb.TaskScores(task=t, scores=task_scores[q, :n, i].tolist())
                                 for i, t in enumerate(tasks))
        out.append(r)
    return out


def _index_model_only(user_ids, sparse, request) -> dict:
    """An index model takes no learned-model fields: refuse them by name rather than ignore them."""
    sent = [n for n, present in (("user_ids", user_ids is not None), ("sparse_features", sparse is not None),
                                 ("k0", bool(request.k0)), ("value_formula", bool(request.value_formula))) if present]
    if sent:
        raise_invalid(f"{', '.join(sent)} need a learned model (`sterling train`); this server serves an index "
                      "model: send query_embedding or user_features")
    return {}


class RetrievalServicer(pb_grpc.RetrievalServicer):
    """``sterling.v1.Retrieval`` over a ``Router``."""

    def __init__(self, router: Router, *, backend_name: str = "local", updates=None, metrics=None,
                 batching: BatchingConfig | None = None) -> None:
        self.router = router
        self.batcher = Batcher(router.retrieve, batching or BatchingConfig(max_wait_ms=0))
        self.metrics = metrics if metrics is not None else NullMetrics()
        self.backend_name = backend_name
        self.updates = updates  # a ``sterling.cluster.live.LiveShards`` when the server takes updates

    def _deadline(self, request: pb.RetrieveRequest, context) -> float | None:
        budgets = []
        if request.deadline_ms:
            budgets.append(request.deadline_ms / 1e3)
        remaining = context.time_remaining()
        if remaining is not None:
            budgets.append(max(0.0, remaining - _DEADLINE_MARGIN_S))
        return min(budgets) if budgets else None

    def Retrieve(self, request, context):
        try:
            B = request.batch_size or 1
            query = user = user_ids = sparse = None
            learned = self.router.learned is not None
            if len(request.query_embedding) and len(request.user_features):
                raise_invalid("send query_embedding or user_features, not both")
            if len(request.query_embedding):
                query = _matrix(request.query_embedding, B, "query_embedding")
            elif len(request.user_features):
                user = _matrix(request.user_features, B, "user_features")
            if len(request.user_ids):
                user_ids = np.asarray(request.user_ids, dtype=np.int64)
                if len(user_ids) != B:
                    raise_invalid(f"{len(user_ids)} user_ids for batch_size {B}; send one per query")
            if request.HasField("sparse_features"):
                sf = request.sparse_features
                sparse = SparseInput(keys=tuple(sf.keys), lengths=np.asarray(sf.lengths, dtype=np.int32),
                                     values=np.asarray(sf.values, dtype=np.int64))
                if sparse.batch != B or len(sf.lengths) % max(len(sf.keys), 1):
                    raise_invalid(f"{len(sf.lengths)} sparse lengths for {len(sf.keys)} keys and batch_size {B}; "
                                  "send len(keys) × batch_size lengths")
            if query is None and user is None and user_ids is None and sparse is None:
                raise_invalid("the request has no query_embedding, user_features, user_ids or sparse_features")
            where: str | list[str | None] | None = request.filter or None
            if len(request.filters):
                where = [f or None for f in request.filters]
            adaptive = {pb.ADAPTIVE_MODE_OFF: False, pb.ADAPTIVE_MODE_ON: True}.get(request.adaptive)
            if request.min_version:
                self._wait_for_version(request, context)
            res = self.batcher.retrieve(
                query=query, user_features=user, k=int(request.k), nprobe=int(request.nprobe) or None,
                where=where, exact=not request.approximate_filter, adaptive=adaptive,
                deadline_s=self._deadline(request, context), require_complete=request.require_complete,
                **({"user_ids": user_ids, "sparse": sparse, "k0": int(request.k0) or None,
                    "value_formula": request.value_formula or None} if learned else
                   _index_model_only(user_ids, sparse, request)),
                shard_min_versions=self.updates.shard_versions() if self.updates is not None else None,
            )
            t = res.timing
            return pb.RetrieveResponse(
                results=_to_proto(res.ids, res.scores, res.task_scores, res.tasks),
                model_version=res.version,
                partial=res.partial,
                missing_shards=res.missing,
                version_skew=[pb.ShardVersion(shard=s, version=v) for s, v in sorted(res.version_skew.items())],
                timing=pb.Timing(
                    total_ms=t["total_ms"], encode_ms=t["encode_ms"], fanout_ms=t["fanout_ms"],
                    merge_ms=t["merge_ms"],
                    shards=[_shard_timing(*row) for row in t["shards"]],
                ),
            )
        except Exception as e:  # every error becomes a status; the server keeps serving
            _abort(context, e)

    def _wait_for_version(self, request, context) -> None:
        """Read-your-writes: block until ``min_version`` is applied everywhere, up to the deadline."""
        from sterling.model.errors import VersionTimeoutError

        current = self.updates.version if self.updates is not None else int(self.router.head.index.version)
        if current >= request.min_version:
            return
        if self.updates is None:
            raise VersionTimeoutError(
                f"min_version {request.min_version} is above this server's version {current}, and it takes no "
                "updates (start it with --data-dir)"
            )
        self.updates.wait_for_version(request.min_version, self._deadline(request, context))

    def _need_updates(self, rpc: str):
        if self.updates is None:
            raise NotImplementedYetError(
                f"{rpc} needs a server that keeps an update log: start it with `sterling serve --model M "
                "--data-dir DIR`; or rebuild the artifact and re-shard to change items"
            )
        return self.updates

    def _updated(self, kind: str, t0: float) -> None:
        """Update lag of one batch: arrival to durable and visible (the apply is synchronous)."""
        self.metrics.update(kind, time.perf_counter() - t0, applied_batches=self.updates.applied_batches)

    def Upsert(self, request_iterator, context):
        try:
            updates = self._need_updates("Upsert")
            n, version = 0, updates.version
            for req in request_iterator:  # one atomic, durable batch per message
                t0 = time.perf_counter()
                ids = list(req.ids)
                if not ids:
                    continue
                attrs = None
                if len(req.attributes):
                    if len(req.attributes) != len(ids):
                        raise_invalid(f"{len(ids)} ids but {len(req.attributes)} attribute lists; give one per id "
                                      "or none")
                    attrs = [list(a.terms) for a in req.attributes]
                if len(req.item_features):  # a learned model: its item tower embeds them
                    if len(req.embeddings):
                        raise_invalid("send embeddings or item_features, not both")
                    table = features_from_proto(ids, req.item_features)
                    done, version = updates.upsert(ids, None, attrs, item_features=table)
                else:
                    x = _matrix(req.embeddings, len(ids), "embeddings") if len(req.embeddings) else None
                    done, version = updates.upsert(ids, x, attrs)
                self._updated("upsert", t0)
                n += done
            return pb.UpsertResponse(upserted=n, model_version=version)
        except Exception as e:
            _abort(context, e)

    def Delete(self, request, context):
        try:
            t0 = time.perf_counter()
            n, version = self._need_updates("Delete").delete(list(request.ids))
            self._updated("delete", t0)
            return pb.DeleteResponse(deleted=n, model_version=version)
        except Exception as e:
            _abort(context, e)

    def UpdateAttributes(self, request, context):
        try:
            t0 = time.perf_counter()
            n, version = self._need_updates("UpdateAttributes").update_attributes(
                list(request.ids), [list(a.terms) for a in request.attributes]
            )
            self._updated("attributes", t0)
            return pb.UpdateAttributesResponse(updated=n, model_version=version)
        except Exception as e:
            _abort(context, e)

    def Info(self, request, context):
        try:
            idx = self.router.head.index
            tower = self.router.head.tower
            learned = self.router.learned
            shards = self.router.backend.shard_infos()
            return pb.InfoResponse(
                dim=idx.dim, nlist=idx.nlist, default_nprobe=idx.default_nprobe(), max_k=self.router.config.max_k,
                items=sum(int(s["items"]) for s in shards),
                model_version=self.updates.version if self.updates is not None else int(idx.version),
                has_user_tower=tower is not None or learned is not None,
                user_feature_dim=(learned.dense_dim if learned is not None
                                  else tower.config.input_dim if tower is not None else 0),
                **({"tasks": learned.tasks, "default_k0": learned.model.k0,
                    "default_value_formula": learned.value_model.default, "sparse_keys": list(learned.sparse_keys),
                    "max_k0": self.router.config.max_k0} if learned is not None else {}),
                shards=[
                    pb.ShardInfo(shard=s["shard"], list_start=s["lists"][0], list_end=s["lists"][1],
                                 items=int(s["items"]), version=int(s["version"]), replicas=s["replicas"],
                                 healthy_replicas=s["healthy_replicas"])
                    for s in shards
                ],
                backend=self.backend_name,
                updatable=self.updates is not None,
                applied_batches=self.updates.applied_batches if self.updates is not None else 0,
                replica_logs=[pb.ReplicaLog(**r) for r in self.updates.replica_states()] if self.updates else [],
            )
        except Exception as e:
            _abort(context, e)


def _shard_timing(shard: int, replica: int, ms: float, stages: dict[str, float]) -> pb.ShardTiming:
    return pb.ShardTiming(shard=shard, replica=replica, ms=ms, probe_ms=stages.get("probe", 0.0),
                          filter_ms=stages.get("filter", 0.0), scan_ms=stages.get("scan", 0.0),
                          rerank_ms=stages.get("rerank", 0.0))


def raise_invalid(msg: str):
    from sterling.model.errors import InvalidInputError

    raise InvalidInputError(msg)


def _matrix(values, B: int, name: str) -> np.ndarray:
    flat = np.asarray(values, dtype=np.float32)
    if flat.size % B:
        from sterling.model.errors import DimensionMismatchError

        raise DimensionMismatchError(f"{name} has {flat.size} floats, not a multiple of batch_size ({B})")
    return flat.reshape(B, -1)


class RetrievalServer:
    """A running gRPC server: the Retrieval service, ``grpc.health.v1`` and reflection.

    Example:
        >>> srv = RetrievalServer(router, ServerConfig(port=0)).start()
        >>> Client(srv.address).retrieve(query=xq, k=10)
        >>> srv.stop()
    """

    def __init__(self, router: Router, config: ServerConfig | None = None, *, backend_name: str = "local",
                 updates=None, close_backend: bool = True) -> None:
        self.router = router
        self.close_backend = close_backend  # False: the router's shards outlive this server (stop() leaves them)
        self.updates = updates
        self.config = config or ServerConfig()
        self.backend_name = backend_name
        self.port: int | None = None
        self._server: grpc.Server | None = None
        self._health = health.HealthServicer()
        self._stopped = threading.Event()
        self.admission = Admission(self.config.admission)
        self.metrics = make_metrics()
        self.metrics_port: int | None = None

    @property
    def address(self) -> str:
        return f"{self.config.host}:{self.port}"

    def start(self) -> RetrievalServer:
        cfg = self.config
        opts = [
            ("grpc.max_receive_message_length", cfg.max_message_bytes),
            ("grpc.max_send_message_length", cfg.max_message_bytes),
            ("grpc.so_reuseport", 0),
        ]
        sec = cfg.security
        interceptors = [_TokenInterceptor(sec.token)] if sec is not None and sec.token else []
        threads = cfg.admission.grpc_threads
        server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=threads, thread_name_prefix="sterling-grpc"),
            options=opts, interceptors=interceptors, maximum_concurrent_rpcs=threads,
        )
        servicer = RetrievalServicer(self.router, backend_name=self.backend_name, updates=self.updates,
                                     metrics=self.metrics, batching=cfg.batching)
        server.add_generic_rpc_handlers((guarded_service_handler(servicer, self.admission, self.metrics),))
        health_pb2_grpc.add_HealthServicer_to_server(self._health, server)
        reflection.enable_server_reflection(
            (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME),
            server,
        )
        target = f"{cfg.host}:{cfg.port}"
        try:
            if sec is not None and sec.tls:
                port = server.add_secure_port(target, sec.credentials())
            else:
                port = server.add_insecure_port(target)
        except RuntimeError as e:  # grpcio raises on a failed bind ("Failed to bind to address")
            port = 0
            cause = e
        else:
            cause = None
        if port == 0:
            raise ClusterConfigError(
                f"could not bind {target}: the port is in use or the address is not on this host; pick "
                "another --port (0 = any free port) or stop the process holding it"
            ) from cause
        self.port = port
        if cfg.metrics_port is not None:
            self.metrics_port = self.metrics.serve_http(cfg.metrics_port, cfg.host)
        server.start()
        self._server = server
        self._health.set("", health_pb2.HealthCheckResponse.SERVING)
        self._set_complete(self.router.backend.complete())
        self.router.backend.on_health_change(self._set_complete)
        return self

    def _set_complete(self, complete: bool) -> None:
        """``sterling.v1.Retrieval`` is SERVING while every shard has a healthy replica, else NOT_SERVING
        (the process itself, service "", stays SERVING: it still answers, with ``partial=true``)."""
        if self._stopped.is_set():
            return
        status = health_pb2.HealthCheckResponse
        self._health.set(SERVICE_NAME, status.SERVING if complete else status.NOT_SERVING)
        healthy = {s: sum(h) for s, h in enumerate(self.router.backend.healthy())}
        self.metrics.model(version=int(self.router.head.index.version), complete=complete, shard_items={},
                           healthy_replicas=healthy)

    def stop(self, grace: float = 2.0) -> None:
        if self._server is None or self._stopped.is_set():
            return
        self._health.enter_graceful_shutdown()
        self._server.stop(grace).wait(grace + 1)
        self.metrics.close()
        if self.close_backend:
            self.router.backend.close()
        self._stopped.set()

    def wait_for_signal(self, *, on_stop=None) -> None:
        """Block until SIGINT or SIGTERM, then stop cleanly (main thread only)."""
        stop = threading.Event()

        def handler(signum, frame):
            stop.set()

        old = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            while not stop.wait(0.5):
                pass
        finally:
            for s, h in old.items():
                signal.signal(s, h)
            t0 = time.monotonic()
            self.stop()
            if on_stop is not None:
                on_stop()
            log.info("stopped in %.2f s", time.monotonic() - t0)
