"""Append-only update log: length-prefixed, checksummed records in numbered segments.

Record layout (little endian)::

    length   u32   bytes of the payload
    crc      u32   crc32 of the payload
    payload        kind u8 · seq u64 · n u32 · dim u32 · meta_len u32 · meta (JSON)
                   · ids int64[n] · vectors fp32[n · dim]

``kind`` is ``upsert`` (ids, vectors, meta = attribute lists or null),
``delete`` (ids) or ``attributes`` (ids, meta = attribute lists). ``seq`` is
the batch's sequence number: 1, 2, 3, … with no gaps across segments.

``upsert_features`` (a learned model's upsert: the item tower embeds the
items, so the record carries the tower's inputs, ``ItemInputs``, not a
vector) has ``dim`` = the dense feature width, ``vectors`` = the dense
features, and after them the sparse part::

                   · lengths int32[len(keys) · n] · values int64[sum(lengths)]

with ``meta = {"format": 1, "keys": [...], "nvalues": V, "attributes": ...}``.
A record of an unknown ``format`` raises ``CorruptLogError`` (written by a
newer Sterling) instead of being misread.

Segments are files ``wal-<first seq, 20 digits>.log`` in one directory; a new
segment starts at every snapshot, and segments whose records a snapshot
covers are deleted. Group commit: ``append`` only writes (to the page cache);
``sync(seq)`` makes every record up to ``seq`` durable with one ``fsync``
shared by all the writers waiting at that moment.

Reading stops at the first record that is short or fails its checksum: such
a record was never acknowledged (its writer died before the fsync returned)
or the file was damaged; it and everything after it are dropped — logged at
WARNING with the file and byte offset — and ``open`` truncates the file there
so new records follow the last good one.
"""

from __future__ import annotations

import json
import logging
import os
import struct
import threading
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from enum import IntEnum
from pathlib import Path

import numpy as np

from sterling.model.data import ItemInputs
from sterling.model.errors import CorruptLogError

__all__ = ["LogRecord", "RecordKind", "UpdateLog"]

log = logging.getLogger("sterling.wal")

_FRAME = struct.Struct("<II")  # length, crc
_HEAD = struct.Struct("<BQIII")  # kind, seq, n, dim, meta length
_MAX_RECORD = 1 << 31
FEATURES_FORMAT = 1  # layout version of ``upsert_features`` records


class RecordKind(IntEnum):
    UPSERT = 1
    DELETE = 2
    ATTRIBUTES = 3
    UPSERT_FEATURES = 4


