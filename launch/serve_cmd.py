"""`sterling serve`: the gRPC service in one process, no Ray (the embedded default)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

__all__ = [
    "register", "run", "add_server_arguments", "server_config_from_args", "router_config_from_args",
    "check_servable",
]


def add_server_arguments(p: argparse.ArgumentParser, *, default_port: int = 50051) -> None:
    """Listening, limits and security options shared by `serve` and `launch ray`."""
    p.add_argument("--host", default="127.0.0.1", help="bind address (non-loopback needs --tls-* and --token-file)")
    p.add_argument("--port", type=int, default=default_port, help="gRPC port; 0 = any free port")
    p.add_argument("--max-k", type=int, default=10_000, help="largest k a request may ask for")
    p.add_argument("--max-k0", type=int, default=100_000,
                   help="most candidates a learned model's OverArch may rerank per query (request field k0)")
    p.add_argument("--max-batch", type=int, default=4096, help="most queries in one request")
    p.add_argument("--max-results", type=int, default=4_000_000,
                   help="most result entries (batch × k) in one request (RESOURCE_EXHAUSTED above)")
    p.add_argument("--deadline-ms", type=int, default=5000, help="default request deadline in milliseconds")
    p.add_argument("--adaptive", action="store_true",
                   help="widen nprobe globally for selective filters unless a request says otherwise")
    p.add_argument("--workers", type=int, default=8, help="requests executed at once (max in flight)")
    p.add_argument("--max-queue", type=int, default=32,
                   help="requests waiting for a worker; more are refused with RESOURCE_EXHAUSTED")
    p.add_argument("--max-queue-wait-ms", type=int, default=1000,
                   help="longest a request waits in the queue before RESOURCE_EXHAUSTED")
    p.add_argument("--max-client-in-flight", type=int, default=0,
                   help="places (running + queued) one client may hold; 0 = no per-client limit")
    p.add_argument("--max-message-mb", type=int, default=64, help="largest request or response in MiB")
    p.add_argument("--batch-wait-ms", type=float, default=20.0,
                   help="dynamic batching: a Retrieve call that finds a search running waits behind it (at most this "
                   "long) to share the next one; a call finding the server idle never waits; 0 = off")
    p.add_argument("--batch-max-queries", type=int, default=64, help="dynamic batching: most queries per shared search")
    p.add_argument("--metrics-port", type=int, default=None,
                   help="serve Prometheus /metrics on this port (0 = any free port; default: off)")
    p.add_argument("--log-format", choices=("text", "json"), default="text",
                   help="stderr log lines as text or as one JSON object per line")
    p.add_argument("--tls-cert", help="server certificate chain (PEM)")
    p.add_argument("--tls-key", help="server private key (PEM)")
    p.add_argument("--tls-client-ca", help="require client certificates signed by this CA (PEM)")
    p.add_argument("--token-file", help="require `authorization: Bearer <token>` with the token in this file "
                   "(one line, ≥ 16 characters; an empty file is refused)")


def server_config_from_args(args: argparse.Namespace):
    from sterling.cluster.access import read_token_file
    from sterling.cluster.admission import AdmissionConfig
    from sterling.cluster.server import SecurityConfig, ServerConfig

    token = read_token_file(args.token_file) if args.token_file else None
    sec = None
    if args.tls_cert or args.tls_key or args.tls_client_ca or token is not None:
        sec = SecurityConfig(cert=args.tls_cert, key=args.tls_key, client_ca=args.tls_client_ca, token=token)
    admission = AdmissionConfig(max_in_flight=args.workers, max_queue=args.max_queue,
                                max_queue_wait_ms=args.max_queue_wait_ms,
                                max_client_in_flight=args.max_client_in_flight)
    if args.max_message_mb < 1:
        from sterling.cluster.errors import ClusterConfigError

        raise ClusterConfigError(f"--max-message-mb ({args.max_message_mb}) must be ≥ 1")
    return ServerConfig(host=args.host, port=args.port, workers=args.workers,
                        max_message_bytes=args.max_message_mb << 20, security=sec, admission=admission,
                        metrics_port=args.metrics_port, batching=_batching(args))


def _batching(args: argparse.Namespace):
    from sterling.cluster.batching import BatchingConfig
    from sterling.cluster.errors import ClusterConfigError

    try:
        return BatchingConfig(max_wait_ms=args.batch_wait_ms, max_queries=args.batch_max_queries)
    except ValueError as e:
        raise ClusterConfigError(f"{e}; use --batch-wait-ms ≥ 0 (0 = off) and --batch-max-queries ≥ 1") from e


def check_servable(path: str) -> None:
    """Refuse a shard or head artifact (``sterling shard`` output) given where a whole model is expected."""
    from sterling.model.errors import InvalidInputError
    from sterling.sharding.documents import shard_info

    info = shard_info(path)
    if info is None:
        return
    what = "the head (centroids only, no items)" if int(info.get("index", 0)) < 0 else \
        f"shard {info.get('index')} of {info.get('num_shards')}"
    raise InvalidInputError(
        f"{path} is {what} of a sharded model, not a whole model. Serve the whole model with "
        f"`sterling serve --model {info.get('source', 'model.st')} --shards N`, or the shard directory with "
        f"`sterling launch ray --model {info.get('source', 'model.st')} --shards-dir {Path(path).parent}`"
    )


def router_config_from_args(args: argparse.Namespace):
    from sterling.cluster.errors import ClusterConfigError
    from sterling.cluster.router import RouterConfig

    try:
        return RouterConfig(max_k=args.max_k, max_k0=args.max_k0, max_batch=args.max_batch, max_results=args.max_results,
                            default_deadline_ms=args.deadline_ms, adaptive=args.adaptive)
    except ValueError as e:
        raise ClusterConfigError(str(e).replace("RouterConfig.", "--").replace("_", "-")) from e


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "serve",
        help="serve a model over gRPC in one process (no Ray)",
        description="Run sterling.v1.Retrieval (+ grpc.health.v1 and reflection) in this process. "
        "--shards N slices the model in memory into N document shards searched concurrently "
        "(answers equal `sterling launch ray`). Prints the address; stops on SIGINT/SIGTERM.",
    )
    p.add_argument("--model", required=True, help="artifact written by `sterling build` or `sterling train`")
    p.add_argument("--shards", type=int, default=1, help="in-memory document shards searched concurrently")
    p.add_argument("--data-dir", help="take Upsert/Delete/UpdateAttributes: snapshots and the update log live "
                   "here (one sub-directory per shard); a restart with the same DIR recovers before SERVING")
    p.add_argument("--snapshot-every", type=int, default=1000, help="update batches between snapshots")
    add_server_arguments(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from sterling.cluster.embedded import local_router
    from sterling.cluster.server import RetrievalServer
    from sterling.launch.logs import configure_logging

    configure_logging(args.log_format)
    server_cfg = server_config_from_args(args)
    check_servable(args.model)
    if args.shards < 1:
        from sterling.model.errors import InvalidInputError

        raise InvalidInputError(f"--shards ({args.shards}) must be ≥ 1")
    updates = None
    if args.data_dir:  # a learned model's upserts carry item features (its item tower embeds them)
        from sterling.cluster.live import live_router

        router, updates = live_router(args.model, data_dir=args.data_dir, num_shards=args.shards,
                                      config=router_config_from_args(args), snapshot_every=args.snapshot_every)
        version = updates.version
    else:
        router = local_router(args.model, num_shards=args.shards, config=router_config_from_args(args))
        version = int(router.head.index.version)
    srv = RetrievalServer(router, server_cfg, backend_name="local", updates=updates).start()
    metrics = f"; metrics on http://{args.host}:{srv.metrics_port}/metrics" if srv.metrics_port is not None else ""
    logged = f", updates logged in {args.data_dir}" if updates else ""
    print(f"sterling serve: listening on {srv.address} ({args.shards} shard(s), model version "
          f"{version}{logged}){metrics}; Ctrl-C to stop", flush=True)
    srv.wait_for_signal(on_stop=updates.close if updates is not None else None)
    print("sterling serve: stopped", file=sys.stderr, flush=True)
    return 0
