"""In-place attribute updates: change the ``feature:value`` terms of existing items.

An item's attributes live in two places, both rewritten here:

* its Bloom signature, row ``pos`` of ``ItemIndex.bloom`` [N_cap, W] — a
  fixed-size row, always overwritten in place;
* its exact list, the slice ``attr_ids[attr_offsets[pos] : attr_offsets[pos+1]]``
  of the packed CSR. The CSR has no gaps, so:

  - **fits** (new list no longer than the slot): written in place. The tail
    of the slot is padded with a repeat of the item's last new id —
    duplicates do not change set membership — or with −1 ("no attribute",
    never matches) when the new list is empty. Offsets do not move, so
    concurrent readers see either the old or the new list of that item.
  - **grows** (longer than the slot): one splice for the whole batch
    rebuilds ``attr_ids`` with the grown slices (O(nnz) copy) and shifts
    ``attr_offsets`` after each grown item. Batch growths together; a slot
    keeps its larger size afterwards, so an item that shrinks and grows back
    stays in place.

Terms never seen before are appended to the index vocabulary (and become
searchable at once). Every call bumps ``version``. The Bloom width was sized
for the catalog's terms-per-item at build time; items given many more terms
than that see a higher false-positive rate (never a wrong exact answer).

Example:
    >>> update_attributes(index, [1001, 1002], [["lang:en", "policy:ok"], ["lang:fr"]])
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from sterling.model import bloom as bloom_mod
from sterling.model.attributes import validate_term
from sterling.model.errors import InvalidAttributeError, InvalidInputError

__all__ = ["UpdateStats", "update_attributes"]


@dataclass(frozen=True, slots=True)
class UpdateStats:
    """What one ``update_attributes`` call did."""

    items: int  # items updated
    in_place: int  # exact lists rewritten inside their slot
    grown: int  # exact lists that needed the CSR splice
    new_terms: int  # terms appended to the vocabulary


def update_attributes(index, ids, attributes: Sequence[Sequence[str]]) -> UpdateStats:
    """Replace the attributes of existing items (by external id), in place.

    Args:
        index: an ``ItemIndex``.
        ids: one external id or [B] ids (unique).
        attributes: one list of ``feature:value`` strings per id (for a
            single id, its list).
    Returns:
        ``UpdateStats``.
    Raises:
        InvalidInputError: unknown or repeated id, or lengths that differ.
        InvalidAttributeError: a term not of the form ``feature:value``.
    """
    single = isinstance(ids, int) or (isinstance(ids, torch.Tensor) and ids.ndim == 0)
    id_list = [int(ids)] if single else [int(i) for i in torch.as_tensor(ids).reshape(-1).tolist()]
    lists = [attributes] if single else list(attributes)
    if len(lists) != len(id_list):
        raise InvalidInputError(
            f"{len(id_list)} ids but {len(lists)} attribute lists; give one list of terms per id"
        )
    if len(set(id_list)) != len(id_list):
        raise InvalidInputError("an id appears twice in one update_attributes call; merge its lists")
    positions = _positions_of(index, id_list)

    # vocabulary ids (appending new terms), validated before anything changes
    new_vocab: dict[str, int] = {}
    encoded: list[list[int]] = []
    for i, terms in zip(id_list, lists):
        if isinstance(terms, str):
            raise InvalidAttributeError(f"attributes of id {i} are a string {terms!r}; give a list of terms")
        out: list[int] = []
        for term in dict.fromkeys(terms):  # de-duplicate, keep order
            tid = index.vocab_index.get(term)
            if tid is None:
                tid = new_vocab.get(term)
                if tid is None:
                    validate_term(term, where=f" of id {i}")
                    tid = new_vocab[term] = len(index.vocab) + len(new_vocab)
            out.append(tid)
        encoded.append(out)
    for term, tid in new_vocab.items():
        index.vocab.append(term)
        index.vocab_index[term] = tid

    # Bloom signatures: overwrite each row
    used = sorted({t for tids in encoded for t in tids})
    words = dict(zip(used, bloom_mod.term_words([index.vocab[t] for t in used], index.bloom_spec)))
    for pos, tids in zip(positions, encoded):
        sig = torch.zeros(index.bloom_spec.words, dtype=torch.int64)
        for t in tids:
            sig |= words[t]
        index.bloom[pos] = sig.to(index.bloom.device)

    # exact CSR: in place where the slot is long enough, one splice for the rest
    grown: dict[int, list[int]] = {}
    offsets = index.attr_offsets
    for pos, tids in zip(positions, encoded):
        s, e = int(offsets[pos]), int(offsets[pos + 1])
        if len(tids) <= e - s:
            fill = tids + [tids[-1] if tids else -1] * (e - s - len(tids))
            index.attr_ids[s:e] = torch.tensor(fill, dtype=index.attr_ids.dtype)
        else:
            grown[pos] = tids
    if grown:
        _splice(index, grown)
    index.version += 1
    return UpdateStats(len(id_list), len(id_list) - len(grown), len(grown), len(new_vocab))


def _positions_of(index, id_list: list[int]) -> list[int]:
    """External ids → slot positions (one sort of ``item_ids``)."""
    if not id_list:
        return []
    want = torch.tensor(id_list, dtype=torch.int64)
    sorted_ids, order = torch.sort(index.item_ids)
    at = torch.searchsorted(sorted_ids, want).clamp(max=sorted_ids.numel() - 1)
    found = (sorted_ids[at] == want) & (want >= 0)
    if not bool(found.all()):
        missing = id_list[int((~found).nonzero()[0])]
        raise InvalidInputError(
            f"id {missing} is not in the index; update_attributes changes existing items — "
            "add new items with an upsert"
        )
    return order[at].tolist()


def _splice(index, grown: dict[int, list[int]]) -> None:
    """Rebuild the CSR with the grown slices (one O(nnz) pass for the whole batch)."""
    offsets = index.attr_offsets
    old_ids = index.attr_ids
    pieces: list[torch.Tensor] = []
    delta = torch.zeros(offsets.numel(), dtype=torch.int64)
    prev = 0
    for pos in sorted(grown):
        s, e = int(offsets[pos]), int(offsets[pos + 1])
        pieces.append(old_ids[prev:s])
        pieces.append(torch.tensor(grown[pos], dtype=old_ids.dtype))
        delta[pos + 1] += len(grown[pos]) - (e - s)
        prev = e
    pieces.append(old_ids[prev:])
    index.attr_ids = torch.cat(pieces).to(old_ids.device)
    index.attr_offsets = offsets + torch.cumsum(delta, 0).to(offsets.device)
