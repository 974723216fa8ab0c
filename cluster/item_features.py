"""Item feature columns on the wire (``UpsertRequest.item_features``) ↔ ``FeatureTable``.

A learned model's upsert carries the items' raw feature columns, as in the
items table (docs/data.md): sparse columns as per-item lengths + flat values
(integers or strings), dense columns as row-major floats with their width.
The server maps the values through the model's vocabularies.
"""

from __future__ import annotations

import numpy as np

from sterling.cluster import retrieval_pb2 as pb
from sterling.model.data import FeatureTable
from sterling.model.errors import DimensionMismatchError, InvalidInputError

__all__ = ["features_to_proto", "features_from_proto"]


def features_to_proto(table: FeatureTable) -> list[pb.ItemFeatureColumn]:
    """The sparse and dense columns of ``table`` (not ``item_id`` or ``attributes``), in table order."""
    cols = []
    for name, (values, offsets) in table.sparse.items():
        c = pb.ItemFeatureColumn(name=name, lengths=np.diff(offsets).astype(np.int32).tolist())
        flat = values[offsets[0] : offsets[-1]]
        if flat.dtype.kind in "iu":
            c.int_values.extend(int(v) for v in flat)
        else:
            c.string_values.extend(str(v) for v in flat)
        cols.append(c)
    for name, x in table.dense.items():
        x = np.asarray(x, dtype=np.float32).reshape(len(table), -1)
        cols.append(pb.ItemFeatureColumn(name=name, width=x.shape[1], dense=x.reshape(-1).tolist()))
    return cols


def features_from_proto(ids: list[int], columns) -> FeatureTable:
    """A ``FeatureTable`` for ``ids`` from ``UpsertRequest.item_features``; typed errors on bad shapes."""
    n = len(ids)
    table = FeatureTable(ids=np.asarray(ids, dtype=np.int64), path="UpsertRequest.item_features")
    for c in columns:
        if c.name in table.sparse or c.name in table.dense or c.name in ("item_id", "attributes", ""):
            raise InvalidInputError(f"item feature column {c.name!r} is empty, reserved or repeated; send each "
                                    "feature column once (the id and attributes have their own fields)")
        if c.width:
            x = np.asarray(c.dense, dtype=np.float32)
            if x.size != n * c.width:
                raise DimensionMismatchError(f"dense item feature {c.name!r} has {x.size} floats for {n} items of "
                                             f"width {c.width}; send len(ids) × width")
            table.dense[c.name] = x.reshape(n, c.width)
            continue
        lengths = np.asarray(c.lengths, dtype=np.int64)
        if lengths.size != n or (lengths < 0).any():
            raise InvalidInputError(f"sparse item feature {c.name!r} has {lengths.size} lengths for {n} items; "
                                    "send one non-negative length per item")
        if len(c.int_values) and len(c.string_values):
            raise InvalidInputError(f"sparse item feature {c.name!r} mixes integer and string values; use one")
        values = (np.asarray(c.int_values, dtype=np.int64) if len(c.int_values)
                  else np.asarray(list(c.string_values), dtype=object))
        if values.size != int(lengths.sum()):
            raise InvalidInputError(f"sparse item feature {c.name!r}: lengths sum to {int(lengths.sum())} but "
                                    f"{values.size} values were sent; they must match")
        offsets = np.zeros(n + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        table.sparse[c.name] = (values, offsets)
    return table
