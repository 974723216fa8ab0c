"""A filter's eligible fraction estimated before the scan, from a fixed sample of the catalog.

Adaptive widening (``sterling.model.search``) sizes a filtered query's probe
by the eligible fraction f of its filter: about nprobe / √f lists hold the
eligible top-k. Measured on the first scan alone, f arrives too late: a
selective filter's query scans nprobe lists, then its widening lists, with a
second probe, selection and verification — up to twice the work of one scan
of the right size (BENCHMARKS.md, the ``make demo`` adaptive rows).

``SelectivitySample`` is the exact attribute sets (vocabulary ids) of up to
``SAMPLE_SIZE`` items, catalog rows evenly spaced (``sample_rows``), taken
when the index is built (``build_index`` and the chunked builder take the
same rows, so their artifacts stay equal). Each of a batch's programs is evaluated exactly on it once, and the
query's first scan is sized by that estimate; the measured selectivity of
that scan stays the safety net (it widens further when the estimate was too
optimistic for the query's neighbourhood).

The sample lives in the index's metadata, so every document shard, rank
slice and the router's head carry the same one and decide the same first
nprobe as the single-process model. It is a build-time snapshot: streaming
updates do not change it (the measured widening covers the drift) and a
re-build or re-pack of a fresh catalog takes a new one. An index built
before the sample existed has none, and searches as before.
"""

from __future__ import annotations

import base64
from dataclasses import dataclass

import numpy as np
import torch

from sterling.kernels.filter_eval import OP_AND, OP_FALSE, OP_NOT, OP_TERM, OP_TRUE
from sterling.model.errors import ArtifactError

__all__ = ["SAMPLE_SIZE", "SelectivitySample", "sample_rows"]

SAMPLE_SIZE = 4096  # items: ±0.4 points on a 7.5 % filter, ±3 % on the lists it asks for
_MEMO = 4096  # programs whose estimate is kept (cleared when full)


def sample_rows(num_items: int, size: int = SAMPLE_SIZE) -> np.ndarray:
    """The catalog rows the sample takes: ``size`` (at most ``num_items``) evenly spaced, sorted."""
    if num_items <= 0:
        return np.zeros(0, dtype=np.int64)
    return np.unique(np.linspace(0, num_items - 1, min(size, num_items)).round().astype(np.int64))


@dataclass(frozen=True, eq=False)
class SelectivitySample:
    """The exact attribute sets of a fixed sample of items: item r holds vocabulary ids
    ``ids[offsets[r]:offsets[r + 1]]`` (``offsets`` [S + 1] int64, ``ids`` [nnz] int32)."""

    offsets: np.ndarray
    ids: np.ndarray

    def __post_init__(self) -> None:
        off, ids = self.offsets, self.ids
        if (off.ndim != 1 or off.size < 1 or off[0] != 0 or off[-1] != ids.size or ids.ndim != 1
                or (off.size > 1 and bool((np.diff(off) < 0).any()))):
            raise ArtifactError("the index's selectivity sample is malformed (offsets do not describe its ids); "
                                "rebuild the index or drop the sample from its metadata")
        words = -(-(off.size - 1) // 64)
        full = np.zeros(words * 64, dtype=bool)
        full[: off.size - 1] = True
        # lazily built lookup state (the sample itself never changes)
        object.__setattr__(self, "_full", np.packbits(full, bitorder="little").view(np.uint64))
        object.__setattr__(self, "_bits", {})
        object.__setattr__(self, "_memo", {})
        object.__setattr__(self, "_inverse", None)

    @property
    def size(self) -> int:
        return int(self.offsets.size - 1)

    @classmethod
    def from_term_lists(cls, rows) -> SelectivitySample:
        """From each sampled item's vocabulary ids (any order; padding −1 and repeats dropped)."""
        rows = [np.unique(np.asarray(r, dtype=np.int64)) for r in rows]
        rows = [r[r >= 0] for r in rows]
        offsets = np.zeros(len(rows) + 1, dtype=np.int64)
        np.cumsum([r.size for r in rows], out=offsets[1:])
        ids = np.concatenate(rows).astype(np.int32) if rows else np.zeros(0, np.int32)
        return cls(offsets=offsets, ids=ids)

    def to_meta(self) -> dict:
        return {"items": self.size,
                "offsets": base64.b64encode(self.offsets.astype("<i8").tobytes()).decode(),
                "ids": base64.b64encode(self.ids.astype("<i4").tobytes()).decode()}

    @classmethod
    def from_meta(cls, d: dict | None) -> SelectivitySample | None:
        if not d:
            return None
        try:
            offsets = np.frombuffer(base64.b64decode(d["offsets"]), dtype="<i8").astype(np.int64)
            ids = np.frombuffer(base64.b64decode(d["ids"]), dtype="<i4").astype(np.int32)
        except (KeyError, TypeError, ValueError) as e:
            raise ArtifactError(f"the index's selectivity sample cannot be read ({e}); rebuild the index") from e
        return cls(offsets=offsets, ids=ids)

    def eligible_fraction(self, programs, term_vocab: torch.Tensor) -> torch.Tensor:
        """[P] float64: each program's (passing + 1) / (sampled + 2) on the sample.

        ``programs``: postfix programs over the batch's terms (``CompiledFilters.programs``),
        evaluated with exact semantics (NOT negates); ``term_vocab`` [T] their vocabulary ids
        (−1: a term no item has). The +1 / +2 keeps a filter no sampled item passes from
        estimating 0. Each term is one bitset over the sample (64 items a word) and each program
        a few word-wise operations; a program seen before (same terms, same shape) is looked up.
        """
        vocab = term_vocab.cpu().tolist()
        out = torch.empty(len(programs), dtype=torch.float64)
        for i, prog in enumerate(programs):
            key = tuple((op, vocab[arg] if op == OP_TERM else 0) for op, arg in prog)
            f = self._memo.get(key)
            if f is None:
                f = (self._passing(key) + 1.0) / (self.size + 2.0)
                if len(self._memo) >= _MEMO:
                    self._memo.clear()
                self._memo[key] = f
            out[i] = f
        return out

    def _passing(self, prog) -> int:
        """Sampled items a program (ops with vocabulary ids) passes, by word-wise bitset logic."""
        full = self._full
        stack = []
        for op, v in prog:
            if op == OP_TERM:
                stack.append(self._term_bits(v))
            elif op == OP_TRUE:
                stack.append(full)
            elif op == OP_FALSE:
                stack.append(np.zeros_like(full))
            elif op == OP_NOT:
                stack.append(~stack.pop() & full)
            else:
                b, a = stack.pop(), stack.pop()
                stack.append(a & b if op == OP_AND else a | b)
        return int(np.unpackbits(stack[0].view(np.uint8)).sum())

    def _term_bits(self, v: int) -> np.ndarray:
        """[ceil(S / 64)] uint64: which sampled items hold vocabulary id v (built once per id)."""
        bits = self._bits.get(v)
        if bits is None:
            if self._inverse is None:
                item = np.repeat(np.arange(self.size, dtype=np.int64), np.diff(self.offsets))
                order = np.argsort(self.ids, kind="stable")
                object.__setattr__(self, "_inverse", (self.ids[order].astype(np.int64), item[order]))
            keys, items = self._inverse
            lo, hi = np.searchsorted(keys, v), np.searchsorted(keys, v, side="right")
            mask = np.zeros(self._full.size * 64, dtype=bool)
            mask[items[lo:hi]] = True
            bits = np.packbits(mask, bitorder="little").view(np.uint64)
            self._bits[v] = bits
        return bits
