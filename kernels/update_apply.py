"""Compiled write path of streaming updates: one call per upsert or delete batch.

An upsert batch of 1,000 items used to be ~200 small PyTorch and Python
operations; each released and re-took the GIL, so with a query thread
running the writer queued behind the reader a hundred times per batch
(``BENCHMARKS.md``, ``sterling bench updates``). Here the whole apply — id →
slot lookups, the per-list free-slot stacks, the room check, the Bloom rows,
the exact CSR lists, the alive bits, the tensor writes and the version bump —
is one numba function compiled with ``nogil=True``.

State of the slot map (owned by ``sterling.model.updates.SlotMap``), all
numpy arrays:

* ``sorted_ids`` / ``sorted_slots`` [M]: id → slot snapshot (binary search);
* ``hkeys`` / ``hvals`` [H] (H a power of two): changes since the snapshot,
  open addressing with linear probing, ``hkeys == −1`` empty, ``hvals == −1``
  "deleted";
* ``free_buf`` [capacity] / ``free_top`` [nlist]: list ``l``'s stack of free
  slots is ``free_buf[offs[l] : offs[l] + free_top[l]]``, popped from the end
  (the lowest free slot first after a rebuild);
* ``counters`` [2]: live items, entries used in the hash.

Every function is plain Python that numba compiles when it is installed; the
same code runs interpreted where numba is absent (slowly, but the semantics
are one). The PyTorch write path in ``sterling.model.updates`` is the
reference the tests compare these against, tensor for tensor.
"""

from __future__ import annotations

import numpy as np

try:  # optional, as for the scan kernels
    from numba import njit

    HAVE_NUMBA = True
    _jit = njit(nogil=True, cache=True)
except ImportError:  # pragma: no cover - exercised where numba is absent
    HAVE_NUMBA = False

    def _jit(f):
        return f


__all__ = [
    "HAVE_NUMBA",
    "ROOM",
    "SHORT",
    "check_and_quantize",
    "check_quantize_assign",
    "delete_apply",
    "delete_commit",
    "free_stacks",
    "hash_set",
    "lookup_many",
    "quantize_rows",
    "snapshot",
    "upsert_apply",
    "upsert_commit",
    "upsert_plan",
    "upsert_prewrite",
]

ROOM = -1  # upsert_apply: some list has too few free slots (need_out says how many it needs)
SHORT = -2  # upsert_apply: some new slot's exact list is too short (need_out[r] = terms of row r)
_MIX = 0x2545F4914F6CDD1D  # odd multiplier; only the product's low bits are used


@_jit
def _bucket(hkeys, key):
    """Index of ``key`` in the hash, or of the empty bucket where it would go."""
    mask = hkeys.shape[0] - 1
    k = int(key)
    i = ((k ^ (k >> 16) ^ (k >> 32)) * _MIX) & mask
    while hkeys[i] != -1 and hkeys[i] != key:
        i = (i + 1) & mask
    return i


@_jit
def _slot_of(key, sorted_ids, sorted_slots, hkeys, hvals):
    b = _bucket(hkeys, key)
    if hkeys[b] == key:
        return hvals[b]
    m = sorted_ids.shape[0]
    if m == 0:
        return -1
    j = np.searchsorted(sorted_ids, key)
    if j < m and sorted_ids[j] == key:
        return sorted_slots[j]
    return -1


@_jit
def _set(key, slot, hkeys, hvals, counters):
    b = _bucket(hkeys, key)
    if hkeys[b] == -1:
        hkeys[b] = key
        counters[1] += 1
    hvals[b] = slot


@_jit
def _list_of(offs, slot):
    return np.searchsorted(offs, slot, side="right") - 1


@_jit
def lookup_many(ids, sorted_ids, sorted_slots, hkeys, hvals):
    """[n] ids → [n] slots (−1 where absent)."""
    out = np.empty(ids.shape[0], dtype=np.int64)
    for r in range(ids.shape[0]):
        out[r] = _slot_of(ids[r], sorted_ids, sorted_slots, hkeys, hvals)
    return out


@_jit
def hash_set(ids, slots, hkeys, hvals, counters):
    """Record id → slot changes (−1 = deleted)."""
    for r in range(ids.shape[0]):
        _set(ids[r], slots[r], hkeys, hvals, counters)


