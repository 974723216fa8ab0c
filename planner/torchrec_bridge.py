"""Sparse user tables planned by TorchRec's own ``EmbeddingShardingPlanner``.

The index is placed first; TorchRec then plans the user embedding tables on
what is left of each device of one replica (``world_size`` = number of
document shards, each shard's GPU is one TorchRec rank). Its compute kernels
map to our tiers:

=======================  ==========================================
TorchRec kernel          Sterling tiers
=======================  ==========================================
``fused`` / ``dense``    HBM
``fused_uvm_caching``    HBM cache over host DRAM
``fused_uvm``            host DRAM (read over PCIe / NVLink-C2C)
=======================  ==========================================

TorchRec is imported lazily inside ``plan_sparse_tables``; without it the
tables are placed by a simple greedy (HBM if it fits, else DRAM), and the
output says so.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

from sterling.planner import errors
from sterling.planner.inventory import SparseTableSpec
from sterling.planner.types import (
    DeviceKind,
    DevicePlan,
    MemoryTier,
    Placement,
    SparseTablePlacement,
    Storage,
    Topology,
)

__all__ = ["SparseResult", "KERNEL_TIERS", "torchrec_available", "plan_sparse_tables"]

# TorchRec EmbeddingComputeKernel value -> the tiers its bytes live in.
KERNEL_TIERS: dict[str, tuple[MemoryTier, ...]] = {
    "dense": (MemoryTier.HBM,),
    "fused": (MemoryTier.HBM,),
    "fused_uvm_caching": (MemoryTier.HBM, MemoryTier.DRAM),
    "fused_uvm": (MemoryTier.DRAM,),
}
# TorchRec's planner constants are bytes/ms (torchrec/distributed/planner/constants.py).
_MS_PER_S: float = 1000.0
_TABLE_PREFIX: str = "t_"  # a table named like a ModuleDict method fails to build (DESIGN §5)


@dataclass(frozen=True, kw_only=True, slots=True)
class SparseResult:
    tables: tuple[SparseTablePlacement, ...]
    stats: tuple[str, ...]
    devices: tuple[DevicePlan, ...]
    summary: str


def torchrec_available() -> bool:
    try:
        import torchrec  # noqa: F401
    except Exception:  # ImportError, or fbgemm failing to load its .so
        return False
    return True


def _leftover(topo: Topology, devices: Sequence[DevicePlan]) -> tuple[int, int]:
    cap = topo.capacity_per_device()
    hbm = min(cap.hbm - d.storage.hbm for d in devices)
    dram = min(cap.dram - d.storage.dram for d in devices)
    return max(0, hbm), max(0, dram)


def _add(devices: Sequence[DevicePlan], per_rank: dict[int, list[Placement]]) -> tuple[DevicePlan, ...]:
    out = []
    for d in devices:
        extra = per_rank.get(d.shard, [])
        storage = d.storage
        for p in extra:
            storage = storage + Storage.of(p.tier, p.nbytes)
        out.append(DevicePlan(shard=d.shard, storage=storage, placements=d.placements + tuple(extra), tiers=d.tiers))
    return tuple(out)


def plan_sparse_tables(
    tables: Sequence[SparseTableSpec],
    *,
    topo: Topology,
    devices: Sequence[DevicePlan],
    batch: int,
    use_torchrec: bool | None = None,
) -> SparseResult:
    """Plan ``tables`` on the leftover memory of one replica's devices."""
    if use_torchrec is None:
        use_torchrec = torchrec_available()
    hbm_left, dram_left = _leftover(topo, devices)
    if use_torchrec:
        return _plan_with_torchrec(tables, topo=topo, devices=devices, batch=batch,
                                   hbm_left=hbm_left, dram_left=dram_left)
    return _plan_greedy(tables, topo=topo, devices=devices, hbm_left=hbm_left, dram_left=dram_left)


