"""Human-readable plan: rich tables and one line per decision."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table

from sterling.planner.placement import fmt_bytes
from sterling.planner.types import TIER_ORDER, Plan

__all__ = ["render_plan", "MAX_SHARD_ROWS"]

MAX_SHARD_ROWS: int = 16


def _hosts_of(plan: Plan, shard: int) -> str:
    hosts = sorted({a.host for a in plan.assignments if a.shard == shard})
    if len(hosts) <= 4:
        return ",".join(str(h) for h in hosts)
    return f"{hosts[0]}…{hosts[-1]} ({len(hosts)})"


def render_plan(plan: Plan, console: Console | None = None) -> None:
    """Print the plan: summary, inventory, per-device memory, decisions, cost."""
    console = console or Console()
    topo = plan.topology
    dev = topo.device
    console.print(
        f"[bold]Sterling plan[/bold]  {plan.items:,} items × {plan.dim}-d, int{plan.code_bits} "
        f"codes, nlist {plan.nlist:,}, nprobe {plan.nprobe}, K0 {plan.k0:,}, batch {plan.batch}  "
        f"on {dev.name} × {topo.gpus_per_host}/host (≤ {topo.hosts} hosts)"
    )

    inv = Table(title="Tensor inventory (whole catalog)", title_justify="left")
    for col in ("tensor", "shape", "dtype", "bytes", "bytes/query", "access", "placement"):
        inv.add_column(col, justify="right" if col.startswith("bytes") else "left")
    for t in plan.inventory:
        inv.add_row(
            t.name, "×".join(str(x) for x in t.shape), t.dtype, fmt_bytes(t.nbytes),
            fmt_bytes(t.bytes_per_query), t.access.value, t.role.value,
        )
    console.print(inv)

    unit = "GPU" if dev.kind.value == "gpu" else "process"
    devs = Table(
        title=f"Per {unit} (every replica of a shard holds the same)", title_justify="left"
    )
    for col in ("shard", "IVF lists", "items", *(t.value for t in TIER_ORDER), "replicas", "hosts"):
        devs.add_column(col, justify="right")
    for d, s in list(zip(plan.devices, plan.shards, strict=True))[:MAX_SHARD_ROWS]:
        devs.add_row(
            str(s.shard), f"{s.list_start}–{s.list_end}", f"{s.items:,}",
            *(fmt_bytes(d.storage.get(t)) for t in TIER_ORDER),
            str(plan.replicas), _hosts_of(plan, s.shard),
        )
    if plan.num_shards > MAX_SHARD_ROWS:
        devs.add_row(f"… {plan.num_shards - MAX_SHARD_ROWS} more", *[""] * (4 + len(TIER_ORDER)))
    console.print(devs)

    if plan.sparse_tables:
        sp = Table(title="Sparse user tables", title_justify="left")
        for col in ("table", "planner", "sharding", "kernel", "ranks", "hbm", "dram"):
            sp.add_column(col)
        for t in plan.sparse_tables:
            sp.add_row(
                t.name, t.planner, t.sharding_type, t.compute_kernel,
                ",".join(map(str, t.ranks)), fmt_bytes(t.tiers.get("hbm", 0)),
                fmt_bytes(t.tiers.get("dram", 0)),
            )
        console.print(sp)
    if plan.sparse_stats:
        console.print("[bold]TorchRec planner stats[/bold]")
        for line in plan.sparse_stats:
            console.print(line, markup=False, highlight=False)

    console.print("[bold]Decisions[/bold]")
    for i, d in enumerate(plan.decisions, 1):
        console.print(f"  {i}. [{d.step}] {d.message}", markup=False, highlight=False)

    c = plan.cost
    cost = Table(title="Predicted cost", title_justify="left")
    for col in ("latency/batch", "p99", "QPS/replica", "QPS total", f"{unit}s", "hosts",
                f"{unit}-h per 1M queries"):
        cost.add_column(col, justify="right")
    cost.add_row(
        f"{c.latency_ms:.2f} ms", f"{c.p99_ms:.2f} ms", f"{c.qps_per_replica:,.0f}",
        f"{c.qps_total:,.0f}", str(c.gpus), str(plan.hosts_used),
        f"{c.gpu_hours_per_million_queries:.3f}",
    )
    console.print(cost)
    per_tier = ", ".join(
        f"{k} {fmt_bytes(v)}" for k, v in c.bytes_per_tier.items() if v
    )
    console.print(
        f"per batch on one shard: memory {c.memory_s * 1e3:.3f} ms ({per_tier}), "
        f"compute {c.compute_s * 1e3:.3f} ms, merge {c.merge_s * 1e3:.3f} ms",
        markup=False, highlight=False,
    )