def snapshot(item_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(sorted live ids, their slots) of ``item_ids`` (live ⇔ id ≥ 0). numpy: whole-array ops."""
    live = np.flatnonzero(item_ids >= 0)
    keys = item_ids[live]
    order = np.argsort(keys, kind="stable")
    return np.ascontiguousarray(keys[order], dtype=np.int64), np.ascontiguousarray(live[order], dtype=np.int64)


def free_stacks(item_ids: np.ndarray, offs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(free_buf [capacity], free_top [nlist]): each list's free slots, the lowest on top."""
    free = np.flatnonzero(item_ids < 0)
    cut = np.searchsorted(free, offs)
    top = np.diff(cut).astype(np.int64)
    buf = np.zeros(item_ids.shape[0], dtype=np.int64)
    lst = np.repeat(np.arange(top.shape[0]), top)
    within = np.arange(free.shape[0]) - cut[:-1][lst]
    buf[offs[:-1][lst] + top[lst] - 1 - within] = free
    return buf, top


@_jit
def check_and_quantize(ids, x, codes, scales):
    """An upsert batch's checks and quantization in one pass: (status, where).

    status 0: fine; 1: ``ids[where]`` is negative; 2: ``where`` is an id given twice;
    3: row ``where`` of ``x`` holds NaN or inf. ``codes`` / ``scales`` as ``quantize_rows``.
    """
    n = ids.shape[0]
    for r in range(n):
        if ids[r] < 0:
            return 1, r
    s = np.sort(ids)
    for r in range(1, n):
        if s[r] == s[r - 1]:
            return 2, s[r]
    bad = quantize_rows(x, codes, scales)
    if bad >= 0:
        return 3, bad
    return 0, 0


@_jit
def check_quantize_assign(ids, x, products, codes, scales, lists):
    """``check_and_quantize`` plus each row's list: the first column of its largest entry in
    ``products`` [n, nlist] (``x @ centroids.T``), as ``torch.argmax`` picks it. One GIL-free
    call for the whole batch encoding. Returns (status, where) as ``check_and_quantize``."""
    status, at = check_and_quantize(ids, x, codes, scales)
    if status != 0:
        return status, at
    n, nl = products.shape
    for r in range(n):
        best = products[r, 0]
        arg = 0
        for c in range(1, nl):
            v = products[r, c]
            if v > best:
                best = v
                arg = c
        lists[r] = arg
    return 0, 0


@_jit
def quantize_rows(x, codes, scales):
    """[n, D] fp32 → int8 codes and per-row scales in place, bit-identical to
    ``sterling.kernels.quantize_int8`` (fp32 arithmetic, round half to even).
    Returns the first row holding NaN or inf, or −1."""
    n, d = x.shape
    for r in range(n):
        amax = np.float32(0.0)
        for j in range(d):
            v = x[r, j]
            if not np.isfinite(v):
                return r
            a = abs(v)
            if a > amax:
                amax = a
        s = np.float32(amax / np.float32(127.0))
        scales[r] = s
        safe = s if s > np.float32(0.0) else np.float32(1.0)
        for j in range(d):
            q = np.float32(x[r, j] / safe)
            f = np.floor(q)
            diff = q - f
            if diff > 0.5 or (diff == 0.5 and (f % 2.0) != 0.0):
                f += 1.0
            if f > 127.0:
                f = 127.0
            elif f < -127.0:
                f = -127.0
            codes[r, j] = np.int8(f)
    return -1


@_jit
def _terms_in_slot(attr_ids, attr_offsets, slot, out, at):
    """Copy slot's exact list (padding dropped: −1 and repeats of the previous entry) to
    ``out[at:]``; returns how many were copied (``out`` may be empty to count only)."""
    n = 0
    prev = -2
    for e in range(attr_offsets[slot], attr_offsets[slot + 1]):
        t = attr_ids[e]
        if t >= 0 and t != prev:
            if out.shape[0]:
                out[at + n] = t
            n += 1
        prev = t
    return n


@_jit
def _tombstone(s, item_ids, scales, bloom, alive, attr_ids, attr_offsets):
    """Free slot ``s``: id −1, scale 0, Bloom row 0, exact list −1, alive bit 0 (the scan skips it)."""
    item_ids[s] = -1
    scales[s] = 0.0
    for w in range(bloom.shape[1]):
        bloom[s, w] = 0
    for e in range(attr_offsets[s], attr_offsets[s + 1]):
        attr_ids[e] = -1
    alive[s >> 3] &= np.uint8(255 - (1 << (s & 7)))


@_jit
def upsert_apply(
    ids, codes_b, scales_b, lists_b, t_off, t_ids, t_words, has_terms,
    sorted_ids, sorted_slots, hkeys, hvals, free_buf, free_top, offs, counters,
    codes, scales, item_ids, bloom, alive, attr_ids, attr_offsets, version, need_out, pos_out,
):
    """Apply one prepared upsert batch in place; returns the new version, or ``ROOM`` /
    ``SHORT`` having changed nothing.

    Batch: ids [n] (unique), codes_b [n, D] int8, scales_b [n], lists_b [n] nearest list;
    with ``has_terms`` each row's vocabulary ids are ``t_ids[t_off[r]:t_off[r+1]]`` with
    their Bloom words ``t_words`` [nnz, W]; without, an existing item keeps its terms and
    Bloom row and a new one gets none. An id already present leaves its old slot free.

    ``need_out``: for ``ROOM`` [nlist] free slots each list needs; for ``SHORT`` [n] terms of
    each row whose new slot's exact list is too short (else −1). ``pos_out`` [n]: the slot
    each row gets (also for ``SHORT``).

    The three steps ``upsert_plan`` (reads only), ``upsert_prewrite`` (rows landing in slots
    that are dead now) and ``upsert_commit`` (the rest) in one call; a caller that holds
    queries out only while the live items change runs them one by one (``apply_upsert``).
    """
    plan = upsert_plan(ids, codes_b, scales_b, lists_b, t_off, t_ids, t_words, has_terms,
                       sorted_ids, sorted_slots, hkeys, hvals, free_buf, free_top, offs,
                       bloom, attr_ids, attr_offsets, need_out, pos_out)
    if plan[0] < 0:
        return plan[0]
    upsert_prewrite(plan, ids, codes_b, scales_b, codes, scales, bloom, attr_ids, attr_offsets)
    return upsert_commit(plan, ids, codes_b, scales_b, hkeys, hvals, free_buf, free_top, offs, counters,
                         codes, scales, item_ids, bloom, alive, attr_ids, attr_offsets, version)


@_jit
def upsert_plan(
    ids, codes_b, scales_b, lists_b, t_off, t_ids, t_words, has_terms,
    sorted_ids, sorted_slots, hkeys, hvals, free_buf, free_top, offs,
    bloom, attr_ids, attr_offsets, need_out, pos_out,
):
    """Where every row of an upsert batch goes, and what it will hold; changes nothing.

    Returns ``(status, old, pos, early, nterm, toff, terms, sig, pushed, pstart, npush, npop)``:
    status 0, or ``ROOM`` / ``SHORT`` (``need_out`` as in ``upsert_apply``; the rest is then
    empty); ``old`` [n] each row's current slot (−1: new id), ``pos`` [n] its new slot,
    ``early`` [n] whether that slot is dead now (not one the batch frees), so the row can be
    written before queries are held out; each row's exact terms ``terms[toff[r]:toff[r+1]]``
    and Bloom row ``sig[r]``; the free-slot stack changes (``pushed`` per list from ``pstart``,
    ``npush`` / ``npop`` per list).
    """
    n = ids.shape[0]
    nl = free_top.shape[0]
    W = bloom.shape[1]
    e64 = np.zeros(0, dtype=np.int64)
    eb = np.zeros(0, dtype=np.bool_)
    old = np.empty(n, dtype=np.int64)
    old_list = np.full(n, -1, dtype=np.int64)
    want = np.zeros(nl, dtype=np.int64)
    npush = np.zeros(nl, dtype=np.int64)
    for r in range(n):
        want[lists_b[r]] += 1
        s = _slot_of(ids[r], sorted_ids, sorted_slots, hkeys, hvals)
        old[r] = s
        if s >= 0:
            lst = _list_of(offs, s)
            old_list[r] = lst
            want[lst] -= 1
            npush[lst] += 1
    room = True
    for lst in range(nl):
        w = want[lst] if want[lst] > 0 else 0
        if w > free_top[lst]:
            room = False
    if not room:
        for lst in range(nl):
            need_out[lst] = want[lst] if want[lst] > 0 else 0
        return (ROOM, e64, e64, eb, e64, e64, attr_ids[:0].copy(), np.zeros((0, W), dtype=bloom.dtype),
                e64, e64, e64, e64)
    # where each row lands, worked out without touching the stacks: a list's pops take the
    # slots its moved items free (last freed first), then its free stack from the top
    pstart = np.zeros(nl + 1, dtype=np.int64)
    for lst in range(nl):
        pstart[lst + 1] = pstart[lst] + npush[lst]
    pushed = np.empty(pstart[nl], dtype=np.int64)
    cur = pstart[:nl].copy()
    for r in range(n):
        if old[r] >= 0:
            pushed[cur[old_list[r]]] = old[r]
            cur[old_list[r]] += 1
    npop = np.zeros(nl, dtype=np.int64)
    pos = np.empty(n, dtype=np.int64)
    early = np.empty(n, dtype=np.bool_)
    for r in range(n):
        lst = lists_b[r]
        j = npop[lst]
        npop[lst] += 1
        early[r] = j >= npush[lst]  # a slot of the free stack: dead now, invisible to queries
        if j < npush[lst]:
            pos[r] = pushed[pstart[lst] + npush[lst] - 1 - j]
        else:
            pos[r] = free_buf[offs[lst] + free_top[lst] - 1 - (j - npush[lst])]
        pos_out[r] = pos[r]
    # terms of every row, and whether each fits its new slot's exact list
    nterm = np.zeros(n, dtype=np.int64)
    empty = np.empty(0, dtype=attr_ids.dtype)
    for r in range(n):
        if has_terms:
            nterm[r] = t_off[r + 1] - t_off[r]
        elif old[r] >= 0:
            nterm[r] = _terms_in_slot(attr_ids, attr_offsets, old[r], empty, 0)
    short = False
    for r in range(n):
        if nterm[r] > attr_offsets[pos[r] + 1] - attr_offsets[pos[r]]:
            short = True
    if short:
        for r in range(n):
            need_out[r] = nterm[r] if nterm[r] > attr_offsets[pos[r] + 1] - attr_offsets[pos[r]] else -1
        return (SHORT, e64, e64, eb, e64, e64, attr_ids[:0].copy(), np.zeros((0, W), dtype=bloom.dtype),
                e64, e64, e64, e64)
    # gather what the old slots hold before anything is written (a freed slot may be reused)
    sig = np.zeros((n, W), dtype=bloom.dtype)
    toff = np.zeros(n + 1, dtype=np.int64)
    for r in range(n):
        toff[r + 1] = toff[r] + nterm[r]
    terms = np.empty(toff[n], dtype=attr_ids.dtype)
    for r in range(n):
        if has_terms:
            for e in range(t_off[r], t_off[r + 1]):
                terms[toff[r] + e - t_off[r]] = t_ids[e]
                for w in range(W):
                    sig[r, w] |= t_words[e, w]
        elif old[r] >= 0:
            _terms_in_slot(attr_ids, attr_offsets, old[r], terms, toff[r])
            for w in range(W):
                sig[r, w] = bloom[old[r], w]
    return (np.int64(0), old, pos, early, nterm, toff, terms, sig, pushed, pstart, npush, npop)


@_jit
def _write_row(r, p, codes_b, scales_b, nterm, toff, terms, sig, codes, scales, bloom, attr_ids, attr_offsets):
    """Row r of a batch into slot p: codes, scale, Bloom row, exact list (padded by repeating its
    last term, or −1 when it has none). Not the id nor the alive bit."""
    for j in range(codes.shape[1]):
        codes[p, j] = codes_b[r, j]
    scales[p] = scales_b[r]
    for w in range(bloom.shape[1]):
        bloom[p, w] = sig[r, w]
    a0, a1 = attr_offsets[p], attr_offsets[p + 1]
    k = nterm[r]
    for e in range(a1 - a0):
        if e < k:
            attr_ids[a0 + e] = terms[toff[r] + e]
        elif k:
            attr_ids[a0 + e] = terms[toff[r] + k - 1]
        else:
            attr_ids[a0 + e] = -1


@_jit
def upsert_prewrite(plan, ids, codes_b, scales_b, codes, scales, bloom, attr_ids, attr_offsets):
    """Write the rows whose new slot is dead now (``plan``'s ``early``): queries skip dead slots
    (the scan masks or never reads them; ids and alive bits are left to ``upsert_commit``), so
    this may run while queries do."""
    _, old, pos, early, nterm, toff, terms, sig, _, _, _, _ = plan
    for r in range(ids.shape[0]):
        if early[r]:
            _write_row(r, pos[r], codes_b, scales_b, nterm, toff, terms, sig, codes, scales, bloom, attr_ids,
                       attr_offsets)


@_jit
def upsert_commit(
    plan, ids, codes_b, scales_b, hkeys, hvals, free_buf, free_top, offs, counters,
    codes, scales, item_ids, bloom, alive, attr_ids, attr_offsets, version,
):
    """The visible part of an upsert batch, after ``upsert_prewrite``: the slot map (stacks,
    id → slot), the old slots freed, the rows landing in freed slots written, every new
    slot's id and alive bit set, the version bumped. Returns the new version."""
    _, old, pos, early, nterm, toff, terms, sig, pushed, pstart, npush, npop = plan
    n = ids.shape[0]
    nl = free_top.shape[0]
    # the slot map: stacks, id → slot
    for lst in range(nl):
        keep = npush[lst] - npop[lst]
        if keep >= 0:
            for j in range(keep):
                free_buf[offs[lst] + free_top[lst] + j] = pushed[pstart[lst] + j]
            free_top[lst] += keep
        else:
            free_top[lst] += keep
    added = 0
    for r in range(n):
        if old[r] < 0:
            added += 1
        _set(ids[r], pos[r], hkeys, hvals, counters)
    counters[0] += added
    # the tensors: free the old slots, then fill the new ones (which may be freed ones)
    for r in range(n):
        if old[r] >= 0:
            _tombstone(old[r], item_ids, scales, bloom, alive, attr_ids, attr_offsets)
    for r in range(n):
        p = pos[r]
        if not early[r]:
            _write_row(r, p, codes_b, scales_b, nterm, toff, terms, sig, codes, scales, bloom, attr_ids,
                       attr_offsets)
        item_ids[p] = ids[r]
        alive[p >> 3] |= np.uint8(1 << (p & 7))
    version[0] += 1
    return version[0]


@_jit
def delete_apply(
    ids, sorted_ids, sorted_slots, hkeys, hvals, free_buf, free_top, offs, counters,
    item_ids, scales, bloom, alive, attr_ids, attr_offsets, version,
):
    """Tombstone items by id in place (absent ids ignored); returns items deleted.
    Bumps ``version``. ``lookup_many`` (reads only, may run while queries do), then
    ``delete_commit``."""
    slots = lookup_many(ids, sorted_ids, sorted_slots, hkeys, hvals)
    return delete_commit(ids, slots, hkeys, hvals, free_buf, free_top, offs, counters,
                         item_ids, scales, bloom, alive, attr_ids, attr_offsets, version)


@_jit
def delete_commit(
    ids, slots, hkeys, hvals, free_buf, free_top, offs, counters,
    item_ids, scales, bloom, alive, attr_ids, attr_offsets, version,
):
    """Tombstone the slots ``lookup_many`` found for ``ids`` (−1: absent; a slot already dead,
    an id given twice, is skipped); returns items deleted. Bumps ``version``."""
    gone = 0
    for r in range(ids.shape[0]):
        s = slots[r]
        if s < 0 or ((alive[s >> 3] >> (s & 7)) & 1) == 0:
            continue
        lst = _list_of(offs, s)
        free_buf[offs[lst] + free_top[lst]] = s
        free_top[lst] += 1
        _set(ids[r], -1, hkeys, hvals, counters)
        _tombstone(s, item_ids, scales, bloom, alive, attr_ids, attr_offsets)
        gone += 1
    counters[0] -= gone
    version[0] += 1
    return gone
