"""Actor layouts (which plan host runs each shard replica): pure, no Ray."""

from __future__ import annotations

import pytest

from sterling.cluster.ray_backend import default_layout, layout_from_plan
from sterling.model.errors import InvalidInputError


@pytest.mark.parametrize("shards, replicas, hosts", [(4, 1, 2), (4, 2, 2), (3, 3, 4), (2, 2, 8), (1, 1, 1)])
def test_default_layout_puts_replicas_of_a_shard_on_different_hosts(shards, replicas, hosts):
    lay = default_layout(shards, replicas, hosts)
    assert len(lay.hosts) == shards and lay.replicas == [replicas] * shards
    assert lay.num_hosts == min(hosts, shards * replicas)
    for hs in lay.hosts:
        assert all(0 <= h < lay.num_hosts for h in hs)
        if replicas <= lay.num_hosts:
            assert len(set(hs)) == replicas
    used = {h for hs in lay.hosts for h in hs}
    assert used == set(range(lay.num_hosts))  # every bundle of the placement group gets an actor


class _A:
    def __init__(self, shard, replica, host):
        self.shard, self.replica, self.host = shard, replica, host


class _P:
    def __init__(self, num_shards, replicas, assignments):
        self.num_shards, self.replicas, self.assignments = num_shards, replicas, assignments


def test_plan_layout_renumbers_hosts_and_checks_replicas():
    plan = _P(2, 2, [_A(0, 0, 3), _A(0, 1, 7), _A(1, 0, 7), _A(1, 1, 3)])
    lay = layout_from_plan(plan, 2)
    assert lay.hosts == ((0, 1), (1, 0)) and lay.num_hosts == 2
    with pytest.raises(InvalidInputError):
        layout_from_plan(plan, 3)  # manifest has another shard count
    with pytest.raises(InvalidInputError):
        layout_from_plan(_P(2, 2, [_A(0, 0, 0), _A(1, 0, 0), _A(1, 1, 1)]), 2)  # shard 0 lacks replica 1
