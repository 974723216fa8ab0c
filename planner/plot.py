"""``--plot``: stacked bars of memory per device per tier (matplotlib, lazy import)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from sterling.planner.types import TIER_ORDER, Plan

__all__ = ["plot_plan", "MAX_BARS"]

MAX_BARS: int = 64
_COLORS = {"sram": "#2a9d8f", "hbm": "#264653", "dram": "#e9c46a", "remote": "#e76f51", "mmap": "#8d99ae"}


def plot_plan(plan: Plan, path: str | Path) -> Path:
    """Write the chart atomically (temp file in the same folder, then ``os.replace``)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    devices = plan.devices[:MAX_BARS]
    labels = [f"s{d.shard}" for d in devices]
    split = devices[0].tiers if devices and devices[0].tiers else None
    if split is None:
        fig, ax = plt.subplots(figsize=(max(6.0, 0.35 * len(devices) + 2), 4.5))
    else:
        fig, (ax, ax_lists) = plt.subplots(1, 2, figsize=(max(6.0, 0.35 * len(devices) + 2) + 7, 4.5),
                                           gridspec_kw={"width_ratios": [1, 2]})
        _plot_lists(ax_lists, split)
    bottom = [0.0] * len(devices)
    for tier in TIER_ORDER:
        vals = [d.storage.get(tier) / 1e9 for d in devices]
        if any(vals):
            ax.bar(labels, vals, bottom=bottom, label=tier.value, color=_COLORS[tier.value])
            bottom = [b + v for b, v in zip(bottom, vals, strict=True)]
    dev = plan.topology.device
    if dev.usable_hbm:
        ax.axhline(dev.usable_hbm / 1e9, color="grey", linestyle="--", linewidth=1,
                   label=f"usable HBM ({dev.usable_hbm / 1e9:.0f} GB)")
    shown = "" if plan.num_shards <= MAX_BARS else f" (first {MAX_BARS} of {plan.num_shards})"
    ax.set_title(
        f"{plan.items:,} × {plan.dim}-d on {dev.name}: {plan.num_shards} shards{shown} "
        f"× {plan.replicas} replicas"
    )
    ax.set_ylabel("GB per device")
    ax.set_xlabel("document shard (each replica holds the same)")
    ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize="small")
    if len(devices) > 16:
        ax.tick_params(axis="x", labelrotation=90, labelsize="x-small")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=path.suffix or ".png",
                               dir=path.parent)
    os.close(fd)
    try:
        fig.savefig(tmp, format=(path.suffix.lstrip(".") or "png"))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    finally:
        plt.close(fig)
    return path


def _plot_lists(ax, split: dict) -> None:
    """Shard 0's lists, hottest first: bytes per list coloured by tier, and the probes they take."""
    fast = [c == "1" for c in split["fast"]]
    ranges = split["ranges"]
    per_list_freq = list(split.get("probe_freq") or [])
    per_list_bytes = list(split.get("list_bytes") or [])
    if len(per_list_freq) != len(fast) or len(per_list_bytes) != len(fast):
        per_list_freq, per_list_bytes = [0.0] * len(fast), [0.0] * len(fast)
        for r in ranges:  # only range totals known: spread them evenly over their lists
            n = max(1, r["end"] - r["start"])
            for lst in range(r["start"], r["end"]):
                per_list_freq[lst] = r["probes_per_query"] / n
                per_list_bytes[lst] = r["nbytes"] / n
    order = sorted(range(len(fast)), key=lambda i: (-per_list_freq[i], i))
    xs = list(range(len(order)))
    colors = [_COLORS[split["fast_tier"]] if fast[i] else _COLORS[split["slow_tier"]] for i in order]
    ax.bar(xs, [per_list_bytes[i] / 1e6 for i in order], width=1.0, color=colors)
    ax.set_xlabel("IVF list, by expected probes per query (hottest first)")
    ax.set_ylabel("MB per list")
    total = sum(per_list_freq) or 1.0
    cum, acc = [], 0.0
    for i in order:
        acc += per_list_freq[i]
        cum.append(acc / total)
    ax2 = ax.twinx()
    ax2.plot(xs, cum, color="black", linewidth=1)
    ax2.set_ylabel("share of probes (cumulative)")
    ax2.set_ylim(0, 1.05)
    ax.set_title(f"tiers: {split['fast_lists']} lists in {split['fast_tier']}, "
                 f"{split['slow_lists']} in {split['slow_tier']} (resident {split['resident_bytes'] / 1e6:.1f} MB)")
