"""Disk full during a snapshot: a typed error, no temp file, and recovery still has every acknowledged batch.

A child process writes batches to a ``LiveModel``, takes one good snapshot,
then lowers ``RLIMIT_FSIZE`` below the snapshot's size (log segments still
fit) and keeps writing: an explicit ``snapshot()`` must raise
``SnapshotError``, automatic snapshots (``snapshot_every=1``) must not fail
the batches that triggered them, and the child then dies without closing.
The parent recovers the directory and compares it with an in-memory
``LiveModel`` given the same acknowledged batches (the oracle).
"""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import torch

from sterling.benchmarks.evaluation import assert_same_topk
from sterling.model import IndexConfig, RetrievalModel, build_index
from sterling.model.live import LiveModel

D, N, NLIST = 16, 4000, 16
LIMIT = 48 * 1024

_CHILD = """
import os, resource, signal, sys
import numpy as np
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
from sterling.model.errors import SnapshotError
from sterling.model.live import LiveModel
base, data, batches, limit = sys.argv[1], sys.argv[2], np.load(sys.argv[3]), int(sys.argv[4])
live = LiveModel.open(base, LiveModel.Config(data_dir=data))
def write(b):
    ids = batches[f"ids{b}"]
    if f"x{b}" in batches:
        live.upsert(ids, batches[f"x{b}"])
    else:
        live.delete(ids)
    print("ACK", b, flush=True)
n = int(batches["n"])
for b in range(n // 3):
    write(b)
live.snapshot()
resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
for b in range(n // 3, 2 * n // 3):
    write(b)
try:
    live.snapshot()
    print("SNAPSHOT SAVED", flush=True)
except SnapshotError as e:
    print("TYPED", type(e).__name__, flush=True)
live.config.snapshot_every = 1
for b in range(2 * n // 3, n):
    write(b)
os._exit(0)
"""


def _batches(n: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(11)
    out: dict[str, np.ndarray] = {"n": np.array(n)}
    for b in range(n):
        if b % 4 == 3:  # deletes of base items and of items upserted earlier
            out[f"ids{b}"] = np.concatenate([rng.choice(N, 5, replace=False), N + rng.choice(10 * b, 3, replace=False)])
        else:
            out[f"ids{b}"] = np.arange(N + 10 * b, N + 10 * (b + 1))
            out[f"x{b}"] = rng.standard_normal((10, D)).astype(np.float32)
    return out


def test_snapshot_on_a_full_disk_fails_typed_and_recovery_keeps_every_acknowledged_batch(tmp_path):
    g = torch.Generator().manual_seed(2)
    base = tmp_path / "m.st"
    RetrievalModel(build_index(torch.randn(N, D, generator=g), config=IndexConfig(nlist=NLIST))).save(base)
    assert base.stat().st_size > 2 * LIMIT  # the snapshot cannot fit under the limit
    batches = _batches(18)
    np.savez(tmp_path / "b.npz", **batches)
    data = tmp_path / "data"
    r = subprocess.run([sys.executable, "-c", _CHILD, str(base), str(data), str(tmp_path / "b.npz"), str(LIMIT)],
                       capture_output=True, text=True, timeout=300)
    acked = [int(line.split()[1]) for line in r.stdout.splitlines() if line.startswith("ACK")]
    assert r.returncode == 0, r.stderr[-2000:]
    assert acked == list(range(18)), r.stdout
    assert "TYPED SnapshotError" in r.stdout
    assert "automatic snapshot failed" in r.stderr  # logged, not raised into the batch
    assert not [p.name for p in data.iterdir() if ".tmp-" in p.name]
    assert len(list(data.glob("snapshot-*.st"))) == 1  # the good one is kept

    oracle = LiveModel.open(RetrievalModel.load(base))
    for b in acked:
        ids = batches[f"ids{b}"]
        oracle.upsert(ids, batches[f"x{b}"]) if f"x{b}" in batches else oracle.delete(ids)
    got = LiveModel.open(base, LiveModel.Config(data_dir=data))
    try:
        assert got.version == oracle.version and got.index.num_items == oracle.index.num_items
        every = list(range(N + 10 * 18))
        assert got.holding(every) == oracle.holding(every)
        xq = torch.from_numpy(np.random.default_rng(4).standard_normal((8, D)).astype(np.float32))
        a = got(query=xq, k=50, nprobe=NLIST)
        b = oracle(query=xq, k=50, nprobe=NLIST)
        assert_same_topk(a.ids.numpy(), a.scores.numpy(), b.ids.numpy(), b.scores.numpy(), atol=1e-5)
    finally:
        got.close()
