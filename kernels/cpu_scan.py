"""Fused CPU scan: int8 dequantize + Bloom program + dot product + block maxima, in one pass.

Compiled with numba when it is installed (``HAVE_NUMBA``); callers fall back
to the op-by-op PyTorch path otherwise. One parallel task per probed list:
a list probed by several queries is dequantized once into a scratch buffer
(one probed by fewer than four is scored straight from its codes). A list
with filtered queries is filtered once per distinct program, not per query
(``_scan_list_filtered``): term hits per item (exact from the CSR attributes
for programs marked ``need_exact``, else Bloom with NOT = "maybe"), one
truth-table lookup per program (memoised per distinct hit pattern of the
batch, per thread: ``Memo``, into per-item program words), and a program shared by four or more of the
list's queries has its eligible items compacted and scored 4 × 2 like an
unfiltered list; smaller groups score only their gathered eligible items,
two queries × four items per step.

A score depends on the query, the item and the code path that scored it
(int8 direct, 4x2 dot, or single-query remainder), which the batch and the
list fix; a document shard holding whole lists and receiving the same
batch computes bit-identical scores to the single-process model.
"""

from __future__ import annotations

import threading
from collections import namedtuple

import numpy as np

__all__ = ["HAVE_NUMBA", "MAX_TERMS", "IndexArrays", "KernelFilter", "Results", "fused_topk", "kernel_filter",
           "programs_to_arrays", "scratch_bytes"]

KernelFilter = namedtuple(
    "KernelFilter",
    ["bloom", "term_words", "ops", "args", "lens", "need_exact", "attr_ids", "attr_offsets", "vocab_bits", "qprog"],
)
KernelFilter.__doc__ = """A batch's filter as the compiled scan reads it (numpy arrays).

bloom [N_cap, W] int64 item signatures; term_words [T, W] int64 of the batch's
terms; ops/args [P, L] and lens [P]: the postfix programs; need_exact [P] bool:
programs evaluated exactly in the scan, on every live item's CSR attributes
``attr_ids`` / ``attr_offsets`` (no Bloom pass first: measured slower overall;
``vocab_bits[v]`` is the bitmask of batch terms with vocabulary id v); qprog [B] int64, −1 = unfiltered.
"""

# The compiled scan's named structures. The first two are made in Python by ``fused_topk``; the
# others in compiled code by ``_prologue``. numba's parallel lowering cannot capture a namedtuple
# made in compiled code, so ``_run_parallel`` unpacks those into arrays before its parallel loops
# and packs them again inside each iteration (free: a struct of array views).
IndexArrays = namedtuple("IndexArrays", ["codes", "scales", "list_offsets", "alive", "item_ids"])
IndexArrays.__doc__ = """The index the scan reads: codes [N_cap, D] int8, scales [N_cap] fp32, list_offsets
[nlist + 1] int64, alive [ceil(N_cap / 8)] uint8 bitmask, item_ids [N_cap] int64 (or a 1-element dummy
when the results' ids are not wanted)."""
Results = namedtuple("Results", ["scores", "positions", "ids", "counts", "with_ids"])
Results.__doc__ = """What the scan writes: scores [B, k] fp32, positions [B, k] int64, ids [B, k] int64 when
``with_ids``, counts [B, 2] int64 (live items scanned, of which eligible)."""
Pairs = namedtuple("Pairs", ["lists", "lstart", "query", "col", "flat"])
Pairs.__doc__ = """The (query, probed list) pairs grouped by list, as the scan walks them: the probed lists,
each one's pairs [lstart[i], lstart[i + 1]), and per pair its query, first block column in the query's
block-maxima row and offset in the score buffer."""
Rows = namedtuple("Rows", ["col", "start", "flat", "n", "nb", "map", "order", "pmap", "map_off"])
Rows.__doc__ = """The same pairs query-major ([B · P] int64 each, pair q · P + j), as the selection reads them: col
(first block column in the query's row of block maxima), start (position of the list), flat (score buffer offset), n / nb (scores and
16-item blocks), map: −1 = the scores are the list's items in order; ≥ 0 = a compacted run whose
positions are pmap[map + i]; LOCAL = a compact row whose n scores are followed, in the score buffer,
by their items' offsets in the list (uint32 bits). The filtered scan rewrites n / nb / map of the pairs
it compacts. order: list-grouped pair → query-major pair; map_off: each list's offset in pmap."""
Buffers = namedtuple("Buffers", ["flat", "bmax", "counts"])
Buffers.__doc__ = """The scan's output to the selection: the score buffer, the [B, width] 16-item block maxima
and the per-pair (live items, eligible items) counts."""
SelectScratch = namedtuple("SelectScratch", ["keys", "tmp", "samp", "posb", "idb"])
SelectScratch.__doc__ = """One selecting thread's scratch, sized for the most items one query scanned: candidate
keys and their radix-sort buffer, the large-k sample, and the positions / ids read in position order."""
Memo = namedtuple("Memo", ["kb", "ke", "used", "val", "filled"])
Memo.__doc__ = """Per thread (row = thread id), a batch's distinct term-hit patterns (Bloom hits kb, exact hits
ke, in an open-addressing table of ``MEMO_SLOTS``) → the words of the programs that admit them (val),
kept from list to list; filled: entries per row."""
TruthTables = namedtuple("TruthTables", ["terms", "tlen", "tab"])
TruthTables.__doc__ = """Per program: its distinct terms (≤ ``TT_TERMS``), their number (−1: too many, the
program is interpreted) and its truth table over them."""

MAX_TERMS = 63  # term hits are an int64 bitmask per item
LOCAL = -2  # pair_map of a compact row whose item offsets follow its scores (see above)
NEG_BITS = np.uint32(0xFF800000)  # fp32 −inf: "no candidate" in the score buffer
TT_TERMS = 8  # programs over at most this many distinct terms are evaluated by a truth table
MEMO_SLOTS = 512  # hit patterns a thread remembers per batch (half of them filled at most)
GROUP_MIN = 4  # queries of one list sharing a program, from which its eligible items are compacted
SERIAL_ITEMS = 32_768  # items scanned below which one thread does the whole search
HEAP_K = 1024  # k up to which a heap finds the k-th key; above, radix select on a key bound
IDS_IN_ORDER = 512  # k from which the results' ids are read in position order, before the final sort

try:  # optional: the device image and minimal installs have no numba
    import numba
    from numba import njit, prange

    HAVE_NUMBA = True
except ImportError:  # pragma: no cover - exercised where numba is absent
    HAVE_NUMBA = False


