"""Catalog sources: where a build streams embeddings, ids and attributes from.

A build reads embeddings twice (a sample for k-means, then every item in
chunks) and never needs the whole catalog in memory as fp32: ``.npy`` files
are memory-mapped, Parquet is read in record batches.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Protocol

import numpy as np
import torch

from sterling.model.attributes import Attributes
from sterling.model.errors import InvalidInputError

__all__ = ["CatalogSource", "ArraySource", "ParquetSource", "open_catalog", "as_source"]


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


class ArraySource:
    """In-memory or memory-mapped arrays (torch, numpy, ``np.load(mmap_mode='r')``)."""

    def __init__(self, embeddings, ids=None, attributes=None) -> None:
        if not isinstance(embeddings, (np.ndarray, torch.Tensor)):
            embeddings = np.asarray(embeddings, dtype=np.float32)
        self._emb = _as_2d(embeddings, "embeddings")
        self.num_items, self.dim = int(self._emb.shape[0]), int(self._emb.shape[1])
        self._ids = None if ids is None else torch.as_tensor(np.asarray(ids)).reshape(-1)
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

    ``attributes`` is optional. Embeddings are read in record batches.
    """

    def __init__(self, path: str | Path) -> None:
        import pyarrow.parquet as pq

        self.path = Path(path)
        self._file = pq.ParquetFile(self.path)
        names = set(self._file.schema_arrow.names)
        if "embedding" not in names:
            raise InvalidInputError(
                f"{self.path} has no 'embedding' column (columns: {sorted(names)}); expected "
                "id:int64, embedding:list<float>, attributes:list<string>"
            )
        self._has_ids = "id" in names
        self._has_attrs = "attributes" in names
        self.num_items = self._file.metadata.num_rows
        first = next(self._file.iter_batches(batch_size=1, columns=["embedding"]), None)
        self.dim = 0 if first is None else len(first.column(0)[0])

    def _to_tensor(self, col, start: int) -> torch.Tensor:
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
        if not self._has_ids:
            return None
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


def open_catalog(path: str | Path, *, ids_path: str | Path | None = None) -> CatalogSource:
    """Open ``.parquet`` or ``.npy`` (memory-mapped; optional ``.npy`` ids beside it)."""
    p = Path(path)
    if not p.exists():
        raise InvalidInputError(f"catalog {p} does not exist")
    if p.suffix == ".parquet":
        return ParquetSource(p)
    if p.suffix == ".npy":
        emb = np.load(p, mmap_mode="r")
        ids = None if ids_path is None else np.load(ids_path)
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
