"""`launch ray` checks on a real Ray cluster: more CPUs asked than the cluster has fails at once."""

from __future__ import annotations

import time

import pytest

from sterling.cluster.errors import ClusterConfigError
from sterling.cluster.ray_backend import RayBackend


def test_more_shard_cpus_than_the_cluster_has_fails_fast_with_fixes_that_apply(ray_cluster, shards4):
    t0 = time.monotonic()
    with pytest.raises(ClusterConfigError) as e:  # 2 nodes × 4 CPUs; 4 actors × 3 CPUs = 2 bundles of 6
        RayBackend.launch(shards4, replicas=1, cpus_per_actor=3.0, ready_timeout_s=300)
    assert time.monotonic() - t0 < 10  # not the 300 s placement timeout
    msg = str(e.value)
    assert "--cpus-per-shard 2" in msg and "--num-cpus" not in msg  # an existing cluster: no local Ray to resize
    import ray

    assert not [pg for pg in ray.util.placement_group_table().values() if pg["state"] == "PENDING"]
