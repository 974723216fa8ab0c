"""Catalog sources: where a build streams embeddings, ids and attributes from.

A build reads embeddings twice (a sample for k-means, then every item in
chunks) and never needs the whole catalog in memory as fp32: ``.npy`` files
are memory-mapped, Parquet is read in record batches.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Protocol

import numpy as np
import torch

from sterling.model.attributes import Attributes
from sterling.model.errors import (
    CatalogFormatError,
    InvalidInputError,
    MissingColumnError,
    NonFiniteError,
)

__all__ = [
    "CatalogSource", "ArraySource", "ParquetSource", "open_catalog", "as_source", "load_npy", "load_query_vectors",
]


class CatalogSource(Protocol):
    num_items: int
    dim: int

    def iter_chunks(self, chunk: int) -> Iterator[tuple[int, torch.Tensor]]:
        """Yield (start row, fp32 [c, D] embeddings) in row order."""

    def take_rows(self, rows: torch.Tensor) -> torch.Tensor:
        """fp32 [len(rows), D] for sorted row numbers."""

    def ids(self) -> torch.Tensor | None:
        """int64 [N] external ids, or None for 0..N-1."""

    def attributes(self) -> Attributes | None: ...


def _as_2d(x, what: str) -> np.ndarray | torch.Tensor:
    if x.ndim != 2:
        raise InvalidInputError(f"{what} must be 2-D [N, D], got shape {tuple(x.shape)}")
    return x


def _as_ids(ids) -> torch.Tensor:
    a = ids.numpy() if isinstance(ids, torch.Tensor) else np.asarray(ids)
    if a.size and not np.issubdtype(a.dtype, np.integer):
        raise InvalidInputError(f"ids have dtype {a.dtype}; give integer ids (int64), one per item")
    return torch.from_numpy(a.astype(np.int64).reshape(-1))


class ArraySource:
    """In-memory or memory-mapped arrays (torch, numpy, ``np.load(mmap_mode='r')``)."""

    def __init__(self, embeddings, ids=None, attributes=None) -> None:
        if not isinstance(embeddings, (np.ndarray, torch.Tensor)):
            try:
                embeddings = np.asarray(embeddings, dtype=np.float32)
            except (TypeError, ValueError) as e:
                raise InvalidInputError(f"embeddings are not a numeric [N, D] array ({e})") from e
        if isinstance(embeddings, np.ndarray) and not np.issubdtype(embeddings.dtype, np.number):
            raise InvalidInputError(f"embeddings have dtype {embeddings.dtype}; give float32 (or any numeric) [N, D]")
        if isinstance(embeddings, torch.Tensor) and (embeddings.is_complex() or embeddings.dtype == torch.bool):
            raise InvalidInputError(f"embeddings have dtype {embeddings.dtype}; give float32 [N, D]")
        self._emb = _as_2d(embeddings, "embeddings")
        self.num_items, self.dim = int(self._emb.shape[0]), int(self._emb.shape[1])
        self._ids = None if ids is None else _as_ids(ids)
        if self._ids is not None and self._ids.numel() != self.num_items:
            raise InvalidInputError(
                f"ids has {self._ids.numel()} entries for {self.num_items} embeddings; give one id per item"
            )
        if attributes is None or isinstance(attributes, Attributes):
            self._attrs = attributes
        else:
            self._attrs = Attributes.from_lists(attributes)
        if self._attrs is not None and self._attrs.num_items != self.num_items:
            raise InvalidInputError(
                f"attributes cover {self._attrs.num_items} items but there are {self.num_items} embeddings"
            )

    def _rows(self, sl) -> torch.Tensor:
        x = self._emb[sl]
        if isinstance(x, np.ndarray):
            x = torch.from_numpy(np.array(x, dtype=np.float32))  # own, writable copy of the chunk
        return x.float()

    def iter_chunks(self, chunk: int) -> Iterator[tuple[int, torch.Tensor]]:
        for s in range(0, self.num_items, chunk):
            yield s, self._rows(slice(s, s + chunk))

    def take_rows(self, rows: torch.Tensor) -> torch.Tensor:
        idx = rows.numpy() if isinstance(self._emb, np.ndarray) else rows
        return self._rows(idx)

    def ids(self) -> torch.Tensor | None:
        return None if self._ids is None else self._ids.to(torch.int64)

    def attributes(self) -> Attributes | None:
        return self._attrs


class ParquetSource:
    """Parquet with columns ``id: int64``, ``embedding: list<float>``, ``attributes: list<string>``.

    ``id`` and ``embedding`` are required (a missing or misnamed id column is a
    ``MissingColumnError``, never silently 0..N-1); ``attributes`` is
    optional. Column types are checked on open; embeddings are read in
    record batches.
    """

    def __init__(self, path: str | Path) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        self.path = Path(path)
        try:
            self._file = pq.ParquetFile(self.path)
        except (pa.ArrowException, OSError) as e:
            raise CatalogFormatError(
                f"{self.path} is not a readable Parquet file ({e}); write it with pyarrow/pandas "
                "`to_parquet` with columns id:int64, embedding:list<float>, attributes:list<string>"
            ) from e
        schema = self._file.schema_arrow
        names = set(schema.names)
        for need in ("id", "embedding"):
            if need not in names:
                hint = " (rename your id column to 'id')" if need == "id" else ""
                raise MissingColumnError(
                    f"{self.path} has no {need!r} column (columns: {sorted(names)}){hint}; expected "
                    "id:int64, embedding:list<float>, attributes:list<string>"
                )
        _check_type(self.path, "id", schema.field("id").type, pa.types.is_integer, "int64")
        _check_type(self.path, "embedding", schema.field("embedding").type, _is_float_list, "list<float>")
        self._has_attrs = "attributes" in names
        if self._has_attrs:
            _check_type(self.path, "attributes", schema.field("attributes").type, _is_string_list, "list<string>")
        self.num_items = self._file.metadata.num_rows
        self.dim = 0
        start = 0
        for batch in self._file.iter_batches(batch_size=1024, columns=["embedding"]):
            col = batch.column(0)
            valid = np.flatnonzero(~col.is_null().to_numpy(zero_copy_only=False))
            if valid.size:
                self.dim = len(col[int(valid[0])])
                break
            start += len(col)

    def _to_tensor(self, col, start: int) -> torch.Tensor:
        if col.null_count:
            row = start + int(np.flatnonzero(col.is_null().to_numpy(zero_copy_only=False))[0])
            raise NonFiniteError(
                f"row {row} of {self.path} has a null embedding; give every item a vector of length "
                f"{self.dim} or drop the row"
            )
        if col.flatten().null_count:
            raise NonFiniteError(
                f"{self.path}: an embedding in rows {start}..{start + len(col) - 1} holds a null value; "
                "fill or drop it"
            )
        lengths = col.value_lengths().to_numpy(zero_copy_only=False)
        bad = np.nonzero(lengths != self.dim)[0]
        if bad.size:
            raise InvalidInputError(
                f"row {start + int(bad[0])} of {self.path} has an embedding of length "
                f"{int(lengths[bad[0]])}, expected {self.dim} like the first row"
            )
        flat = np.array(col.flatten().to_numpy(zero_copy_only=False), dtype=np.float32)
        return torch.from_numpy(flat.reshape(-1, self.dim))

    def iter_chunks(self, chunk: int) -> Iterator[tuple[int, torch.Tensor]]:
        start = 0
        for batch in self._file.iter_batches(batch_size=chunk, columns=["embedding"]):
            x = self._to_tensor(batch.column(0), start)
            yield start, x
            start += x.shape[0]

    def take_rows(self, rows: torch.Tensor) -> torch.Tensor:
        out = torch.empty(rows.numel(), self.dim)
        r = rows.numpy()
        filled = 0
        for start, x in self.iter_chunks(65_536):
            lo, hi = np.searchsorted(r, [start, start + x.shape[0]])
            if hi > lo:
                out[filled : filled + hi - lo] = x[torch.from_numpy(r[lo:hi] - start)]
                filled += hi - lo
        return out

    def ids(self) -> torch.Tensor | None:
        col = self._file.read(columns=["id"]).column("id")
        if col.null_count:
            raise InvalidInputError(f"{self.path}: column 'id' has {col.null_count} nulls")
        return torch.from_numpy(col.to_numpy().astype(np.int64))

    def attributes(self) -> Attributes | None:
        if not self._has_attrs:
            return None
        import pyarrow as pa
        import pyarrow.compute as pc

        col = self._file.read(columns=["attributes"]).column("attributes").combine_chunks()
        col = pc.fill_null(col, pa.scalar([], type=col.type)) if col.null_count else col
        offsets = torch.from_numpy(col.offsets.to_numpy().astype(np.int64))
        offsets = offsets - offsets[0]
        enc = col.flatten().dictionary_encode()
        vocab = enc.dictionary.to_pylist()
        ids = torch.from_numpy(enc.indices.to_numpy(zero_copy_only=False).astype(np.int32))
        return Attributes.from_csr(vocab, ids, offsets)


def _is_float_list(t) -> bool:
    import pyarrow as pa

    return (pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t)) and (
        pa.types.is_floating(t.value_type) or pa.types.is_integer(t.value_type)
    )


def _is_string_list(t) -> bool:
    import pyarrow as pa

    return (pa.types.is_list(t) or pa.types.is_large_list(t)) and (
        pa.types.is_string(t.value_type) or pa.types.is_large_string(t.value_type)
    )


def _check_type(path: Path, name: str, got, ok, want: str) -> None:
    if not ok(got):
        raise CatalogFormatError(
            f"{path}: column {name!r} has type {got}, expected {want}"
            + (" (one list of 'feature:value' strings per item, e.g. ['lang:en', 'country:US'])"
               if name == "attributes" else "")
        )


def load_npy(path: str | Path, *, what: str, mmap: bool = False) -> np.ndarray:
    """``np.load`` with typed errors: a missing, empty, pickled or non-numeric file is a ``CatalogFormatError``.

    Object arrays are never unpickled (``allow_pickle=False``).
    """
    p = Path(path)
    if not p.is_file():
        raise CatalogFormatError(f"{what} {p} does not exist or is not a file")
    try:
        a = np.load(p, mmap_mode="r" if mmap else None, allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
        raise CatalogFormatError(f"{what} {p} is not a readable numeric .npy file ({e}); save it with np.save") from e
    if not isinstance(a, np.ndarray) or not (np.issubdtype(a.dtype, np.number) or a.dtype == np.bool_):
        kind = type(a).__name__ if not isinstance(a, np.ndarray) else f"dtype {a.dtype}"
        raise CatalogFormatError(f"{what} {p} holds {kind}, not numbers; save a float32/int64 array with np.save")
    return a


def load_query_vectors(path: str | Path) -> np.ndarray:
    """float32 [D] or [B, D] queries from ``.npy`` or ``.json`` (a list of floats, or a list of such lists).

    Raises ``CatalogFormatError`` for a missing, empty or non-numeric file (strings, objects, ragged rows).
    """
    p = Path(path)
    if p.suffix == ".npy":
        a = load_npy(p, what="vector file")
    elif p.suffix == ".json":
        if not p.is_file():
            raise CatalogFormatError(f"vector file {p} does not exist or is not a file")
        try:
            data = json.loads(p.read_text(encoding="utf-8"))
        except (ValueError, UnicodeDecodeError) as e:
            raise CatalogFormatError(f"vector file {p} is not valid JSON ({e}); write e.g. [0.1, 0.2, …]") from e
        if not isinstance(data, list) or not all(
            isinstance(v, (int, float)) and not isinstance(v, bool)
            for row in data for v in (row if isinstance(row, list) else [row])
        ):
            raise CatalogFormatError(f"vector file {p} must hold a list of numbers or a list of lists of numbers")
        try:
            a = np.asarray(data, dtype=np.float64)
        except ValueError as e:
            raise CatalogFormatError(f"vector file {p} has rows of different lengths ({e})") from e
    else:
        raise CatalogFormatError(f"vector file {p}: use .npy or .json")
    if a.ndim not in (1, 2) or a.size == 0:
        raise CatalogFormatError(f"vector file {p} holds shape {tuple(a.shape)}; give [D] or [B, D] with D ≥ 1")
    with np.errstate(over="ignore"):
        out = a.astype(np.float32)
    return out


def open_catalog(path: str | Path, *, ids_path: str | Path | None = None) -> CatalogSource:
    """Open ``.parquet`` or ``.npy`` (memory-mapped; optional ``.npy`` ids beside it)."""
    p = Path(path)
    if not p.exists():
        raise InvalidInputError(f"catalog {p} does not exist")
    if p.is_dir():
        raise CatalogFormatError(f"catalog {p} is a directory; give a .parquet or .npy file")
    if p.suffix == ".parquet":
        if ids_path is not None:
            raise InvalidInputError("--ids is for .npy catalogs; a Parquet catalog carries its own 'id' column")
        return ParquetSource(p)
    if p.suffix == ".npy":
        emb = load_npy(p, what="catalog", mmap=True)
        ids = None if ids_path is None else load_npy(ids_path, what="ids file")
        return ArraySource(emb, ids)
    raise InvalidInputError(f"catalog {p}: unknown format {p.suffix!r}; use .parquet or .npy")


def as_source(embeddings, ids=None, attributes=None) -> CatalogSource:
    if hasattr(embeddings, "iter_chunks"):
        if ids is not None or attributes is not None:
            raise InvalidInputError("pass ids/attributes inside the catalog source, not beside it")
        return embeddings
    if isinstance(embeddings, (str, Path)):
        src = open_catalog(embeddings)
        if ids is None and attributes is None:
            return src
        raise InvalidInputError("pass ids/attributes inside the catalog file, not beside it")
    return ArraySource(embeddings, ids, attributes)
