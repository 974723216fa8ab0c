"""Parquet inputs of the learned model: interactions, users, items (docs/data.md).

* interactions: ``user_id:int64``, ``item_id:int64``, optional
  ``timestamp:int64``, and one float column per task (every other column).
* users / items: the id column plus feature columns. ``int64``, ``string``,
  ``list<int64>`` and ``list<string>`` columns are *sparse* (one embedding
  table each, vocabulary built at training time with hashed out-of-vocabulary
  buckets); ``float32`` and fixed-length ``list<float32>`` are *dense*. A
  users column ``history`` (``list<int64>``) holds item ids and uses the item
  id vocabulary. An items column ``attributes`` (``list<string>``) holds the
  ``feature:value`` filter terms of the index.

Every malformed file raises ``DataError`` naming the file, the column, the
first bad row and the fix. Sparse columns are held as CSR (flat values +
``[N + 1]`` offsets) so that a batch of rows becomes a ``KeyedJaggedTensor``
without Python loops.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from sterling.model.errors import InvalidInputError

__all__ = [
    "DataError",
    "Interactions",
    "FeatureTable",
    "ItemInputs",
    "Vocab",
    "read_interactions",
    "read_features",
    "read_feature_batches",
    "check_references",
    "csr_take",
    "write_parquet",
]

ID_COLUMNS = ("user_id", "item_id")
RESERVED = ("user_id", "item_id", "timestamp")


class DataError(InvalidInputError):
    """An input file that does not follow the documented layout (docs/data.md)."""


@dataclass(slots=True)
class Interactions:
    """One row per (user, item) record; ``tasks[name]`` is a float32 [N] label column."""

    user_id: np.ndarray  # [N] int64
    item_id: np.ndarray  # [N] int64
    timestamp: np.ndarray | None  # [N] int64
    tasks: dict[str, np.ndarray]  # name → [N] float32
    path: str = ""

    def __len__(self) -> int:
        return int(self.user_id.shape[0])

    def take(self, rows: np.ndarray) -> Interactions:
        return Interactions(
            self.user_id[rows],
            self.item_id[rows],
            None if self.timestamp is None else self.timestamp[rows],
            {t: v[rows] for t, v in self.tasks.items()},
            self.path,
        )


@dataclass(slots=True)
class FeatureTable:
    """A users or items table: ids, sparse CSR columns (raw values), dense columns, attributes."""

    ids: np.ndarray  # [N] int64
    sparse: dict[str, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)  # name → (values, offsets [N+1])
    dense: dict[str, np.ndarray] = field(default_factory=dict)  # name → [N, d] float32
    attributes: list[list[str]] | None = None
    path: str = ""

    def __len__(self) -> int:
        return int(self.ids.shape[0])

    def row_of(self, ids: np.ndarray) -> np.ndarray:
        """Row of each id in this table, −1 where absent."""
        order = np.argsort(self.ids, kind="stable")
        s = self.ids[order]
        pos = np.searchsorted(s, ids)
        pos = np.minimum(pos, len(s) - 1) if len(s) else pos
        found = (len(s) > 0) & (s[pos] == ids) if len(s) else np.zeros(len(ids), bool)
        return np.where(found, order[pos], -1)


@dataclass(frozen=True, slots=True)
class ItemInputs:
    """The item tower's inputs for ``n`` items: sparse values already mapped to embedding rows.

    What an upsert of a learned model logs (``sterling.model.wal``): replaying
    it through the same item tower gives the same embedding, index entry and
    cache row. ``values`` is key-major (all of key 0's rows, then key 1's …),
    as a ``KeyedJaggedTensor`` lays it out.
    """

    keys: tuple[str, ...]
    lengths: np.ndarray  # [len(keys), n] int32
    values: np.ndarray  # [lengths.sum()] int64
    dense: np.ndarray  # [n, dense_dim] float32 (dense_dim may be 0)

    def __len__(self) -> int:
        return int(self.dense.shape[0])


def _stable_hash(v) -> int:
    if isinstance(v, (int, np.integer)):
        return int(v) & 0x7FFF_FFFF_FFFF_FFFF
    return zlib.crc32(str(v).encode())


@dataclass(slots=True)
class Vocab:
    """Value → embedding row: the ``max_size`` most frequent training values, then hashed OOV buckets.

    Rows ``0..len(values)-1`` are known values; an unseen value goes to row
    ``len(values) + hash(value) % oov_buckets`` so that new users/items share
    a few learned rows instead of failing.
    """

    values: list
    oov_buckets: int = 1
    _index: dict = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        if self.oov_buckets < 1:
            raise InvalidInputError(f"oov_buckets ({self.oov_buckets}) must be ≥ 1")
        self._index = {v: i for i, v in enumerate(self.values)}

    @property
    def size(self) -> int:
        return len(self.values) + self.oov_buckets

    @classmethod
    def build(cls, values: np.ndarray, *, max_size: int | None = None, oov_buckets: int = 1) -> Vocab:
        uniq, counts = np.unique(np.asarray(values), return_counts=True)
        order = np.lexsort((np.arange(len(uniq)), -counts))  # frequency desc, then value order
        if max_size is not None:
            order = order[:max_size]
        kept = uniq[order]
        return cls([v.item() if isinstance(v, np.generic) else v for v in kept], oov_buckets)

    def lookup(self, values: np.ndarray) -> np.ndarray:
        """[n] raw values → [n] int64 rows."""
        base, idx = len(self.values), self._index
        b = self.oov_buckets
        out = np.fromiter(
            (idx.get(v, -1) for v in (values.tolist() if isinstance(values, np.ndarray) else values)),
            dtype=np.int64,
            count=len(values),
        )
        miss = np.flatnonzero(out < 0)
        for i in miss.tolist():
            out[i] = base + _stable_hash(values[i]) % b
        return out

    def to_meta(self) -> dict:
        return {"values": list(self.values), "oov_buckets": self.oov_buckets}

    @classmethod
    def from_meta(cls, d: dict) -> Vocab:
        return cls(list(d["values"]), int(d["oov_buckets"]))


def csr_take(values: np.ndarray, offsets: np.ndarray, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Rows of a CSR column: (flat values of those rows, [len(rows)] lengths); row −1 is empty."""
    rows = np.asarray(rows, dtype=np.int64)
    ok = rows >= 0
    r = np.where(ok, rows, 0)
    starts = offsets[r]
    lengths = np.where(ok, offsets[r + 1] - starts, 0)
    total = int(lengths.sum())
    if total == 0:
        return values[:0], lengths
    rep = np.repeat(starts - np.concatenate(([0], np.cumsum(lengths)[:-1])), lengths)
    return values[rep + np.arange(total)], lengths


