"""Placement: scale up, then out, then document-shard, then replicate.

The order (SilverTorch §5.3, and the issue):

1. **Scale up.** On one device, fill the fastest tier first by bytes touched
   per query per byte stored (``TensorSpec.density``): centroids and small
   hot tensors into SRAM where they fit, the scan path (codes, scales, Bloom,
   alive) into HBM, the cold tail (tensors read only for the K0 survivors:
   ids, exact attributes, embedding cache) into whatever HBM is left, then
   host DRAM over PCIe / NVLink-C2C, then remote DRAM. Dense towers,
   OverArch and centroids are replicated on every device.
2. **Scale out.** When the scan path does not fit one device, or the p99
   target is missed, or a few more shards on the same host serve the QPS
   target with fewer GPUs, split the catalog over the host's GPUs.
3. **Document-shard** across hosts when one host's GPUs are not enough.
4. **Replicate** the whole shard set until the QPS target is met.

Shards are contiguous ranges of whole IVF lists; with only a config the lists
are assumed equal-sized (the cluster code balances real lists by bytes).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass

from sterling.planner import errors
from sterling.planner.cost import cold_seconds, estimate_cost
from sterling.planner.cpu_cost import ADVICE, ColdTerms, cold_terms, scan_terms
from sterling.planner.inventory import IndexModelConfig, inventory_from_config
from sterling.planner.tiers import (
    COLD_WINDOW_BYTES,
    ListStats,
    TierSplit,
    scan_scratch_bytes,
    slow_reads_per_batch,
    split_lists,
    split_placements,
)
from sterling.planner.types import (
    TIER_ORDER,
    AccessPattern,
    CostEstimate,
    Decision,
    DeviceAssignment,
    DeviceKind,
    DevicePlan,
    MemoryTier,
    Placement,
    Plan,
    ShardSpec,
    SparseTablePlacement,
    Storage,
    TensorRole,
    TensorSpec,
    Topology,
    ceil_div,
)

__all__ = ["PlanTargets", "place_on_device", "plan", "fmt_bytes"]


@dataclass(frozen=True, kw_only=True, slots=True)
class PlanTargets:
    """Service-level targets. ``qps=None`` plans one replica; ``p99_ms=None``
    ignores latency. ``allow_scan_spill`` lets the scan path live in host DRAM
    (UVM-style) instead of forcing more GPUs."""

    qps: float | None = None
    p99_ms: float | None = 100.0
    allow_scan_spill: bool = False

    def __post_init__(self) -> None:
        if self.qps is not None and self.qps <= 0:
            raise errors.InvalidPlanConfigError(f"qps ({self.qps}) must be > 0")
        if self.p99_ms is not None and self.p99_ms <= 0:
            raise errors.InvalidPlanConfigError(f"p99_ms ({self.p99_ms}) must be > 0")


def fmt_bytes(n: float) -> str:
    """Decimal units, as the datasheets: 74.5 GB, 12.8 MB."""
    for unit, scale in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{int(n)} B"


def _allowed_tiers(spec: TensorSpec, kind: DeviceKind, allow_scan_spill: bool) -> tuple[MemoryTier, ...]:
    if kind is DeviceKind.CPU:
        if spec.access is AccessPattern.GATHERED:
            return (MemoryTier.DRAM, MemoryTier.REMOTE)
        return (MemoryTier.DRAM,)
    if spec.role is TensorRole.REPLICATED:
        return (MemoryTier.SRAM, MemoryTier.HBM)
    if spec.scan_path and not allow_scan_spill:
        return (MemoryTier.SRAM, MemoryTier.HBM)
    return TIER_ORDER


def _shard_spec(spec: TensorSpec, fraction: float) -> TensorSpec:
    """The part of ``spec`` one shard holds (``fraction`` of the catalog)."""
    if spec.role is not TensorRole.SHARDED or fraction == 1.0:
        return spec
    nbytes = int(math.ceil(spec.nbytes * fraction))
    if spec.access is AccessPattern.PROBED and spec.name != "list_offsets":
        bpq = spec.bytes_per_query * fraction
    else:
        bpq = spec.bytes_per_query  # each shard still gathers its own K0 survivors
    return TensorSpec(
        name=spec.name, nbytes=nbytes, bytes_per_query=bpq, access=spec.access,
        role=spec.role, scan_path=spec.scan_path, shape=spec.shape, dtype=spec.dtype,
    )


def place_on_device(
    specs: Sequence[TensorSpec],
    capacity: Storage,
    *,
    kind: DeviceKind,
    allow_scan_spill: bool = False,
) -> tuple[tuple[Placement, ...], dict[str, int]]:
    """Greedy fractional knapsack by density over the tiers, fastest first.

    Sharded tensors may split across tiers (uniform access: any slice of the
    lists is as hot as any other); replicated weights are placed whole.
    Returns the placements and, per tensor, the bytes that fit nowhere.
    """
    free = {t: capacity.get(t) for t in TIER_ORDER}
    placements: list[Placement] = []
    overflow: dict[str, int] = {}
    order = sorted(
        (s for s in specs if s.role is not TensorRole.SPARSE),
        key=lambda s: (-s.density, s.name),
    )
    # Tensors that may only live in the device tiers (scan path, weights) keep their
    # room: a denser cold-tail tensor never takes the bytes they will need.
    device_tiers = (
        (MemoryTier.DRAM,) if kind is DeviceKind.CPU else (MemoryTier.SRAM, MemoryTier.HBM)
    )

    def device_only(spec: TensorSpec) -> bool:
        return all(t in device_tiers for t in _allowed_tiers(spec, kind, allow_scan_spill))

    must_left = sum(s.nbytes for s in order if device_only(s))
    for spec in order:
        left = spec.nbytes
        must = device_only(spec)
        tiers = _allowed_tiers(spec, kind, allow_scan_spill)
        splittable = spec.role is TensorRole.SHARDED
        for tier in tiers:
            if left == 0:
                break
            room = free[tier]
            if not must and tier in device_tiers:
                spare = sum(free[t] for t in device_tiers) - must_left
                room = max(0, min(room, spare))
            take = min(left, room) if splittable else (left if left <= room else 0)
            if take <= 0:
                continue
            placements.append(Placement(
                name=spec.name, tier=tier, nbytes=take,
                bytes_per_query=spec.bytes_per_query * take / spec.nbytes if spec.nbytes else 0.0,
            ))
            free[tier] -= take
            left -= take
        if must:
            must_left -= spec.nbytes
        if left:
            overflow[spec.name] = left
    return tuple(placements), overflow


def _storage_of(placements: Sequence[Placement]) -> Storage:
    total = Storage()
    for p in placements:
        total = total + Storage.of(p.tier, p.nbytes)
    return total


@dataclass(frozen=True, slots=True)
class _Eval:
    num_shards: int
    placements: tuple[Placement, ...]
    overflow: dict[str, int]
    cost: CostEstimate
    split: TierSplit | None = None


def _list_ranges(nlist: int, num_shards: int) -> list[tuple[int, int]]:
    return [(s * nlist // num_shards, (s + 1) * nlist // num_shards) for s in range(num_shards)]


class _Planner:
    def __init__(
        self,
        cfg: IndexModelConfig,
        topo: Topology,
        targets: PlanTargets,
        inventory: tuple[TensorSpec, ...],
        list_stats: ListStats | None = None,
    ) -> None:
        self.list_stats = list_stats if topo.device.kind is DeviceKind.CPU else None
        self.cfg = cfg
        self.topo = topo
        self.targets = targets
        self.inventory = inventory
        self.nlist = cfg.resolved_nlist
        self.capacity = topo.capacity_per_device()
        self.cold_window = COLD_WINDOW_BYTES
        self.force_fast = None
        self.force_advice = None
        self.profile = None
        self._cache: dict[tuple[int, int, int], _Eval] = {}

    def evaluate(self, num_shards: int, lists: int | None = None, replicas: int = 1,
                 start: int = 0) -> _Eval:
        """Placement and cost for the largest shard when split ``num_shards`` ways
        (lists ``[start, start + lists)`` when the real lists are known)."""
        if lists is None:
            lists = ceil_div(self.nlist, num_shards)
        key = (num_shards, lists, start)
        if replicas == 1 and key in self._cache:
            return self._cache[key]
        fraction = lists / self.nlist
        specs = [_shard_spec(s, fraction) for s in self.inventory]
        split = None
        if self.list_stats is not None:
            placements, overflow, split = self._place_split(specs, self.list_stats.subset(start, start + lists))
        else:
            placements, overflow = place_on_device(
                specs, self._capacity_for(specs, num_shards), kind=self.topo.device.kind,
                allow_scan_spill=self.targets.allow_scan_spill,
            )
        slow_reads = 0.0
        items_per_query = None
        scan = cold = None
        if split is not None:
            sub = self.list_stats.subset(start, start + lists)
            k0 = min(self.cfg.k0, self.cfg.items)
            slow_reads = slow_reads_per_batch(split, sub, batch=self.cfg.batch, k=k0)
            if "scales" in sub.bytes_by_tensor:  # probe-weighted items per query (4 bytes of scale an item)
                items = sub.bytes_by_tensor["scales"] / 4.0
                items_per_query = float(sub.probe_freq @ items)
                if self.profile is not None and self.profile.model >= 2:
                    scan = scan_terms(items, sub.probe_freq, self.cfg.batch)
                    cold = self._cold(sub, split)
                    if cold is not None:
                        split = dataclasses.replace(split, slow_advice=cold.advice)
        cost = estimate_cost(
            topo=self.topo, cfg=self.cfg, placements=placements,
            shard_fraction=fraction, num_shards=num_shards, replicas=replicas, slow_reads=slow_reads,
            profile=self.profile, items_per_query=items_per_query, scan=scan, cold=cold,
        )
        ev = _Eval(num_shards, placements, overflow, cost, split)
        if replicas == 1:
            self._cache[key] = ev
        return ev

    def _cold(self, sub: ListStats, split: TierSplit) -> ColdTerms | None:
        """The slow tier's simulated cold reads under the imposed fault advice, or under the cheaper
        of read-around and MADV_RANDOM when the profile measured both."""
        k0 = min(self.cfg.k0, self.cfg.items)
        pr = self.profile
        choices = [self.force_advice] if self.force_advice is not None else (
            ["normal", "random"] if pr.random_fault_s > 0 else ["normal"])
        best, best_s = None, math.inf
        for advice in choices:
            ct = cold_terms(sub, split.fast, batch=self.cfg.batch, k=k0, before=pr.readaround_before,
                            after=pr.readaround_after, cold_window=split.cold_window, advice=advice)
            if ct is None:
                return None
            sec = cold_seconds(pr, ct)
            if sec < best_s:
                best, best_s = ct, sec
        return best

    def _place_split(self, specs: Sequence[TensorSpec], stats: ListStats):
        """CPU host with real lists: the other tensors stay in DRAM, per-item tensors split by list."""
        per_item = set(stats.bytes_by_tensor)
        others = [s for s in specs if s.name not in per_item and s.role is not TensorRole.SPARSE]
        placements, overflow = place_on_device(others, self.capacity, kind=DeviceKind.CPU)
        used = sum(p.nbytes for p in placements if p.tier is MemoryTier.DRAM)
        scratch = 0
        if "scales" in stats.bytes_by_tensor:  # the scan's kept score buffers (4 bytes of scale an item)
            items = float(stats.probe_freq @ (stats.bytes_by_tensor["scales"] / 4.0))
            scratch = scan_scratch_bytes(items, batch=self.cfg.batch, nprobe=self.cfg.nprobe)
        budget = self.capacity.dram - used - self.cold_window - scratch
        split = split_lists(stats, budget, fast=self.force_fast, cold_window=self.cold_window)
        placements = split_placements(split, stats, k0=min(self.cfg.k0, self.cfg.items), batch=self.cfg.batch,
                                      other=placements)
        slow = sum(p.bytes_per_query for p in placements if p.tier is split.slow_tier) * self.cfg.batch
        split = dataclasses.replace(split, batch_slow_bytes=int(math.ceil(slow)), scan_scratch=scratch)
        return placements, overflow, split

    def _capacity_for(self, specs: Sequence[TensorSpec], num_shards: int) -> Storage:
        """Per-device capacity left for the index: sparse user tables (planned later by
        TorchRec, one rank per shard) get HBM before the index's cold tail, never
        before the scan path and the replicated weights."""
        sparse = sum(s.nbytes for s in specs if s.role is TensorRole.SPARSE)
        if not sparse or self.topo.device.kind is DeviceKind.CPU:
            return self.capacity
        must = sum(
            s.nbytes for s in specs
            if s.role is TensorRole.REPLICATED or (s.role is TensorRole.SHARDED and s.scan_path)
        )
        reserve = max(0, min(ceil_div(sparse, num_shards), self.capacity.hbm - must))
        return self.capacity - Storage(hbm=reserve)

    def device_bytes(self, *, replicated: bool, scan: bool) -> int:
        kind = self.topo.device.kind
        total = 0
        for s in self.inventory:
            if s.role is TensorRole.REPLICATED and replicated:
                total += s.nbytes
            elif s.role is TensorRole.SHARDED and scan and (s.scan_path or kind is DeviceKind.CPU):
                if kind is DeviceKind.CPU and s.access is AccessPattern.GATHERED:
                    continue
                total += s.nbytes
        return total

    def meets_latency(self, ev: _Eval) -> bool:
        return self.targets.p99_ms is None or ev.cost.p99_ms <= self.targets.p99_ms

    def hosts_for(self, num_shards: int, replicas: int) -> int:
        g = self.topo.gpus_per_host
        if num_shards <= g:
            return ceil_div(replicas, g // num_shards)
        return ceil_div(num_shards * replicas, g)


def _device_capacity_bytes(topo: Topology) -> int:
    cap = topo.capacity_per_device()
    if topo.device.kind is DeviceKind.CPU:
        return cap.dram
    return cap.sram + cap.hbm


def plan(
    cfg: IndexModelConfig,
    topo: Topology,
    targets: PlanTargets | None = None,
    *,
    inventory: tuple[TensorSpec, ...] | None = None,
    plan_sparse: bool = True,
    list_stats: ListStats | None = None,
    cold_window: int = COLD_WINDOW_BYTES,
    list_fast=None,
    profile=None,
    slow_advice: str | None = None,
) -> Plan:
    """Plan a deployment of ``cfg`` on at most ``topo.hosts`` hosts.

    Pure: no devices, no process group. Raises ``InfeasiblePlanError`` with the
    numbers and numbered remedies when nothing fits. ``list_stats`` (the real
    IVF lists of an artifact) lets a CPU host keep the lists queries probe
    most in DRAM and serve the rest from the memory-mapped artifact
    (``planner/tiers.py``) instead of adding hosts; ``cold_window`` is the
    slow-tier bytes a serving process keeps mapped at a time; ``list_fast``
    ([nlist] bool) imposes a split instead of choosing one (to predict a
    given layout, e.g. all lists fast or all slow). ``profile`` (a
    ``planner.profile.MachineProfile``) replaces the CPU cost constants with
    rates measured on the serving host; with a mechanism profile the plan
    also picks how the slow tier is read (``tiers["slow_advice"]``: the
    kernel's read-around, or ``random`` — ``MADV_RANDOM``, one page a
    fault — when the profile predicts that cheaper); ``slow_advice`` imposes
    one instead.

    Example:
        >>> from sterling.planner import IndexModelConfig, make_topology, plan
        >>> p = plan(IndexModelConfig(items=100_000_000, dim=128), make_topology("h100-80g"))
        >>> p.num_shards, p.replicas
        (1, 1)
    """
    targets = targets or PlanTargets()
    inventory = inventory if inventory is not None else inventory_from_config(cfg)
    pl = _Planner(cfg, topo, targets, inventory, list_stats)
    pl.cold_window = int(cold_window)
    pl.force_fast = list_fast
    if slow_advice is not None and slow_advice not in ADVICE:
        raise errors.InvalidPlanConfigError(f"slow_advice {slow_advice!r} is not one of {ADVICE}")
    if slow_advice == "random" and (profile is None or profile.model < 2):
        raise errors.InvalidPlanConfigError(
            "slow_advice='random' (MADV_RANDOM) is priced only with a machine profile of the mechanism model; "
            "measure one with `sterling plan --calibrate --profile PATH` and pass it")
    pl.force_advice = slow_advice
    pl.profile = profile
    g = topo.gpus_per_host
    world = topo.world_size
    nlist = pl.nlist
    dev = topo.device
    unit = "GPU" if dev.kind is DeviceKind.GPU else "process"
    mem_name = "HBM" if dev.kind is DeviceKind.GPU else "host DRAM"
    decisions: list[Decision] = []

    replicated = pl.device_bytes(replicated=True, scan=False)
    on_device = pl.device_bytes(replicated=False, scan=True)
    cap = _device_capacity_bytes(topo)
    usable_note = f"{fmt_bytes(cap)} usable"
    if replicated >= cap:
        raise errors.InfeasiblePlanError(
            f"replicated weights (towers, OverArch, centroids: {fmt_bytes(replicated)}) do not "
            f"fit one {dev.name} ({usable_note})",
            reason="memory", needed=replicated, available=cap,
            remedies=[
                "use a device with more memory (--gpu h200-141g)",
                f"fewer IVF lists (--nlist; centroids take {fmt_bytes(cfg.resolved_nlist * cfg.dim * 4)})",
                "smaller towers / OverArch (--tower-params, --overarch-params)",
            ],
        )
    # (a) scale up: does one device hold it?
    s_mem = max(1, ceil_div(on_device, cap - replicated))
    ev1 = pl.evaluate(1)
    if not ev1.overflow:
        tiers = _tier_summary(ev1.placements)
        decisions.append(Decision(
            step="up",
            message=f"scale up: one {dev.name} holds the model ({tiers})",
        ))
    else:
        names = _scan_names(inventory)
        decisions.append(Decision(
            step="up",
            message=(
                f"scale up: {names} need {fmt_bytes(on_device + replicated)} on one {unit} "
                f"> {usable_note} in {mem_name} (best single-{unit} layout: "
                f"{_tier_summary(ev1.placements)})"
            ),
        ))
    if ev1.split is not None:
        sp = ev1.split
        slow = int((~sp.fast).sum())
        lb = pl.list_stats.list_bytes
        hot_share = float(pl.list_stats.probe_freq[sp.fast].sum() / max(pl.list_stats.probe_freq.sum(), 1e-300))
        decisions.append(Decision(
            step="up",
            message=(
                f"tiers by probe frequency: {int(sp.fast.sum())} hottest lists ({fmt_bytes(int(lb[sp.fast].sum()))}, "
                f"{hot_share:.0%} of probes) resident in DRAM, {slow} lists "
                f"({fmt_bytes(int(lb[~sp.fast].sum()))}) served from the memory-mapped artifact"
                + (" (MADV_RANDOM: a cold fault reads its own page, predicted cheaper here than the "
                   "kernel's read-around)" if sp.slow_advice == "random" else "")
                + f"; predicted resident {fmt_bytes(sp.resident_bytes)}"
            ) if slow else f"tiers by probe frequency: all {pl.nlist} lists fit DRAM (resident {fmt_bytes(sp.resident_bytes)})",
        ))
    # (b, c) smallest shard count that fits memory and meets latency
    s = max(1, s_mem if ev1.overflow else 1)
    s_limit = min(world, nlist)
    last_fail = "memory"
    chosen: _Eval | None = None
    while s <= s_limit:
        ev = pl.evaluate(s)
        if ev.overflow:
            last_fail = "memory"
        elif not pl.meets_latency(ev):
            last_fail = "latency"
        else:
            chosen = ev
            break
        # jump ahead by memory bound when overflowing, else step
        s += 1
    if chosen is None:
        raise _infeasible(pl, last_fail, s_limit, on_device, replicated, cap)
    s_min = chosen.num_shards
    if s_min > 1:
        reason = (
            f"{_scan_names(inventory)} exceed 1 {unit} {mem_name} "
            f"({fmt_bytes(on_device + replicated)} > {usable_note})"
            if ev1.overflow
            else f"1 shard predicts p99 {ev1.cost.p99_ms:.1f} ms > {targets.p99_ms:g} ms target"
        )
        decisions.append(Decision(
            step="out",
            message=f"{reason} → scale out to {min(s_min, g)} {unit}s",
        ))
    # QPS: more shards per replica (on the host, or until the cold tail fits HBM)
    # may serve the target with fewer GPUs than more replicas of the smallest layout.
    best = chosen
    best_r = _replicas_for(targets.qps, chosen.cost.qps_per_replica)
    if targets.qps is not None:
        upper = max(s_min, min(g, s_limit))
        if _off_device(chosen.placements):
            s_hbm = s_min
            while s_hbm < s_limit and _off_device(pl.evaluate(s_hbm).placements):
                s_hbm += 1
            upper = max(upper, s_hbm)
        for s2 in range(s_min + 1, upper + 1):
            ev = pl.evaluate(s2)
            if ev.overflow or not pl.meets_latency(ev):
                continue
            r2 = _replicas_for(targets.qps, ev.cost.qps_per_replica)
            if s2 * r2 < best.num_shards * best_r:
                best, best_r = ev, r2
        if best.num_shards != s_min:
            r1 = _replicas_for(targets.qps, chosen.cost.qps_per_replica)
            spill = _off_device(chosen.placements)
            why = (
                f" (cold tail {fmt_bytes(spill)} read from host DRAM)"
                if spill and not _off_device(best.placements)
                else ""
            )
            decisions.append(Decision(
                step="out",
                message=(
                    f"{s_min} shard(s) serve {chosen.cost.qps_per_replica:,.0f} QPS per replica"
                    f"{why}: {r1} replicas = {s_min * r1} {unit}s for {targets.qps:,.0f} QPS; "
                    f"{best.num_shards} shards serve {best.cost.qps_per_replica:,.0f}: "
                    f"{best.num_shards * best_r} {unit}s → scale out to "
                    f"{min(best.num_shards, g)} {unit}s"
                ),
            ))
    num_shards = best.num_shards
    replicas = best_r
    if num_shards > g:
        hpr = ceil_div(num_shards, g)
        decisions.append(Decision(
            step="shard",
            message=(
                f"{num_shards} shards > {g} {unit}s per host → document-shard across {hpr} hosts "
                f"per replica (~{nlist // num_shards} IVF lists, "
                f"{fmt_bytes(_storage_of(best.placements).total)} per shard)"
            ),
        ))
    hosts_used = pl.hosts_for(num_shards, replicas)
    if replicas > 1:
        decisions.append(Decision(
            step="replicate",
            message=(
                f"one replica serves {best.cost.qps_per_replica:,.0f} QPS < {targets.qps:,.0f} target "
                f"→ {replicas} replicas ({num_shards * replicas} {unit}s on {hosts_used} hosts)"
            ),
        ))
    if hosts_used > topo.hosts:
        need = hosts_used
        raise errors.InfeasiblePlanError(
            f"{targets.qps:,.0f} QPS needs {replicas} replicas × {num_shards} shards = "
            f"{num_shards * replicas} {unit}s on {need} hosts > --max-hosts {topo.hosts}",
            reason="qps", needed=need, available=topo.hosts,
            remedies=[
                f"more hosts (--max-hosts {need})",
                f"lower QPS target (one host set serves ~{best.cost.qps_per_replica * (topo.hosts * g // num_shards):,.0f})",
                f"smaller K0 (--k0 {max(1, cfg.k0 // 2)}) or fewer probes (--nprobe {max(1, cfg.nprobe // 2)})",
                "fewer bits per code (--bits 4)",
            ],
        )
    ranges = _list_ranges(nlist, num_shards)
    shards: list[ShardSpec] = []
    devices: list[DevicePlan] = []
    for i, (a, b) in enumerate(ranges):
        frac = (b - a) / nlist
        shards.append(ShardSpec(
            shard=i, list_start=a, list_end=b, fraction=frac, items=round(cfg.items * frac),
        ))
        ev = pl.evaluate(num_shards, lists=b - a, start=a if pl.list_stats is not None else 0)
        devices.append(DevicePlan(shard=i, storage=_storage_of(ev.placements), placements=ev.placements,
                                  tiers=None if ev.split is None else {**ev.split.to_dict(), "list_start": a}))
    assignments = _assign(num_shards, replicas, g)
    final = pl.evaluate(num_shards, replicas=replicas)
    sparse_tables: tuple[SparseTablePlacement, ...] = ()
    sparse_stats: tuple[str, ...] = ()
    sparse_specs = [t for t in inventory if t.role is TensorRole.SPARSE]
    if sparse_specs and plan_sparse:
        from sterling.planner.torchrec_bridge import plan_sparse_tables

        result = plan_sparse_tables(
            cfg.sparse_tables, topo=topo, devices=devices, batch=cfg.batch,
        )
        sparse_tables, sparse_stats = result.tables, result.stats
        devices = list(result.devices)
        decisions.append(Decision(step="sparse", message=result.summary))
    targets_d: dict[str, float] = {}
    if targets.qps is not None:
        targets_d["qps"] = float(targets.qps)
    if targets.p99_ms is not None:
        targets_d["p99_ms"] = float(targets.p99_ms)
    targets_d["max_hosts"] = float(topo.hosts)
    return Plan(
        items=cfg.items,
        dim=cfg.dim,
        nlist=nlist,
        nprobe=cfg.nprobe,
        k0=cfg.k0,
        batch=cfg.batch,
        code_bits=cfg.code_bits,
        topology=topo,
        num_shards=num_shards,
        replicas=replicas,
        hosts_used=hosts_used,
        shards=tuple(shards),
        assignments=tuple(assignments),
        devices=tuple(devices),
        inventory=inventory,
        decisions=tuple(decisions),
        cost=final.cost,
        sparse_tables=sparse_tables,
        sparse_stats=sparse_stats,
        targets=targets_d,
    )


def _replicas_for(qps: float | None, qps_per_replica: float) -> int:
    if qps is None:
        return 1
    return max(1, math.ceil(qps / qps_per_replica))


def _assign(num_shards: int, replicas: int, g: int) -> list[DeviceAssignment]:
    out = []
    if num_shards <= g:
        per_host = g // num_shards
        for r in range(replicas):
            host, slot = divmod(r, per_host)
            for s in range(num_shards):
                out.append(DeviceAssignment(shard=s, replica=r, host=host, gpu=slot * num_shards + s))
    else:
        for r in range(replicas):
            for s in range(num_shards):
                host, gpu = divmod(r * num_shards + s, g)
                out.append(DeviceAssignment(shard=s, replica=r, host=host, gpu=gpu))
    return out


def _off_device(placements: Sequence[Placement]) -> int:
    """Bytes a GPU shard keeps in host or remote DRAM."""
    return sum(p.nbytes for p in placements if p.tier in (MemoryTier.DRAM, MemoryTier.REMOTE))


def _scan_names(inventory: Sequence[TensorSpec]) -> str:
    names = [s.name for s in sorted(inventory, key=lambda s: -s.nbytes) if s.scan_path][:3]
    return "+".join(names) if names else "index"


def _tier_summary(placements: Sequence[Placement]) -> str:
    by_tier: dict[MemoryTier, list[str]] = {}
    sizes: dict[MemoryTier, int] = {}
    for p in placements:
        by_tier.setdefault(p.tier, []).append(p.name)
        sizes[p.tier] = sizes.get(p.tier, 0) + p.nbytes
    parts = []
    for t in TIER_ORDER:
        if t in by_tier:
            names = ", ".join(dict.fromkeys(by_tier[t]))
            parts.append(f"{t.value}: {names} = {fmt_bytes(sizes[t])}")
    return "; ".join(parts)


def _infeasible(
    pl: _Planner, reason: str, s_limit: int, on_device: int, replicated: int, cap: int
) -> errors.InfeasiblePlanError:
    cfg, topo = pl.cfg, pl.topo
    g = topo.gpus_per_host
    per_shard = cap - replicated
    shards_needed = ceil_div(on_device, per_shard)
    hosts_needed = ceil_div(shards_needed, g)
    if reason == "memory" and s_limit == pl.nlist and shards_needed <= topo.world_size:
        return errors.InfeasiblePlanError(
            f"{shards_needed} shards are needed but the index has only {pl.nlist} IVF lists "
            "(shards are whole lists)",
            reason="nlist", needed=shards_needed, available=pl.nlist,
            remedies=[f"more IVF lists (--nlist {shards_needed * 4})"],
        )
    if reason == "memory":
        smaller_dim = max(8, cfg.dim // 2)
        return errors.InfeasiblePlanError(
            f"the index needs {fmt_bytes(on_device)} of device memory plus "
            f"{fmt_bytes(replicated)} replicated per device: {shards_needed} {topo.device.name} "
            f"({hosts_needed} hosts × {g}) but --max-hosts allows {topo.hosts} "
            f"({topo.world_size} devices, {fmt_bytes(topo.world_size * per_shard)} for the index)",
            reason="memory", needed=on_device, available=topo.world_size * per_shard,
            remedies=[
                f"more hosts (--max-hosts {hosts_needed})",
                f"lower dim (--dim {smaller_dim} halves the codes)",
                "fewer bits per code (--bits 4 halves the codes)"
                if cfg.code_bits > 4 else "a device with more memory (--gpu h200-141g)",
                f"smaller K0 (--k0 {max(1, cfg.k0 // 2)}) and fewer attributes per item shrink "
                "the cold tail",
                "let the scan path spill to host DRAM (--allow-spill), slower",
            ],
        )
    ev = pl.evaluate(s_limit)
    return errors.InfeasiblePlanError(
        f"even {s_limit} shards predict p99 {ev.cost.p99_ms:.1f} ms > "
        f"{pl.targets.p99_ms:g} ms target",
        reason="latency", needed=ev.cost.p99_ms, available=pl.targets.p99_ms or 0.0,
        remedies=[
            f"fewer probes (--nprobe {max(1, cfg.nprobe // 2)})",
            f"smaller K0 (--k0 {max(1, cfg.k0 // 2)})",
            f"smaller batches (--batch {max(1, cfg.batch // 2)})",
            f"more hosts (--max-hosts {topo.hosts * 2})",
            "a looser latency target (--p99-ms)",
        ],
    )