def programs_to_arrays(programs) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Postfix programs → (ops [P, L] int8, args [P, L] int32, lengths [P] int32)."""
    P = len(programs)
    L = max([len(p) for p in programs] + [1])
    ops = np.zeros((max(P, 1), L), dtype=np.int8)
    args = np.zeros((max(P, 1), L), dtype=np.int32)
    lens = np.zeros(max(P, 1), dtype=np.int32)
    for i, prog in enumerate(programs):
        lens[i] = len(prog)
        for j, (op, arg) in enumerate(prog):
            ops[i, j], args[i, j] = op, arg
    return ops, args, lens


if HAVE_NUMBA:

    @njit(fastmath=True, cache=True, inline="always")
    def _dot1(xq, q, blk, i):  # pragma: no cover - compiled
        a = np.float32(0.0)
        for d in range(blk.shape[1]):
            a += xq[q, d] * blk[i, d]
        return a

    @njit(fastmath=True, cache=True, inline="always")
    def _dot4x2(xq, q0, q1, q2, q3, blk, flat, b0, b1, b2, b3, n, bmax, c0, c1, c2, c3, track):  # pragma: no cover
        """Four queries × one dequantized block, two items per step (8 accumulators: each
        loaded query and item value feeds several FMAs). With ``track`` the 16-item block
        maxima are written as well (the block needs no masking)."""
        D = blk.shape[1]
        neg = np.float32(-np.inf)
        m0 = neg
        m1 = neg
        m2 = neg
        m3 = neg
        i = 0
        while i < n:
            if i + 1 < n:
                a0 = np.float32(0.0)
                a1 = np.float32(0.0)
                a2 = np.float32(0.0)
                a3 = np.float32(0.0)
                e0 = np.float32(0.0)
                e1 = np.float32(0.0)
                e2 = np.float32(0.0)
                e3 = np.float32(0.0)
                for d in range(D):
                    u = blk[i, d]
                    v = blk[i + 1, d]
                    x0 = xq[q0, d]
                    x1 = xq[q1, d]
                    x2 = xq[q2, d]
                    x3 = xq[q3, d]
                    a0 += x0 * u
                    a1 += x1 * u
                    a2 += x2 * u
                    a3 += x3 * u
                    e0 += x0 * v
                    e1 += x1 * v
                    e2 += x2 * v
                    e3 += x3 * v
                flat[b0 + i] = a0
                flat[b1 + i] = a1
                flat[b2 + i] = a2
                flat[b3 + i] = a3
                flat[b0 + i + 1] = e0
                flat[b1 + i + 1] = e1
                flat[b2 + i + 1] = e2
                flat[b3 + i + 1] = e3
                step = 2
            else:  # odd tail
                a0 = _dot1(xq, q0, blk, i)
                a1 = _dot1(xq, q1, blk, i)
                a2 = _dot1(xq, q2, blk, i)
                a3 = _dot1(xq, q3, blk, i)
                flat[b0 + i] = a0
                flat[b1 + i] = a1
                flat[b2 + i] = a2
                flat[b3 + i] = a3
                e0 = a0
                e1 = a1
                e2 = a2
                e3 = a3
                step = 1
            if track:
                m0 = max(m0, max(a0, e0))
                m1 = max(m1, max(a1, e1))
                m2 = max(m2, max(a2, e2))
                m3 = max(m3, max(a3, e3))
                last = i + step - 1
                if (last & 15) == 15 or last == n - 1:  # blocks of 16 start at even items
                    j = last >> 4
                    bmax[q0, c0 + j] = m0
                    bmax[q1, c1 + j] = m1
                    bmax[q2, c2 + j] = m2
                    bmax[q3, c3 + j] = m3
                    m0 = neg
                    m1 = neg
                    m2 = neg
                    m3 = neg
            i += step

    @njit(cache=True, inline="always")
    def _all_alive(alive, s, n):  # pragma: no cover - compiled
        """True when every item of positions [s, s + n) is alive (bytes at a time)."""
        e = s + n
        p = s
        while p < e and (p & 7) != 0:
            if ((alive[p >> 3] >> (p & 7)) & 1) == 0:
                return False
            p += 1
        while p + 8 <= e:
            if alive[p >> 3] != 255:
                return False
            p += 8
        while p < e:
            if ((alive[p >> 3] >> (p & 7)) & 1) == 0:
                return False
            p += 1
        return True

    @njit(fastmath=True, cache=True, inline="always")
    def _scan_pair_plain(xq, q, codes, scales, s, n, flat, base, bmax, c0, alive, holes):  # pragma: no cover
        """One query × one list straight from the int8 codes (no dequantized copy): one tight dot
        loop, four items per step, then (``holes``: the dead items' scores set to −inf) block
        maxima over the just-written scores."""
        D = xq.shape[1]
        i = 0
        while i + 4 <= n:  # each loaded query value feeds four FMAs
            a0 = np.float32(0.0)
            a1 = np.float32(0.0)
            a2 = np.float32(0.0)
            a3 = np.float32(0.0)
            p = s + i
            for d in range(D):
                x = xq[q, d]
                a0 += x * np.float32(codes[p, d])
                a1 += x * np.float32(codes[p + 1, d])
                a2 += x * np.float32(codes[p + 2, d])
                a3 += x * np.float32(codes[p + 3, d])
            flat[base + i] = a0 * scales[p]
            flat[base + i + 1] = a1 * scales[p + 1]
            flat[base + i + 2] = a2 * scales[p + 2]
            flat[base + i + 3] = a3 * scales[p + 3]
            i += 4
        while i < n:
            acc = np.float32(0.0)
            for d in range(D):
                acc += xq[q, d] * np.float32(codes[s + i, d])
            flat[base + i] = acc * scales[s + i]
            i += 1
        if holes:
            _mask_dead(alive, s, n, flat, base)
        _block_max(flat, base, n, bmax, q, c0)

    @njit(fastmath=True, cache=True, inline="always")
    def _scan_pair_plain2(xq, q0, q1, codes, scales, s, n, flat, b0, b1, bmax, c0, c1, alive, holes):  # pragma: no cover
        """``_scan_pair_plain`` for two queries of one list: each int8 code is converted once and
        feeds both (2 queries × 4 items, 8 accumulators) — the conversion, not the FMA, is most of
        the direct loop's work."""
        D = xq.shape[1]
        i = 0
        while i + 4 <= n:
            a0 = np.float32(0.0)
            a1 = np.float32(0.0)
            a2 = np.float32(0.0)
            a3 = np.float32(0.0)
            e0 = np.float32(0.0)
            e1 = np.float32(0.0)
            e2 = np.float32(0.0)
            e3 = np.float32(0.0)
            p = s + i
            for d in range(D):
                x = xq[q0, d]
                y = xq[q1, d]
                u0 = np.float32(codes[p, d])
                u1 = np.float32(codes[p + 1, d])
                u2 = np.float32(codes[p + 2, d])
                u3 = np.float32(codes[p + 3, d])
                a0 += x * u0
                a1 += x * u1
                a2 += x * u2
                a3 += x * u3
                e0 += y * u0
                e1 += y * u1
                e2 += y * u2
                e3 += y * u3
            flat[b0 + i] = a0 * scales[p]
            flat[b0 + i + 1] = a1 * scales[p + 1]
            flat[b0 + i + 2] = a2 * scales[p + 2]
            flat[b0 + i + 3] = a3 * scales[p + 3]
            flat[b1 + i] = e0 * scales[p]
            flat[b1 + i + 1] = e1 * scales[p + 1]
            flat[b1 + i + 2] = e2 * scales[p + 2]
            flat[b1 + i + 3] = e3 * scales[p + 3]
            i += 4
        while i < n:
            a0 = np.float32(0.0)
            e0 = np.float32(0.0)
            for d in range(D):
                u0 = np.float32(codes[s + i, d])
                a0 += xq[q0, d] * u0
                e0 += xq[q1, d] * u0
            flat[b0 + i] = a0 * scales[s + i]
            flat[b1 + i] = e0 * scales[s + i]
            i += 1
        if holes:
            _mask_dead(alive, s, n, flat, b0)
            _mask_dead(alive, s, n, flat, b1)
        _block_max(flat, b0, n, bmax, q0, c0)
        _block_max(flat, b1, n, bmax, q1, c1)

    @njit(cache=True, inline="always")
    def _block_max(flat, base, n, bmax, q, c0):  # pragma: no cover - compiled
        """The 16-item block maxima of scores flat[base : base + n] into bmax[q, c0 ...]."""
        neg = np.float32(-np.inf)
        nf = n >> 4
        for j in range(nf):
            m = neg
            for i in range(16):
                v = flat[base + 16 * j + i]
                m = v if v > m else m
            bmax[q, c0 + j] = m
        if n & 15:
            m = neg
            for i in range(16 * nf, n):
                v = flat[base + i]
                m = v if v > m else m
            bmax[q, c0 + nf] = m

    @njit(cache=True, inline="always")
    def _mask_dead(alive, s, n, flat, base):  # pragma: no cover - compiled
        """Scores of the dead items among positions [s, s + n) → −inf (whole alive bytes skipped)."""
        neg = np.float32(-np.inf)
        i = 0
        while i < n:
            p = s + i
            if (p & 7) == 0 and i + 8 <= n and alive[p >> 3] == 255:
                i += 8
                continue
            if ((alive[p >> 3] >> (p & 7)) & 1) == 0:
                flat[base + i] = neg
            i += 1

    @njit(cache=True, inline="always")
    def _live_extent(alive, s, n):  # pragma: no cover - compiled
        """(ne, nlive) of a list at positions [s, s + n): its live items all lie in [s, s + ne)
        (the dead tail, e.g. unused slack, trimmed) and nlive of them are alive."""
        ne = n
        while ne > 0:
            p = s + ne - 1
            if (p & 7) == 7 and ne >= 8 and alive[p >> 3] == 0:
                ne -= 8
            elif ((alive[p >> 3] >> (p & 7)) & 1) == 0:
                ne -= 1
            else:
                break
        nlive = 0
        i = 0
        while i < ne:
            p = s + i
            if (p & 7) == 0 and i + 8 <= ne:
                b = np.int64(alive[p >> 3])
                b = b - ((b >> 1) & 0x55)
                b = (b & 0x33) + ((b >> 2) & 0x33)
                nlive += (b + (b >> 4)) & 0x0F
                i += 8
                continue
            nlive += (alive[p >> 3] >> (p & 7)) & 1
            i += 1
        return ne, nlive

    @njit(cache=True, inline="always")
    def _masked_route(ne, nlive):  # pragma: no cover - compiled
        """An unfiltered list whose live extent is at least half alive is scored whole over that
        extent with the dead items' scores masked to −inf (the fast path plus one pass over the
        alive bytes); a sparser one goes to the gathered scoring of ``_scan_list_filtered``."""
        return 2 * nlive >= ne

    @njit(cache=True, inline="always")
    def _eval_prog(ops, args, length, hits, stack, exact):  # pragma: no cover - compiled
        """Evaluate one postfix program on a term-hit bitmask.

        ``exact``: the hits are the item's true terms, NOT negates. Otherwise they
        are Bloom hits and NOT is "maybe" (True): a Bloom match cannot decide a negation.
        """
        sp = 0
        for j in range(length):
            op = ops[j]
            if op == 0:  # OP_TERM
                stack[sp] = ((hits >> args[j]) & 1) == 1
                sp += 1
            elif op == 1:  # OP_TRUE
                stack[sp] = True
                sp += 1
            elif op == 2:  # OP_FALSE
                stack[sp] = False
                sp += 1
            elif op == 3:  # OP_NOT
                stack[sp - 1] = (not stack[sp - 1]) if exact else True
            elif op == 4:  # OP_AND
                sp -= 1
                stack[sp - 1] = stack[sp - 1] and stack[sp]
            else:  # OP_OR
                sp -= 1
                stack[sp - 1] = stack[sp - 1] or stack[sp]
        return stack[0]

    @njit(cache=True, inline="always")
    def _bloom_hits(bloom, term_words, p):  # pragma: no cover - compiled
        """Bitmask of the batch's terms whose Bloom words are all set in item p's signature."""
        h = np.int64(0)
        for t in range(term_words.shape[0]):
            hit = True
            for w in range(term_words.shape[1]):
                tw = term_words[t, w]
                if (bloom[p, w] & tw) != tw:
                    hit = False
                    break
            if hit:
                h |= np.int64(1) << t
        return h

    @njit(cache=True, inline="always")
    def _exact_hits(attr_ids, attr_offsets, vocab_bits, p):  # pragma: no cover - compiled
        """Bitmask of the batch's terms item p really has (its CSR attribute ids → term bits)."""
        h = np.int64(0)
        V = vocab_bits.shape[0]
        for a in range(attr_offsets[p], attr_offsets[p + 1]):
            v = attr_ids[a]
            if 0 <= v < V:
                h |= vocab_bits[v]
        return h

    @njit(cache=True, nogil=True)
    def _truth_tables(flt):  # pragma: no cover - compiled
        """Per program: its distinct terms (≤ ``TT_TERMS``, else length −1) and its truth table over
        them, in the program's semantics (exact where ``flt.need_exact``, else Bloom). One table
        lookup per item replaces interpreting the postfix program."""
        P = flt.lens.shape[0]
        terms = np.zeros((P, TT_TERMS), dtype=np.int64)
        tlen = np.zeros(P, dtype=np.int64)
        tab = np.zeros((P, 1 << TT_TERMS), dtype=np.bool_)
        stack = np.empty(flt.ops.shape[1] + 1, dtype=np.bool_)
        for pr in range(P):
            m = 0
            for j in range(flt.lens[pr]):
                if flt.ops[pr, j] == 0:
                    a = flt.args[pr, j]
                    seen = False
                    for u in range(min(m, TT_TERMS)):
                        if terms[pr, u] == a:
                            seen = True
                    if not seen:
                        if m < TT_TERMS:
                            terms[pr, m] = a
                        m += 1
            if m > TT_TERMS:
                tlen[pr] = -1
                continue
            tlen[pr] = m
            for idx in range(1 << m):
                h = np.int64(0)
                for u in range(m):
                    if (idx >> u) & 1:
                        h |= np.int64(1) << terms[pr, u]
                tab[pr, idx] = _eval_prog(flt.ops[pr], flt.args[pr], flt.lens[pr], h, stack, flt.need_exact[pr])
        return TruthTables(terms, tlen, tab)

    @njit(cache=True)
    def _groups(p0, p1, pair_q, qprog):  # pragma: no cover - compiled
        """A list's pairs grouped by program: (pair order [p1 - p0], group programs, group starts)."""
        m = p1 - p0
        progs = np.empty(m, dtype=np.int64)
        for j in range(m):
            progs[j] = qprog[pair_q[p0 + j]]
        srt = np.argsort(progs, kind="mergesort")
        ng = 0
        for j in range(m):
            if j == 0 or progs[srt[j]] != progs[srt[j - 1]]:
                ng += 1
        gprog = np.empty(ng, dtype=np.int64)
        gstart = np.empty(ng + 1, dtype=np.int64)
        g = 0
        for j in range(m):
            if j == 0 or progs[srt[j]] != progs[srt[j - 1]]:
                gprog[g] = progs[srt[j]]
                gstart[g] = j
                g += 1
        gstart[ng] = m
        return srt, gprog, gstart

    @njit(cache=True, nogil=True)
    def _map_offsets(lists, lstart, pair_q, qprog, list_offsets, alive):  # pragma: no cover - compiled
        """Offsets of each list's compacted eligible positions: one run of n per program group of
        ≥ ``GROUP_MIN`` pairs, in the lists ``_scan_list`` sends to ``_scan_list_filtered``."""
        nl = lists.shape[0]
        off = np.zeros(nl + 1, dtype=np.int64)
        for li in range(nl):
            p0 = lstart[li]
            p1 = lstart[li + 1]
            n = list_offsets[lists[li] + 1] - list_offsets[lists[li]]
            use = 0
            s = list_offsets[lists[li]]
            if n > 0 and _to_filtered(p0, p1, pair_q, qprog, alive, s, n):
                _, _, gstart = _groups(p0, p1, pair_q, qprog)
                for g in range(gstart.shape[0] - 1):
                    if gstart[g + 1] - gstart[g] >= GROUP_MIN:
                        use += n
            off[li + 1] = off[li] + use
        return off

    @njit(cache=True, inline="always")
    def _any_filtered(p0, p1, pair_q, qprog):  # pragma: no cover - compiled
        for r in range(p0, p1):
            if qprog[pair_q[r]] >= 0:
                return True
        return False

    @njit(cache=True, inline="always")
    def _to_filtered(p0, p1, pair_q, qprog, alive, s, n):  # pragma: no cover - compiled
        """Whether ``_scan_list`` hands a list to ``_scan_list_filtered``: a filtered query probes
        it, or its live extent is too sparse for the masked fast path (``_masked_route``)."""
        if _any_filtered(p0, p1, pair_q, qprog):
            return True
        if _all_alive(alive, s, n):
            return False
        ne, nlive = _live_extent(alive, s, n)
        return not _masked_route(ne, nlive)

    @njit(fastmath=True, cache=True, inline="always")
    def _dot1_track(xq, q, blk, m, flat, base, bmax, c0):  # pragma: no cover - compiled
        """One query × a dequantized block of m items, with its 16-item block maxima."""
        neg = np.float32(-np.inf)
        mx = neg
        for i in range(m):
            a = _dot1(xq, q, blk, i)
            flat[base + i] = a
            mx = a if a > mx else mx
            if (i & 15) == 15 or i == m - 1:
                bmax[q, c0 + (i >> 4)] = mx
                mx = neg

    @njit(fastmath=True, cache=True, inline="always")
    def _score_gathered(xq, q, codes, scales, s, idx, m, n, flat, base, bmax, c0, compact):  # pragma: no cover
        """One query × the items ``idx[:m]`` (ascending offsets into a list of n at position s),
        straight from the codes, four items per step. ``compact`` (2·m ≤ n): the m scores go to the
        row's first m slots and their offsets (uint32) to the next m (``_compact_local``); else every
        other slot of the list scores −inf. Block maxima of the blocks holding a score are raised
        (the rest stay −inf)."""
        D = xq.shape[1]
        if compact:
            _compact_local(idx, m, flat, base)
        else:
            _fill_neg(flat, base, n)
        j = 0
        while j + 4 <= m:
            i0 = idx[j]
            i1 = idx[j + 1]
            i2 = idx[j + 2]
            i3 = idx[j + 3]
            a0 = np.float32(0.0)
            a1 = np.float32(0.0)
            a2 = np.float32(0.0)
            a3 = np.float32(0.0)
            for d in range(D):
                x = xq[q, d]
                a0 += x * np.float32(codes[s + i0, d])
                a1 += x * np.float32(codes[s + i1, d])
                a2 += x * np.float32(codes[s + i2, d])
                a3 += x * np.float32(codes[s + i3, d])
            _put(flat, base, bmax, q, c0, j if compact else i0, a0 * scales[s + i0])
            _put(flat, base, bmax, q, c0, j + 1 if compact else i1, a1 * scales[s + i1])
            _put(flat, base, bmax, q, c0, j + 2 if compact else i2, a2 * scales[s + i2])
            _put(flat, base, bmax, q, c0, j + 3 if compact else i3, a3 * scales[s + i3])
            j += 4
        while j < m:
            i0 = idx[j]
            a0 = np.float32(0.0)
            for d in range(D):
                a0 += xq[q, d] * np.float32(codes[s + i0, d])
            _put(flat, base, bmax, q, c0, j if compact else i0, a0 * scales[s + i0])
            j += 1

    @njit(fastmath=True, cache=True, inline="always")
    def _score_gathered2(xq, q0, q1, codes, scales, s, idx, m, n, flat, b0, b1, bmax, c0, c1,  # pragma: no cover
                         compact):
        """``_score_gathered`` for two queries sharing a program: each loaded code feeds both
        (2 queries × 4 items, 8 accumulators); the remainder goes one query at a time."""
        D = xq.shape[1]
        if compact:
            _compact_local(idx, m, flat, b0)
            _compact_local(idx, m, flat, b1)
        else:
            _fill_neg(flat, b0, n)
            _fill_neg(flat, b1, n)
        j = 0
        while j + 4 <= m:
            i0 = idx[j]
            i1 = idx[j + 1]
            i2 = idx[j + 2]
            i3 = idx[j + 3]
            a0 = np.float32(0.0)
            a1 = np.float32(0.0)
            a2 = np.float32(0.0)
            a3 = np.float32(0.0)
            e0 = np.float32(0.0)
            e1 = np.float32(0.0)
            e2 = np.float32(0.0)
            e3 = np.float32(0.0)
            for d in range(D):
                x = xq[q0, d]
                y = xq[q1, d]
                u0 = np.float32(codes[s + i0, d])
                u1 = np.float32(codes[s + i1, d])
                u2 = np.float32(codes[s + i2, d])
                u3 = np.float32(codes[s + i3, d])
                a0 += x * u0
                a1 += x * u1
                a2 += x * u2
                a3 += x * u3
                e0 += y * u0
                e1 += y * u1
                e2 += y * u2
                e3 += y * u3
            sc0 = scales[s + i0]
            sc1 = scales[s + i1]
            sc2 = scales[s + i2]
            sc3 = scales[s + i3]
            _put(flat, b0, bmax, q0, c0, j if compact else i0, a0 * sc0)
            _put(flat, b0, bmax, q0, c0, j + 1 if compact else i1, a1 * sc1)
            _put(flat, b0, bmax, q0, c0, j + 2 if compact else i2, a2 * sc2)
            _put(flat, b0, bmax, q0, c0, j + 3 if compact else i3, a3 * sc3)
            _put(flat, b1, bmax, q1, c1, j if compact else i0, e0 * sc0)
            _put(flat, b1, bmax, q1, c1, j + 1 if compact else i1, e1 * sc1)
            _put(flat, b1, bmax, q1, c1, j + 2 if compact else i2, e2 * sc2)
            _put(flat, b1, bmax, q1, c1, j + 3 if compact else i3, e3 * sc3)
            j += 4
        while j < m:
            i0 = idx[j]
            a0 = np.float32(0.0)
            e0 = np.float32(0.0)
            for d in range(D):
                u0 = np.float32(codes[s + i0, d])
                a0 += xq[q0, d] * u0
                e0 += xq[q1, d] * u0
            _put(flat, b0, bmax, q0, c0, j if compact else i0, a0 * scales[s + i0])
            _put(flat, b1, bmax, q1, c1, j if compact else i0, e0 * scales[s + i0])
            j += 1

    @njit(cache=True, inline="always")
    def _fill_neg(flat, base, n):  # pragma: no cover - compiled
        neg = np.float32(-np.inf)
        for i in range(n):
            flat[base + i] = neg

    @njit(cache=True, inline="always")
    def _compact_local(idx, m, flat, base):  # pragma: no cover - compiled
        """The offsets of a row's m compact scores, as uint32 bits, in the m slots after them
        (``pair_map`` ``LOCAL``: the selection reads positions there)."""
        fu = flat.view(np.uint32)
        for j in range(m):
            fu[base + m + j] = np.uint32(idx[j])

    @njit(cache=True, inline="always")
    def _put(flat, base, bmax, q, c0, i, v):  # pragma: no cover - compiled
        """Write item i's score and raise its 16-item block's maximum."""
        flat[base + i] = v
        b = c0 + (i >> 4)
        bmax[q, b] = max(bmax[q, b], v)

    @njit(cache=True, inline="always")
    def _prog_eval(pr, hb, he, flt, tt, stack):  # pragma: no cover - compiled
        """Does program pr admit an item with Bloom term hits hb and exact term hits he (in the
        program's own semantics: exact where ``flt.need_exact``, else Bloom)?"""
        ex = flt.need_exact[pr]
        h = he if ex else hb
        tl = tt.tlen[pr]
        if tl >= 0:
            ix = 0
            for u in range(tl):
                ix |= ((h >> tt.terms[pr, u]) & 1) << u
            return tt.tab[pr, ix]
        return _eval_prog(flt.ops[pr], flt.args[pr], flt.lens[pr], h, stack, ex)

    @njit(cache=True, inline="always")
    def _prog_word(hb, he, flt, tt, w, stack):  # pragma: no cover - compiled
        """Word w of the bits, over the batch's programs, that admit an item with hits hb / he."""
        out = np.int64(0)
        for pr in range(64 * w, min(64 * w + 64, flt.lens.shape[0])):
            if _prog_eval(pr, hb, he, flt, tt, stack):
                out |= np.int64(1) << np.int64(pr & 63)
        return out

    @njit(cache=True, inline="always")
    def _prog_word_some(hb, he, gprog, flt, tt, w, stack):  # pragma: no cover - compiled
        """``_prog_word`` with only the bits of the programs ``gprog`` (≥ 0) evaluated (a memo miss)."""
        out = np.int64(0)
        for g in range(gprog.shape[0]):
            pr = gprog[g]
            if pr >> 6 == w and _prog_eval(pr, hb, he, flt, tt, stack):
                out |= np.int64(1) << np.int64(pr & 63)
        return out

    @njit(cache=True)
    def _prog_words(s, n, live_all, alive, gprog, flt, tt, memo, tid):  # pragma: no cover - compiled
        """[nw, n] int64: for each item of a list, the bits of the batch's programs that admit it
        (0 for dead items; the bits of the programs no query of the list uses may be missing).

        Each item's term hits are computed once (Bloom and / or exact, as the list's programs need);
        the programs run once per distinct hit pattern *of the batch*: the calling thread's ``memo``
        row ``tid`` keeps each pattern's program words from list to list (a batch holds few
        distinct attribute combinations; full, the list's programs run for the item directly)."""
        nw = memo.val.shape[2]
        pw = np.zeros((nw, n), dtype=np.int64)
        stack = np.empty(flt.ops.shape[1] + 1, dtype=np.bool_)
        need_b = False
        need_e = False
        for g in range(gprog.shape[0]):
            if gprog[g] >= 0:
                if flt.need_exact[gprog[g]]:
                    need_e = True
                else:
                    need_b = True
        H = memo.used.shape[1]  # open addressing; beyond H / 2 entries the programs run directly
        kb = memo.kb[tid]
        ke = memo.ke[tid]
        used = memo.used[tid]
        val = memo.val[tid]
        for i in range(n):
            p = s + i
            if not (live_all or ((alive[p >> 3] >> (p & 7)) & 1) == 1):
                continue
            # a hit mask not computed is 0: the memo's value for a pattern is a function of the pattern
            # alone, so an entry made without Bloom hits serves a later list's item whose hb is 0
            hb = _bloom_hits(flt.bloom, flt.term_words, p) if need_b else np.int64(0)
            he = _exact_hits(flt.attr_ids, flt.attr_offsets, flt.vocab_bits, p) if need_e else np.int64(0)
            x = (hb * np.int64(-7046029254386353131)) ^ (he * np.int64(-4658895280553007687))
            slot = np.int64((x >> np.int64(40)) & (H - 1))
            while used[slot] and not (kb[slot] == hb and ke[slot] == he):
                slot = (slot + 1) & (H - 1)
            if used[slot]:
                for w in range(nw):
                    pw[w, i] = val[slot, w]
            elif memo.filled[tid] < H // 2:
                used[slot] = True
                kb[slot] = hb
                ke[slot] = he
                memo.filled[tid] += 1
                for w in range(nw):
                    val[slot, w] = _prog_word(hb, he, flt, tt, w, stack)
                    pw[w, i] = val[slot, w]
            else:
                for w in range(nw):
                    pw[w, i] = _prog_word_some(hb, he, gprog, flt, tt, w, stack)
        return pw

    @njit(cache=True, inline="always")
    def _filtered_batch(qprog):  # pragma: no cover - compiled
        for q in range(qprog.shape[0]):
            if qprog[q] >= 0:
                return True
        return False

    @njit(cache=True, nogil=True)
    def _new_memo(flt, rows):  # pragma: no cover - compiled
        """Empty pattern memos (``Memo``), one row per possible thread id."""
        H = MEMO_SLOTS
        nw = max(1, (flt.lens.shape[0] + 63) >> 6)
        return Memo(np.zeros((rows, H), dtype=np.int64), np.zeros((rows, H), dtype=np.int64),
                    np.zeros((rows, H), dtype=np.bool_), np.zeros((rows, H, nw), dtype=np.int64),
                    np.zeros(rows, dtype=np.int64))

    @njit(fastmath=True, cache=True)
    def _scan_list_filtered(li, xq, ix, pairs, rows, flt, tt, buf, memo):  # pragma: no cover - compiled
        """Scan one probed list for a batch where some of its queries are filtered.

        The filter runs once per (list, distinct program), not per query: each
        item's term hits are computed once — from its CSR attributes (exact) for
        the programs ``flt.need_exact`` marks, from its Bloom words for the
        others — and each program the list's queries use is evaluated once (a
        truth-table lookup) into an eligibility row. A program shared by ``GROUP_MIN`` or more of the list's queries
        has its eligible items compacted (positions into ``cmp.pmap``) and
        dequantized once; its queries are scored 4 × 2 on the compacted block,
        block maxima written as they go — the unfiltered fast path, over fewer
        items. Smaller groups score only their eligible items, gathered straight from the codes
        (two queries of a group at a time); the other slots of their rows score −inf.
        """
        D = xq.shape[1]
        codes, scales, alive = ix.codes, ix.scales, ix.alive
        pair_q, pair_col, pair_flat = pairs.query, pairs.col, pairs.flat
        flat, bmax, counts = buf.flat, buf.bmax, buf.counts
        lst = pairs.lists[li]
        s = ix.list_offsets[lst]
        n = ix.list_offsets[lst + 1] - s
        p0 = pairs.lstart[li]
        p1 = pairs.lstart[li + 1]
        live_all = _all_alive(alive, s, n)
        srt, gprog, gstart = _groups(p0, p1, pair_q, flt.qprog)
        ng = gprog.shape[0]
        pw = (_prog_words(s, n, live_all, alive, gprog, flt, tt, memo, numba.get_thread_id()) if gprog[ng - 1] >= 0
              else np.zeros((1, 0), dtype=np.int64))  # groups sorted by program: the last is filtered, or none is
        elig = np.empty(n, dtype=np.int64)
        nlive = 0
        for i in range(n):
            p = s + i
            nlive += live_all or ((alive[p >> 3] >> (p & 7)) & 1) == 1
        mo = rows.map_off[li]
        for g in range(ng):
            g0 = gstart[g]
            g1 = gstart[g + 1]
            pr = gprog[g]
            ident = pr < 0 and live_all
            nelig = 0
            if pr >= 0:
                wp = pr >> 6
                bp = np.int64(pr & 63)
                for i in range(n):
                    elig[nelig] = i
                    nelig += (pw[wp, i] >> bp) & 1
            else:
                for i in range(n):
                    p = s + i
                    elig[nelig] = i
                    nelig += live_all or ((alive[p >> 3] >> (p & 7)) & 1) == 1
            if g1 - g0 >= GROUP_MIN:
                m = 0
                if ident:
                    m = n
                    blk = np.empty((n, D), dtype=np.float32)
                    for i in range(n):
                        sc = scales[s + i]
                        for d in range(D):
                            blk[i, d] = codes[s + i, d] * sc
                else:
                    m = nelig
                    for j in range(m):
                        rows.pmap[mo + j] = s + elig[j]
                    blk = np.empty((m, D), dtype=np.float32)
                    for j in range(m):
                        p = rows.pmap[mo + j]
                        sc = scales[p]
                        for d in range(D):
                            blk[j, d] = codes[p, d] * sc
                j = g0
                while j + 4 <= g1:
                    r0 = p0 + srt[j]
                    r1 = p0 + srt[j + 1]
                    r2 = p0 + srt[j + 2]
                    r3 = p0 + srt[j + 3]
                    _dot4x2(xq, pair_q[r0], pair_q[r1], pair_q[r2], pair_q[r3], blk, flat,
                            pair_flat[r0], pair_flat[r1], pair_flat[r2], pair_flat[r3], m,
                            bmax, pair_col[r0], pair_col[r1], pair_col[r2], pair_col[r3], True)
                    j += 4
                while j < g1:
                    r = p0 + srt[j]
                    _dot1_track(xq, pair_q[r], blk, m, flat, pair_flat[r], bmax, pair_col[r])
                    j += 1
                for j in range(g0, g1):
                    r = p0 + srt[j]
                    qp = rows.order[r]
                    rows.n[qp] = m
                    rows.nb[qp] = (m + 15) // 16
                    rows.map[qp] = -1 if ident else mo
                    counts[r, 0] = nlive
                    counts[r, 1] = m
                mo += n
            else:
                # at most half the list eligible: each row holds its scores compactly, positions after
                # them (no −inf fill of the whole row, and the selection reads only the eligible)
                compact = 2 * nelig <= n
                j = g0
                while j + 2 <= g1:
                    r0 = p0 + srt[j]
                    r1 = p0 + srt[j + 1]
                    _score_gathered2(xq, pair_q[r0], pair_q[r1], codes, scales, s, elig, nelig, n, flat,
                                     pair_flat[r0], pair_flat[r1], bmax, pair_col[r0], pair_col[r1], compact)
                    j += 2
                if j < g1:
                    r = p0 + srt[j]
                    _score_gathered(xq, pair_q[r], codes, scales, s, elig, nelig, n, flat, pair_flat[r], bmax,
                                    pair_col[r], compact)
                for j in range(g0, g1):
                    r = p0 + srt[j]
                    counts[r, 0] = nlive
                    counts[r, 1] = nelig
                    if compact:
                        qp = rows.order[r]
                        rows.n[qp] = nelig
                        rows.nb[qp] = (nelig + 15) // 16
                        rows.map[qp] = LOCAL

    @njit(fastmath=True, cache=True)
    def _scan_list(li, xq, ix, pairs, rows, flt, tt, buf, memo):  # pragma: no cover - compiled
        """Scan one probed list for every query of the batch that probes it.

        Lists with a filtered query, or whose live items are sparse (``_to_filtered``),
        go to ``_scan_list_filtered``. Otherwise: probed by fewer than four queries,
        each is scored straight from the codes; by more, the list is dequantized
        once and scored four queries × two items per step. A list with dead items
        (tombstones, unused slack) is scanned up to its last live item and the
        dead items' scores are masked to −inf before the block maxima.
        """
        D = xq.shape[1]
        codes, scales, alive = ix.codes, ix.scales, ix.alive
        pair_q, pair_col, pair_flat = pairs.query, pairs.col, pairs.flat
        flat, bmax, counts = buf.flat, buf.bmax, buf.counts
        lst = pairs.lists[li]
        s = ix.list_offsets[lst]
        n = ix.list_offsets[lst + 1] - s
        p0 = pairs.lstart[li]
        p1 = pairs.lstart[li + 1]
        if n == 0:
            return
        if _to_filtered(p0, p1, pair_q, flt.qprog, alive, s, n):
            _scan_list_filtered(li, xq, ix, pairs, rows, flt, tt, buf, memo)
            return
        # every query unfiltered; dead items (tombstones, unused slack) are scored and masked to −inf,
        # and a dead tail is not scanned at all: the query's pair ends at the live extent ne
        ne = n
        nlive = n
        holes = False
        if not _all_alive(alive, s, n):
            ne, nlive = _live_extent(alive, s, n)
            holes = nlive < ne
            for pi in range(p0, p1):
                qp = rows.order[pi]
                rows.n[qp] = ne
                rows.nb[qp] = (ne + 15) // 16
        for pi in range(p0, p1):
            counts[pi, 0] = nlive
            counts[pi, 1] = nlive
        if ne == 0:
            return
        if p1 - p0 < GROUP_MIN:
            pi = p0
            while pi + 2 <= p1:
                _scan_pair_plain2(xq, pair_q[pi], pair_q[pi + 1], codes, scales, s, ne, flat, pair_flat[pi],
                                  pair_flat[pi + 1], bmax, pair_col[pi], pair_col[pi + 1], alive, holes)
                pi += 2
            if pi < p1:
                _scan_pair_plain(xq, pair_q[pi], codes, scales, s, ne, flat, pair_flat[pi], bmax, pair_col[pi],
                                 alive, holes)
            return
        blk = np.empty((ne, D), dtype=np.float32)
        for i in range(ne):
            sc = scales[s + i]
            for d in range(D):
                blk[i, d] = codes[s + i, d] * sc
        pi = p0
        while pi + 4 <= p1:
            _dot4x2(xq, pair_q[pi], pair_q[pi + 1], pair_q[pi + 2], pair_q[pi + 3], blk, flat,
                    pair_flat[pi], pair_flat[pi + 1], pair_flat[pi + 2], pair_flat[pi + 3], ne,
                    bmax, pair_col[pi], pair_col[pi + 1], pair_col[pi + 2], pair_col[pi + 3], not holes)
            pi += 4
        while pi < p1:
            if holes:
                for i in range(ne):
                    flat[pair_flat[pi] + i] = _dot1(xq, pair_q[pi], blk, i)
            else:
                _dot1_track(xq, pair_q[pi], blk, ne, flat, pair_flat[pi], bmax, pair_col[pi])
            pi += 1
        if holes:
            for pi in range(p0, p1):
                _mask_dead(alive, s, ne, flat, pair_flat[pi])
                _block_max(flat, pair_flat[pi], ne, bmax, pair_q[pi], pair_col[pi])

    @njit(cache=True, inline="always")
    def _kth_largest(vals, m, kk):  # pragma: no cover - compiled
        """The kk-th largest of vals[:m] (1 ≤ kk ≤ m): a size-kk min-heap when kk is small."""
        if kk > 1024 or 4 * kk > m:
            return -np.partition(-vals[:m], kk - 1)[kk - 1]
        h = vals[:kk].copy()
        for i in range(kk // 2 - 1, -1, -1):  # heapify
            _sift(h, i, kk)
        for i in range(kk, m):
            v = vals[i]
            if v > h[0]:
                h[0] = v
                _sift(h, 0, kk)
        return h[0]

    @njit(cache=True, inline="always")
    def _sift(h, i, n):  # pragma: no cover - compiled
        v = h[i]
        while True:
            c = 2 * i + 1
            if c >= n:
                break
            if c + 1 < n and h[c + 1] < h[c]:
                c += 1
            if h[c] >= v:
                break
            h[i] = h[c]
            i = c
        h[i] = v

    @njit(cache=True)
    def _select_query(q, k, rows, buf, item_ids, out, sc):  # pragma: no cover - compiled
        """Stages B and C for one query: top-k blocks by maximum, then top-k items among them.

        Candidates are gathered in position order (the query's lists by start) as 64-bit
        words: high half a key whose ascending order is descending score, low half the
        candidate's position. Above ``HEAP_K`` only the keys at or below a bound taken from
        a sample of the scores are gathered (at least k of them, else everything is). The
        k-th key is found by a heap (small k) or a radix select (large k; skipped when the
        bounded gather kept at most k + 25 %, which the sort then orders whole); the survivors
        are ordered by a stable LSD radix sort on the high half, so equal scores stay in position
        order; ids are read for the survivors only, in position order before the sort from
        ``IDS_IN_ORDER`` results (``posb`` / ``idb``: their positions and ids, the keys' low half
        then indexing them), else for the k results. ``sc`` (``SelectScratch``) is the calling
        thread's scratch, large enough for every scanned item (``samp``: its sample).
        """
        colq, flat = rows.col, buf.flat
        nprobe = colq.shape[0] // buf.bmax.shape[0]
        out_s, out_p, out_i, with_ids = out.scores, out.positions, out.ids, out.with_ids
        keys, tmp, posb, idb = sc.keys, sc.tmp, sc.posb, sc.idb
        neg = np.float32(-np.inf)
        row = buf.bmax[q]
        width = 0
        for j in range(nprobe):
            width = max(width, colq[q * nprobe + j] + rows.nb[q * nprobe + j])
        kb = min(k, width)
        if kb == 0:
            _pad(q, 0, k, with_ids, out_s, out_p, out_i)
            return
        # β = kb-th largest block maximum: blocks with a maximum ≥ β hold the top k
        if kb == width:
            beta = np.float32(-3.4e38)  # every block is needed: take every finite score
        else:
            beta = _kth_largest(row, width, kb)
            if beta == neg:
                beta = np.float32(-3.4e38)  # fewer than kb non-empty blocks: take every finite one
        every = np.int64(0xFFFFFFFF)
        bound = every
        if k > HEAP_K:  # gather only the keys a sample says hold the top k
            bound = _sample_bound(q, nprobe, row, beta, flat, k, rows, sc.samp)
        m = _gather(q, nprobe, row, beta, flat, rows, bound, keys)
        if m < k and bound != every:  # the sample's bound fell short of k: take every candidate
            m = _gather(q, nprobe, row, beta, flat, rows, every, keys)
        kk = min(k, m)
        _pad(q, kk, k, with_ids, out_s, out_p, out_i)
        if kk == 0:
            return
        n = m
        if kk < m and (kk <= HEAP_K or m > kk + (kk >> 2)):  # a bounded gather within k + 25 %: sort it all
            thr = np.uint64(_kth_smallest_heap(keys, m, kk) if kk <= HEAP_K else _kth_smallest_radix(keys, m, kk))
            n = 0
            for i in range(m):  # stable, branch-free compaction
                x = keys[i]
                keys[n] = x
                n += (x >> np.uint64(32)) <= thr
        low = np.uint64(0xFFFFFFFF)
        by_pos = with_ids and kk >= IDS_IN_ORDER
        if by_pos:  # the survivors are in position order: read their ids that way, sort their indexes
            for i in range(n):
                x = keys[i]
                at = np.int64(x & low)
                posb[i] = at
                idb[i] = item_ids[at]
                keys[i] = (x & ~low) | np.uint64(i)
        _radix_sort_high(keys[:n], tmp)
        top = np.empty(kk, dtype=np.uint32)
        for r in range(kk):
            top[r] = _score_bits(np.int64(keys[r] >> np.uint64(32)))
        sc = top.view(np.float32)
        for r in range(kk):
            at = np.int64(keys[r] & low)
            out_s[q, r] = sc[r]
            if by_pos:
                out_p[q, r] = posb[at]
                out_i[q, r] = idb[at]
            else:
                out_p[q, r] = at
                if with_ids:
                    out_i[q, r] = item_ids[at]

    @njit(cache=True, inline="always")
    def _gather(q, nprobe, row, beta, flat, rows, bound, keys):  # pragma: no cover - compiled
        """Query q's candidates with ``key <= bound`` (blocks with a maximum ≥ β), in position
        order (its lists by start), as 64-bit words: high half the key, low half the candidate's
        position (positions fit 32 bits where the fused scan runs). Branch-free: every item is
        written, the count advances only past the kept ones (the scratch holds every scanned item).
        Returns how many."""
        colq, pair_nb, pair_n, pair_flat, pair_start, pair_map, pmap = (
            rows.col, rows.nb, rows.n, rows.flat, rows.start, rows.map, rows.pmap)
        jorder = np.argsort(pair_start[q * nprobe : (q + 1) * nprobe])
        fu = flat.view(np.uint32)
        m = 0
        for jj in range(nprobe):
            j = jorder[jj]
            p = q * nprobe + j
            nb = pair_nb[p]
            c = colq[p]
            b = 0
            while b < nb:  # runs of consecutive blocks that pass β, each one flat loop
                if row[c + b] < beta:
                    b += 1
                    continue
                e = b + 1
                while e < nb and row[c + e] >= beta:
                    e += 1
                first = 16 * b
                last = min(16 * e, pair_n[p])
                f0 = pair_flat[p]
                mp = pair_map[p]
                s0 = pair_start[p]
                if mp == -1:
                    for i in range(first, last):
                        u = fu[f0 + i]
                        key = _desc_key(u)
                        keys[m] = (np.uint64(key) << np.uint64(32)) | np.uint64(s0 + i)
                        # a bit test for −inf: immune to fast-math assumptions about inf
                        m += (u != NEG_BITS) & (key <= bound)
                elif mp == LOCAL:  # compact row: its items' offsets follow its pair_n scores
                    loc = f0 + pair_n[p]
                    for i in range(first, last):
                        u = fu[f0 + i]
                        key = _desc_key(u)
                        keys[m] = (np.uint64(key) << np.uint64(32)) | np.uint64(s0 + np.int64(fu[loc + i]))
                        m += (u != NEG_BITS) & (key <= bound)
                else:
                    for i in range(first, last):
                        u = fu[f0 + i]
                        key = _desc_key(u)
                        keys[m] = (np.uint64(key) << np.uint64(32)) | np.uint64(pmap[mp + i])
                        m += (u != NEG_BITS) & (key <= bound)
                b = e
        return m

    @njit(cache=True)
    def _sample_bound(q, nprobe, row, beta, flat, k, rows, samp):  # pragma: no cover - compiled
        """A key bound for large k, from a sample: items 0 and 8 of every candidate block (one in 8).

        Returns the r-th smallest sampled key, r the sample's share of k plus a margin of four
        standard deviations, so the candidates with a key at or below it are very likely at least k
        (the caller checks, and gathers everything when they are not: results never depend on the
        sample). 0xFFFFFFFF (every key) when the sample cannot bound k.
        """
        colq, pair_nb, pair_n, pair_flat = rows.col, rows.nb, rows.n, rows.flat
        fu = flat.view(np.uint32)
        ns = 0
        seen = 0
        tot = 0
        for j in range(nprobe):
            p = q * nprobe + j
            for b in range(pair_nb[p]):
                if row[colq[p] + b] >= beta:
                    cnt = min(16, pair_n[p] - 16 * b)
                    tot += cnt
                    for i in range(0, cnt, 8):
                        u = fu[pair_flat[p] + 16 * b + i]
                        seen += 1
                        if u != NEG_BITS:
                            samp[ns] = np.uint64(_desc_key(u)) << np.uint64(32)
                            ns += 1
        r = -(-k * seen // max(tot, 1))
        r += 4 * np.int64(np.sqrt(r)) + 8
        if r >= ns:
            return np.int64(0xFFFFFFFF)
        return _kth_smallest_radix(samp, ns, r)

    @njit(cache=True, inline="always")
    def _pad(q, start, k, with_ids, out_s, out_p, out_i):  # pragma: no cover - compiled
        for r in range(start, k):
            out_s[q, r] = -np.inf
            out_p[q, r] = -1
            if with_ids:
                out_i[q, r] = -1

    @njit(cache=True, inline="always")
    def _desc_key(u):  # pragma: no cover - compiled
        """fp32 score bits → uint32 key whose ascending order is descending score (−0.0 as +0.0).

        Branch-free: negative scores flip every bit, positive ones only the sign bit.
        """
        x = np.int64(u)
        x = x * (x != 0x80000000)
        a = x ^ (0x80000000 | (0x7FFFFFFF * (x >> 31)))
        return 0xFFFFFFFF - a

    @njit(cache=True, inline="always")
    def _score_bits(h):  # pragma: no cover - compiled
        """Inverse of ``_desc_key`` (as int64 → uint32 bits)."""
        a = 0xFFFFFFFF - h
        return np.uint32(a ^ (0x80000000 | (0x7FFFFFFF * (1 - (a >> 31)))))

    @njit(cache=True)
    def _kth_smallest_heap(keys, m, kk):  # pragma: no cover - compiled
        """The kk-th smallest high half of keys[:m], with a size-kk max-heap (stored negated)."""
        h = np.empty(kk, dtype=np.int64)
        for i in range(kk):
            h[i] = -np.int64(keys[i] >> np.uint64(32))
        for i in range(kk // 2 - 1, -1, -1):
            _sift(h, i, kk)
        for i in range(kk, m):
            v = -np.int64(keys[i] >> np.uint64(32))
            if v > h[0]:
                h[0] = v
                _sift(h, 0, kk)
        return -h[0]

    @njit(cache=True)
    def _kth_smallest_radix(keys, m, kk):  # pragma: no cover - compiled
        """The kk-th smallest high half of keys[:m] by radix select: digits of 11, 11, 10 bits."""
        cand = np.empty(0, dtype=np.int64)
        need = kk
        prefix = np.int64(0)
        for step in range(3):
            shift = 21 if step == 0 else (10 if step == 1 else 0)
            width = 1024 if step == 2 else 2048
            hist = np.zeros(width, dtype=np.int64)
            n = m if step == 0 else cand.shape[0]
            for i in range(n):
                h = np.int64(keys[i] >> np.uint64(32)) if step == 0 else cand[i]
                hist[(h >> shift) & (width - 1)] += 1
            digit = 0
            while hist[digit] < need:
                need -= hist[digit]
                digit += 1
            prefix |= np.int64(digit) << shift
            if step < 2:
                nxt = np.empty(hist[digit], dtype=np.int64)
                j = 0
                for i in range(n):
                    h = np.int64(keys[i] >> np.uint64(32)) if step == 0 else cand[i]
                    if ((h >> shift) & (width - 1)) == digit:
                        nxt[j] = h
                        j += 1
                cand = nxt
        return prefix

    @njit(cache=True)
    def _radix_sort_high(keys, tmp):  # pragma: no cover - compiled
        """Stable in-place ascending sort of uint64 words by their high 32 bits: insertion sort
        when short, else LSD radix over the four high bytes, skipping any byte every word shares."""
        n = keys.shape[0]
        if n <= 64:
            for i in range(1, n):
                x = keys[i]
                j = i - 1
                while j >= 0 and keys[j] > x:  # whole-word order = high half, then index
                    keys[j + 1] = keys[j]
                    j -= 1
                keys[j + 1] = x
            return
        hist = np.zeros((4, 256), dtype=np.int64)
        for i in range(n):
            h = np.int64(keys[i] >> np.uint64(32))
            hist[0, h & 255] += 1
            hist[1, (h >> 8) & 255] += 1
            hist[2, (h >> 16) & 255] += 1
            hist[3, h >> 24] += 1
        src = keys
        dst = tmp[:n]
        flips = 0
        offs = np.empty(256, dtype=np.int64)
        for step in range(4):
            trivial = False
            for d in range(256):
                if hist[step, d] == n:
                    trivial = True
                    break
            if trivial:
                continue
            acc = 0
            for d in range(256):
                offs[d] = acc
                acc += hist[step, d]
            shift = np.uint64(32 + 8 * step)
            for i in range(n):
                x = src[i]
                d = np.int64((x >> shift) & np.uint64(255))
                dst[offs[d]] = x
                offs[d] += 1
            src, dst = dst, src
            flips += 1
        if flips % 2 == 1:
            keys[:] = src

    @njit(cache=True, nogil=True)
    def _layout(probe, list_offsets):  # pragma: no cover - compiled
        """Pairs (query-major) → blocks, buffer offsets, and the pairs grouped by list (counting sort)."""
        B, P = probe.shape
        nlist = list_offsets.shape[0] - 1
        npairs = B * P
        pair_n = np.empty(npairs, dtype=np.int64)
        pair_nb = np.empty(npairs, dtype=np.int64)
        pair_start = np.empty(npairs, dtype=np.int64)
        col = np.empty(npairs, dtype=np.int64)
        width = 0
        for q in range(B):
            c = 0
            for j in range(P):
                p = q * P + j
                lst = probe[q, j]
                n = list_offsets[lst + 1] - list_offsets[lst]
                pair_n[p] = n
                pair_nb[p] = (n + 15) // 16
                pair_start[p] = list_offsets[lst]
                col[p] = c
                c += pair_nb[p]
            width = max(width, c)
        per_list = np.zeros(nlist + 1, dtype=np.int64)
        for p in range(npairs):
            per_list[probe[p // P, p % P] + 1] += 1
        nl = 0
        for lst in range(nlist):
            if per_list[lst + 1] > 0:
                nl += 1
            per_list[lst + 1] += per_list[lst]
        fill = per_list[:-1].copy()
        order = np.empty(npairs, dtype=np.int64)
        for p in range(npairs):
            lst = probe[p // P, p % P]
            order[fill[lst]] = p
            fill[lst] += 1
        lists = np.empty(nl, dtype=np.int64)
        lstart = np.empty(nl + 1, dtype=np.int64)
        k = 0
        for lst in range(nlist):
            if per_list[lst + 1] > per_list[lst]:
                lists[k] = lst
                lstart[k] = per_list[lst]
                k += 1
        lstart[nl] = npairs
        pair_flat = np.empty(npairs, dtype=np.int64)
        total = 0
        for r in range(npairs):
            p = order[r]
            pair_flat[p] = total
            total += pair_n[p]
        # the same per-pair facts in list-grouped order, for the scan
        pair_q = np.empty(npairs, dtype=np.int64)
        pcol = np.empty(npairs, dtype=np.int64)
        pflat = np.empty(npairs, dtype=np.int64)
        for r in range(npairs):
            p = order[r]
            pair_q[r] = p // P
            pcol[r] = col[p]
            pflat[r] = pair_flat[p]
        pairs = Pairs(lists, lstart, pair_q, pcol, pflat)
        rows = Rows(col, pair_start, pair_flat, pair_n, pair_nb, np.full(npairs, -1, dtype=np.int64),
                    order, np.empty(0, dtype=np.int64), np.zeros(nl + 1, dtype=np.int64))
        return pairs, rows, width, total

    @njit(cache=True, nogil=True)
    def _buffer_sizes(probe, list_offsets):  # pragma: no cover - compiled
        """(scores the search writes, widest row of block maxima)."""
        total = 0
        width = 0
        for q in range(probe.shape[0]):
            w = 0
            for j in range(probe.shape[1]):
                n = list_offsets[probe[q, j] + 1] - list_offsets[probe[q, j]]
                total += n
                w += (n + 15) // 16
            width = max(width, w)
        return total, width

    @njit(cache=True, nogil=True)
    def _prologue(probe, ix, qprog, flat_buf, bmax_buf):  # pragma: no cover - compiled
        """(``Pairs``, ``Rows``, ``Buffers``, most items one query scans): the layout, the compacted
        runs' offsets and the score buffer and block maxima, shaped from the callers' scratch."""
        B, P = probe.shape
        pairs, rows, width, total = _layout(probe, ix.list_offsets)
        map_off = _map_offsets(pairs.lists, pairs.lstart, pairs.query, qprog, ix.list_offsets, ix.alive)
        rows = Rows(rows.col, rows.start, rows.flat, rows.n, rows.nb, rows.map, rows.order,
                    np.empty(map_off[-1], dtype=np.int64), map_off)
        bmax = bmax_buf[: B * max(width, 1)].reshape(B, max(width, 1))
        bmax[:] = -np.inf
        buf = Buffers(flat_buf[:total], bmax, np.zeros((B * P, 2), dtype=np.int64))
        most = 1  # most items one query scanned: the size of a thread's selection scratch
        for q in range(B):
            most = max(most, rows.n[q * P : (q + 1) * P].sum())
        return pairs, rows, buf, most

    @njit(cache=True, nogil=True)
    def _add_counts(pair_q, counts, qcounts):  # pragma: no cover - compiled
        for r in range(pair_q.shape[0]):
            qcounts[pair_q[r], 0] += counts[r, 0]
            qcounts[pair_q[r], 1] += counts[r, 1]

    @njit(cache=True, nogil=True)
    def _select_share(t, T, k, rows, buf, ix, out, most):  # pragma: no cover - compiled
        """Select queries t, t + T, t + 2T, … with one scratch allocation."""
        big = out.with_ids and min(k, most) >= IDS_IN_ORDER
        sc = SelectScratch(
            np.empty(most, dtype=np.uint64), np.empty(most, dtype=np.uint64),
            np.empty(most // 8 + 2 * (rows.col.shape[0] // buf.bmax.shape[0]) + 2 if k > HEAP_K else 0,
                     dtype=np.uint64),
            np.empty(most if big else 0, dtype=np.int64), np.empty(most if big else 0, dtype=np.int64),
        )
        for q in range(t, buf.bmax.shape[0], T):
            _select_query(q, k, rows, buf, ix.item_ids, out, sc)

    # Two drivers, one body: the same helpers in a parallel region (large
    # batches) or on the calling thread (small ones: no thread team to wake).

    @njit(parallel=True, fastmath=True, cache=True, nogil=True)
    def _run_parallel(xq, probe, k, ix, flt, out, threads, pool, flat_buf, bmax_buf):  # pragma: no cover
        pairs, rows, buf, most = _prologue(probe, ix, flt.qprog, flat_buf, bmax_buf)
        tt = _truth_tables(flt)
        memo = _new_memo(flt, pool if _filtered_batch(flt.qprog) else 0)  # a row per thread id of the pool
        # compiled-made structures cannot cross into the parallel loops: their arrays do (see above)
        lists, lstart, pq, pc, pf = pairs.lists, pairs.lstart, pairs.query, pairs.col, pairs.flat
        r_col, r_start, r_flat, r_n, r_nb, r_map, r_order, r_pmap, r_off = (
            rows.col, rows.start, rows.flat, rows.n, rows.nb, rows.map, rows.order, rows.pmap, rows.map_off)
        flat, bmax, counts = buf.flat, buf.bmax, buf.counts
        terms, tlen, tab = tt.terms, tt.tlen, tt.tab
        m_kb, m_ke, m_used, m_val, m_filled = memo.kb, memo.ke, memo.used, memo.val, memo.filled
        for li in prange(lists.shape[0]):
            _scan_list(li, xq, ix, Pairs(lists, lstart, pq, pc, pf),
                       Rows(r_col, r_start, r_flat, r_n, r_nb, r_map, r_order, r_pmap, r_off), flt,
                       TruthTables(terms, tlen, tab), Buffers(flat, bmax, counts),
                       Memo(m_kb, m_ke, m_used, m_val, m_filled))
        _add_counts(pq, counts, out.counts)
        T = max(1, min(probe.shape[0], threads))
        for t in prange(T):  # one scratch per thread, queries dealt round-robin
            _select_share(t, T, k, Rows(r_col, r_start, r_flat, r_n, r_nb, r_map, r_order, r_pmap, r_off),
                          Buffers(flat, bmax, counts), ix, out, most)

    @njit(fastmath=True, cache=True, nogil=True)
    def _run_serial(xq, probe, k, ix, flt, out, threads, pool, flat_buf, bmax_buf):  # pragma: no cover
        pairs, rows, buf, most = _prologue(probe, ix, flt.qprog, flat_buf, bmax_buf)
        tt = _truth_tables(flt)
        memo = _new_memo(flt, 1 if _filtered_batch(flt.qprog) else 0)  # thread id 0: the calling thread
        for li in range(pairs.lists.shape[0]):
            _scan_list(li, xq, ix, pairs, rows, flt, tt, buf, memo)
        _add_counts(pairs.query, buf.counts, out.counts)
        _select_share(0, 1, k, rows, buf, ix, out, most)


def kernel_filter(
    bloom, term_words, programs, qprog, *, exact=None, attr_ids=None, attr_offsets=None, term_vocab=None,
) -> KernelFilter:
    """Numpy arrays → the ``KernelFilter`` the compiled scan takes.

    ``exact`` ([P] bool, optional) marks programs to evaluate exactly in the
    scan; it needs the CSR attributes (``attr_ids`` [nnz], ``attr_offsets``
    [N_cap + 1]) and the batch terms' vocabulary ids ``term_vocab`` [T].
    Without it every program is a Bloom pass (NOT = "maybe").
    """
    if term_words.shape[0] > MAX_TERMS:
        raise ValueError(f"the compiled scan takes at most {MAX_TERMS} distinct terms per batch")
    if term_words.shape[0] == 0:
        term_words = np.zeros((0, max(bloom.shape[1], 1)), dtype=np.int64)
    ops, args, lens = programs_to_arrays(programs)
    P = lens.shape[0]
    if exact is None or not bool(np.any(exact)):
        need = np.zeros(P, dtype=np.bool_)
        attr_ids, attr_offsets, vocab_bits = _NO_ATTR, _NO_OFFS, _NO_IDS
    else:
        need = np.zeros(P, dtype=np.bool_)
        need[: len(exact)] = np.asarray(exact, dtype=np.bool_)
        tv = np.asarray(term_vocab, dtype=np.int64)
        vocab_bits = np.zeros(int(tv.max()) + 1 if tv.size else 1, dtype=np.int64)
        for t, v in enumerate(tv.tolist()):
            vocab_bits[v] |= np.int64(1) << np.int64(t)
    return KernelFilter(bloom, term_words, ops, args, lens, need, attr_ids, attr_offsets, vocab_bits,
                        np.ascontiguousarray(qprog, dtype=np.int64))


def fused_topk(xq, probe, codes, scales, list_offsets, alive, k, filt=None, *, item_ids=None, parallel=None):
    """Layout, scan and selection in one compiled call (numpy in, numpy out).

    ``filt`` (a ``KernelFilter``, see ``kernel_filter``) is optional: left
    out, every query is unfiltered.

    ``parallel`` (default: by the amount of work) runs the lists and then the
    queries across numba's threads; small searches stay on the calling
    thread, since waking a thread team costs more than it saves there.
    ``item_ids`` (optional [N_cap] int64): also return each result's id,
    read while the candidates are gathered in position order.

    Returns (scores [B, k] fp32, positions [B, k] int64, counts [B, 2] int64,
    ids [B, k] int64 or None): counts are, per query, the live items scanned
    and how many of them passed the scan's filter (Bloom, or exact where
    ``filt.need_exact`` says so).
    """
    B, P = probe.shape
    if filt is None:
        filt = kernel_filter(_NO_BLOOM, _NO_TERMS, (), np.full(B, -1, dtype=np.int64))
    out_s = np.empty((B, k), dtype=np.float32)  # each query pads its own row past its results
    out_p = np.empty((B, k), dtype=np.int64)
    with_ids = item_ids is not None
    out_i = np.empty((B, k) if with_ids else (0, 0), dtype=np.int64)
    counts = np.zeros((B, 2), dtype=np.int64)
    total, width = _buffer_sizes(probe, list_offsets)
    if parallel is None:
        parallel = total >= SERIAL_ITEMS
    run = _run_parallel if parallel else _run_serial
    flat = _SCRATCH.take(max(total, 1))
    bmax = _BMAX.take(max(B * max(width, 1), 1))
    ix = IndexArrays(codes, scales, list_offsets, alive, item_ids if with_ids else _NO_IDS)
    try:
        run(xq, probe, k, ix, filt, Results(out_s, out_p, out_i, counts, with_ids), numba.get_num_threads(),
            numba.config.NUMBA_NUM_THREADS, flat, bmax)
    finally:
        _SCRATCH.give(flat)
        _BMAX.give(bmax)
    return out_s, out_p, counts, (out_i if with_ids else None)


class _ScratchPool:
    """Reused fp32 scratch of one kind (the score buffers, or the block maxima, of searches).

    A fresh buffer of a few hundred MB costs more in page faults than the
    scan that fills it, so buffers are kept for the next search, bounded:
    at most ``keep`` of them and ``max_total`` bytes, none over ``max_bytes``,
    and none under half the largest one given since (a small buffer is
    cheap to fault in again, and after a heavier search the lighter ones'
    buffers would only hold memory). A new buffer gets 1/8 headroom and
    replaces the largest free one that was too small, so batches of varying
    size reuse one buffer instead of collecting one each. Serving one batch
    size and nprobe, the pool holds about one buffer per concurrent search —
    what the planner counts as the scan's scratch
    (``planner.tiers.scan_scratch_bytes``).
    Thread-safe: concurrent searches take different buffers.
    """

    def __init__(self, keep: int = 4, max_bytes: int = 1 << 28, max_total: int = 1 << 30):
        self.keep, self.max_bytes, self.max_total = keep, max_bytes, max_total
        self._free: list[np.ndarray] = []
        self._lock = threading.Lock()

    def take(self, n: int) -> np.ndarray:
        with self._lock:
            for i, buf in enumerate(self._free):  # sorted by size: the smallest that fits
                if buf.size >= n:
                    return self._free.pop(i)
            if self._free:
                self._free.pop()  # the largest is too small for this load: the new buffer replaces it
        grown = n + (n >> 3)  # headroom, so the next batch's slightly larger scan still fits
        return np.empty(grown if 4 * grown <= self.max_bytes else n, dtype=np.float32)

    def give(self, buf: np.ndarray) -> None:
        if buf.nbytes > self.max_bytes:
            return
        with self._lock:
            if self._free and buf.size < self._free[-1].size // 2:
                return  # lighter than what the pool keeps: not worth its memory
            self._free = [b for b in self._free if b.size >= buf.size // 2]  # stale after a heavier search
            self._free.append(buf)
            self._free.sort(key=lambda b: b.size)
            while len(self._free) > self.keep or sum(b.nbytes for b in self._free) > self.max_total:
                self._free.pop(0)  # drop the smallest

    def kept_bytes(self) -> int:
        """Bytes the pool holds now."""
        with self._lock:
            return sum(b.nbytes for b in self._free)

    def clear(self) -> None:
        with self._lock:
            self._free = []


_SCRATCH = _ScratchPool()  # score buffers (one float per scanned item of a search chunk)
_BMAX = _ScratchPool()  # block maxima (one float per 16 items of a query's lists)


def scratch_bytes() -> int:
    """Bytes the scan's scratch pools keep between searches (``_ScratchPool``)."""
    return _SCRATCH.kept_bytes() + _BMAX.kept_bytes()
_NO_IDS = np.zeros(1, dtype=np.int64)
_NO_BLOOM = np.zeros((1, 1), dtype=np.int64)  # "no filter" arguments of the compiled scan
_NO_TERMS = np.zeros((0, 1), dtype=np.int64)
_NO_ATTR = np.zeros(1, dtype=np.int32)
_NO_OFFS = np.zeros(1, dtype=np.int64)
