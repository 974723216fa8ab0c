"""Reading and writing plan.json (atomic: temp file in the same folder + ``os.replace``)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from sterling.planner.types import Plan

__all__ = ["save_plan", "load_plan"]


def save_plan(plan: Plan, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(plan.to_json())
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def load_plan(path: str | Path) -> Plan:
    return Plan.from_json(Path(path).read_text(encoding="utf-8"))
