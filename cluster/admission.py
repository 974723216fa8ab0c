"""Admission control and the guarded gRPC handler of ``sterling.v1.Retrieval``.

What a server under load does, in order, for every call of the service:

1. **decode**: the request bytes are parsed here, not by gRPC, so that an
   undecodable message is answered ``INVALID_ARGUMENT`` with one short,
   rate-limited log line (``RateLimitedLog``) instead of gRPC's INTERNAL
   and a stack trace per message;
2. **admit** (``Admission``): at most ``max_in_flight`` calls execute at
   once; up to ``max_queue`` more wait, each no longer than
   ``max_queue_wait_ms`` nor its own deadline; a client (the
   ``sterling-client`` metadata value, else the peer's address without its
   port) may hold at most ``max_client_in_flight`` of those places. Anything
   beyond is refused at once with ``RESOURCE_EXHAUSTED`` (``OverloadedError``),
   and a call whose deadline passes while queued gets ``DEADLINE_EXCEEDED``.
   Latency of admitted calls therefore stays bounded by the queue wait plus
   the service time, however hard clients push;
3. **serve** the servicer method, then record status and latency
   (``sterling.cluster.metrics``).

gRPC's own thread pool and ``maximum_concurrent_rpcs`` are sized from the
same numbers (``AdmissionConfig.grpc_threads``), so no unbounded queue
hides in front of this one. Health checks and reflection are separate
services and never wait here.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import grpc
from google.protobuf import message_factory
from google.protobuf.message import DecodeError

from sterling.cluster import retrieval_pb2 as pb
from sterling.cluster.errors import ClusterConfigError, DeadlineExceededError, OverloadedError

__all__ = ["AdmissionConfig", "Admission", "RateLimitedLog", "guarded_service_handler", "client_key"]

log = logging.getLogger(__name__)

CLIENT_METADATA = "sterling-client"  # optional per-client identity for the per-client limit
_EXTRA_THREADS = 4  # gRPC threads beyond the admission places, for Info/health while saturated


@dataclass(kw_only=True, slots=True)
class AdmissionConfig:
    """Bounds on concurrent and queued calls.

    Args:
        max_in_flight: calls executing at once (each holds one handler thread).
        max_queue: calls waiting for a place; one more is refused with RESOURCE_EXHAUSTED.
        max_queue_wait_ms: longest a call waits for a place (its deadline may cut it shorter).
        max_client_in_flight: places (executing + waiting) one client may hold; 0 = no per-client limit.
    """

    max_in_flight: int = 8
    max_queue: int = 32
    max_queue_wait_ms: int = 1000
    max_client_in_flight: int = 0

    def __post_init__(self) -> None:
        if self.max_in_flight < 1:
            raise ClusterConfigError(f"max_in_flight ({self.max_in_flight}) must be ≥ 1 (--max-in-flight)")
        if self.max_queue < 0:
            raise ClusterConfigError(f"max_queue ({self.max_queue}) must be ≥ 0 (--max-queue)")
        if self.max_queue_wait_ms < 0:
            raise ClusterConfigError(f"max_queue_wait_ms ({self.max_queue_wait_ms}) must be ≥ 0 (--max-queue-wait-ms)")
        if self.max_client_in_flight < 0:
            raise ClusterConfigError(
                f"max_client_in_flight ({self.max_client_in_flight}) must be ≥ 0 (0 = off; --max-client-in-flight)"
            )

    @property
    def grpc_threads(self) -> int:
        """Handler threads and gRPC's ``maximum_concurrent_rpcs``: every place plus a few for Info/health."""
        return self.max_in_flight + self.max_queue + _EXTRA_THREADS


