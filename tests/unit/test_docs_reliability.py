"""docs/reliability.md: every test its matrix links to exists (so each row points at a test that runs)."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DOC = ROOT / "docs" / "reliability.md"


def _links() -> list[tuple[str, str]]:
    text = DOC.read_text()
    pairs = re.findall(r"\[`(test_\w+)`\]\((\.\./tests/[\w/]+\.py)\)", text)
    for names, path in re.findall(r"((?:`test_\w+`(?:, )?)+) in \[tests/[\w/.]+\]\((\.\./tests/[\w/]+\.py)\)", text):
        pairs += [(n, path) for n in re.findall(r"`(test_\w+)`", names)]
    return pairs


def test_every_linked_test_exists():
    pairs = _links()
    assert len(pairs) >= 60
    missing = []
    for name, rel in pairs:
        f = (DOC.parent / rel).resolve()
        if not f.is_file() or not re.search(rf"^def {name}\(", f.read_text(), re.M):
            missing.append(f"{rel}::{name}")
    assert missing == []


def test_docs_and_readme_stand_alone():
    """No link or path into a design folder outside the repository, in any file a user gets
    (README, docs, code comments and the strings the planner prints, Makefile, requirements)."""
    files = [ROOT / "README.md", ROOT / "Makefile", ROOT / "pyproject.toml", *sorted((ROOT / "docs").glob("*.md")),
             *sorted((ROOT / "requirements").glob("*.txt"))]
    for pkg in ("cluster", "kernels", "launch", "model", "planner", "sharding", "tests"):
        files += sorted((ROOT / pkg).rglob("*.py"))
    bad = [str(f.relative_to(ROOT)) for f in files
           if f != Path(__file__).resolve() and ("../shared" in (t := f.read_text()) or "DESIGN.md" in t)]
    assert bad == []


def test_grafana_dashboard_queries_only_metrics_the_server_exports():
    import json

    from sterling.cluster.metrics import ServerMetrics

    dash = json.loads((ROOT / "docs" / "grafana-dashboard.json").read_text())
    exported = {m.name for m in ServerMetrics().registry.collect()}
    used = set()
    for p in dash["panels"]:
        for t in p["targets"]:
            used |= set(re.findall(r"\b(sterling_\w+?)(?:_bucket|_total)?\b", t["expr"]))
    assert used and used <= exported | {n.removesuffix("_total") for n in exported}, used - exported
    assert all(p["gridPos"]["w"] > 0 for p in dash["panels"]) and dash["title"]
