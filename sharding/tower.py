"""The user tower's sparse tables sharded across a process group with TorchRec ``DistributedModelParallel``.

The tower (``sterling.model.towers.Tower``) is single-device code; this
module applies the distribution from outside: the ``EmbeddingBagCollection``
is sharded following the plan (``sharding_type`` per table), the dense MLP
is replicated, and each rank copies only its own shards of the trained
weights out of the (memory-mapped) artifact.

On CPU (gloo) TorchRec offers ``table_wise``, ``column_wise`` (kernel
``fused``) and ``data_parallel`` (kernel ``dense``); ``row_wise`` and
``table_row_wise`` need a GPU. The fused kernel pools in a different order
than ``nn.EmbeddingBag``, so the sharded tower equals the unsharded one to
fp32 rounding (|Δ| ≲ 1e-7), not bit for bit.

Every rank must call the sharded tower's forward with a batch of the same
size (the lookup is an all-to-all); the serving group feeds every rank the
same broadcast batch.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.distributed as dist

from sterling.model.errors import InvalidInputError

__all__ = ["CPU_SHARDING_TYPES", "tower_sharding_from_plan", "table_constraints", "shard_tower"]

CPU_SHARDING_TYPES: dict[str, str] = {"table_wise": "fused", "column_wise": "fused", "data_parallel": "dense"}
_GPU_ONLY = ("row_wise", "table_row_wise", "grid_shard")


def tower_sharding_from_plan(plan) -> dict[str, str]:
    """``{table: sharding_type}`` from a ``sterling.planner.Plan``'s ``sparse_tables`` (what TorchRec planned)."""
    return {t.name: t.sharding_type for t in plan.sparse_tables}


def table_constraints(tower, sharding: Mapping[str, str] | str | None, *, device: torch.device):
    """TorchRec ``ParameterConstraints`` per table from ``{feature or table name: sharding_type}``.

    A plain string applies to every table; ``None`` leaves the choice to TorchRec's planner.
    """
    from torchrec.distributed.planner import ParameterConstraints

    names = [f"t_{s.name}" for s in tower.config.sparse]
    if sharding is None:
        return {}
    if isinstance(sharding, str):
        sharding = dict.fromkeys(names, sharding)
    out = {}
    for key, kind in sharding.items():
        table = key if key in names else f"t_{key}"
        if table not in names:
            raise InvalidInputError(
                f"the plan shards table {key!r}, but the user tower has tables {names}; re-plan for this model"
            )
        if device.type == "cpu" and kind in _GPU_ONLY:
            raise InvalidInputError(
                f"table {key!r}: sharding type {kind!r} is not offered on CPU (gloo); use one of "
                f"{sorted(CPU_SHARDING_TYPES)} on CPU, or run on GPUs (NCCL)"
            )
        kernel = CPU_SHARDING_TYPES.get(kind, "fused") if device.type == "cpu" else (
            "dense" if kind == "data_parallel" else "fused")
        out[table] = ParameterConstraints(sharding_types=[kind], compute_kernels=[kernel])
    return out


def shard_tower(tower, *, sharding: Mapping[str, str] | str | None = None, device: torch.device | None = None,
                pg: dist.ProcessGroup | None = None):
    """``tower`` with its EBC sharded over ``pg`` (default: the world group); returns the DMP module.

    Collective: every rank of ``pg`` calls it with the same tower config and
    weights (memory-mapped; only this rank's shard rows are read). The
    returned module is called like the tower: ``m(kjt, dense) → [B, D]``.
    """
    from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
    from torchrec.distributed.model_parallel import DistributedModelParallel
    from torchrec.distributed.planner import EmbeddingShardingPlanner, Topology
    from torchrec.distributed.types import ShardingEnv

    from sterling.model.towers import Tower

    if tower.ebc is None:
        raise InvalidInputError("this user tower has no sparse tables to shard; serve it replicated")
    pg = pg or dist.group.WORLD
    device = device or torch.device("cpu")
    world = dist.get_world_size(pg)
    full = tower.state_dict()
    fresh = Tower(tower.config)
    sharders = [EmbeddingBagCollectionSharder()]
    planner = EmbeddingShardingPlanner(
        topology=Topology(world_size=world, compute_device=device.type),
        constraints=table_constraints(tower, sharding, device=device),
    )
    plan = planner.collective_plan(fresh, sharders, pg)
    dmp = DistributedModelParallel(fresh, env=ShardingEnv.from_process_group(pg), device=device, plan=plan,
                                   sharders=sharders, init_data_parallel=False)
    with torch.no_grad():
        for name, t in dmp.state_dict().items():
            src = full[name.removeprefix("_dmp_wrapped_module.")]
            if hasattr(t, "local_shards"):
                for sh in t.local_shards():
                    (r0, c0), (nr, nc) = sh.metadata.shard_offsets, sh.metadata.shard_sizes
                    sh.tensor.copy_(src[r0 : r0 + nr, c0 : c0 + nc])
            else:
                t.copy_(src)
    dmp.eval()
    dmp.sterling_plan = plan
    return dmp
