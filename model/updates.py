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
from contextlib import nullcontext
from dataclasses import dataclass

import numpy as np
import torch

from sterling.kernels import update_apply as ua
from sterling.model import bloom as bloom_mod
from sterling.model.attributes import validate_term
from sterling.model.errors import InvalidAttributeError, InvalidInputError, ItemFeaturesError

__all__ = [
    "BACKENDS",
    "ListsFullError",
    "PreparedUpsert",
    "SlotMap",
    "UpdateStats",
    "apply_delete",
    "apply_upsert",
    "footprint",
    "install_layout",
    "free_slots_needed",
    "prepare_upsert",
    "repack",
    "update_attributes",
    "update_backend",
]


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
    """External ids → slot positions (the index's ``SlotMap``; built once, kept current)."""
    if not id_list:
        return []
    pos = slot_map(index).lookup(id_list)
    if min(pos) < 0:
        missing = id_list[pos.index(min(pos))]
        raise InvalidInputError(
            f"id {missing} is not in the index; update_attributes changes existing items — "
            "add new items with an upsert"
        )
    return pos


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


# ----------------------------------------------------------------------------------------
# Upserts, deletes and re-packing (see the module docstring of ``sterling.model.live`` for
# how these are made atomic and durable; the functions here are the single-threaded core).


@dataclass(frozen=True, slots=True)
class PreparedUpsert:
    """An upsert batch validated and encoded, ready to apply (pure function of its input).

    Attributes:
        ids: [n] int64 external ids, unique, ≥ 0.
        codes: [n, D] int8 quantized vectors (the index's scheme: per-row scale).
        scales: [n] fp32 per-row scales.
        lists: [n] int64 nearest list of each item.
        attributes: one list of terms per item, or ``None`` (existing items keep
            their terms, new items get none).
    """

    ids: torch.Tensor
    codes: torch.Tensor
    scales: torch.Tensor
    lists: torch.Tensor
    attributes: list[list[str]] | None


def check_upsert_kind(*, learned: bool, embeddings, item_features) -> None:
    """An upsert carries item features for a learned model and embeddings for an index model.

    An empty ``embeddings`` (a proto's default) counts as absent. Raises
    ``ItemFeaturesError`` naming what to send instead.
    """
    has_vectors = embeddings is not None and (
        embeddings.numel() if torch.is_tensor(embeddings) else np.asarray(embeddings).size) > 0
    if learned and (has_vectors or item_features is None):
        raise ItemFeaturesError(
            "this is a learned model: its index entries and OverArch cache rows come from the item tower, so "
            "an upsert carries item features (item_features=, the items-table columns of docs/data.md), not "
            "embeddings. To serve precomputed vectors, build an index model with `sterling build`"
        )
    if not learned and item_features is not None:
        raise ItemFeaturesError(
            "item_features need a learned model with an item tower (`sterling train`); this is an index model: "
            "send embeddings"
        )


def check_batch_ids(ids, what: str) -> torch.Tensor:
    """[n] external ids as int64: non-negative, unique within the batch."""
    from sterling.model.build import check_ids

    if isinstance(ids, int):
        ids = [ids]
    try:
        t = torch.as_tensor(ids)
    except (TypeError, ValueError) as e:
        raise InvalidInputError(f"{what} ids must be a list/array of integers, got {type(ids).__name__}") from e
    if t.is_floating_point() or t.dtype == torch.bool:
        raise InvalidInputError(f"{what} ids must be integers, got dtype {t.dtype}")
    t = t.reshape(-1).to(torch.int64)
    check_ids(t)
    return t


def prepare_upsert(index, ids, embeddings, attributes=None) -> PreparedUpsert:
    """Validate and encode one upsert batch (no change to ``index``).

    Args:
        index: the ``ItemIndex`` the batch is for (dimension, metric, centroids).
        ids: [n] external ids, unique, ≥ 0.
        embeddings: [n, D] float vectors (finite).
        attributes: ``None`` or one list of ``feature:value`` terms per item.
    Raises:
        DuplicateIdError, DimensionMismatchError, NonFiniteError,
        InvalidAttributeError, InvalidInputError.
    """
    from sterling.kernels import quantize_int8
    from sterling.model.config import Metric
    from sterling.model.errors import DimensionMismatchError, NonFiniteError
    from sterling.model.kmeans import assign

    fast = _prepare_compiled(index, ids, embeddings, attributes)
    if fast is not None:
        return fast
    id_t = check_batch_ids(ids, "upsert")
    x = torch.as_tensor(embeddings)
    if x.ndim == 1 and id_t.numel() == 1:
        x = x[None]
    if x.ndim != 2 or x.shape[0] != id_t.numel():
        raise DimensionMismatchError(
            f"upsert embeddings have shape {tuple(x.shape)}; give one row per id: [{id_t.numel()}, {index.dim}]"
        )
    if x.shape[1] != index.dim:
        raise DimensionMismatchError(
            f"upsert embeddings have dimension {x.shape[1]} but the index has dimension {index.dim}; "
            "encode items with the model the index was built from"
        )
    if not x.is_floating_point():
        raise InvalidInputError(f"upsert embeddings must be floating point, got {x.dtype}")
    x = x.detach().float().cpu()
    finite = torch.isfinite(x).all(dim=1)
    if not bool(finite.all()):
        bad = int(id_t[int((~finite).nonzero()[0])])
        raise NonFiniteError(f"embedding of id {bad} contains NaN or inf; fix or drop that item")
    if Metric(index.config.metric) is Metric.COSINE:
        x = torch.nn.functional.normalize(x, dim=1)
    lists = _check_attributes(index, id_t.tolist(), attributes)
    centroids = index.centroids.detach().float().cpu()
    codes, scales = quantize_int8(x)
    return PreparedUpsert(
        ids=id_t,
        codes=codes,
        scales=scales,
        lists=assign(x, centroids) if id_t.numel() else torch.zeros(0, dtype=torch.int64),
        attributes=lists,
    )


