"""Cost model: latency of one batch on one document shard, QPS, GPU-hours.

A batch on a shard costs ``overhead + memory + compute``: bytes read from each
tier divided by that tier's achievable bandwidth, plus arithmetic at a
fraction of peak (no overlap is assumed: a conservative bound). Shards run in
parallel; their top-k lists are merged over NVLink inside a host and over the
network across hosts, which adds to latency but not to a shard's busy time.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import numpy as np

from sterling.planner.cpu_cost import SERIAL_ITEMS, ColdTerms, ScanTerms, scan_terms
from sterling.planner.devices import CPU_MMAP_COLD_BW, CPU_MMAP_READ_S
from sterling.planner.inventory import IndexModelConfig
from sterling.planner.profile import MachineProfile
from sterling.planner.types import (
    CostEstimate,
    DeviceKind,
    MemoryTier,
    Placement,
    Topology,
)

__all__ = [
    "MEMORY_EFFICIENCY",
    "COMPUTE_EFFICIENCY",
    "GPU_BATCH_OVERHEAD_S",
    "CPU_BATCH_OVERHEAD_S",
    "INTRA_HOST_HOP_S",
    "NETWORK_HOP_S",
    "TARGET_UTILIZATION",
    "P99_OVER_SERVICE",
    "RESULT_BYTES_PER_ITEM",
    "tier_bandwidth",
    "batch_compute_ops",
    "estimate_cost",
]

# Achievable fraction of peak bandwidth for streaming reads. Assumption, in
# line with STREAM-style measurements (typically 80-90% of peak).
MEMORY_EFFICIENCY: float = 0.8
# Achieved fraction of peak arithmetic for the int8 scan / GEMMs. Assumption:
# SilverTorch's scan uses dp4a on CUDA cores, well below tensor-core peak.
COMPUTE_EFFICIENCY: float = 0.3
# Fixed cost per batch: ~20 kernel launches and one host sync. Assumption.
GPU_BATCH_OVERHEAD_S: float = 200e-6  # seconds
CPU_BATCH_OVERHEAD_S: float = 50e-6  # seconds, Python + dispatch. Assumption.
# One collective step between GPUs of a host (NCCL small-message latency). Assumption.
INTRA_HOST_HOP_S: float = 20e-6  # seconds
# One gRPC round trip router <-> shard on a datacenter network. Assumption.
NETWORK_HOP_S: float = 500e-6  # seconds
# Replicas are sized so each runs at most at this utilization (queueing headroom).
TARGET_UTILIZATION: float = 0.7
# p99 / service time: batch formation (≤ one service time) plus M/D/1 queueing at
# 70% utilization. Assumption; replace with measured tails from `sterling bench`.
P99_OVER_SERVICE: float = 3.0
# One merged candidate: fp32 score + int64 id.
RESULT_BYTES_PER_ITEM: int = 12


def tier_bandwidth(topo: Topology, tier: MemoryTier) -> float:
    """Peak bytes/s one device reads from ``tier``."""
    dev = topo.device
    host_share = topo.host_dram_bw / topo.gpus_per_host
    if tier is MemoryTier.SRAM:
        return dev.sram_bw
    if tier is MemoryTier.HBM:
        return dev.hbm_bw
    if tier is MemoryTier.DRAM:
        if dev.kind is DeviceKind.CPU:
            return host_share
        return min(dev.host_link_bw, host_share)
    if tier is MemoryTier.MMAP:
        return CPU_MMAP_COLD_BW
    return topo.remote_bw


def batch_compute_ops(cfg: IndexModelConfig, shard_fraction: float,
                      items_per_query: float | None = None) -> dict[str, float]:
    """Arithmetic per batch on one shard, by precision: int8 ops and fp FLOPs.

    ``items_per_query``: items a query scans on this shard, when the real
    lists are known (probe-frequency weighted); default: uniform lists.
    """
    b = cfg.batch
    nlist = cfg.resolved_nlist
    scanned = cfg.n_cap * shard_fraction * cfg.nprobe / nlist if items_per_query is None else items_per_query
    scan = 2.0 * b * scanned * cfg.dim
    k0 = min(cfg.k0, cfg.items)
    return {
        "int8": scan if cfg.code_bits <= 8 else 0.0,
        "fp16": (0.0 if cfg.code_bits <= 8 else scan)
        + 2.0 * b * cfg.tower_params
        + 2.0 * b * k0 * cfg.overarch_params
        + 2.0 * b * k0 * cfg.resolved_cache_dim,  # re-score K0 with cached embeddings
        "fp32": 2.0 * b * nlist * cfg.dim,  # query x centroids
    }


def estimate_cost(
    *,
    topo: Topology,
    cfg: IndexModelConfig,
    placements: Iterable[Placement],
    shard_fraction: float,
    num_shards: int,
    replicas: int = 1,
    slow_reads: float = 0.0,
    profile: MachineProfile | None = None,
    items_per_query: float | None = None,
    scan: ScanTerms | None = None,
    cold: ColdTerms | None = None,
) -> CostEstimate:
    """Latency and throughput of one batch on the shard described by ``placements``.

    ``slow_reads``: separate reads per batch from the memory-mapped tier
    (``planner.tiers.slow_reads_per_batch``), each costing ``CPU_MMAP_READ_S``
    on top of its bytes. ``profile`` (CPU devices): measured rates
    (``planner/profile.py``) replace the constants — overhead, resident scan
    bandwidth, int8 rate, cold mapped bandwidth and cost per read — with no
    efficiency factors (they are measured, not peak); with the profile's
    read-around, the mapped bytes a batch reads are ``min(mapped tier bytes,
    max(bytes scanned, slow_reads × read-around))``. ``items_per_query``:
    see ``batch_compute_ops``.

    A profile of the mechanism model (``profile.model >= 2``,
    ``planner/cpu_cost.py``) prices the scan by its work — ``scan``: the
    batch's expected lists, pair-items and dequantized items (default:
    uniform lists) — and the mapped tier by ``cold``: the simulated faults,
    bytes read from the disk and slow bytes mapped (without it, the mapped
    bytes at the cold bandwidth).
    """
    b = cfg.batch
    dev = topo.device
    placements = tuple(placements)
    if profile is not None and profile.model >= 2 and dev.kind is DeviceKind.CPU:
        return _mechanism_cost(topo=topo, cfg=cfg, placements=placements, shard_fraction=shard_fraction,
                               num_shards=num_shards, replicas=replicas, profile=profile, scan=scan, cold=cold)
    per_tier: dict[str, float] = {t.value: 0.0 for t in MemoryTier}
    for p in placements:
        per_tier[p.tier.value] += p.bytes_per_query * b
    memory_s = 0.0
    measured = profile if dev.kind is DeviceKind.CPU else None
    for t in MemoryTier:
        if per_tier[t.value]:
            if measured is not None and t is MemoryTier.DRAM:
                memory_s += per_tier[t.value] / measured.scan_bytes_per_s
            elif measured is not None and t is MemoryTier.MMAP:
                read = per_tier[t.value]
                if measured.mmap_readaround_bytes > 0:  # each separate fault reads its read-around window
                    span = sum(p.nbytes for p in placements if p.tier is MemoryTier.MMAP)
                    read = min(float(span), max(read, slow_reads * measured.mmap_readaround_bytes))
                memory_s += read / measured.mmap_cold_bw
            else:
                memory_s += per_tier[t.value] / (tier_bandwidth(topo, t) * MEMORY_EFFICIENCY)
    memory_s += slow_reads * (CPU_MMAP_READ_S if measured is None else measured.mmap_read_s)
    ops = batch_compute_ops(cfg, shard_fraction, items_per_query)
    int8_rate = dev.int8_ops * COMPUTE_EFFICIENCY if measured is None else measured.int8_ops_per_s
    compute_s = (
        ops["int8"] / int8_rate
        + ops["fp16"] / (dev.fp16_flops * COMPUTE_EFFICIENCY)
        + ops["fp32"] / (dev.fp32_flops * COMPUTE_EFFICIENCY)
    )
    overhead = GPU_BATCH_OVERHEAD_S if dev.kind is DeviceKind.GPU else CPU_BATCH_OVERHEAD_S
    if measured is not None:
        overhead = measured.overhead_s
    return _estimate(topo, cfg, per_tier, overhead, memory_s, compute_s, num_shards, replicas)


def _merge_s(topo: Topology, cfg: IndexModelConfig, num_shards: int) -> float:
    if num_shards <= 1:
        return 0.0
    merge_bytes = num_shards * cfg.batch * min(cfg.k, cfg.items) * RESULT_BYTES_PER_ITEM
    if num_shards <= topo.gpus_per_host:
        return INTRA_HOST_HOP_S + merge_bytes / topo.intra_host_bw
    return INTRA_HOST_HOP_S + NETWORK_HOP_S + merge_bytes / topo.inter_host_bw


def scan_seconds(profile: MachineProfile, scan: ScanTerms) -> float:
    """The mechanism model's scan + probe seconds for one batch (one thread when it runs serially)."""
    work = (scan.lists * profile.list_s + scan.direct * profile.direct_s + scan.dequant * profile.dequant_s
            + scan.group * profile.group_s)
    if scan.pair_items < SERIAL_ITEMS:  # the fused scan keeps small batches on the calling thread
        work *= max(1, profile.threads)
    return work + scan.probe * profile.probe_s