class Admission:
    """A bounded queue in front of ``max_in_flight`` places; thread-safe.

    Example:
        >>> adm = Admission(AdmissionConfig(max_in_flight=2, max_queue=4))
        >>> with adm.slot("10.0.0.7", deadline=time.monotonic() + 0.5):
        ...     serve()
    """

    def __init__(self, config: AdmissionConfig | None = None, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.config = config or AdmissionConfig()
        self._clock = clock
        self._cond = threading.Condition()
        self.running = 0
        self.waiting = 0
        self._per_client: dict[str, int] = {}

    def acquire(self, client: str, deadline: float | None = None) -> float:
        """Take a place (waiting in the queue if needed); returns the seconds spent waiting.

        Raises:
            OverloadedError: queue full, per-client limit reached, or waited ``max_queue_wait_ms``.
            DeadlineExceededError: the call's deadline passed while it waited.
        """
        cfg = self.config
        t0 = self._clock()
        with self._cond:
            held = self._per_client.get(client, 0)
            if cfg.max_client_in_flight and held >= cfg.max_client_in_flight:
                raise OverloadedError(
                    f"this client already has {held} calls running or queued, the per-client limit "
                    f"(max_client_in_flight {cfg.max_client_in_flight}); wait for answers before sending more",
                    reason="client",
                )
            if self.running < cfg.max_in_flight and self.waiting == 0:
                self._take(client)
                return 0.0
            if self.waiting >= cfg.max_queue:
                raise OverloadedError(
                    f"server busy: {self.running} calls running (max_in_flight {cfg.max_in_flight}) and "
                    f"{self.waiting} queued (max_queue {cfg.max_queue}); retry with backoff",
                    reason="queue_full",
                )
            limit = t0 + cfg.max_queue_wait_ms / 1e3
            until = limit if deadline is None else min(limit, deadline)
            self.waiting += 1
            self._per_client[client] = held + 1
            try:
                while self.running >= cfg.max_in_flight:
                    left = until - self._clock()
                    if left <= 0:
                        if deadline is not None and deadline <= limit:
                            raise DeadlineExceededError(
                                f"the call's deadline passed after {(self._clock() - t0) * 1e3:.0f} ms in the "
                                "admission queue; give it a longer deadline or send fewer concurrent calls"
                            )
                        raise OverloadedError(
                            f"server busy: waited {cfg.max_queue_wait_ms} ms (max_queue_wait_ms) for one of "
                            f"{cfg.max_in_flight} places; retry with backoff",
                            reason="queue_timeout",
                        )
                    self._cond.wait(left)
            finally:
                self.waiting -= 1
                if self._per_client[client] == 1:
                    del self._per_client[client]
                else:
                    self._per_client[client] -= 1
            self._take(client)
            return self._clock() - t0

    def _take(self, client: str) -> None:
        self.running += 1
        self._per_client[client] = self._per_client.get(client, 0) + 1

    def release(self, client: str) -> None:
        with self._cond:
            self.running -= 1
            n = self._per_client.get(client, 1) - 1
            if n:
                self._per_client[client] = n
            else:
                self._per_client.pop(client, None)
            self._cond.notify()

    @contextlib.contextmanager
    def slot(self, client: str, deadline: float | None = None):
        """``acquire`` … ``release`` around a block; yields the seconds waited."""
        waited = self.acquire(client, deadline)
        try:
            yield waited
        finally:
            self.release(client)


class RateLimitedLog:
    """At most one line per ``interval_s``; the next line says how many were suppressed meanwhile."""

    def __init__(self, logger: logging.Logger, *, interval_s: float = 10.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._log, self._interval, self._clock = logger, interval_s, clock
        self._lock = threading.Lock()
        self._next = 0.0
        self.suppressed = 0

    def warning(self, msg: str, *args) -> bool:
        """Log unless a line went out less than ``interval_s`` ago; returns whether it logged."""
        with self._lock:
            now = self._clock()
            if now < self._next:
                self.suppressed += 1
                return False
            n, self.suppressed, self._next = self.suppressed, 0, now + self._interval
        self._log.warning(msg + (f" ({n} similar suppressed)" if n else ""), *args)
        return True


def client_key(context: grpc.ServicerContext) -> str:
    """The per-client identity: ``sterling-client`` metadata, else the peer without its port."""
    for key, value in context.invocation_metadata() or ():
        if key == CLIENT_METADATA and value:
            return f"id:{str(value)[:64]}"
    peer = context.peer() or ""
    return peer.rsplit(":", 1)[0] if peer.count(":") >= 2 else peer


class _Undecodable:
    __slots__ = ("error",)

    def __init__(self, error: str) -> None:
        self.error = error


def _safe_deserializer(cls):
    def parse(data: bytes):
        try:
            return cls.FromString(data)
        except (DecodeError, ValueError, RuntimeError) as e:  # upb raises DecodeError; bad UTF-8 too
            return _Undecodable(str(e)[:120] or type(e).__name__)

    return parse


def _deadline_of(request, context) -> float | None:
    budgets = []
    remaining = context.time_remaining()
    if remaining is not None:
        budgets.append(remaining)
    ms = getattr(request, "deadline_ms", 0) if not isinstance(request, _Undecodable) else 0
    if ms:
        budgets.append(ms / 1e3)
    return time.monotonic() + min(budgets) if budgets else None


def guarded_service_handler(servicer, admission: Admission, metrics, *,
                            service=None, bad_message_log: RateLimitedLog | None = None,
                            admit: frozenset[str] = frozenset({"Retrieve", "Upsert", "Delete", "UpdateAttributes"})
                            ) -> grpc.GenericRpcHandler:
    """Every method of the ``Retrieval`` service (read from the descriptor) wrapped in decode → admit → serve.

    Methods in ``admit`` pass admission control; the rest (``Info``) only get
    the safe decoding and the metrics. ``metrics`` is a
    ``sterling.cluster.metrics.ServerMetrics`` (or its no-op twin).
    """
    service = service or pb.DESCRIPTOR.services_by_name["Retrieval"]
    bad_log = bad_message_log or RateLimitedLog(log)
    handlers = {}
    for m in service.methods:
        req_cls = message_factory.GetMessageClass(m.input_type)
        resp_cls = message_factory.GetMessageClass(m.output_type)
        behaviour = getattr(servicer, m.name)
        wrapped = _wrap(m.name, behaviour, m.client_streaming, m.name in admit, admission, metrics, bad_log)
        make = {
            (False, False): grpc.unary_unary_rpc_method_handler,
            (True, False): grpc.stream_unary_rpc_method_handler,
            (False, True): grpc.unary_stream_rpc_method_handler,
            (True, True): grpc.stream_stream_rpc_method_handler,
        }[(m.client_streaming, m.server_streaming)]
        handlers[m.name] = make(
            wrapped, request_deserializer=_safe_deserializer(req_cls), response_serializer=resp_cls.SerializeToString
        )
    return grpc.method_handlers_generic_handler(service.full_name, handlers)


def _wrap(name: str, behaviour, streaming: bool, admitted: bool, admission: Admission, metrics, bad_log):
    def reject_undecodable(context, err: str):
        metrics.undecodable(name)
        bad_log.warning("undecodable %s request from %s: %s", name, context.peer(), err)
        context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                      f"the {name} request is not a valid sterling.v1 protobuf message ({err})")

    def checked_stream(it, context):
        for item in it:
            if isinstance(item, _Undecodable):
                reject_undecodable(context, item.error)
            yield item

    def handler(request, context):
        t0 = time.perf_counter()
        code = grpc.StatusCode.OK
        try:
            if streaming:
                request = checked_stream(request, context)
            elif isinstance(request, _Undecodable):
                reject_undecodable(context, request.error)
            if not admitted:
                return behaviour(request, context)
            client = client_key(context)
            try:
                waited = admission.acquire(client, _deadline_of(request, context))
            except (OverloadedError, DeadlineExceededError) as e:
                metrics.rejected(getattr(e, "reason", "deadline"))
                status = grpc.StatusCode.RESOURCE_EXHAUSTED if isinstance(e, OverloadedError) else \
                    grpc.StatusCode.DEADLINE_EXCEEDED
                context.abort(status, str(e))
            metrics.queue_wait(waited)
            metrics.in_flight(admission.running)
            try:
                response = behaviour(request, context)
            finally:
                admission.release(client)
                metrics.in_flight(admission.running)
            metrics.response(name, response)
            return response
        except BaseException:
            code = context.code() or grpc.StatusCode.UNKNOWN
            raise
        finally:
            metrics.request(name, (context.code() or code).name, time.perf_counter() - t0)

    return handler