def _assign(x: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """``kmeans.assign`` (the same products, so the same lists) without its copies for one chunk."""
    from sterling.model.kmeans import assign

    if x.shape[0] == 0:
        return torch.zeros(0, dtype=torch.int64)
    if x.shape[0] > 16_384:
        return assign(x, centroids)
    return (x @ centroids.T).argmax(dim=1)


def _check_attributes(index, id_list: list[int], attributes) -> list[list[str]] | None:
    """One deduplicated list of valid terms per id, or None."""
    if attributes is None:
        return None
    lists = list(attributes)
    if len(lists) != len(id_list):
        raise InvalidInputError(f"{len(id_list)} ids but {len(lists)} attribute lists; give one list of terms per id")
    for i, terms in zip(id_list, lists):
        if isinstance(terms, str):
            raise InvalidAttributeError(f"attributes of id {i} are a string {terms!r}; give a list of terms")
        for term in terms:
            if term not in index.vocab_index:
                validate_term(term, where=f" of id {i}")
    return [list(dict.fromkeys(terms)) for terms in lists]


def _prepare_compiled(index, ids, embeddings, attributes) -> PreparedUpsert | None:
    """``prepare_upsert`` for the common case — integer ids and a float32 [n, D] array, inner
    product, numba — in two GIL-free calls (checks + int8 codes; the list assignment, the
    same matmul as ``assign``). None: take the general path (it also words every error)."""
    from sterling.model.config import Metric
    from sterling.model.errors import DuplicateIdError, NonFiniteError

    if not ua.HAVE_NUMBA or Metric(index.config.metric) is not Metric.IP or index.centroids.device.type != "cpu":
        return None
    if isinstance(ids, torch.Tensor):
        ids = ids.detach().cpu().numpy() if ids.device.type == "cpu" else None
    if isinstance(embeddings, torch.Tensor):
        embeddings = (embeddings.detach().numpy() if embeddings.device.type == "cpu"
                      and not embeddings.requires_grad else None)
    if not isinstance(ids, np.ndarray) or not isinstance(embeddings, np.ndarray):
        return None
    if ids.dtype.kind not in "iu" or embeddings.dtype != np.float32 or embeddings.ndim != 2:
        return None
    if embeddings.shape != (ids.size, index.dim) or index.centroids.dtype != torch.float32:
        return None
    id_np = np.ascontiguousarray(ids.reshape(-1), dtype=np.int64)
    x = np.ascontiguousarray(embeddings)
    codes = np.empty(x.shape, dtype=np.int8)
    scales = np.empty(x.shape[0], dtype=np.float32)
    xt = torch.from_numpy(x)
    small = 0 < x.shape[0] <= 16_384
    if small:  # the assignment's products (as ``assign``), then checks, codes and argmax in one call
        lists = np.empty(x.shape[0], dtype=np.int64)
        products = (xt @ index.centroids.T).numpy()
        status, at = ua.check_quantize_assign(id_np, x, products, codes, scales, lists)
    else:
        status, at = ua.check_and_quantize(id_np, x, codes, scales)
    if status == 1:
        raise DuplicateIdError(f"item {at} has negative id {int(id_np[at])}; ids must be ≥ 0 (−1 marks empty slots)")
    if status == 2:
        raise DuplicateIdError(f"id {at} is used by more than one item; ids must be unique")
    if status == 3:
        raise NonFiniteError(f"embedding of id {int(id_np[at])} contains NaN or inf; fix or drop that item")
    terms = _check_attributes(index, id_np.tolist(), attributes)
    return PreparedUpsert(
        ids=torch.from_numpy(id_np),
        codes=torch.from_numpy(codes),
        scales=torch.from_numpy(scales),
        lists=torch.from_numpy(lists) if small else _assign(xt, index.centroids),
        attributes=terms,
    )


class SlotMap:
    """Where each item lives and which slots are free, kept up to date by the update ops.

    * id → slot: a sorted snapshot of ``item_ids`` (binary search) plus a hash
      table of the changes since; the snapshot is retaken from ``item_ids``
      when the hash is half full.
    * free slots: one stack per list (slots with ``item_ids == −1``), the lowest
      free slot on top after a rebuild.

    All of it is numpy arrays that the compiled write path
    (``sterling.kernels.update_apply``) reads and updates in one call.
    Rebuilt from the index tensors whenever the layout is replaced (re-pack).
    """

    def __init__(self, index) -> None:
        self.rebuild(index)

    def rebuild(self, index) -> None:
        ids = np.ascontiguousarray(index.item_ids.cpu().numpy())
        offs = np.ascontiguousarray(index.list_offsets.cpu().numpy().astype(np.int64))
        self._sorted, self._slot = ua.snapshot(ids)
        size = 1 << max(12, min(20, int(ids.shape[0]).bit_length()))  # ≈ 1–2 × capacity, 4k … 1M
        self._hkeys = np.full(size, -1, dtype=np.int64)
        self._hvals = np.zeros(size, dtype=np.int64)
        self.free_buf, self.free_top = ua.free_stacks(ids, offs)
        self.counters = np.array([self._sorted.shape[0], 0], dtype=np.int64)  # live items, hash entries
        self._offs = offs
        self._layout = (index.list_offsets, index.list_offsets._version)

    def arrays(self) -> tuple:
        """The state the kernels take: (sorted_ids, sorted_slots, hkeys, hvals, free_buf, free_top, offs, counters)."""
        return (self._sorted, self._slot, self._hkeys, self._hvals, self.free_buf, self.free_top,
                self._offs, self.counters)

    @property
    def live_items(self) -> int:
        return int(self.counters[0])

    def reserve(self, index, n: int) -> None:
        """Make room in the hash for ``n`` more changes (retakes the snapshot when needed)."""
        if self.counters[1] + n > self._hkeys.shape[0] // 2:
            self.rebuild(index)

    def push(self, lst: int, slot: int) -> None:
        self.free_buf[self._offs[lst] + self.free_top[lst]] = slot
        self.free_top[lst] += 1

    def pop(self, lst: int) -> int:
        if not self.free_top[lst]:
            raise InvalidInputError(f"list {lst} has no free slot; re-pack the index before this upsert")
        self.free_top[lst] -= 1
        return int(self.free_buf[self._offs[lst] + self.free_top[lst]])

    def lists_of(self, slots: list[int]) -> list[int]:
        """The list each slot belongs to."""
        return (np.searchsorted(self._offs, slots, side="right") - 1).tolist()

    def lookup(self, ids: list[int]) -> list[int]:
        """Slot of each id, −1 where absent."""
        if not len(ids):
            return []
        return ua.lookup_many(np.asarray(ids, dtype=np.int64), self._sorted, self._slot,
                              self._hkeys, self._hvals).tolist()

    def set_many(self, ids: list[int], slots: list[int]) -> None:
        """Record that each id now lives in its slot (−1: deleted)."""
        if len(ids):
            ua.hash_set(np.asarray(ids, dtype=np.int64), np.asarray(slots, dtype=np.int64),
                        self._hkeys, self._hvals, self.counters)


def slot_map(index) -> SlotMap:
    """The index's ``SlotMap`` (created on first use; lives as long as the layout)."""
    sm = index.__dict__.get("_slot_map")
    lo = index.list_offsets
    if sm is None or sm._layout[0] is not lo or sm._layout[1] != lo._version:
        sm = index.__dict__["_slot_map"] = SlotMap(index)
    return sm


def fresh_slot_map(index) -> SlotMap:
    """Replace the index's ``SlotMap`` by one rebuilt from its tensors (each list's lowest free slot
    on top, as after loading): one reference swap, so a concurrent ``holding`` reads either map
    whole. Writers must be excluded (``LiveModel.snapshot`` holds them)."""
    sm = index.__dict__["_slot_map"] = SlotMap(index)
    return sm


def free_slots_needed(index, batch: PreparedUpsert) -> tuple[torch.Tensor, bool]:
    """([nlist] free slots each list needs for ``batch``, whether every list has them now).

    A list needs one slot per batch item assigned to it, less the slots its
    items that the batch moves or replaces will free. When some list lacks
    room, ``repack(index, extra=needed)`` makes it.
    """
    sm = slot_map(index)
    nl = index.nlist
    want = np.bincount(batch.lists.numpy(), minlength=nl)
    old = [s for s in sm.lookup(batch.ids.tolist()) if s >= 0]
    if old:
        want -= np.bincount(sm.lists_of(old), minlength=nl)
    want = np.maximum(want, 0)
    return torch.from_numpy(want), bool((want <= sm.free_top).all())


BACKENDS = ("kernel", "torch")


def update_backend(index, backend: str | None = None) -> str:
    """The write path for ``index``: ``"kernel"`` (one compiled, GIL-free call per batch;
    CPU indexes) or ``"torch"`` (tensor ops, any device). ``None`` picks the kernel when
    numba is installed and the index is on the CPU."""
    cpu = index.codes.device.type == "cpu"
    if backend is None:
        return "kernel" if ua.HAVE_NUMBA and cpu else "torch"
    if backend not in BACKENDS:
        raise InvalidInputError(f"update backend {backend!r} is not one of {BACKENDS}")
    if backend == "kernel" and not cpu:
        raise InvalidInputError(
            f"the update kernel writes CPU tensors; this index is on {index.codes.device}: use backend='torch'"
        )
    return backend


def apply_upsert(index, batch: PreparedUpsert, *, exclusive=nullcontext, backend: str | None = None) -> int:
    """Write a prepared batch into free slots of its lists, in place; bumps ``version``.

    Every list must have room (``free_slots_needed``; grow it with
    ``repack`` first), else ``ListsFullError`` (nothing changed). An id
    already present leaves its old slot free (tombstoned: alive bit 0,
    id −1). The tensors are written inside ``exclusive()`` (the caller's
    writer guard). ``backend``: see ``update_backend``; both give the same
    tensors. Returns the new version.
    """
    if update_backend(index, backend) == "torch":
        return _apply_upsert_torch(index, batch, exclusive)
    sm = slot_map(index)
    n = batch.ids.numel()
    sm.reserve(index, n)
    has_terms = batch.attributes is not None
    W = index.bloom.shape[1]
    adt = index.attr_ids.numpy().dtype
    if has_terms:
        encoded = _encode_terms(index, batch.ids.tolist(), batch.attributes)
        t_off = np.zeros(n + 1, dtype=np.int64)
        np.cumsum([len(t) for t in encoded], out=t_off[1:])
        t_ids = np.fromiter((t for tids in encoded for t in tids), dtype=adt, count=int(t_off[-1]))
        t_words = _term_words(index, t_ids)
    else:
        t_off, t_ids, t_words = np.zeros(n + 1, np.int64), np.zeros(0, adt), np.zeros((0, W), np.int64)
    need = np.zeros(max(index.nlist, n), dtype=np.int64)
    pos = np.zeros(n, dtype=np.int64)
    args = (batch.ids.numpy(), batch.codes.numpy(), batch.scales.numpy(), batch.lists.numpy(),
            t_off, t_ids, t_words, has_terms, *sm.arrays())
    version = index.version.reshape(1).numpy()
    sm_arrays = args[8:]
    for _ in range(2):
        # where every row goes and the rows landing in dead slots are worked out and written while
        # queries run (they skip dead slots); only the visible part holds them out
        codes, scales, bloom = index.codes.numpy(), index.scales.numpy(), index.bloom.numpy()
        attr_ids, attr_offsets = index.attr_ids.numpy(), index.attr_offsets.numpy()
        plan = ua.upsert_plan(*args[:12], *sm_arrays[4:7], bloom, attr_ids, attr_offsets, need, pos)
        v = int(plan[0])
        if v == ua.ROOM:
            raise ListsFullError(torch.from_numpy(need[: index.nlist].copy()))
        if v != ua.SHORT:
            ids_b, codes_b, scales_b = args[0], args[1], args[2]
            ua.upsert_prewrite(plan, ids_b, codes_b, scales_b, codes, scales, bloom, attr_ids, attr_offsets)
            with exclusive():
                v = ua.upsert_commit(plan, ids_b, codes_b, scales_b, *sm_arrays[2:], codes, scales,
                                     index.item_ids.numpy(), bloom, index.alive.numpy(), attr_ids, attr_offsets,
                                     version)
            return int(v)
        # some exact lists are too short for their new terms: lay the CSR out again with room
        # (same content; readers may keep using the old arrays until the swap), then apply
        short = np.flatnonzero(need[:n] >= 0)
        grown = _grown_csr(index, [(int(pos[r]), [0] * int(need[r])) for r in short])
        with exclusive():
            index.attr_ids, index.attr_offsets = grown
    raise AssertionError("the grown exact lists still do not fit")  # pragma: no cover


class ListsFullError(InvalidInputError):
    """Some lists have too few free slots for an upsert batch (``needed``: [nlist] slots each
    list needs); re-pack with ``repack(index, extra=needed)`` and apply again."""

    def __init__(self, needed: torch.Tensor) -> None:
        short = int((needed > 0).sum())
        super().__init__(f"{short} lists have too few free slots for this upsert; re-pack the index "
                         "(repack(index, extra=needed)) before applying it")
        self.needed = needed


def _term_words(index, t_ids: np.ndarray) -> np.ndarray:
    """[nnz] vocabulary ids → [nnz, W] int64 Bloom words (hashed once per term, per index; the
    vocabulary only grows, so the table is extended with the terms added since)."""
    table = index.__dict__.get("_term_word_table")
    have = 0 if table is None else table.shape[0]
    if have < len(index.vocab):
        fresh = bloom_mod.term_words(index.vocab[have:], index.bloom_spec).numpy()
        table = fresh if table is None else np.concatenate([table, fresh])
        index.__dict__["_term_word_table"] = table
    return np.ascontiguousarray(table[t_ids.astype(np.int64)])


def _apply_upsert_torch(index, batch: PreparedUpsert, exclusive) -> int:
    """The tensor-op write path (any device); the reference of ``upsert_apply``."""
    sm = slot_map(index)
    sm.reserve(index, batch.ids.numel())
    id_list = batch.ids.tolist()
    old = sm.lookup(id_list)
    old_slots = [s for s in old if s >= 0]
    needed, fits = free_slots_needed(index, batch)
    if not fits:
        raise ListsFullError(needed)
    if batch.attributes is None:
        encoded = _terms_of_slots(index, old)
    else:
        encoded = _encode_terms(index, id_list, batch.attributes)
    for s, lst in zip(old_slots, sm.lists_of(old_slots)):
        sm.push(lst, s)
    new_pos = [sm.pop(lst) for lst in batch.lists.tolist()]
    sm.set_many(id_list, new_pos)
    sm.counters[0] += len(id_list) - len(old_slots)
    taken = set(new_pos)
    freed = torch.tensor(sorted(s for s in old_slots if s not in taken), dtype=torch.int64)
    pos = torch.tensor(new_pos, dtype=torch.int64)
    sig = _signatures(index, encoded)
    # exact CSR: grown into new arrays (written before they are swapped in), else in place
    n_terms = torch.tensor([len(t) for t in encoded], dtype=torch.int64)
    offs = index.attr_offsets.cpu()
    grown = None
    short = (n_terms > offs[pos + 1] - offs[pos]).nonzero().squeeze(1).tolist()
    if short:
        grown = _grown_csr(index, [(new_pos[r], encoded[r]) for r in short])
    attr_ids, attr_offsets = grown if grown is not None else (index.attr_ids, index.attr_offsets)
    dst_free, _ = _slot_ranges(attr_offsets, freed)
    dst_new, fill = _csr_fill(attr_offsets, pos, encoded, attr_ids.dtype)
    alive_at, alive_bytes = _alive_after(index, set_live=pos, set_dead=freed)
    if grown is not None:
        attr_ids[dst_free] = -1
        attr_ids[dst_new] = fill
    dev = index.codes.device
    with exclusive():
        if grown is not None:
            index.attr_ids, index.attr_offsets = grown
        else:
            index.attr_ids[dst_free.to(dev)] = -1
            index.attr_ids[dst_new.to(dev)] = fill.to(dev)
        if freed.numel():
            f = freed.to(dev)
            index.item_ids[f] = -1
            index.scales[f] = 0.0
            index.bloom[f] = 0
        p = pos.to(dev)
        index.codes[p] = batch.codes.to(dev)
        index.scales[p] = batch.scales.to(dev)
        index.item_ids[p] = batch.ids.to(dev)
        index.bloom[p] = sig.to(dev)
        index.alive[alive_at.to(dev)] = alive_bytes.to(dev)
        index.version += 1
        version = int(index.version)
    return version


def apply_delete(index, ids: torch.Tensor, *, exclusive=nullcontext, backend: str | None = None) -> tuple[int, int]:
    """Tombstone items by external id (absent ids are ignored); bumps ``version``.

    Returns (items deleted, new version).
    """
    sm = slot_map(index)
    sm.reserve(index, ids.numel())
    if update_backend(index, backend) == "kernel":
        arrays = sm.arrays()
        slots = ua.lookup_many(ids.numpy(), *arrays[:4])  # reads only: while queries run
        with exclusive():
            gone = ua.delete_commit(ids.numpy(), slots, *arrays[2:], index.item_ids.numpy(), index.scales.numpy(),
                                    index.bloom.numpy(), index.alive.numpy(), index.attr_ids.numpy(),
                                    index.attr_offsets.numpy(), index.version.reshape(1).numpy())
        return int(gone), int(index.version)
    id_list = ids.tolist()
    old = sm.lookup(id_list)
    gone = [s for s in old if s >= 0]
    for s, lst in zip(gone, sm.lists_of(gone)):
        sm.push(lst, s)
    sm.set_many([i for i, s in zip(id_list, old) if s >= 0], [-1] * len(gone))
    sm.counters[0] -= len(gone)
    freed = torch.tensor(sorted(gone), dtype=torch.int64)
    dst_free, _ = _slot_ranges(index.attr_offsets, freed)
    alive_at, alive_bytes = _alive_after(index, set_live=freed[:0], set_dead=freed)
    dev = index.codes.device
    with exclusive():
        if freed.numel():
            f = freed.to(dev)
            index.item_ids[f] = -1
            index.scales[f] = 0.0
            index.bloom[f] = 0
            index.attr_ids[dst_free.to(dev)] = -1
            index.alive[alive_at.to(dev)] = alive_bytes.to(dev)
        index.version += 1
        version = int(index.version)
    return len(gone), version


def _slot_ranges(attr_offsets: torch.Tensor, pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(every CSR entry index of the slots ``pos`` [n], slot length [n]), on the CPU."""
    offs = attr_offsets.cpu()
    start = offs[pos]
    length = offs[pos + 1] - start
    total = int(length.sum())
    if not total:
        return torch.zeros(0, dtype=torch.int64), length
    first = torch.cumsum(length, 0) - length
    dst = torch.repeat_interleave(start - first, length) + torch.arange(total)
    return dst, length


_SHIFTS = torch.tensor([1 << b for b in range(8)], dtype=torch.int64)


def _alive_after(index, *, set_live: torch.Tensor, set_dead: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(byte indices, new byte values) of the alive bitmask once ``set_live`` are alive and
    ``set_dead`` are not (every other bit as ``item_ids`` says now: alive ⇔ id ≥ 0)."""
    touched = torch.cat([set_live, set_dead])
    if touched.numel() == 0:
        return torch.zeros(0, dtype=torch.int64), torch.zeros(0, dtype=torch.uint8)
    byte = torch.unique(touched >> 3)
    cap = index.capacity
    rows = (byte[:, None] * 8 + torch.arange(8)).reshape(-1)
    ok = rows < cap
    live = (index.item_ids.cpu()[rows.clamp(max=cap - 1)] >= 0) & ok
    live[torch.isin(rows, set_dead)] = False
    live[torch.isin(rows, set_live)] = True
    return byte, (live.reshape(-1, 8).to(torch.int64) * _SHIFTS).sum(1).to(torch.uint8)


def _terms_of_slots(index, slots: list[int]) -> list[list[int]]:
    """Vocabulary ids of each slot's exact list (padding dropped); ``[]`` for −1."""
    have = [s for s in slots if s >= 0]
    dst, length = _slot_ranges(index.attr_offsets, torch.tensor(have, dtype=torch.int64))
    vals = index.attr_ids.cpu()[dst].tolist() if dst.numel() else []
    per, at = {}, 0
    for s, L in zip(have, length.tolist()):
        per[s] = [t for t in dict.fromkeys(vals[at : at + L]) if t >= 0]
        at += L
    return [per[s] if s >= 0 else [] for s in slots]


def _encode_terms(index, id_list: list[int], lists: list[list[str]]) -> list[list[int]]:
    out = []
    for terms in lists:
        tids = []
        for term in terms:
            tid = index.vocab_index.get(term)
            if tid is None:
                tid = index.vocab_index[term] = len(index.vocab)
                index.vocab.append(term)
            tids.append(tid)
        out.append(tids)
    return out


def _signatures(index, encoded: list[list[int]]) -> torch.Tensor:
    """[n, W] Bloom rows: the OR of each item's term words."""
    n_terms = torch.tensor([len(t) for t in encoded], dtype=torch.int64)
    sig = torch.zeros(len(encoded), index.bloom_spec.words, dtype=torch.int64)
    flat = torch.tensor([t for tids in encoded for t in tids], dtype=torch.int64)
    if flat.numel():
        used, inv = torch.unique(flat, return_inverse=True)
        words = bloom_mod.term_words([index.vocab[t] for t in used.tolist()], index.bloom_spec)  # [U, W]
        per = words[inv]  # [nnz, W]
        first = torch.cumsum(n_terms, 0) - n_terms
        for j in range(int(n_terms.max())):  # OR the j-th term of every row at once
            has = n_terms > j
            sig[has] |= per[first[has] + j]
    return sig


def _csr_fill(attr_offsets: torch.Tensor, pos: torch.Tensor, encoded: list[list[int]], dtype):
    """(CSR entry indices of slots ``pos``, their values): each list padded to its slot with a
    repeat of its last id, or −1 when empty (duplicates do not change set membership)."""
    dst, length = _slot_ranges(attr_offsets, pos)
    fill: list[int] = []
    for tids, L in zip(encoded, length.tolist()):
        if L:
            fill.extend(tids)
            fill.extend([tids[-1] if tids else -1] * (L - len(tids)))
    return dst, torch.tensor(fill, dtype=dtype)


def _grown_csr(index, short: list[tuple[int, list[int]]]) -> tuple[torch.Tensor, torch.Tensor]:
    """A re-laid-out copy of the CSR (one O(nnz) pass): the short slots get their length, and
    every slot at least ``reserve`` entries — the 99th percentile of list lengths or the
    longest list of this batch, at most 32 — so later upserts, which land in slots other
    items freed, write in place instead of growing the CSR again (``repack`` trims it back)."""
    offs = index.attr_offsets.cpu().numpy()
    old_len = np.diff(offs)
    live = old_len[index.item_ids.cpu().numpy() >= 0]
    p99 = int(np.quantile(live, 0.99)) if live.size else 0
    reserve = min(32, max([p99] + [len(t) for _, t in short]))
    new_len = np.maximum(old_len, reserve)
    for p, tids in short:
        new_len[p] = max(new_len[p], len(tids))
    return _relayout_csr(index.attr_ids, offs, new_len, keep=None)


def _relayout_csr(attr_ids: torch.Tensor, offs: np.ndarray, new_len: np.ndarray, keep) -> tuple:
    """Copy each slot's list into a CSR with ``new_len`` entries per slot (padding −1).

    ``keep`` (optional): [n_slots] source slot of each new slot (re-pack); default identity.
    """
    src = attr_ids.cpu().numpy()
    if keep is None:
        keep = np.arange(len(offs) - 1)
    src_start = offs[:-1][keep]
    src_len = np.minimum(np.diff(offs)[keep], new_len)
    new_offs = np.zeros(len(new_len) + 1, dtype=np.int64)
    np.cumsum(new_len, out=new_offs[1:])
    out = np.full(int(new_offs[-1]), -1, dtype=src.dtype)
    n = int(src_len.sum())
    if n:
        rep_dst = np.repeat(new_offs[:-1] - np.concatenate([[0], np.cumsum(src_len)[:-1]]), src_len)
        rep_src = np.repeat(src_start - np.concatenate([[0], np.cumsum(src_len)[:-1]]), src_len)
        j = np.arange(n)
        out[rep_dst + j] = src[rep_src + j]
    dev = attr_ids.device
    return torch.from_numpy(out).to(dev), torch.from_numpy(new_offs).to(dev)


def repack(index, *, extra: torch.Tensor | None = None, slack: float | None = None) -> dict[str, torch.Tensor]:
    """A compacted layout of ``index``: live items only, per-list slack reserved again.

    Reads the index without changing it (safe while queries run); the caller
    swaps the result in with ``install_layout``. List ``l`` gets
    ``live_l + max(ceil(live_l · slack), extra_l)`` slots (at least one
    spare slot in a non-empty list); free slots hold
    no attribute entries, live items keep their terms (padding dropped).

    Args:
        extra: [nlist] slots a list must have free afterwards (overflow).
        slack: spare fraction per list (default ``config.list_slack``).
    Returns:
        new tensors for every layout buffer (centroids and version unchanged).
    """
    slack = index.config.list_slack if slack is None else slack
    ids = index.item_ids.cpu()
    offs = index.list_offsets.cpu()
    nl = index.nlist
    live = (ids >= 0).nonzero().squeeze(1)  # in list order
    lst = torch.searchsorted(offs, live, right=True) - 1
    sizes = torch.bincount(lst, minlength=nl)
    spare = torch.ceil(sizes.double() * slack).long()
    spare = torch.where(sizes > 0, spare.clamp(min=1), spare)  # lists a shard does not hold stay empty
    if extra is not None:
        spare = torch.maximum(spare, extra.cpu().long())
    caps = sizes + spare
    new_offs = torch.zeros(nl + 1, dtype=torch.int64)
    torch.cumsum(caps, 0, out=new_offs[1:])
    size_off = torch.zeros(nl + 1, dtype=torch.int64)
    torch.cumsum(sizes, 0, out=size_off[1:])
    dest = new_offs[lst] + (torch.arange(live.numel()) - size_off[lst])
    cap = int(new_offs[-1])
    dev = index.codes.device
    codes = torch.zeros(cap, index.dim, dtype=index.codes.dtype)
    codes[dest] = index.codes.cpu()[live]
    scales = torch.zeros(cap, dtype=index.scales.dtype)
    scales[dest] = index.scales.cpu()[live]
    item_ids = torch.full((cap,), -1, dtype=torch.int64)
    item_ids[dest] = ids[live]
    bloom = torch.zeros(cap, index.bloom.shape[1], dtype=index.bloom.dtype)
    bloom[dest] = index.bloom.cpu()[live]
    # exact lists without their padding (−1 entries and trailing repeats)
    aoffs = index.attr_offsets.cpu().numpy()
    a = index.attr_ids.cpu().numpy()
    slot_of_entry = np.repeat(np.arange(len(aoffs) - 1), np.diff(aoffs))
    first = np.zeros(a.size, dtype=bool)
    first[aoffs[:-1][np.diff(aoffs) > 0]] = True
    prev = np.concatenate([[-2], a[:-1]])
    keep_entry = (a >= 0) & (first | (a != prev))
    counts = np.bincount(slot_of_entry[keep_entry], minlength=len(aoffs) - 1)
    tight = a[keep_entry]
    tight_offs = np.zeros(len(aoffs), dtype=np.int64)
    np.cumsum(counts, out=tight_offs[1:])
    new_len = np.zeros(cap, dtype=np.int64)
    dest_np, live_np = dest.numpy(), live.numpy()
    new_len[dest_np] = counts[live_np]
    source = np.zeros(cap, dtype=np.int64)
    source[dest_np] = live_np
    attr_ids, attr_offsets = _relayout_csr(torch.from_numpy(tight), tight_offs, new_len, keep=source)
    from sterling.kernels import pack_bits

    out = {
        "list_offsets": new_offs, "codes": codes, "scales": scales, "item_ids": item_ids,
        "bloom": bloom, "attr_ids": attr_ids, "attr_offsets": attr_offsets, "alive": pack_bits(item_ids >= 0),
    }
    return {n: t.to(dev) for n, t in out.items()}


# A local re-layout may take at most this share of the lists; a fuller index is re-packed whole.
LOCAL_MAX_SHARE = 0.25


@dataclass(frozen=True)
class LocalLayout:
    """Windows of neighbouring lists laid out again inside their own slot ranges (``local_repack``).

    ``windows``: per window (first list, last list, new list offsets [last − first + 2], slot
    range start, and the window's new ``codes``, ``scales``, ``item_ids``, ``bloom``, exact
    lists ``attr_ids`` and ``attr_offsets`` (global entry offsets of its slots, the range's ends
    unchanged)).
    """

    windows: list


def local_repack(index, extra: torch.Tensor, *, slack: float | None = None,
                 max_share: float = LOCAL_MAX_SHARE) -> LocalLayout | None:
    """Room for the lists that lack it, by laying out again only a window of neighbouring lists
    around each: the overflow path of streaming upserts.

    A full list borrows the spare slots of its neighbours: the window grows one list at a time
    (toward the neighbour with more free slots) until its slot range holds every list in it at
    ``live + max(ceil(live · slack / 2), extra)`` slots (≥ 1 spare in a non-empty list), the
    range's leftover slots shared out evenly (a packed-memory-array rebalance). Nothing outside the windows moves:
    the slot ranges, the exact lists' entry ranges and every other list stay where they are, so
    the cost is the windows' size, not the index's (a whole ``repack`` copies every tensor).
    Reads the index without changing it (queries may run); ``install_local`` swaps it in.

    Returns None when the windows would cover more than ``max_share`` of the lists (the index
    is nearly full: re-pack it whole, with fresh slack everywhere).
    """
    slack = index.config.list_slack if slack is None else slack
    sm = slot_map(index)
    offs = index.list_offsets.cpu().numpy().astype(np.int64)
    nl = index.nlist
    need = np.asarray(extra.cpu().numpy() if isinstance(extra, torch.Tensor) else extra, dtype=np.int64)
    cap = np.diff(offs)
    free = sm.free_top.astype(np.int64)
    live = cap - free
    # inside a window every list keeps at least half its slack (≥ 1 slot when it holds items) and
    # the lists that lack room get what the batch needs; the window's other free slots are
    # shared out evenly. Windows only grow while that fits: an index whose lists are all below
    # half their slack is re-packed whole, with fresh slack everywhere.
    spare = np.ceil(live * slack / 2).astype(np.int64)
    spare = np.where(live > 0, np.maximum(spare, 1), spare)
    want = live + np.maximum(spare, need)
    short = np.flatnonzero(need > free)
    if short.size == 0:
        return LocalLayout(windows=[])
    limit = max(1, int(nl * max_share))
    spans: list[list[int]] = []
    for lst in short.tolist():
        if spans and spans[-1][0] <= lst <= spans[-1][1]:
            continue
        a = b = lst
        if spans and spans[-1][1] >= a - 1:  # touching the last window: grow that one
            a = spans.pop()[0]
        while want[a : b + 1].sum() > offs[b + 1] - offs[a]:
            left = free[a - 1] if a > 0 else -1
            right = free[b + 1] if b + 1 < nl else -1
            if left < 0 and right < 0:
                return None
            if right >= left:
                b += 1
            else:
                a -= 1
            if b - a + 1 > limit:
                return None
            if spans and spans[-1][1] >= a - 1:
                a = min(a, spans.pop()[0])
        spans.append([a, b])
    if sum(b - a + 1 for a, b in spans) > limit:
        return None
    return LocalLayout(windows=[_window_layout(index, offs, want, a, b) for a, b in spans])


def _window_layout(index, offs: np.ndarray, want: np.ndarray, a: int, b: int) -> tuple:
    """Lists a..b laid out again inside slots [offs[a], offs[b + 1]) (see ``local_repack``)."""
    s0, s1 = int(offs[a]), int(offs[b + 1])
    caps = want[a : b + 1].copy()
    left = (s1 - s0) - int(caps.sum())
    n = b - a + 1
    # the slots left over go evenly to the lists that hold or held slots (a list a document
    # shard does not hold keeps none)
    share = np.flatnonzero((caps > 0) | (np.diff(offs[a : b + 2]) > 0))
    if share.size == 0:
        share = np.arange(n)
    caps[share] += left // share.size
    caps[share[: left % share.size]] += 1
    new_offs = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(caps, out=new_offs[1:])
    new_offs += s0
    ids = index.item_ids.cpu().numpy()[s0:s1]
    live = np.flatnonzero(ids >= 0)  # window-relative, in list order
    lst = np.searchsorted(offs[a : b + 2] - s0, live, side="right") - 1
    sizes = np.bincount(lst, minlength=n)
    first = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(sizes, out=first[1:])
    dest = new_offs[lst] - s0 + (np.arange(live.size) - first[lst])
    W = s1 - s0
    codes = np.zeros((W, index.dim), dtype=index.codes.cpu().numpy().dtype)
    codes[dest] = index.codes.cpu().numpy()[s0:s1][live]
    scales = np.zeros(W, dtype=np.float32)
    scales[dest] = index.scales.cpu().numpy()[s0:s1][live]
    item_ids = np.full(W, -1, dtype=np.int64)
    item_ids[dest] = ids[live]
    bloom = np.zeros((W, index.bloom.shape[1]), dtype=index.bloom.cpu().numpy().dtype)
    bloom[dest] = index.bloom.cpu().numpy()[s0:s1][live]
    # exact lists: the live items' terms without padding, in the window's own entry range; the
    # entries left over become room (−1 padding) shared by the free slots
    aoffs = index.attr_offsets.cpu().numpy()[s0 : s1 + 1].astype(np.int64)
    A0, A1 = int(aoffs[0]), int(aoffs[-1])
    ent = index.attr_ids.cpu().numpy()[A0:A1]
    per_slot = np.diff(aoffs)
    slot_of = np.repeat(np.arange(W), per_slot)
    head = np.zeros(ent.size, dtype=bool)
    head[(aoffs[:-1] - A0)[per_slot > 0]] = True
    prev = np.concatenate([[-2], ent[:-1]]) if ent.size else ent
    keep = (ent >= 0) & (head | (ent != prev)) & (ids[slot_of] >= 0)
    tight_len = np.bincount(slot_of[keep], minlength=W)
    tight = ent[keep]
    tight_at = np.zeros(W + 1, dtype=np.int64)
    np.cumsum(tight_len, out=tight_at[1:])
    length = np.zeros(W, dtype=np.int64)
    length[dest] = tight_len[live]
    room = (A1 - A0) - int(length.sum())
    spare_slots = np.flatnonzero(item_ids < 0)
    if spare_slots.size:
        length[spare_slots] += room // spare_slots.size
        length[spare_slots[: room % spare_slots.size]] += 1
    else:
        length[-1] += room
    attr_offsets = np.zeros(W + 1, dtype=np.int64)
    np.cumsum(length, out=attr_offsets[1:])
    attr_ids = np.full(A1 - A0, -1, dtype=ent.dtype)
    cnt = tight_len[live]
    total = int(cnt.sum())
    if total:
        within = np.arange(total) - np.repeat(np.cumsum(cnt) - cnt, cnt)
        attr_ids[np.repeat(attr_offsets[dest], cnt) + within] = tight[np.repeat(tight_at[live], cnt) + within]
    attr_offsets += A0
    return (a, b, new_offs, s0, codes, scales, item_ids, bloom, attr_ids, attr_offsets)


def install_local(index, layout: LocalLayout) -> None:
    """Write a ``local_repack`` result into ``index`` in place (the caller excludes concurrent
    queries) and bring its ``SlotMap`` up to date: the moved items' slots, the windows' free-slot
    stacks and list offsets; nothing outside the windows is touched."""
    if not layout.windows:
        return
    sm = slot_map(index)
    lo = index.list_offsets
    moved_ids, moved_slots = [], []
    for a, b, new_offs, s0, codes, scales, item_ids, bloom, attr_ids, attr_offsets in layout.windows:
        W = item_ids.shape[0]
        s1 = s0 + W
        old_ids = index.item_ids[s0:s1].cpu().numpy().copy()  # (a view would see the new ids)
        A0 = int(attr_offsets[0])
        for name, v in (("codes", codes), ("scales", scales), ("item_ids", item_ids), ("bloom", bloom)):
            getattr(index, name)[s0:s1].copy_(torch.from_numpy(v))
        index.attr_ids[A0 : A0 + attr_ids.shape[0]].copy_(torch.from_numpy(attr_ids))
        index.attr_offsets[s0 : s1 + 1].copy_(torch.from_numpy(attr_offsets))
        bits = np.unpackbits(index.alive.cpu().numpy()[s0 >> 3 : (s1 + 7) >> 3], bitorder="little")
        bits[s0 - (s0 >> 3 << 3) : s0 - (s0 >> 3 << 3) + W] = item_ids >= 0
        index.alive[s0 >> 3 : (s1 + 7) >> 3].copy_(torch.from_numpy(np.packbits(bits, bitorder="little")))
        lo[a : b + 2].copy_(torch.from_numpy(new_offs))
        # the slot map: list offsets, free stacks of the window's lists, where moved items are now
        sm._offs[a : b + 2] = new_offs
        buf, top = ua.free_stacks(item_ids, new_offs - s0)
        sm.free_buf[s0:s1] = buf + s0  # (entries past a list's top are never read)
        sm.free_top[a : b + 1] = top
        moved = np.flatnonzero((item_ids >= 0) & (item_ids != old_ids))
        moved_ids.append(item_ids[moved])
        moved_slots.append(moved + s0)
    ids = np.concatenate(moved_ids)
    if sm.counters[1] + ids.size > sm._hkeys.shape[0] // 2:
        sm.rebuild(index)
    else:
        ua.hash_set(ids, np.concatenate(moved_slots), sm._hkeys, sm._hvals, sm.counters)
        sm._layout = (lo, lo._version)


def install_layout(index, layout: dict[str, torch.Tensor]) -> None:
    """Swap a ``repack`` result into ``index`` (the caller excludes concurrent queries)."""
    for name, t in layout.items():
        setattr(index, name, t)
    index.__dict__.pop("_slot_map", None)


def footprint(index) -> int:
    """Bytes held by the index's buffers."""
    return sum(t.numel() * t.element_size() for t in index.tensors().values())