def _plan_greedy(
    tables: Sequence[SparseTableSpec], *, topo: Topology, devices: Sequence[DevicePlan],
    hbm_left: int, dram_left: int,
) -> SparseResult:
    """Table-wise, largest first, onto the rank with the most room: HBM, then DRAM."""
    world = len(devices)
    free = {r: {MemoryTier.HBM: hbm_left, MemoryTier.DRAM: dram_left} for r in range(world)}
    if topo.device.kind is DeviceKind.CPU:
        for r in free:
            free[r][MemoryTier.HBM] = 0
    per_rank: dict[int, list[Placement]] = {}
    placed = []
    for t in sorted(tables, key=lambda t: -t.nbytes):
        choice = None
        for tier in (MemoryTier.HBM, MemoryTier.DRAM):
            r = max(range(world), key=lambda r, tier=tier: free[r][tier])
            if free[r][tier] >= t.nbytes:
                choice = (r, tier)
                break
        if choice is None:
            raise _no_room(t, hbm_left, dram_left, world)
        r, tier = choice
        free[r][tier] -= t.nbytes
        bpq = t.pooling_factor * t.embedding_dim * t.bytes_per_value
        per_rank.setdefault(r, []).append(
            Placement(name=f"sparse.{t.name}", tier=tier, nbytes=t.nbytes, bytes_per_query=bpq)
        )
        kernel = "fused" if tier is MemoryTier.HBM else "fused_uvm"
        placed.append(SparseTablePlacement(
            name=t.name, sharding_type="table_wise", compute_kernel=kernel, ranks=(r,),
            tiers={tier.value: t.nbytes}, planner="sterling",
        ))
    return SparseResult(
        tables=tuple(placed),
        stats=("torchrec not installed: sparse tables placed table-wise by Sterling's greedy",),
        devices=_add(devices, per_rank),
        summary=f"sparse: {len(placed)} tables placed table-wise by Sterling (torchrec not installed)",
    )


def _no_room(t: SparseTableSpec, hbm_left: int, dram_left: int, world: int) -> errors.InfeasiblePlanError:
    from sterling.planner.placement import fmt_bytes

    return errors.InfeasiblePlanError(
        f"sparse table {t.name!r} ({fmt_bytes(t.nbytes)}) does not fit the memory the index "
        f"leaves on {world} device(s) ({fmt_bytes(hbm_left)} HBM + {fmt_bytes(dram_left)} DRAM each)",
        reason="sparse", needed=t.nbytes, available=hbm_left + dram_left,
        remedies=[
            "more shards per replica (more --gpus-per-host, or --max-hosts)",
            "fewer rows or a smaller embedding_dim / fp16 dtype in the tables YAML",
            "smaller index (lower --dim, --bits 4)",
        ],
    )


class _Capture(logging.Handler):
    def __init__(self) -> None:
        super().__init__(level=logging.INFO)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


def _clean(line: str) -> str:
    """TorchRec pads its stats box to a fixed width with '#'; keep the content."""
    return line.strip().strip("#").rstrip()