def cold_seconds(profile: MachineProfile, cold: ColdTerms) -> float:
    """The mechanism model's mapped-tier seconds for one batch: faults, disk bytes, mapped bytes;
    with MADV_RANDOM (``cold.advice == "random"``) one measured single-page fault cost per fault."""
    if cold.advice == "random":
        if profile.random_fault_s <= 0:
            from sterling.planner import errors

            raise errors.InvalidPlanConfigError(
                "the machine profile has no single-page fault cost (random_fault_s = 0: measured before "
                "MADV_RANDOM was priced); re-measure it with `sterling plan --calibrate --profile PATH`")
        return cold.faults * profile.random_fault_s
    touch_bw = profile.mmap_touch_bw if profile.mmap_touch_bw > 0 else profile.page_cache_bw
    return cold.faults * profile.fault_s + cold.bytes_read / profile.mmap_cold_bw + cold.bytes_touched / touch_bw


def _mechanism_cost(*, topo, cfg, placements, shard_fraction, num_shards, replicas, profile, scan, cold):
    b = cfg.batch
    per_tier: dict[str, float] = {t.value: 0.0 for t in MemoryTier}
    for p in placements:
        per_tier[p.tier.value] += p.bytes_per_query * b
    if scan is None:  # uniform lists
        nl = max(1, round(cfg.resolved_nlist * shard_fraction))
        scan = scan_terms(np.full(nl, cfg.n_cap * shard_fraction / nl),
                          np.full(nl, min(1.0, cfg.nprobe / cfg.resolved_nlist)), b)
    if cold is not None:
        memory_s = cold_seconds(profile, cold)
    else:
        memory_s = per_tier[MemoryTier.MMAP.value] / profile.mmap_cold_bw
    ops = batch_compute_ops(cfg, shard_fraction)
    dev = topo.device
    compute_s = scan_seconds(profile, scan) + ops["fp16"] / (dev.fp16_flops * COMPUTE_EFFICIENCY)
    return _estimate(topo, cfg, per_tier, profile.overhead_s, memory_s, compute_s, num_shards, replicas)


def _estimate(topo, cfg, per_tier, overhead, memory_s, compute_s, num_shards, replicas) -> CostEstimate:
    b = cfg.batch
    merge_s = _merge_s(topo, cfg, num_shards)
    busy_s = overhead + memory_s + compute_s
    latency_s = busy_s + merge_s
    qps_replica = b / busy_s * TARGET_UTILIZATION
    gpus = num_shards * replicas
    qps_total = qps_replica * replicas
    return CostEstimate(
        batch=b,
        memory_s=memory_s,
        compute_s=compute_s,
        merge_s=merge_s,
        bytes_per_tier=per_tier,
        latency_ms=latency_s * 1e3,
        p99_ms=latency_s * 1e3 * P99_OVER_SERVICE,
        qps_per_replica=qps_replica,
        qps_total=qps_total,
        gpus=gpus,
        gpu_hours_per_hour=float(gpus),
        gpu_hours_per_million_queries=(gpus / (qps_total * 3600.0) * 1e6) if qps_total else math.inf,
    )
