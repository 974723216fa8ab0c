"""Matplotlib helpers shared by the benchmarks' ``--plot`` flags (lazy import; PNG written whole or not at all)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

__all__ = ["pyplot", "save", "plot_recall_qps"]


def pyplot(bench: str):
    """``matplotlib.pyplot`` on the Agg backend, or None (said on stderr) when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"bench {bench}: matplotlib is not installed; no plot written", file=sys.stderr)
        return None
    return plt


def save(fig, path: str | Path, *, dpi: int = 120) -> Path:
    """Write ``fig`` as a PNG at ``path`` through a temporary file and a rename; close it."""
    import matplotlib.pyplot as plt

    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.stem + ".tmp.png")
    fig.savefig(tmp, dpi=dpi)
    plt.close(fig)
    os.replace(tmp, out)
    return out


def plot_recall_qps(rows: list[dict], path: str | Path, *, title: str = "") -> Path | None:
    """Recall@k vs QPS over the nprobe sweep of ``bench ann``'s unfiltered rows, every system of the run.

    One curve per system (Sterling, Faiss IVF-SQ8, Faiss IVF-Flat), one point
    per nprobe, labelled with it. Returns None when there are no unfiltered
    rows or no matplotlib.
    """
    rows = sorted((r for r in rows if r.get("case") == "unfiltered"), key=lambda r: r["nprobe"])
    if not rows:
        print("bench ann: no unfiltered rows (add `unfiltered` to --parts); no plot written", file=sys.stderr)
        return None
    plt = pyplot("ann")
    if plt is None:
        return None
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    for key, label in (("sterling", "Sterling int8 IVF"), ("faiss_sq8", "Faiss IVF-SQ8"),
                       ("faiss_flat", "Faiss IVF-Flat")):
        if f"{key}_qps" not in rows[0]:
            continue
        xs, ys = [r[f"recall_{key}"] for r in rows], [r[f"{key}_qps"] for r in rows]
        ax.plot(xs, ys, marker="o", label=label)
        if key == "sterling":
            for r, x, y in zip(rows, xs, ys):
                ax.annotate(f"nprobe {r['nprobe']}", (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
    ax.set_yscale("log")
    ax.set_xlabel(f"recall@{rows[0]['k']} vs exact")
    ax.set_ylabel(f"QPS (batch {rows[0]['batch']}, log)")
    r0 = rows[0]
    ax.set_title(title or f"{r0['items']:,} × {r0['dim']}, nlist {r0['nlist']}, {r0['threads']} threads, "
                 "same run", fontsize=9)
    ax.grid(True, which="both", linewidth=0.3)
    ax.legend()
    fig.tight_layout()
    return save(fig, path)
