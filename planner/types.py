"""The planner's vocabulary: memory tiers, storage arithmetic, devices, topology,
tensor specs, placements and the plan itself.

Conventions: every size is in **bytes** (decimal GB = 1e9 bytes when printed),
every bandwidth in **bytes/s**, every time in **seconds** unless a name says
``_ms``. "Shard" means a document shard (a contiguous range of IVF lists);
"replica" means a full copy of all shards serving its own share of the QPS.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from enum import StrEnum
from typing import Any

from sterling.planner import errors

__all__ = [
    "PLAN_FORMAT_VERSION",
    "MemoryTier",
    "TIER_ORDER",
    "DeviceKind",
    "AccessPattern",
    "TensorRole",
    "Storage",
    "DeviceSpec",
    "Topology",
    "TensorSpec",
    "Placement",
    "DeviceAssignment",
    "ShardSpec",
    "DevicePlan",
    "Decision",
    "CostEstimate",
    "SparseTablePlacement",
    "Plan",
]

PLAN_FORMAT_VERSION: int = 1


class MemoryTier(StrEnum):
    """Where bytes live, fastest first.

    ``sram``: on-chip L2 / shared memory (a persisting-L2 window on GPUs);
    ``hbm``: device memory; ``dram``: the host's DRAM, read by a GPU over
    PCIe or NVLink-C2C (for a CPU deployment it is the main memory);
    ``remote``: another host's DRAM, read over the network; ``mmap``: the
    memory-mapped artifact on a CPU host (page cache, then disk) — the slow
    tier of a tiered index's cold lists (``planner/tiers.py``).
    """

    SRAM = "sram"
    HBM = "hbm"
    DRAM = "dram"
    REMOTE = "remote"
    MMAP = "mmap"


TIER_ORDER: tuple[MemoryTier, ...] = (
    MemoryTier.SRAM,
    MemoryTier.HBM,
    MemoryTier.DRAM,
    MemoryTier.REMOTE,
    MemoryTier.MMAP,
)


class DeviceKind(StrEnum):
    """``gpu``: the index is scanned from HBM; ``cpu``: scanned from host DRAM."""

    GPU = "gpu"
    CPU = "cpu"


class AccessPattern(StrEnum):
    """How a query touches a tensor.

    ``per_batch``: read whole once per batch (centroids, weights);
    ``probed``: the probed IVF lists' rows are streamed (codes, scales, Bloom, alive);
    ``gathered``: K0 random rows per query (ids, exact attributes, embedding cache);
    ``lookup``: pooled sparse-table rows per query (user embedding tables).
    """

    PER_BATCH = "per_batch"
    PROBED = "probed"
    GATHERED = "gathered"
    LOOKUP = "lookup"


class TensorRole(StrEnum):
    """How a tensor is distributed: ``sharded`` by items across document shards,
    ``replicated`` on every GPU (towers, OverArch, centroids, scratch), or
    ``sparse`` (user embedding tables planned by TorchRec)."""

    SHARDED = "sharded"
    REPLICATED = "replicated"
    SPARSE = "sparse"


@dataclass(frozen=True, slots=True)
class Storage:
    """Bytes per memory tier. Arithmetic reads like algebra (after TorchRec's ``Storage``).

    Example:
        >>> Storage(hbm=10) + Storage(dram=5) == Storage(hbm=10, dram=5)
        True
    """

    sram: int = 0
    hbm: int = 0
    dram: int = 0
    remote: int = 0
    mmap: int = 0

    @classmethod
    def of(cls, tier: MemoryTier | str, nbytes: int) -> Storage:
        return cls(**{MemoryTier(tier).value: int(nbytes)})

    def get(self, tier: MemoryTier | str) -> int:
        return int(getattr(self, MemoryTier(tier).value))

    def __add__(self, other: Storage) -> Storage:
        return Storage(**{t.value: self.get(t) + other.get(t) for t in TIER_ORDER})

    def __sub__(self, other: Storage) -> Storage:
        return Storage(**{t.value: self.get(t) - other.get(t) for t in TIER_ORDER})

    def __mul__(self, k: int) -> Storage:
        return Storage(**{t.value: self.get(t) * k for t in TIER_ORDER})

    __rmul__ = __mul__

    @property
    def total(self) -> int:
        return sum(self.get(t) for t in TIER_ORDER)

    def fits_in(self, capacity: Storage) -> bool:
        return all(self.get(t) <= capacity.get(t) for t in TIER_ORDER)

    def to_dict(self) -> dict[str, int]:
        return {t.value: self.get(t) for t in TIER_ORDER}

    @classmethod
    def from_dict(cls, d: dict[str, int]) -> Storage:
        return cls(**{t.value: int(d.get(t.value, 0)) for t in TIER_ORDER})


@dataclass(frozen=True, kw_only=True, slots=True)
class DeviceSpec:
    """One accelerator (or a CPU-only host's share of memory) as the planner sees it.

    Capacities are raw datasheet bytes; ``usable_fraction`` of HBM is planned
    (the rest is CUDA context, allocator slack and scratch). ``sram_bytes`` is the
    part of L2 that can hold a persisting window. Bandwidths are peak bytes/s;
    the cost model applies its own efficiency factors.
    """

    name: str
    kind: DeviceKind
    hbm_bytes: int
    sram_bytes: int
    hbm_bw: float  # bytes/s
    sram_bw: float  # bytes/s
    host_link_bw: float  # bytes/s, one direction, device <- host DRAM (PCIe / NVLink-C2C)
    int8_ops: float  # dense int8 ops/s
    fp16_flops: float  # dense fp16/bf16 FLOP/s
    fp32_flops: float  # FP32 FLOP/s (non-tensor-core)
    usable_fraction: float = 0.9
    source: str = ""

    def __post_init__(self) -> None:
        if not 0.0 < self.usable_fraction <= 1.0:
            raise errors.InvalidPlanConfigError(
                f"usable_fraction ({self.usable_fraction}) must be in (0, 1]"
            )

    @property
    def usable_hbm(self) -> int:
        return int(self.hbm_bytes * self.usable_fraction)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["kind"] = self.kind.value
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> DeviceSpec:
        d = dict(d)
        d["kind"] = DeviceKind(d["kind"])
        return cls(**d)


@dataclass(frozen=True, kw_only=True, slots=True)
class Topology:
    """``hosts`` × ``gpus_per_host`` identical devices.

    ``host_dram_bytes`` is per host (``dram_usable_fraction`` of it is planned);
    ``intra_host_bw`` is per GPU between GPUs of one host (NVLink), ``inter_host_bw``
    per host between hosts (NICs); ``remote_bw`` is what one GPU gets reading
    another host's DRAM.
    """

    device: DeviceSpec
    hosts: int
    gpus_per_host: int
    host_dram_bytes: int
    host_dram_bw: float  # bytes/s, host memory bandwidth
    intra_host_bw: float  # bytes/s
    inter_host_bw: float  # bytes/s
    remote_bw: float  # bytes/s
    dram_usable_fraction: float = 0.8

    def __post_init__(self) -> None:
        if self.hosts < 1 or self.gpus_per_host < 1:
            raise errors.InvalidPlanConfigError(
                f"hosts ({self.hosts}) and gpus_per_host ({self.gpus_per_host}) must be >= 1"
            )

    @property
    def world_size(self) -> int:
        return self.hosts * self.gpus_per_host

    @property
    def dram_per_gpu(self) -> int:
        """Planned host DRAM bytes available to one device's shard."""
        return int(self.host_dram_bytes * self.dram_usable_fraction) // self.gpus_per_host

    def capacity_per_device(self) -> Storage:
        """Planned bytes per tier for one device (remote DRAM is not bounded here)."""
        if self.device.kind is DeviceKind.CPU:
            return Storage(dram=self.dram_per_gpu, remote=_UNBOUNDED, mmap=_UNBOUNDED)
        return Storage(
            sram=self.device.sram_bytes,
            hbm=self.device.usable_hbm,
            dram=self.dram_per_gpu,
            remote=_UNBOUNDED,
            mmap=_UNBOUNDED,
        )

    def to_dict(self) -> dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in fields(self)}
        d["device"] = self.device.to_dict()
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Topology:
        d = dict(d)
        d["device"] = DeviceSpec.from_dict(d["device"])
        return cls(**d)


_UNBOUNDED: int = 2**62


@dataclass(frozen=True, kw_only=True, slots=True)
class TensorSpec:
    """One tensor of the retrieval model, for the whole catalog (before sharding).

    ``bytes_per_query`` is the bytes one query touches (per-batch reads already
    divided by the batch size). ``scan_path`` tensors are streamed by the IVF
    scan and must sit in SRAM/HBM on a GPU unless spilling is allowed.
    """

    name: str
    nbytes: int
    bytes_per_query: float
    access: AccessPattern
    role: TensorRole
    scan_path: bool = False
    shape: tuple[int, ...] = ()
    dtype: str = ""

    @property
    def density(self) -> float:
        """Bytes touched per query per byte stored: the placement priority."""
        return self.bytes_per_query / self.nbytes if self.nbytes else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "nbytes": self.nbytes,
            "bytes_per_query": float(self.bytes_per_query),
            "access": self.access.value,
            "role": self.role.value,
            "scan_path": self.scan_path,
            "shape": list(self.shape),
            "dtype": self.dtype,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TensorSpec:
        return cls(
            name=d["name"],
            nbytes=int(d["nbytes"]),
            bytes_per_query=float(d["bytes_per_query"]),
            access=AccessPattern(d["access"]),
            role=TensorRole(d["role"]),
            scan_path=bool(d["scan_path"]),
            shape=tuple(int(x) for x in d["shape"]),
            dtype=d["dtype"],
        )


@dataclass(frozen=True, kw_only=True, slots=True)
class Placement:
    """``nbytes`` of tensor ``name`` (on one device) live in ``tier``; a tensor may
    be split across tiers (several Placements with the same name)."""

    name: str
    tier: MemoryTier
    nbytes: int
    bytes_per_query: float

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "tier": self.tier.value,
            "nbytes": self.nbytes,
            "bytes_per_query": float(self.bytes_per_query),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Placement:
        return cls(
            name=d["name"],
            tier=MemoryTier(d["tier"]),
            nbytes=int(d["nbytes"]),
            bytes_per_query=float(d["bytes_per_query"]),
        )


@dataclass(frozen=True, kw_only=True, slots=True)
class DeviceAssignment:
    """Shard ``shard`` of replica ``replica`` runs on GPU ``gpu`` of host ``host``."""

    shard: int
    replica: int
    host: int
    gpu: int


@dataclass(frozen=True, kw_only=True, slots=True)
class ShardSpec:
    """A document shard: IVF lists ``[list_start, list_end)``, about ``fraction`` of the items."""

    shard: int
    list_start: int
    list_end: int
    fraction: float
    items: int


@dataclass(frozen=True, kw_only=True, slots=True)
class DevicePlan:
    """What one device of a shard holds: per-tier bytes and per-tensor placements.

    Every replica of a shard holds the same thing, so this is per shard.
    """

    shard: int
    storage: Storage
    placements: tuple[Placement, ...]
    tiers: dict[str, Any] | None = None  # per-list split (planner/tiers.py TierSplit.to_dict), when planned from an artifact

    def to_dict(self) -> dict[str, Any]:
        d = {
            "shard": self.shard,
            "storage": self.storage.to_dict(),
            "placements": [p.to_dict() for p in self.placements],
        }
        if self.tiers is not None:
            d["tiers"] = self.tiers
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> DevicePlan:
        return cls(
            shard=int(d["shard"]),
            storage=Storage.from_dict(d["storage"]),
            placements=tuple(Placement.from_dict(p) for p in d["placements"]),
            tiers=d.get("tiers"),
        )


@dataclass(frozen=True, kw_only=True, slots=True)
class Decision:
    """One planning step, explained in one line. ``step`` is ``up``, ``out``,
    ``shard``, ``replicate`` or ``sparse``."""

    step: str
    message: str


@dataclass(frozen=True, kw_only=True, slots=True)
class CostEstimate:
    """Predicted cost of one batch on one shard, and the cluster totals."""

    batch: int
    memory_s: float  # seconds per batch spent reading bytes (all tiers)
    compute_s: float  # seconds per batch of arithmetic
    merge_s: float  # seconds per batch of cross-device merge + network hops
    bytes_per_tier: dict[str, float]  # bytes read per batch on one shard, per tier
    latency_ms: float  # one batch, end to end (service time, no queueing)
    p99_ms: float  # predicted p99 including batching and queueing
    qps_per_replica: float  # sustainable at the target utilization
    qps_total: float
    gpus: int
    gpu_hours_per_hour: float
    gpu_hours_per_million_queries: float


@dataclass(frozen=True, kw_only=True, slots=True)
class SparseTablePlacement:
    """A user embedding table as planned (by TorchRec when available)."""

    name: str
    sharding_type: str
    compute_kernel: str
    ranks: tuple[int, ...]
    tiers: dict[str, int]  # bytes per MemoryTier value, over all ranks
    planner: str  # "torchrec" or "sterling"


@dataclass(frozen=True, kw_only=True, slots=True)
class Plan:
    """A complete, JSON-serialisable deployment plan (what ``sterling launch`` reads).

    ``shards`` are document shards expressed as IVF list ranges; ``assignments``
    say which host/GPU runs each (shard, replica).
    """

    format_version: int = PLAN_FORMAT_VERSION
    items: int
    dim: int
    nlist: int
    nprobe: int
    k0: int
    batch: int
    code_bits: int
    topology: Topology
    num_shards: int
    replicas: int
    hosts_used: int
    shards: tuple[ShardSpec, ...]
    assignments: tuple[DeviceAssignment, ...]
    devices: tuple[DevicePlan, ...]
    inventory: tuple[TensorSpec, ...]
    decisions: tuple[Decision, ...]
    cost: CostEstimate
    sparse_tables: tuple[SparseTablePlacement, ...] = ()
    sparse_stats: tuple[str, ...] = ()
    targets: dict[str, float] = field(default_factory=dict)

    @property
    def gpus(self) -> int:
        return self.num_shards * self.replicas

    def to_dict(self) -> dict[str, Any]:
        return {
            "format_version": self.format_version,
            "items": self.items,
            "dim": self.dim,
            "nlist": self.nlist,
            "nprobe": self.nprobe,
            "k0": self.k0,
            "batch": self.batch,
            "code_bits": self.code_bits,
            "topology": self.topology.to_dict(),
            "num_shards": self.num_shards,
            "replicas": self.replicas,
            "hosts_used": self.hosts_used,
            "shards": [asdict(s) for s in self.shards],
            "assignments": [asdict(a) for a in self.assignments],
            "devices": [d.to_dict() for d in self.devices],
            "inventory": [t.to_dict() for t in self.inventory],
            "decisions": [asdict(d) for d in self.decisions],
            "cost": asdict(self.cost),
            "sparse_tables": [
                {**asdict(s), "ranks": list(s.ranks)} for s in self.sparse_tables
            ],
            "sparse_stats": list(self.sparse_stats),
            "targets": dict(self.targets),
        }

    def to_json(self, *, indent: int | None = 1) -> str:
        return json.dumps(self.to_dict(), indent=indent, allow_nan=False)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Plan:
        version = d.get("format_version")
        if version != PLAN_FORMAT_VERSION:
            raise errors.PlanFormatError(
                f"plan format_version {version!r} is not supported (this Sterling reads "
                f"{PLAN_FORMAT_VERSION}); re-run `sterling plan` with this version"
            )
        try:
            return cls(
                format_version=int(version),
                items=int(d["items"]),
                dim=int(d["dim"]),
                nlist=int(d["nlist"]),
                nprobe=int(d["nprobe"]),
                k0=int(d["k0"]),
                batch=int(d["batch"]),
                code_bits=int(d["code_bits"]),
                topology=Topology.from_dict(d["topology"]),
                num_shards=int(d["num_shards"]),
                replicas=int(d["replicas"]),
                hosts_used=int(d["hosts_used"]),
                shards=tuple(ShardSpec(**s) for s in d["shards"]),
                assignments=tuple(DeviceAssignment(**a) for a in d["assignments"]),
                devices=tuple(DevicePlan.from_dict(x) for x in d["devices"]),
                inventory=tuple(TensorSpec.from_dict(t) for t in d["inventory"]),
                decisions=tuple(Decision(**x) for x in d["decisions"]),
                cost=CostEstimate(**d["cost"]),
                sparse_tables=tuple(
                    SparseTablePlacement(**{**s, "ranks": tuple(s["ranks"])})
                    for s in d.get("sparse_tables", [])
                ),
                sparse_stats=tuple(d.get("sparse_stats", [])),
                targets=dict(d.get("targets", {})),
            )
        except (KeyError, TypeError, ValueError) as e:
            raise errors.PlanFormatError(f"malformed plan JSON: {e!r}") from e

    @classmethod
    def from_json(cls, text: str) -> Plan:
        try:
            d = json.loads(text)
        except json.JSONDecodeError as e:
            raise errors.PlanFormatError(f"plan is not valid JSON: {e}") from e
        return cls.from_dict(d)

    def shard_bytes(self, shard: int) -> Storage:
        return self.devices[shard].storage

    def max_device_storage(self) -> Storage:
        best = Storage()
        for dp in self.devices:
            if dp.storage.total > best.total:
                best = dp.storage
        return best


def ceil_div(a: int, b: int) -> int:
    return -(-a // b)