def _plan_with_torchrec(
    tables: Sequence[SparseTableSpec], *, topo: Topology, devices: Sequence[DevicePlan],
    batch: int, hbm_left: int, dram_left: int,
) -> SparseResult:
    import torch
    from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
    from torchrec.distributed.planner import EmbeddingShardingPlanner
    from torchrec.distributed.planner import Topology as TRTopology
    from torchrec.distributed.planner.storage_reservations import FixedPercentageStorageReservation
    from torchrec.distributed.planner.types import ParameterConstraints, PlannerError
    from torchrec.modules.embedding_configs import EmbeddingBagConfig
    from torchrec.modules.embedding_modules import EmbeddingBagCollection

    world = len(devices)
    is_gpu = topo.device.kind is DeviceKind.GPU
    tr_topo = TRTopology(
        world_size=world,
        local_world_size=min(world, topo.gpus_per_host),
        compute_device="cuda" if is_gpu else "cpu",
        hbm_cap=hbm_left if is_gpu else 0,
        ddr_cap=dram_left,
        hbm_mem_bw=(topo.device.hbm_bw if is_gpu else topo.host_dram_bw) / _MS_PER_S,
        ddr_mem_bw=topo.host_dram_bw / topo.gpus_per_host / _MS_PER_S,
        hbm_to_ddr_mem_bw=topo.device.host_link_bw / _MS_PER_S,
        intra_host_bw=topo.intra_host_bw / _MS_PER_S,
        inter_host_bw=topo.inter_host_bw / _MS_PER_S,
    )
    name_of = {_TABLE_PREFIX + t.name: t for t in tables}
    configs = []
    constraints = {}
    for tname, t in name_of.items():
        dtype = {4: "FP32", 2: "FP16", 1: "INT8"}[t.bytes_per_value]
        from torchrec.modules.embedding_configs import DataType

        configs.append(EmbeddingBagConfig(
            name=tname, embedding_dim=t.embedding_dim, num_embeddings=t.num_embeddings,
            feature_names=[f"f_{t.name}"], data_type=DataType[dtype],
        ))
        constraints[tname] = ParameterConstraints(pooling_factors=[t.pooling_factor])
    ebc = EmbeddingBagCollection(tables=configs, device=torch.device("meta"))
    # Our usable_fraction already keeps HBM headroom; TorchRec reserves nothing more.
    planner = EmbeddingShardingPlanner(
        topology=tr_topo, batch_size=batch, constraints=constraints,
        storage_reservation=FixedPercentageStorageReservation(percentage=0.0),
    )
    capture = _Capture()
    stats_logger = logging.getLogger("torchrec.distributed.planner.stats")
    old_level, old_propagate = stats_logger.level, stats_logger.propagate
    stats_logger.addHandler(capture)
    stats_logger.setLevel(logging.INFO)
    stats_logger.propagate = False
    try:
        planner.plan(ebc, [EmbeddingBagCollectionSharder()])
    except PlannerError as e:
        biggest = max(tables, key=lambda t: t.nbytes)
        raise _no_room(biggest, hbm_left, dram_left, world) from e
    finally:
        stats_logger.removeHandler(capture)
        stats_logger.setLevel(old_level)
        stats_logger.propagate = old_propagate
    best = planner._best_plan or []  # ShardingOptions carry per-shard storage estimates
    per_rank: dict[int, list[Placement]] = {}
    placed = []
    for so in best:
        t = name_of[so.name]
        tiers: dict[str, int] = {}
        ranks = []
        for shard in so.shards:
            rank = int(shard.rank or 0)
            ranks.append(rank)
            st = shard.storage
            rows = shard.size[0] if shard.size else t.num_embeddings
            cols = shard.size[1] if len(shard.size) > 1 else t.embedding_dim
            bpq = t.pooling_factor * cols * t.bytes_per_value * (rows / t.num_embeddings)
            parts = [(MemoryTier.HBM if is_gpu else MemoryTier.DRAM, int(st.hbm) if st else 0),
                     (MemoryTier.DRAM, int(st.ddr) if st else 0)]
            total = sum(n for _, n in parts) or 1
            for tier, n in parts:
                if n:
                    tiers[tier.value] = tiers.get(tier.value, 0) + n
                    per_rank.setdefault(rank, []).append(Placement(
                        name=f"sparse.{t.name}", tier=tier, nbytes=n, bytes_per_query=bpq * n / total,
                    ))
        placed.append(SparseTablePlacement(
            name=t.name, sharding_type=str(so.sharding_type), compute_kernel=str(so.compute_kernel),
            ranks=tuple(ranks), tiers=tiers, planner="torchrec",
        ))
    kernels = sorted({p.compute_kernel for p in placed})
    return SparseResult(
        tables=tuple(placed),
        stats=tuple(_clean(line) for line in capture.lines if _clean(line)),
        devices=_add(devices, per_rank),
        summary=(
            f"sparse: TorchRec planned {len(placed)} tables on {world} rank(s) "
            f"(kernels: {', '.join(kernels)}; fused = HBM, fused_uvm_caching = HBM cache over "
            "DRAM, fused_uvm = DRAM)"
        ),
    )