# ------------------------------------------------------------------ reading
def _read_table(path: str | Path):
    import pyarrow.parquet as pq

    path = Path(path)
    if not path.exists():
        raise DataError(f"{path} does not exist; pass the path of a Parquet file (see docs/data.md)")
    try:
        table = pq.read_table(path)
    except Exception as e:  # pyarrow raises several unrelated types for a bad file
        raise DataError(f"{path} is not a readable Parquet file ({e}); write it with pyarrow or pandas.to_parquet") from e
    if table.num_rows == 0:
        raise DataError(f"{path} has no rows; an empty table cannot be trained or evaluated on")
    return table


def _int_column(table, name: str, path) -> np.ndarray:
    import pyarrow as pa

    if name not in table.column_names:
        raise DataError(
            f"{path} has no {name!r} column (columns: {table.column_names}); add it as int64"
        )
    col = table.column(name)
    if not pa.types.is_integer(col.type):
        raise DataError(f"{path}: column {name!r} has type {col.type}; it must be int64 (cast it before writing)")
    if col.null_count:
        row = int(np.flatnonzero(col.is_null().to_numpy(zero_copy_only=False))[0])
        raise DataError(f"{path}: column {name!r} is null in row {row}; every row needs an id")
    return col.to_numpy().astype(np.int64, copy=False)


def _float_column(col, name: str, path) -> np.ndarray:
    import pyarrow as pa

    if not (pa.types.is_floating(col.type) or pa.types.is_integer(col.type) or pa.types.is_boolean(col.type)):
        raise DataError(
            f"{path}: task column {name!r} has type {col.type}; task columns are float32 labels or weights "
            "(every column other than user_id, item_id, timestamp is a task)"
        )
    arr = col.to_numpy(zero_copy_only=False).astype(np.float32)
    bad = ~np.isfinite(arr)
    if bad.any():
        raise DataError(f"{path}: task column {name!r} is NaN, inf or null in row {int(np.flatnonzero(bad)[0])}; "
                        "use 0 for 'no engagement'")
    return arr


def read_interactions(path: str | Path) -> Interactions:
    """Read and validate an interactions file."""
    table = _read_table(path)
    users = _int_column(table, "user_id", path)
    items = _int_column(table, "item_id", path)
    ts = _int_column(table, "timestamp", path) if "timestamp" in table.column_names else None
    tasks = {c: _float_column(table.column(c), c, path) for c in table.column_names if c not in RESERVED}
    if not tasks:
        raise DataError(
            f"{path} has no task column; add at least one float32 label column, e.g. click = 1.0 for every row"
        )
    return Interactions(users, items, ts, tasks, str(path))


def read_features(path: str | Path, id_column: str) -> FeatureTable:
    """Read and validate a users (``id_column="user_id"``) or items (``"item_id"``) table."""
    return _features_of(_read_table(path), id_column, path)


