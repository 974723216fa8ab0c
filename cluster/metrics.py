"""Prometheus metrics of a Retrieval server (``prometheus-client``), one registry per server.

Exported (``sterling serve --metrics-port P`` serves them at ``http://HOST:P/metrics``):

* ``sterling_requests_total{method, code}`` — calls by RPC method and gRPC status;
* ``sterling_request_seconds{method}`` — call latency, admission wait included;
* ``sterling_stage_seconds{stage}`` — per-stage time of answered ``Retrieve`` calls as the router
  measures it: ``queue`` (admission wait), ``encode`` (user tower / query check), ``fanout``
  (slowest shard, i.e. probe + filter + scan + per-shard top-k), ``shard`` (each shard's own
  time), ``merge``, ``total``;
* ``sterling_in_flight_requests``, ``sterling_rejected_total{reason}`` (admission control),
  ``sterling_undecodable_requests_total{method}``;
* ``sterling_model_version``, ``sterling_shards_complete`` (1 while every shard has a healthy
  replica) and ``sterling_shard_items{shard}``.

Without ``prometheus-client`` installed the server runs with ``NullMetrics`` and
``--metrics-port`` is refused with a ``ClusterConfigError`` that says what to install.
"""

from __future__ import annotations

from sterling.cluster.errors import ClusterConfigError

__all__ = ["ServerMetrics", "NullMetrics", "make_metrics", "have_prometheus"]

_LATENCY_BUCKETS_S = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


def have_prometheus() -> bool:
    try:
        import prometheus_client  # noqa: F401
    except ImportError:
        return False
    return True


class NullMetrics:
    """Same interface, records nothing (``prometheus-client`` missing, or metrics off)."""

    registry = None

    def request(self, method: str, code: str, seconds: float) -> None: ...
    def response(self, method: str, response) -> None: ...
    def queue_wait(self, seconds: float) -> None: ...
    def in_flight(self, n: int) -> None: ...
    def rejected(self, reason: str) -> None: ...
    def undecodable(self, method: str) -> None: ...
    def model(self, *, version: int, complete: bool, shard_items: dict[int, int],
              healthy_replicas: dict[int, int] | None = None) -> None: ...
    def update(self, kind: str, seconds: float, *, applied_batches: int) -> None: ...

    def close(self) -> None: ...

    def serve_http(self, port: int, host: str = "127.0.0.1") -> int:
        raise ClusterConfigError(
            "metrics need the prometheus-client package: `pip install prometheus-client` "
            "(pinned in requirements/runtime.txt), or drop --metrics-port"
        )


class ServerMetrics(NullMetrics):
    """The Prometheus collectors of one server, in their own ``CollectorRegistry``."""

    def __init__(self) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        r = self.registry = CollectorRegistry()
        self._requests = Counter("sterling_requests", "RPC calls by method and gRPC status code",
                                 ["method", "code"], registry=r)
        self._latency = Histogram("sterling_request_seconds", "RPC latency by method (admission wait included)",
                                  ["method"], buckets=_LATENCY_BUCKETS_S, registry=r)
        self._stage = Histogram("sterling_stage_seconds", "Retrieve time per stage", ["stage"],
                                buckets=_LATENCY_BUCKETS_S, registry=r)
        self._in_flight = Gauge("sterling_in_flight_requests", "calls executing now", registry=r)
        self._rejected = Counter("sterling_rejected", "calls refused by admission control", ["reason"], registry=r)
        self._undecodable = Counter("sterling_undecodable_requests", "messages that were not valid protobuf",
                                    ["method"], registry=r)
        self._version = Gauge("sterling_model_version", "version of the served model", registry=r)
        self._complete = Gauge("sterling_shards_complete", "1 while every shard has a healthy replica", registry=r)
        self._items = Gauge("sterling_shard_items", "live items per shard", ["shard"], registry=r)
        self._healthy = Gauge("sterling_shard_healthy_replicas", "replicas of each shard the router routes to first",
                              ["shard"], registry=r)
        self._update_lag = Histogram(
            "sterling_update_lag_seconds", "update lag: an Upsert/Delete/UpdateAttributes batch from its arrival at "
            "the server to durable and visible to every later Retrieve", ["kind"], buckets=_LATENCY_BUCKETS_S,
            registry=r)
        self._applied = Gauge("sterling_applied_batches", "update batches applied since the data directory was "
                              "created", registry=r)
        self._http = None

    def request(self, method: str, code: str, seconds: float) -> None:
        self._requests.labels(method, code).inc()
        self._latency.labels(method).observe(seconds)

    def response(self, method: str, response) -> None:
        """Stage histograms of one Retrieve: tower (the router's encode), fanout (waiting for
        shards), merge, total; and per answering shard its own probe, filter, scan and rerank
        (exclusive times, ``sterling.model.stages``) and its whole search (``shard``)."""
        if method != "Retrieve" or response is None:
            return
        t = response.timing
        for stage, ms in (("tower", t.encode_ms), ("fanout", t.fanout_ms), ("merge", t.merge_ms),
                          ("total", t.total_ms)):
            self._stage.labels(stage).observe(ms / 1e3)
        for s in t.shards:
            self._stage.labels("shard").observe(s.ms / 1e3)
            for stage, ms in (("probe", s.probe_ms), ("filter", s.filter_ms), ("scan", s.scan_ms),
                              ("rerank", s.rerank_ms)):
                if ms:
                    self._stage.labels(stage).observe(ms / 1e3)
        if response.model_version:
            self._version.set(response.model_version)

    def queue_wait(self, seconds: float) -> None:
        self._stage.labels("queue").observe(seconds)

    def in_flight(self, n: int) -> None:
        self._in_flight.set(n)

    def rejected(self, reason: str) -> None:
        self._rejected.labels(reason).inc()

    def undecodable(self, method: str) -> None:
        self._undecodable.labels(method).inc()

    def model(self, *, version: int, complete: bool, shard_items: dict[int, int],
              healthy_replicas: dict[int, int] | None = None) -> None:
        self._version.set(version)
        self._complete.set(1 if complete else 0)
        for s, n in shard_items.items():
            self._items.labels(str(s)).set(n)
        for s, n in (healthy_replicas or {}).items():
            self._healthy.labels(str(s)).set(n)

    def update(self, kind: str, seconds: float, *, applied_batches: int) -> None:
        self._update_lag.labels(kind).observe(seconds)
        self._applied.set(applied_batches)

    def render(self) -> bytes:
        """The text exposition format (what ``/metrics`` returns)."""
        from prometheus_client import generate_latest

        return generate_latest(self.registry)

    def serve_http(self, port: int, host: str = "127.0.0.1") -> int:
        """Serve ``/metrics`` on ``host:port`` (0 = any free port) in a daemon thread; returns the port."""
        from prometheus_client import start_http_server

        try:
            server, _thread = start_http_server(port, addr=host, registry=self.registry)
        except OSError as e:
            raise ClusterConfigError(
                f"cannot serve metrics on {host}:{port} ({e.strerror}); is the port in use? pick another "
                "--metrics-port (0 = any free port)"
            ) from e
        self._http = server
        return int(server.server_port)

    def close(self) -> None:
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            self._http = None


def make_metrics(enabled: bool = True) -> NullMetrics:
    """``ServerMetrics`` when asked for and ``prometheus-client`` is installed, else ``NullMetrics``."""
    return ServerMetrics() if enabled and have_prometheus() else NullMetrics()
