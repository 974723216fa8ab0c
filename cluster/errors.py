"""Cluster errors and their gRPC status codes.

The router maps every error to a status code with the same helpful text;
a bad request never takes the server down. Tests assert codes, not text.
"""

from __future__ import annotations

from sterling.model.errors import InvalidInputError, SterlingError

__all__ = [
    "ClusterError",
    "RequestTooLargeError",
    "OverloadedError",
    "ShardsUnavailableError",
    "DeadlineExceededError",
    "NotImplementedYetError",
    "ClusterConfigError",
    "ReplicaBehindError",
    "ReplicaOrderError",
    "RankFailedError",
    "status_code_name",
]


class ClusterError(SterlingError):
    """Root of the errors raised by the cluster layer."""


class RequestTooLargeError(ClusterError):
    """A request over the server's configured limits (batch, k × batch, bytes) → RESOURCE_EXHAUSTED."""


class OverloadedError(ClusterError):
    """Admission control refused the call (queue full, per-client limit, queue wait) → RESOURCE_EXHAUSTED.

    ``reason`` is ``queue_full``, ``client`` or ``queue_timeout`` (the metrics label).
    """

    def __init__(self, message: str, *, reason: str) -> None:
        super().__init__(message)
        self.reason = reason


class ShardsUnavailableError(ClusterError):
    """Shards missing while the request said ``require_complete`` (or none answered) → UNAVAILABLE."""

    def __init__(self, message: str, *, missing: list[int]) -> None:
        super().__init__(message)
        self.missing = list(missing)


class DeadlineExceededError(ClusterError):
    """The request's deadline passed before any answer could be formed → DEADLINE_EXCEEDED."""


class NotImplementedYetError(ClusterError):
    """An RPC defined in the protocol that this model does not support yet → UNIMPLEMENTED."""


class ClusterConfigError(ClusterError, ValueError):
    """A server or launch configuration that cannot work (e.g. no TLS on a public address)."""


class ReplicaBehindError(ClusterError):
    """A shard replica asked to answer at a version it has not applied yet (it is catching up) → UNAVAILABLE.

    The router then asks another replica of the shard; only when none can
    answer does the client see UNAVAILABLE.
    """


class ReplicaOrderError(ClusterError):
    """A replica was sent update batch ``seq`` while it had applied up to another one → UNAVAILABLE.

    Every replica applies a shard's batches in sequence order with no gaps;
    the router catches the replica up from a peer before it takes writes again.
    """


class RankFailedError(ClusterError):
    """A rank of a shard replica's process group died (or its collective failed) → UNAVAILABLE.

    ``shard``, ``replica`` and ``rank`` name it. The replica reports unhealthy
    until it has restarted its group; the router asks another replica meanwhile.
    """

    def __init__(self, message: str, *, shard: int, replica: int, rank: int | None) -> None:
        super().__init__(message)
        self.shard, self.replica, self.rank = shard, replica, rank

    def __reduce__(self):  # Ray pickles it back to the router with its fields
        return (_rank_failed, (str(self), self.shard, self.replica, self.rank))


def _rank_failed(message: str, shard: int, replica: int, rank: int | None) -> RankFailedError:
    return RankFailedError(message, shard=shard, replica=replica, rank=rank)


def status_code_name(exc: BaseException) -> str:
    """The ``grpc.StatusCode`` name for an exception (pure, so unit tests need no gRPC server)."""
    if isinstance(exc, (RequestTooLargeError, OverloadedError)):
        return "RESOURCE_EXHAUSTED"
    if isinstance(exc, InvalidInputError):
        return "INVALID_ARGUMENT"
    if isinstance(exc, (ShardsUnavailableError, ReplicaBehindError, ReplicaOrderError, RankFailedError)):
        return "UNAVAILABLE"
    if isinstance(exc, DeadlineExceededError):
        return "DEADLINE_EXCEEDED"
    if isinstance(exc, NotImplementedYetError):
        return "UNIMPLEMENTED"
    if isinstance(exc, SterlingError):
        return "FAILED_PRECONDITION"
    return "INTERNAL"
