"""Update log, snapshots and recovery: torn and corrupt logs, interrupted snapshots, SIGKILL."""

from __future__ import annotations

import logging
import os
import queue
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from sterling.kernels import quantize_int8
from sterling.model import IndexConfig, RetrievalModel, build_index
from sterling.model.errors import VersionTimeoutError
from sterling.model.live import LiveModel
from sterling.model.wal import LogRecord, RecordKind, UpdateLog
from tests import crash_harness

ROOT = Path(__file__).resolve().parents[2]


def _rec(seq, n=3, dim=4):
    rng = np.random.default_rng(seq)
    return LogRecord(RecordKind.UPSERT, seq, np.arange(n) + 10 * seq, rng.standard_normal((n, dim)).astype(np.float32),
                     [["a:b"]] * n)


def _same(a: LogRecord, b: LogRecord) -> bool:
    return (a.kind, a.seq, a.meta) == (b.kind, b.seq, b.meta) and np.array_equal(a.ids, b.ids) and np.array_equal(
        a.vectors, b.vectors)


def test_log_round_trip_and_a_torn_tail_at_every_byte_is_cut_back(tmp_path, caplog):
    wal = UpdateLog.open(tmp_path)
    recs = [_rec(s) for s in (1, 2, 3)]
    for r in recs:
        wal.append(r)
    wal.sync(3)
    wal.close()
    seg = wal.segments()[0][1]
    full = seg.read_bytes()
    last = len(recs[2].encode())
    got = list(UpdateLog.open(tmp_path).replay())
    assert len(got) == 3 and all(_same(a, b) for a, b in zip(got, recs))
    for cut in range(len(full) - last, len(full)):  # kill inside the last record, at every byte
        seg.write_bytes(full[:cut])
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="sterling.wal"):
            wal = UpdateLog.open(tmp_path)
        got = list(wal.replay())
        assert [r.seq for r in got] == [1, 2]
        assert (cut == len(full) - last) or "recovered up to sequence 2" in caplog.text
        wal.append(recs[2])  # the log continues right after the last good record
        wal.sync(3)
        wal.close()
        assert seg.read_bytes() == full


def test_a_record_failing_its_checksum_is_never_applied(tmp_path, caplog):
    wal = UpdateLog.open(tmp_path)
    for s in (1, 2, 3):
        wal.append(_rec(s))
    wal.sync(3)
    wal.close()
    seg = wal.segments()[0][1]
    data = bytearray(seg.read_bytes())
    data[len(_rec(1).encode()) + 20] ^= 0x40  # one flipped bit inside record 2
    seg.write_bytes(bytes(data))
    with caplog.at_level(logging.WARNING, logger="sterling.wal"):
        got = list(UpdateLog.open(tmp_path).replay())
    assert [r.seq for r in got] == [1]
    assert "fails its checksum" in caplog.text


D = crash_harness.D


def _base(tmp_path, n=600, slack=0.1) -> Path:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, D, generator=g)
    rng = random.Random(0)
    attrs = [sorted(rng.sample(crash_harness.TERMS, rng.randint(0, 2))) for _ in range(n)]
    path = tmp_path / "base.st"
    RetrievalModel(build_index(x, attributes=attrs, config=IndexConfig(nlist=8, list_slack=slack))).save(path)
    return path


def _catalog_of(base: Path) -> dict:
    index = RetrievalModel.load(base).index
    out = {}
    for p in (index.item_ids >= 0).nonzero().squeeze(1).tolist():
        s, e = int(index.attr_offsets[p]), int(index.attr_offsets[p + 1])
        out[int(index.item_ids[p])] = (index.codes[p].clone(), float(index.scales[p]),
                                       {index.vocab[t] for t in index.attr_ids[s:e].tolist() if t >= 0})
    return out


def _replay(catalog: dict, seed: int, upto: int) -> dict:
    """The plain-dict oracle: the catalog after batches 1..upto of the crash stream."""
    cat = dict(catalog)
    for seq in range(1, upto + 1):
        b = crash_harness.batch(seed, seq)
        if b[0] == "delete":
            for i in b[1]:
                cat.pop(i, None)
        else:
            codes, scales = quantize_int8(b[2])
            for j, i in enumerate(b[1]):
                cat[i] = (codes[j], float(scales[j]), set(b[3][j]))
    return cat