def read_feature_batches(path: str | Path, id_column: str, batch: int):
    """``read_features`` ``batch`` rows at a time (memory bounded by one batch): yields ``FeatureTable``s.

    Ids are checked for duplicates within each batch only.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    if not Path(path).exists():
        raise DataError(f"{path} does not exist; pass the path of a Parquet file (see docs/data.md)")
    try:
        f = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises several unrelated types for a bad file
        raise DataError(f"{path} is not a readable Parquet file ({e}); write it with pyarrow or pandas.to_parquet") from e
    for rb in f.iter_batches(batch_size=batch):
        yield _features_of(pa.Table.from_batches([rb]), id_column, path)


def _features_of(table, id_column: str, path) -> FeatureTable:
    import pyarrow as pa

    ids = _int_column(table, id_column, path)
    uniq, counts = np.unique(ids, return_counts=True)
    if (counts > 1).any():
        dup = int(uniq[np.argmax(counts > 1)])
        row = int(np.flatnonzero(ids == dup)[1])
        raise DataError(f"{path}: {id_column} {dup} appears again in row {row}; one row per {id_column}")
    out = FeatureTable(ids=ids, path=str(path))
    for name in table.column_names:
        if name == id_column:
            continue
        col = table.column(name).combine_chunks()
        t = col.type
        is_list = pa.types.is_list(t) or pa.types.is_large_list(t)
        vt = t.value_type if is_list else t
        if name == "attributes" and id_column == "item_id":
            if not (is_list and (pa.types.is_string(vt) or pa.types.is_large_string(vt))):
                raise DataError(f"{path}: column 'attributes' has type {t}; it must be list<string> of feature:value")
            attrs = [a or [] for a in col.to_pylist()]
            for r, terms in enumerate(attrs):
                for term in terms:
                    if ":" not in term:
                        raise DataError(f"{path}: attributes of row {r} hold {term!r}, not feature:value")
            out.attributes = attrs
            continue
        if pa.types.is_floating(vt):
            out.dense[name] = _dense(col, is_list, name, path)
        elif pa.types.is_integer(vt) or pa.types.is_string(vt) or pa.types.is_large_string(vt):
            out.sparse[name] = _sparse(col, is_list, pa.types.is_integer(vt), name, path)
        else:
            raise DataError(
                f"{path}: column {name!r} has type {t}; feature columns are int64, string, list<int64>, "
                "list<string> (sparse) or float32, list<float32> (dense)"
            )
    return out


def _dense(col, is_list: bool, name: str, path) -> np.ndarray:
    if col.null_count:
        row = int(np.flatnonzero(col.is_null().to_numpy(zero_copy_only=False))[0])
        raise DataError(f"{path}: dense column {name!r} is null in row {row}; fill it (e.g. with 0)")
    if is_list:
        lengths = np.diff(col.offsets.to_numpy())
        if len(set(lengths.tolist())) > 1:
            row = int(np.flatnonzero(lengths != lengths[0])[0])
            raise DataError(
                f"{path}: dense column {name!r} has {lengths[row]} values in row {row} but {lengths[0]} in row 0; "
                "list<float32> features need one length"
            )
        arr = col.flatten().to_numpy(zero_copy_only=False).astype(np.float32).reshape(len(col), int(lengths[0]))
    else:
        arr = col.to_numpy(zero_copy_only=False).astype(np.float32)[:, None]
    bad = ~np.isfinite(arr).all(axis=1)
    if bad.any():
        raise DataError(f"{path}: dense column {name!r} is NaN or inf in row {int(np.flatnonzero(bad)[0])}")
    return arr


def _sparse(col, is_list: bool, is_int: bool, name: str, path) -> tuple[np.ndarray, np.ndarray]:
    import pyarrow as pa
    import pyarrow.compute as pc

    n = len(col)
    if is_list:
        col = pc.fill_null(col, pa.scalar([], type=col.type)) if col.null_count else col
        offsets = col.offsets.to_numpy().astype(np.int64)
        offsets = offsets - offsets[0]
        flat = col.flatten()
    else:
        valid = col.is_valid().to_numpy(zero_copy_only=False)
        offsets = np.zeros(n + 1, dtype=np.int64)
        np.cumsum(valid, out=offsets[1:])
        flat = col.drop_null()
    if flat.null_count:
        raise DataError(f"{path}: sparse column {name!r} holds a null inside a list; drop it from the list")
    values = flat.to_numpy(zero_copy_only=False)
    values = values.astype(np.int64) if is_int else values.astype(object)
    return values, offsets


def check_references(inter: Interactions, *, users: FeatureTable | None, items: FeatureTable | None) -> None:
    """Every id in the interactions must exist in the users / items tables when those are given."""
    for ids, table, col in ((inter.user_id, users, "user_id"), (inter.item_id, items, "item_id")):
        if table is None:
            continue
        missing = table.row_of(ids) < 0
        if missing.any():
            row = int(np.flatnonzero(missing)[0])
            raise DataError(
                f"{inter.path}: row {row} has {col} {int(ids[row])}, which is absent from {table.path} "
                f"({int(missing.sum())} rows affected); add those ids to {table.path} or drop the rows"
            )


def write_parquet(path: str | Path, columns: dict) -> None:
    """Write columns (numpy arrays or lists) as Parquet atomically (temp + rename)."""
    import os
    import tempfile

    import pyarrow as pa
    import pyarrow.parquet as pq

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    arrays = {}
    for name, v in columns.items():
        if isinstance(v, np.ndarray) and v.dtype == np.float64:
            v = v.astype(np.float32)
        arrays[name] = pa.array(v)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".tmp-", dir=path.parent)
    os.close(fd)
    try:
        pq.write_table(pa.table(arrays), tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
