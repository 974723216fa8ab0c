"""sterling.planner — pure placement planning.

No devices, no process group: ``plan(config, topology, targets)`` answers
"what hardware does this catalog need, and where does each tensor live?".
TorchRec (for sparse user tables) and matplotlib (for ``--plot``) are
imported lazily by the stages that need them.

Example:
    >>> from sterling.planner import IndexModelConfig, PlanTargets, make_topology, plan
    >>> p = plan(IndexModelConfig(items=500_000_000, dim=128),
    ...          make_topology("h100-80g", hosts=4), PlanTargets(qps=20_000))
    >>> p.num_shards, p.replicas  # doctest: +SKIP
"""

from __future__ import annotations

from sterling.planner.cost import estimate_cost
from sterling.planner.devices import DEVICE_PRESETS, get_device, make_topology
from sterling.planner.inventory import (
    IndexModelConfig,
    SparseTableSpec,
    bloom_bits_per_item,
    inventory_from_config,
    inventory_from_header,
)
from sterling.planner.placement import PlanTargets, place_on_device, plan
from sterling.planner.types import (
    AccessPattern,
    DeviceKind,
    DeviceSpec,
    MemoryTier,
    Placement,
    Plan,
    Storage,
    TensorRole,
    TensorSpec,
    Topology,
)

# The error classes (PlannerError, InfeasiblePlanError, InvalidPlanConfigError,
# PlanFormatError) are importable by name but left out of __all__: a star import
# must not build them (that imports sterling.model, see errors.py).
__all__ = [
    "AccessPattern",
    "DEVICE_PRESETS",
    "DeviceKind",
    "DeviceSpec",
    "IndexModelConfig",
    "MemoryTier",
    "Placement",
    "Plan",
    "PlanTargets",
    "SparseTableSpec",
    "Storage",
    "TensorRole",
    "TensorSpec",
    "Topology",
    "bloom_bits_per_item",
    "estimate_cost",
    "get_device",
    "inventory_from_config",
    "inventory_from_header",
    "make_topology",
    "place_on_device",
    "plan",
]

_LAZY_ERRORS = ("InfeasiblePlanError", "InvalidPlanConfigError", "PlanFormatError", "PlannerError")


def __getattr__(name: str) -> type:
    # Error classes subclass sterling.model's SterlingError; built on first use
    # so that importing the planner does not import the model (see errors.py).
    if name in _LAZY_ERRORS:
        from sterling.planner import errors

        return getattr(errors, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
