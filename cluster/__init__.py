"""sterling.cluster — gRPC protocol, shard servers, Ray actors, the merge stage (router), client.

Names resolve lazily so that importing ``sterling.cluster`` needs neither
gRPC nor Ray until they are used.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

__all__ = ["Client", "RetrieveResult", "Router", "RouterConfig", "RetrievalServer", "ServerConfig",
           "SecurityConfig", "local_router", "query_remote"]

_WHERE = {
    "Client": "client",
    "RetrieveResult": "client",
    "query_remote": "client",
    "Router": "router",
    "RouterConfig": "router",
    "RetrievalServer": "server",
    "ServerConfig": "server",
    "SecurityConfig": "server",
    "local_router": "embedded",
}

if TYPE_CHECKING:
    from sterling.cluster.client import Client, RetrieveResult, query_remote
    from sterling.cluster.embedded import local_router
    from sterling.cluster.router import Router, RouterConfig
    from sterling.cluster.server import RetrievalServer, SecurityConfig, ServerConfig


def __getattr__(name: str):
    if name in _WHERE:
        value = getattr(importlib.import_module(f"sterling.cluster.{_WHERE[name]}"), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'sterling.cluster' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
