"""``--plot``: stacked bars of memory per device per tier (matplotlib, lazy import)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from sterling.planner.types import TIER_ORDER, Plan

__all__ = ["plot_plan", "MAX_BARS"]

MAX_BARS: int = 64
_COLORS = {"sram": "#2a9d8f", "hbm": "#264653", "dram": "#e9c46a", "remote": "#e76f51"}


def plot_plan(plan: Plan, path: str | Path) -> Path:
    """Write the chart atomically (temp file in the same folder, then ``os.replace``)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    devices = plan.devices[:MAX_BARS]
    labels = [f"s{d.shard}" for d in devices]
    fig, ax = plt.subplots(figsize=(max(6.0, 0.35 * len(devices) + 2), 4.5))
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
