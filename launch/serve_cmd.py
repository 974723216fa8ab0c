"""`sterling serve`: the gRPC service in one process, no Ray (the embedded default)."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

__all__ = ["register", "run", "add_server_arguments", "server_config_from_args", "router_config_from_args"]


def add_server_arguments(p: argparse.ArgumentParser, *, default_port: int = 50051) -> None:
    """Listening, limits and security options shared by `serve` and `launch ray`."""
    p.add_argument("--host", default="127.0.0.1", help="bind address (non-loopback needs --tls-* and --token-file)")
    p.add_argument("--port", type=int, default=default_port, help="0 = any free port")
    p.add_argument("--max-k", type=int, default=10_000)
    p.add_argument("--max-batch", type=int, default=4096)
    p.add_argument("--deadline-ms", type=int, default=5000, help="default request deadline")
    p.add_argument("--adaptive", action="store_true",
                   help="widen nprobe globally for selective filters unless a request says otherwise")
    p.add_argument("--workers", type=int, default=8, help="gRPC handler threads")
    p.add_argument("--max-message-mb", type=int, default=64)
    p.add_argument("--tls-cert", help="server certificate chain (PEM)")
    p.add_argument("--tls-key", help="server private key (PEM)")
    p.add_argument("--tls-client-ca", help="require client certificates signed by this CA (PEM)")
    p.add_argument("--token-file", help="require `authorization: Bearer <token>` with the token in this file")


def server_config_from_args(args: argparse.Namespace):
    from sterling.cluster.server import SecurityConfig, ServerConfig

    token = Path(args.token_file).read_text().strip() if args.token_file else None
    sec = None
    if args.tls_cert or args.tls_key or args.tls_client_ca or token:
        sec = SecurityConfig(cert=args.tls_cert, key=args.tls_key, client_ca=args.tls_client_ca, token=token)
    return ServerConfig(host=args.host, port=args.port, workers=args.workers,
                        max_message_bytes=args.max_message_mb << 20, security=sec)


def router_config_from_args(args: argparse.Namespace):
    from sterling.cluster.router import RouterConfig

    return RouterConfig(max_k=args.max_k, max_batch=args.max_batch, default_deadline_ms=args.deadline_ms,
                        adaptive=args.adaptive)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "serve",
        help="serve a model over gRPC in one process (no Ray)",
        description="Run sterling.v1.Retrieval (+ grpc.health.v1 and reflection) in this process. "
        "--shards N slices the model in memory into N document shards searched concurrently "
        "(answers equal `sterling launch ray`). Prints the address; stops on SIGINT/SIGTERM.",
    )
    p.add_argument("--model", required=True, help="artifact written by `sterling build`")
    p.add_argument("--shards", type=int, default=1)
    p.add_argument("--data-dir", help="take Upsert/Delete/UpdateAttributes: snapshots and the update log live "
                   "here (one sub-directory per shard); a restart with the same DIR recovers before SERVING")
    p.add_argument("--snapshot-every", type=int, default=1000, help="update batches between snapshots")
    add_server_arguments(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from sterling.cluster.embedded import local_router
    from sterling.cluster.server import RetrievalServer

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    server_cfg = server_config_from_args(args)
    updates = None
    if args.data_dir:
        from sterling.cluster.live import live_router

        router, updates = live_router(args.model, data_dir=args.data_dir, num_shards=args.shards,
                                      config=router_config_from_args(args), snapshot_every=args.snapshot_every)
        version = updates.version
    else:
        router = local_router(args.model, num_shards=args.shards, config=router_config_from_args(args))
        version = int(router.head.index.version)
    srv = RetrievalServer(router, server_cfg, backend_name="local", updates=updates).start()
    print(f"sterling serve: listening on {srv.address} ({args.shards} shard(s), model version "
          f"{version}{', updates logged in ' + args.data_dir if updates else ''}); Ctrl-C to stop", flush=True)
    srv.wait_for_signal(on_stop=updates.close if updates is not None else None)
    print("sterling serve: stopped", file=sys.stderr, flush=True)
    return 0