@dataclass(frozen=True, slots=True)
class LogRecord:
    """One logged batch.

    Attributes:
        kind: what the batch does.
        seq: its sequence number.
        ids: [n] int64 external ids.
        vectors: [n, dim] fp32 (upserts; the dense item features of
            ``upsert_features``; [n, 0] otherwise).
        meta: JSON value (attribute lists, or None; an ``upsert_features``
            record's attribute lists too — its format fields are added on disk).
        features: the item tower's inputs (``upsert_features`` only).
    """

    kind: RecordKind
    seq: int
    ids: np.ndarray
    vectors: np.ndarray
    meta: object = None
    features: ItemInputs | None = None

    def encode(self) -> bytes:
        ids = np.ascontiguousarray(self.ids, dtype="<i8")
        f = self.features
        if (self.kind is RecordKind.UPSERT_FEATURES) != (f is not None):
            raise ValueError(f"a {self.kind.name} record {'needs' if f is None else 'takes no'} item features")
        tail: list[bytes] = []
        meta_obj = self.meta
        if f is not None:
            if f.lengths.shape != (len(f.keys), ids.size):
                raise ValueError(f"item features have lengths {f.lengths.shape} for {len(f.keys)} keys × {ids.size} ids")
            meta_obj = {"format": FEATURES_FORMAT, "keys": list(f.keys), "nvalues": int(f.values.size),
                        "attributes": self.meta}
            vec = np.ascontiguousarray(f.dense, dtype="<f4").reshape(ids.size, -1)
            tail = [np.ascontiguousarray(f.lengths, dtype="<i4").tobytes(),
                    np.ascontiguousarray(f.values, dtype="<i8").tobytes()]
        else:
            vec = np.ascontiguousarray(self.vectors, dtype="<f4")
        n, dim = (vec.shape[0], vec.shape[1]) if vec.ndim == 2 else (ids.size, 0)
        meta = json.dumps(meta_obj, separators=(",", ":")).encode()
        payload = b"".join([_HEAD.pack(int(self.kind), self.seq, ids.size, dim, len(meta)), meta,
                            ids.tobytes(), vec.tobytes(), *tail])
        if n != ids.size:
            raise ValueError(f"record has {ids.size} ids but {n} vectors")
        return _FRAME.pack(len(payload), zlib.crc32(payload)) + payload

    @classmethod
    def decode(cls, payload: bytes) -> LogRecord:
        kind, seq, n, dim, mlen = _HEAD.unpack_from(payload)
        p = _HEAD.size
        meta = json.loads(payload[p : p + mlen])
        p += mlen
        ids = np.frombuffer(payload, dtype="<i8", count=n, offset=p).astype(np.int64)
        p += 8 * n
        vec = np.frombuffer(payload, dtype="<f4", count=n * dim, offset=p).astype(np.float32).reshape(n, dim)
        p += 4 * n * dim
        try:
            kind = RecordKind(kind)
        except ValueError as e:
            raise CorruptLogError(f"update log record {seq} has kind {kind}, unknown to this Sterling; "
                                  "recover this data directory with the Sterling version that wrote it") from e
        if kind is not RecordKind.UPSERT_FEATURES:
            return cls(kind, seq, ids, vec, meta)
        if not isinstance(meta, dict) or meta.get("format") != FEATURES_FORMAT:
            got = meta.get("format") if isinstance(meta, dict) else meta
            raise CorruptLogError(f"update log record {seq} holds item features in format {got!r}; this Sterling "
                                  f"reads format {FEATURES_FORMAT}. Recover with the Sterling version that wrote it")
        keys = tuple(meta["keys"])
        lengths = np.frombuffer(payload, dtype="<i4", count=len(keys) * n, offset=p).astype(np.int32)
        p += 4 * len(keys) * n
        values = np.frombuffer(payload, dtype="<i8", count=int(meta["nvalues"]), offset=p).astype(np.int64)
        feats = ItemInputs(keys=keys, lengths=lengths.reshape(len(keys), n), values=values, dense=vec)
        return cls(kind, seq, ids, np.zeros((n, 0), np.float32), meta["attributes"], feats)


def _segment_name(first_seq: int) -> str:
    return f"wal-{first_seq:020d}.log"


def _scan(path: Path) -> tuple[list[tuple[int, bytes]], int, str | None]:
    """(records as (offset, payload), end of the last good record, why reading stopped early)."""
    data = path.read_bytes()
    out, off = [], 0
    while off < len(data):
        if len(data) - off < _FRAME.size:
            return out, off, f"a torn record header ({len(data) - off} bytes)"
        length, crc = _FRAME.unpack_from(data, off)
        end = off + _FRAME.size + length
        if length < _HEAD.size or length > _MAX_RECORD or end > len(data):
            return out, off, f"a torn record (length {length}, {len(data) - off - _FRAME.size} bytes present)"
        payload = data[off + _FRAME.size : end]
        if zlib.crc32(payload) != crc:
            return out, off, "a record that fails its checksum"
        out.append((off, payload))
        off = end
    return out, off, None


