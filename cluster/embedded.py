"""The one-process cluster (``sterling serve``): router + shards in threads, no Ray.

Slices the loaded model in memory (views of the memory-mapped artifact,
``sharding.documents.slice_model``), so ``--shards N`` costs no extra
copy of the codes, and answers exactly like ``sterling launch ray`` does.
"""

from __future__ import annotations

from pathlib import Path

from sterling.cluster.backends import LocalBackend
from sterling.cluster.learned_head import LearnedHead
from sterling.cluster.router import Router, RouterConfig
from sterling.cluster.shard import ShardServer
from sterling.model.artifact import read_header
from sterling.model.errors import InvalidInputError
from sterling.model.learned import LearnedRetrievalModel
from sterling.model.retrieval import RetrievalModel
from sterling.sharding.documents import balanced_list_ranges, slice_model

__all__ = ["local_router"]


def local_router(model: RetrievalModel | LearnedRetrievalModel | str | Path, *, num_shards: int = 1,
                 replicas: int = 1, config: RouterConfig | None = None) -> Router:
    """A ``Router`` over ``num_shards`` in-process slices of ``model`` (each with ``replicas`` copies).

    A learned model (``sterling train``) is served the same way: its item
    index is sliced into the shards and the router keeps the towers,
    OverArch, heads and item cache (``LearnedHead``), reranking the merged
    K0 candidates.
    """
    if isinstance(model, (str, Path)):
        kind = read_header(model).get("kind")
        model = LearnedRetrievalModel.load(model) if kind == "learned_retrieval_model" else RetrievalModel.load(model)
    learned = None
    if isinstance(model, LearnedRetrievalModel):
        learned = LearnedHead(model)
        model = RetrievalModel(model.index)
    if model.index.num_items == 0:
        raise InvalidInputError(
            "the model has no items (a head or an empty shard artifact?); serve the whole model written by "
            "`sterling build`"
        )
    if num_shards < 1 or replicas < 1:
        raise InvalidInputError(f"num_shards ({num_shards}) and replicas ({replicas}) must be ≥ 1")
    ranges = balanced_list_ranges(model.index, num_shards)
    servers = []
    for s, r in enumerate(ranges):
        sub = slice_model(model, r) if num_shards > 1 else model
        servers.append([ShardServer(sub, shard=s, replica=i, lists=r) for i in range(replicas)])
    head = slice_model(model, (0, 0))
    return Router(head, LocalBackend(servers), config, learned=learned)
