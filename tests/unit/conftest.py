"""Unit tests never start Ray or open sockets to a cluster."""

import pytest


@pytest.fixture(autouse=True)
def _no_ray(monkeypatch):
    try:
        import ray
    except ImportError:
        return

    def refuse(*a, **k):
        raise RuntimeError("unit tests must not start Ray; put this test in tests/cluster/")

    monkeypatch.setattr(ray, "init", refuse)
