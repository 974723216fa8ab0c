"""sterling.model — single-device ``nn.Module``s: the item index, towers, the retrieval models.

Never imports torch.distributed, Ray or gRPC (distribution is applied from
``sterling.sharding`` / ``sterling.cluster``). Names are resolved lazily so
that ``sterling.model.errors`` can be imported without torch (the planner
does).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

__all__ = [
    "Attributes",
    "IndexConfig",
    "ItemIndex",
    "LearnedRetrievalModel",
    "Metric",
    "RetrievalModel",
    "RetrievalOutput",
    "SterlingError",
    "TrainConfig",
    "UserTower",
    "build_index",
    "parse_filter",
]

_WHERE = {
    "Attributes": "attributes",
    "IndexConfig": "config",
    "Metric": "config",
    "ItemIndex": "index",
    "LearnedRetrievalModel": "learned",
    "TrainConfig": "train",
    "RetrievalModel": "retrieval",
    "RetrievalOutput": "retrieval",
    "UserTower": "retrieval",
    "SterlingError": "errors",
    "build_index": "build",
    "parse_filter": "filter",
}

if TYPE_CHECKING:
    from sterling.model.attributes import Attributes
    from sterling.model.build import build_index
    from sterling.model.config import IndexConfig, Metric
    from sterling.model.errors import SterlingError
    from sterling.model.filter import parse_filter
    from sterling.model.index import ItemIndex
    from sterling.model.learned import LearnedRetrievalModel
    from sterling.model.retrieval import RetrievalModel, RetrievalOutput, UserTower
    from sterling.model.train import TrainConfig


def __getattr__(name: str):
    if name in _WHERE:
        value = getattr(importlib.import_module(f"sterling.model.{_WHERE[name]}"), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'sterling.model' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