class UpdateLog:
    """The update log of one data directory.

    Example:
        >>> wal = UpdateLog.open(Path("data"))
        >>> for rec in wal.replay(after=snapshot_seq): apply(rec)
        >>> wal.append(LogRecord(RecordKind.DELETE, wal.next_seq, ids, np.zeros((len(ids), 0))))
        >>> wal.sync(seq)  # durable once this returns
    """

    def __init__(self, directory: Path, *, fsync: bool = True) -> None:
        self.directory = Path(directory)
        self.fsync = fsync
        self._lock = threading.Lock()  # appends and rotation
        self._cv = threading.Condition()  # durability
        self._appended = 0
        self._durable = 0
        self._syncing = False
        self._fd: int | None = None
        self._records: list[LogRecord] = []

    @classmethod
    def open(cls, directory: str | Path, *, fsync: bool = True) -> UpdateLog:
        """Read every good record, cut the log after the last one, and open it for appends."""
        self = cls(Path(directory), fsync=fsync)
        self.directory.mkdir(parents=True, exist_ok=True)
        segments = self.segments()
        expect = None
        for i, (_first, path) in enumerate(segments):
            records, good_end, why = _scan(path)
            stop = why is not None
            for off, payload in records:
                rec = LogRecord.decode(payload)
                if expect is not None and rec.seq != expect:
                    why, stop, good_end = f"sequence {rec.seq} where {expect} was expected", True, off
                    break
                self._records.append(rec)
                expect = rec.seq + 1
            if stop:
                log.warning(
                    "update log %s: stopped at byte %d on %s; recovered up to sequence %d, "
                    "dropping the rest of the log", path, good_end, why, expect - 1 if expect else 0,
                )
                with open(path, "r+b") as f:
                    f.truncate(good_end)
                    os.fsync(f.fileno())
                for _, later in segments[i + 1 :]:
                    later.unlink()
                break
        last = self._records[-1].seq if self._records else (segments[-1][0] - 1 if segments else 0)
        self._appended = self._durable = last
        tail = self.segments()
        path = tail[-1][1] if tail else self.directory / _segment_name(last + 1)
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        _fsync_dir(self.directory)
        return self

    def segments(self) -> list[tuple[int, Path]]:
        """(first seq, path) of every segment, oldest first."""
        out = []
        for p in self.directory.glob("wal-*.log"):
            try:
                out.append((int(p.stem[4:]), p))
            except ValueError:
                continue
        return sorted(out)

    def replay(self, *, after: int = 0) -> Iterator[LogRecord]:
        """Records read at ``open`` with ``seq > after``, in order (then forgotten)."""
        records, self._records = self._records, []
        if records and records[0].seq > after + 1:
            raise CorruptLogError(
                f"update log in {self.directory} starts at sequence {records[0].seq} but the snapshot "
                f"covers only up to {after}; records {after + 1}..{records[0].seq - 1} are missing. "
                "Restore the data directory from a backup, or start from a fresh one"
            )
        for rec in records:
            if rec.seq > after:
                yield rec

    @property
    def last_seq(self) -> int:
        return self._appended

    def append(self, record: LogRecord) -> None:
        """Write one record (not yet durable). ``record.seq`` must be ``last_seq + 1``."""
        frame = record.encode()
        with self._lock:
            if record.seq != self._appended + 1:
                raise CorruptLogError(f"record {record.seq} appended after {self._appended}; sequence numbers are consecutive")
            view = memoryview(frame)
            while view:
                view = view[os.write(self._fd, view) :]
            self._appended = record.seq

    def sync(self, seq: int) -> None:
        """Return once every record up to ``seq`` is on disk (one fsync for all waiting writers)."""
        with self._cv:
            while self._durable < seq:
                if self._syncing:
                    self._cv.wait()
                    continue
                self._syncing = True
                with self._lock:
                    target, fd = self._appended, self._fd
                self._cv.release()
                try:
                    if self.fsync:
                        os.fsync(fd)
                finally:
                    self._cv.acquire()
                    self._syncing = False
                    self._durable = max(self._durable, target)
                    self._cv.notify_all()

    def rotate(self) -> int:
        """Start a new segment after every record so far; returns the last seq of the old ones."""
        with self._cv:
            while self._syncing:
                self._cv.wait()
            with self._lock:
                last = self._appended
                if self.fsync:
                    os.fsync(self._fd)
                os.close(self._fd)
                self._fd = os.open(self.directory / _segment_name(last + 1), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
                self._durable = max(self._durable, last)
            _fsync_dir(self.directory)
            return last

    def truncate(self, covered: int) -> int:
        """Delete segments whose every record has ``seq ≤ covered``; returns how many."""
        segs = self.segments()
        n = 0
        for (_, path), (nxt, _) in zip(segs[:-1], segs[1:]):
            if nxt - 1 <= covered:
                path.unlink()
                n += 1
        if n:
            _fsync_dir(self.directory)
        return n

    def close(self) -> None:
        with self._lock:
            if self._fd is not None:
                if self.fsync:
                    os.fsync(self._fd)
                os.close(self._fd)
                self._fd = None


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
