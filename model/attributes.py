"""Exact item attributes: a vocabulary of ``feature:value`` terms and a CSR of ids."""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from sterling.model.errors import InvalidAttributeError, InvalidInputError

__all__ = ["Attributes", "validate_term"]

_FEATURE_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_.\-]*\Z")


def validate_term(term: object, *, where: str = "") -> str:
    """Check ``feature:value``; returns the term. ``where`` names the item for the message."""
    if not isinstance(term, str) or ":" not in term:
        raise InvalidAttributeError(
            f"attribute {term!r}{where} is not of the form `feature:value` (e.g. 'lang:en')"
        )
    feature, value = term.split(":", 1)
    if not _FEATURE_RE.match(feature):
        raise InvalidAttributeError(
            f"attribute {term!r}{where} has a bad feature name {feature!r}: use letters, digits, "
            "'_', '.', '-', not starting with a digit"
        )
    if value == "" or value != value.strip():
        raise InvalidAttributeError(
            f"attribute {term!r}{where} has an empty value or one with surrounding spaces"
        )
    return term


@dataclass(slots=True)
class Attributes:
    """CSR attribute store.

    Attributes:
        vocab: distinct terms; ids index into it.
        ids: [nnz] int32 vocabulary ids, item after item.
        offsets: [N + 1] int64 row pointers.
    """

    vocab: list[str]
    ids: torch.Tensor
    offsets: torch.Tensor

    @property
    def num_items(self) -> int:
        return self.offsets.numel() - 1

    @classmethod
    def empty(cls, num_items: int) -> Attributes:
        return cls([], torch.zeros(0, dtype=torch.int32), torch.zeros(num_items + 1, dtype=torch.int64))

    @classmethod
    def from_lists(cls, lists: Sequence[Sequence[str]]) -> Attributes:
        """From one list of ``feature:value`` strings per item (validated)."""
        index: dict[str, int] = {}
        flat: list[int] = []
        offsets = [0]
        for i, terms in enumerate(lists):
            if isinstance(terms, str):
                raise InvalidAttributeError(
                    f"attributes of item {i} are a string {terms!r}; give a list of "
                    "`feature:value` strings per item"
                )
            for term in terms or ():
                tid = index.get(term)
                if tid is None:
                    validate_term(term, where=f" of item {i}")
                    tid = index[term] = len(index)
                flat.append(tid)
            offsets.append(len(flat))
        return cls(
            list(index),
            torch.tensor(flat, dtype=torch.int32),
            torch.tensor(offsets, dtype=torch.int64),
        )

    @classmethod
    def from_csr(cls, vocab: list[str], ids: torch.Tensor, offsets: torch.Tensor) -> Attributes:
        """From pre-encoded CSR arrays (validated once per distinct term)."""
        for t, term in enumerate(vocab):
            validate_term(term, where=f" (vocabulary entry {t})")
        ids = torch.as_tensor(ids).to(torch.int32)
        offsets = torch.as_tensor(offsets).to(torch.int64)
        if offsets.numel() < 1 or int(offsets[0]) != 0 or int(offsets[-1]) != ids.numel():
            raise InvalidInputError("attribute offsets must start at 0 and end at len(ids)")
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= len(vocab)):
            raise InvalidInputError("attribute ids must index into the vocabulary")
        return cls(list(vocab), ids, offsets)

    def terms_of(self, i: int) -> list[str]:
        s, e = int(self.offsets[i]), int(self.offsets[i + 1])
        return [self.vocab[t] for t in self.ids[s:e].tolist()]

    def max_terms_per_item(self) -> int:
        if self.num_items == 0:
            return 0
        return int((self.offsets[1:] - self.offsets[:-1]).max())
