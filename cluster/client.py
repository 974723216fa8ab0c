"""Python client for ``sterling.v1.Retrieval``.

Example:
    >>> c = Client("127.0.0.1:50051")
    >>> res = c.retrieve(query=xq, k=100, where="lang:en AND NOT policy:blocked")
    >>> res.ids.shape, res.partial, res.version
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import numpy as np

from sterling.cluster import retrieval_pb2 as pb
from sterling.cluster import retrieval_pb2_grpc as pb_grpc

__all__ = ["Client", "RetrieveResult", "query_remote", "add_remote_arguments"]


@dataclass(kw_only=True, slots=True)
class RetrieveResult:
    """Like ``RetrievalOutput``: ids [B, k] (−1 pads), scores [B, k] (−inf pads), plus cluster facts."""

    ids: np.ndarray
    scores: np.ndarray
    version: int
    partial: bool = False
    missing_shards: list[int] = field(default_factory=list)
    version_skew: dict[int, int] = field(default_factory=dict)
    timing: dict = field(default_factory=dict)
    task_scores: np.ndarray | None = None  # [B, k, T] per-task probabilities (learned models)
    tasks: list[str] = field(default_factory=list)


_FAILOVER_CONFIG = json.dumps({
    "loadBalancingConfig": [{"round_robin": {}}],
    "methodConfig": [{
        "name": [{"service": "sterling.v1.Retrieval", "method": m} for m in ("Retrieve", "Info")],
        "retryPolicy": {"maxAttempts": 5, "initialBackoff": "0.05s", "maxBackoff": "0.5s",
                        "backoffMultiplier": 2, "retryableStatusCodes": ["UNAVAILABLE", "CANCELLED"]},
    }],
})


class Client:
    """A channel to a Sterling router (``sterling serve`` or ``sterling launch ray``).

    Args:
        address: ``HOST:PORT``, or several routers serving the same model
            as ``IP:PORT,IP:PORT`` (IPv4 literals): calls are spread round
            robin, and a ``Retrieve``/``Info`` that finds its router gone
            (``UNAVAILABLE``) is retried on another, so one router can
            restart while the others serve.
        token: bearer token, sent as ``authorization: Bearer <token>``.
        root_certificates: PEM bytes of the CA that signed the server
            certificate; turns TLS on.
        client_cert, client_key: PEM bytes for servers that require client certificates.
        timeout_s: default gRPC deadline per call.
    """

    def __init__(self, address: str, *, token: str | None = None, root_certificates: bytes | None = None,
                 client_cert: bytes | None = None, client_key: bytes | None = None,
                 timeout_s: float = 30.0, max_message_bytes: int = 64 << 20,
                 server_name: str | None = None) -> None:
        opts = [("grpc.max_receive_message_length", max_message_bytes),
                ("grpc.max_send_message_length", max_message_bytes)]
        if server_name:
            opts.append(("grpc.ssl_target_name_override", server_name))
        # Several routers: a call that finds every router down at once (one
        # restarting, the other not yet reconnected) waits, within its deadline,
        # for any of them to come back instead of failing fast; reconnect
        # attempts start at 100 ms so a restarted router is picked up quickly.
        self._wait_for_ready = "," in address
        if self._wait_for_ready:
            opts += [("grpc.service_config", _FAILOVER_CONFIG), ("grpc.enable_retries", 1),
                     ("grpc.initial_reconnect_backoff_ms", 100), ("grpc.min_reconnect_backoff_ms", 100),
                     ("grpc.max_reconnect_backoff_ms", 1000)]
            address = "ipv4:" + address
        if root_certificates is not None:
            creds = grpc.ssl_channel_credentials(root_certificates, client_key, client_cert)
            self.channel = grpc.secure_channel(address, creds, options=opts)
        else:
            self.channel = grpc.insecure_channel(address, options=opts)
        self.stub = pb_grpc.RetrievalStub(self.channel)
        self.timeout_s = timeout_s
        self._metadata = (("authorization", f"Bearer {token}"),) if token else None

    def _call_options(self, timeout_s: float | None) -> dict:
        return {"timeout": timeout_s or self.timeout_s, "metadata": self._metadata,
                "wait_for_ready": self._wait_for_ready}

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def wait_ready(self, timeout_s: float = 30.0) -> None:
        grpc.channel_ready_future(self.channel).result(timeout=timeout_s)

    def retrieve(self, *, query=None, user_features=None, k: int = 10, nprobe: int | None = None,
                 where: str | list[str | None] | None = None, exact: bool = True, adaptive: bool | None = None,
                 deadline_ms: int | None = None, require_complete: bool = False,
                 timeout_s: float | None = None, min_version: int = 0, user_ids=None,
                 sparse: tuple | None = None, k0: int | None = None,
                 value_formula: str | None = None) -> RetrieveResult:
        """Top-k per query through the router; raises ``grpc.RpcError`` with the server's status code.

        The user is a ``query`` embedding [B, D], dense ``user_features`` [B, F]
        (index models with an MLP tower), or — for a learned model — ``user_ids``
        [B] (rows of its users table) or ``sparse=(keys, lengths, values)``
        (a KeyedJaggedTensor's parts, key-major, ``user_features`` its dense
        part). ``k0`` and ``value_formula`` steer the learned model's rerank;
        its per-task probabilities come back in ``task_scores``.
        """
        users = [n for n, v in (("query", query), ("user_ids", user_ids), ("sparse", sparse)) if v is not None]
        if len(users) > 1 or (not users and user_features is None) or (query is not None and user_features is not None):
            raise ValueError("give one of `query`, `user_features`, `user_ids` or `sparse` (+ `user_features`)")
        req = pb.RetrieveRequest(k=k, nprobe=nprobe or 0, deadline_ms=deadline_ms or 0,
                                 require_complete=require_complete, approximate_filter=not exact,
                                 min_version=min_version, k0=k0 or 0, value_formula=value_formula or "")
        batch = None
        for name, v in (("query", query), ("user_features", user_features)):
            if v is not None:
                x = np.asarray(v, dtype=np.float32)
                x = x[None] if x.ndim == 1 else x
                getattr(req, "query_embedding" if name == "query" else "user_features").extend(x.reshape(-1).tolist())
                batch = x.shape[0]
        if user_ids is not None:
            ids = np.asarray(user_ids, dtype=np.int64).reshape(-1)
            req.user_ids.extend(ids.tolist())
            batch = len(ids)
        if sparse is not None:
            keys, lengths, values = sparse
            lengths = np.asarray(lengths, dtype=np.int64).reshape(-1)
            req.sparse_features.keys.extend(list(keys))
            req.sparse_features.lengths.extend(lengths.tolist())
            req.sparse_features.values.extend(np.asarray(values, dtype=np.int64).reshape(-1).tolist())
            batch = len(lengths) // max(len(keys), 1)
        req.batch_size = batch or 1
        if isinstance(where, (list, tuple)):
            req.filters.extend([w or "" for w in where])
        elif where:
            req.filter = where
        if adaptive is not None:
            req.adaptive = pb.ADAPTIVE_MODE_ON if adaptive else pb.ADAPTIVE_MODE_OFF
        resp = self.stub.Retrieve(req, **self._call_options(timeout_s))
        return from_response(resp, k)

    def upsert(self, batches, *, timeout_s: float | None = None) -> pb.UpsertResponse:
        """Stream ``(ids [n], embeddings [n, D], attributes or None)`` batches; one durable summary back.

        For a learned model the second element is a ``FeatureTable`` of the
        items' feature columns (``read_features(path, "item_id")`` rows) instead
        of embeddings: the server's item tower embeds them.
        """
        from sterling.cluster.item_features import features_to_proto
        from sterling.model.data import FeatureTable

        def messages():
            for ids, x, attrs in batches:
                if isinstance(x, FeatureTable):
                    msg = pb.UpsertRequest(ids=[int(i) for i in ids], item_features=features_to_proto(x))
                else:
                    x = np.asarray(x, dtype=np.float32)
                    msg = pb.UpsertRequest(ids=[int(i) for i in ids], embeddings=x.reshape(-1).tolist())
                if attrs is not None:
                    msg.attributes.extend(pb.Attributes(terms=list(t)) for t in attrs)
                yield msg

        return self.stub.Upsert(messages(), **self._call_options(timeout_s))

    def delete(self, ids, *, timeout_s: float | None = None) -> pb.DeleteResponse:
        req = pb.DeleteRequest(ids=[int(i) for i in ids])
        return self.stub.Delete(req, **self._call_options(timeout_s))

    def update_attributes(self, ids, attributes, *, timeout_s: float | None = None) -> pb.UpdateAttributesResponse:
        req = pb.UpdateAttributesRequest(ids=[int(i) for i in ids],
                                         attributes=[pb.Attributes(terms=list(t)) for t in attributes])
        return self.stub.UpdateAttributes(req, **self._call_options(timeout_s))

    def info(self) -> pb.InfoResponse:
        return self.stub.Info(pb.InfoRequest(), **self._call_options(None))


def from_response(resp: pb.RetrieveResponse, k: int) -> RetrieveResult:
    B = len(resp.results)
    ids = np.full((B, k), -1, dtype=np.int64)
    scores = np.full((B, k), -np.inf, dtype=np.float32)
    tasks = [t.task for t in resp.results[0].task_scores] if B and len(resp.results[0].task_scores) else []
    task_scores = np.zeros((B, k, len(tasks)), dtype=np.float32) if tasks else None
    for q, r in enumerate(resp.results):
        n = len(r.ids)
        ids[q, :n] = r.ids
        scores[q, :n] = r.scores
        for i, ts in enumerate(r.task_scores):
            task_scores[q, :n, i] = ts.scores
    t = resp.timing
    return RetrieveResult(
        ids=ids, scores=scores, version=resp.model_version, partial=resp.partial,
        missing_shards=list(resp.missing_shards),
        version_skew={v.shard: v.version for v in resp.version_skew},
        task_scores=task_scores, tasks=tasks,
        timing={"total_ms": t.total_ms, "encode_ms": t.encode_ms, "fanout_ms": t.fanout_ms, "merge_ms": t.merge_ms,
                "shards": [{"shard": s.shard, "replica": s.replica, "ms": s.ms, "probe_ms": s.probe_ms,
                            "filter_ms": s.filter_ms, "scan_ms": s.scan_ms, "rerank_ms": s.rerank_ms}
                           for s in t.shards]},
    )


def add_remote_arguments(p: argparse.ArgumentParser) -> None:
    """The options ``query_remote`` reads besides ``--vector``, ``--k``, ``--nprobe``, ``--where``, ``--json``."""
    p.add_argument("--address", help="HOST:PORT of a router (`sterling serve` / `sterling launch ray`)")
    p.add_argument("--token-file", help="file holding the bearer token")
    p.add_argument("--tls-ca", help="CA certificate (PEM) of a TLS server")
    p.add_argument("--deadline-ms", type=int, default=0, help="request deadline (0 = server default)")


def query_remote(args: argparse.Namespace) -> int:
    """`sterling query --address HOST:PORT --vector q.npy [--k --nprobe --where --json]`.

    Reads ``args.address``, ``args.vector`` (.npy or .json), ``args.k``,
    ``args.nprobe``, ``args.where``, ``args.json``, ``args.approx`` and the
    optional ``token_file``, ``tls_ca``, ``deadline_ms``. Prints one JSON
    line (or a table line) per query; returns the exit code.
    """
    from sterling.model.errors import InvalidInputError

    vec = getattr(args, "vector", None)
    user_ids = getattr(args, "user_ids", None)
    if vec is None and not user_ids:
        raise InvalidInputError("with --address, give the query as --vector q.npy or --user-ids (--like needs the "
                                "artifact)")
    from sterling.cluster.access import read_token_file
    from sterling.launch.query_cmd import parse_user_ids, print_learned
    from sterling.model.catalog import load_query_vectors

    who = {"user_ids": parse_user_ids(user_ids)} if user_ids else {"query": load_query_vectors(vec)}
    token = read_token_file(args.token_file) if getattr(args, "token_file", None) else None
    ca = Path(args.tls_ca).read_bytes() if getattr(args, "tls_ca", None) else None
    with Client(args.address, token=token, root_certificates=ca) as c:
        try:
            res = c.retrieve(k=args.k, nprobe=getattr(args, "nprobe", None), where=getattr(args, "where", None),
                             exact=not getattr(args, "approx", False), deadline_ms=getattr(args, "deadline_ms", 0),
                             k0=getattr(args, "k0", 0) or None, value_formula=getattr(args, "value_formula", None),
                             **who)
        except grpc.RpcError as e:
            raise InvalidInputError(f"{args.address}: {e.code().name}: {e.details()}") from e
    if res.task_scores is not None:
        print_learned(res.ids.tolist(), res.scores.tolist(), res.task_scores.tolist(), res.tasks, res.version,
                      as_json=getattr(args, "json", False),
                      extra={"partial": res.partial, "missing_shards": res.missing_shards})
        return 0
    for ids, scores in zip(res.ids.tolist(), res.scores.tolist()):
        hits = [{"id": i, "score": s} for i, s in zip(ids, scores) if i >= 0]
        line = {"version": res.version, "partial": res.partial, "missing_shards": res.missing_shards, "results": hits}
        if getattr(args, "json", False):
            print(json.dumps(line))
        else:
            print(" ".join(f"{h['id']}:{h['score']:.4f}" for h in hits),
                  f"(version {res.version}{', PARTIAL missing ' + str(res.missing_shards) if res.partial else ''})")
    return 0