def _assert_holds(index, cat: dict) -> None:
    got = _catalog_of_index(index)
    assert sorted(got) == sorted(cat)
    for i, (codes, scale, terms) in cat.items():
        c, s, t = got[i]
        assert torch.equal(c, codes) and s == scale and t == terms, i


def _catalog_of_index(index) -> dict:
    out = {}
    offs, aids, vocab = index.attr_offsets.tolist(), index.attr_ids.tolist(), index.vocab
    for p in (index.item_ids >= 0).nonzero().squeeze(1).tolist():
        out[int(index.item_ids[p])] = (index.codes[p], float(index.scales[p]),
                                       {vocab[t] for t in aids[offs[p] : offs[p + 1]] if t >= 0})
    return out


def test_recovery_replays_the_log_onto_the_latest_snapshot_and_truncates_covered_log(tmp_path):
    base = _base(tmp_path)
    d = tmp_path / "data"
    live = LiveModel.open(base, LiveModel.Config(data_dir=d, snapshot_every=7))
    for seq in range(1, 31):
        b = crash_harness.batch(3, seq)
        v = live.delete(b[1]) if b[0] == "delete" else live.upsert(b[1], b[2], b[3])
        assert v == 1 + seq  # version = build version + batches applied
    live.close()
    snaps = sorted(d.glob("snapshot-*.st"))
    assert [p.name for p in snaps] == [f"snapshot-{28:020d}.st"]
    assert [p.name for p in sorted(d.glob("wal-*.log"))] == [f"wal-{29:020d}.log"]
    again = LiveModel.open(base, LiveModel.Config(data_dir=d))
    assert again.applied_seq == 30 and again.version == 31
    _assert_holds(again.model.index, _replay(_catalog_of(base), 3, 30))
    # an interrupted snapshot leaves only a temp file: recovery deletes it and ignores it
    (d / f"snapshot-{40:020d}.st.tmp-abc").write_bytes(b"STERLNG\0partial")
    again.close()
    third = LiveModel.open(base, LiveModel.Config(data_dir=d))
    assert not list(d.glob("*.tmp-*")) and third.applied_seq == 30
    with pytest.raises(VersionTimeoutError):
        third(query=torch.randn(1, D), k=5, min_version=32, timeout=0.05)
    assert third(query=torch.randn(1, D), k=5, min_version=31).version == 31


def test_writer_killed_at_random_points_loses_no_acknowledged_batch(tmp_path):
    """SIGKILL a writer ≥ 20 times (mid-batch, between log fsync and apply, mid-snapshot)."""
    rounds = int(os.environ.get("STERLING_CRASH_ROUNDS", "20"))
    seed = 11
    base = _base(tmp_path)
    d = tmp_path / "data"
    start = _catalog_of(base)
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.crash_harness", str(base), str(d), str(seed)],
        cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1,
    )
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(target=lambda: [lines.put(x.strip()) for x in proc.stdout], daemon=True).start()
    rng = random.Random(seed)

    def expect(prefix: str, timeout: float = 60.0) -> str:
        end = time.monotonic() + timeout
        while True:
            line = lines.get(timeout=max(0.01, end - time.monotonic()))
            if line.startswith(prefix):
                return line
            if line.startswith("ACK"):
                acked[0] = max(acked[0], int(line.split()[1]))

    mid_snapshot = 0
    try:
        for _ in range(rounds):
            acked = [0]
            proc.stdin.write("round\n")
            proc.stdin.flush()
            pid = int(expect("PID").split()[1])
            recovered_at = int(expect("READY").split()[1])
            time.sleep(rng.uniform(0.0, 0.4))
            os.kill(pid, signal.SIGKILL)
            mid_snapshot += bool(list(d.glob("*.tmp-*")))
            expect("DONE")  # every ACK the child printed comes before this line
            live = LiveModel.open(base, LiveModel.Config(data_dir=d))
            assert live.applied_seq >= max(acked[0], recovered_at)
            _assert_holds(live.model.index, _replay(start, seed, live.applied_seq))
            live.close()
    finally:
        proc.stdin.close()
        proc.wait(timeout=30)
    print(f"crash test: {rounds} kills, {mid_snapshot} during a snapshot")
