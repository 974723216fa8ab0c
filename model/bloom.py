"""Bloom eligibility signatures.

Every item gets a ``64 * W``-bit signature: the OR of its terms' bits. A term
``feature:value`` sets ``hashes`` distinct bit positions derived from a fixed
64-bit hash (documented so any device or language can reproduce it)::

    h(term, seed) = int.from_bytes(blake2b(term.encode("utf-8"), digest_size=8,
                        person=b"sterling.bloom2", salt=seed.to_bytes(8, "little")).digest(),
                        "little")                                  # 64-bit, seed = 0, 1, 2, …
    positions: h(term, j) mod bits for j = 0, 1, 2, …, skipping repeats
               until ``hashes`` distinct positions are found

(One independent 64-bit hash per seed. Double hashing ``h1 + j·h2`` was
dropped: at 128 bits two terms share all k positions with probability about
1/(m·m/2), which added ~1e-3 to the false-positive rate of a 7-term item.)

Bit b lives in word b // 64, bit b % 64 (two's-complement int64 storage).
Hashing happens on the host per distinct term (vocabulary at build, query
terms per request, cached); devices only AND/compare words, so CPU and GPU
agree bit for bit.

Sizing from data (``size_bloom``): the catalog's histogram of terms per item
n_i gives, for a width of m = 64·W bits and k hashes per term, the expected
per-term false-positive rate averaged over items (what ``measure_fpr``
measures)::

    fill_i = 1 − (1 − k/m)^{n_i}                 fraction of the item's bits set
    fpr_i  = Π_{j<k} (fill_i·m − j) / (m − j)     k distinct positions all set
    fpr    = mean_i fpr_i

W is the fewest whole words for which some k reaches ``target_fpr``; k is
then the hash count whose rate is nearest the target (in log ratio), not the
one that minimises the rate — so the measured rate lands near the target
(within 2×) instead of far below it with wasted hashing work.

Two layouts of the same bits:

* item-major ``[N, W]`` int64 (the ``ItemIndex.bloom`` buffer, cluster order):
  a scan tile of consecutive items reads its rows contiguously;
* bit-sliced ``[64·W, ceil(N/64)]`` int64 (``bit_slice``; BitFunnel style):
  row b holds bit b of 64 items per word, so a whole-catalog pass reads only
  the query terms' k rows. Derived on demand, never stored in the artifact.
"""

from __future__ import annotations

import functools
import hashlib
import math
from dataclasses import dataclass

import numpy as np
import torch

__all__ = [
    "BloomSpec",
    "TermsHistogram",
    "size_bloom",
    "expected_fpr",
    "term_positions",
    "term_words",
    "item_signatures",
    "bit_slice",
    "measure_fpr",
]

_PERSON = b"sterling.bloom2"
MAX_WORDS = 64  # 4096 bits per item; beyond this a forward index is cheaper
MAX_HASHES = 16


@dataclass(frozen=True, slots=True)
class BloomSpec:
    words: int
    hashes: int

    @property
    def bits(self) -> int:
        return 64 * self.words

    def expected_fpr(self, n_terms) -> float:
        """Expected per-term false-positive rate for items with ``n_terms`` terms (int or [N] counts)."""
        return expected_fpr(n_terms, self.bits, self.hashes)


@dataclass(frozen=True, slots=True)
class TermsHistogram:
    """Terms per item as a histogram: ``values`` [H] distinct counts (ascending), ``counts`` [H] items
    with each. What a chunked build accumulates instead of the [N] counts (same sizing, bit for bit)."""

    values: np.ndarray
    counts: np.ndarray


def _counts_hist(terms_per_item) -> tuple[np.ndarray, np.ndarray]:
    """(distinct term counts, fraction of items with each) from an int, [N] counts or a ``TermsHistogram``."""
    if isinstance(terms_per_item, TermsHistogram):
        cnt = np.asarray(terms_per_item.counts, dtype=np.int64)
        if cnt.sum() == 0:
            return np.zeros(1), np.ones(1)
        return np.asarray(terms_per_item.values).astype(np.float64), cnt.astype(np.float64) / float(cnt.sum())
    if isinstance(terms_per_item, (int, np.integer)):
        return np.array([max(int(terms_per_item), 0)], dtype=np.float64), np.ones(1)
    c = torch.as_tensor(terms_per_item).reshape(-1).long()
    if c.numel() == 0:
        return np.zeros(1), np.ones(1)
    vals, cnt = torch.unique(c, return_counts=True)
    return vals.double().numpy(), (cnt.double() / cnt.sum()).numpy()


def expected_fpr(terms_per_item, bits: int, hashes: int) -> float:
    """Expected per-term false-positive rate averaged over items (module docstring formula).

    Args:
        terms_per_item: an int (every item has that many terms) or [N] counts.
        bits: signature width m.
        hashes: distinct positions per term k.
    """
    n, w = _counts_hist(terms_per_item)
    m, k = float(bits), int(min(hashes, bits))
    fill = 1.0 - (1.0 - k / m) ** n  # [H]
    set_bits = fill * m
    p = np.ones_like(fill)
    for j in range(k):
        p *= np.clip((set_bits - j) / (m - j), 0.0, 1.0)
    p[n <= 0] = 0.0
    return float((p * w).sum())


def size_bloom(terms_per_item, target_fpr: float) -> BloomSpec:
    """Signature width and hash count for a catalog, from its terms-per-item statistics.

    Args:
        terms_per_item: an int (every item has that many terms; e.g. the max),
            [N] per-item term counts (the catalog's real histogram; preferred) or
            the same as a ``TermsHistogram``.
        target_fpr: wanted per-term false-positive rate before verification.
    Returns:
        the fewest whole words W for which some k ≤ 16 reaches the target, with
        the k whose expected rate is nearest the target (ties: the lower rate).
    """
    if not 0.0 < target_fpr < 1.0:
        from sterling.model.errors import InvalidInputError

        raise InvalidInputError(f"target_fpr ({target_fpr}) must be in (0, 1), e.g. 1e-3")
    log_t = math.log(target_fpr)
    for words in range(1, MAX_WORDS + 1):
        rates = [expected_fpr(terms_per_item, 64 * words, k) for k in range(1, MAX_HASHES + 1)]
        if min(rates) <= target_fpr or words == MAX_WORDS:
            ks = range(1, MAX_HASHES + 1)
            if min(rates) > target_fpr:  # capped width: take the lowest rate it can give
                best = min(ks, key=lambda k: rates[k - 1])
            else:
                gap = {k: (abs(math.log(max(rates[k - 1], 1e-300)) - log_t), rates[k - 1]) for k in ks}
                best = min(ks, key=gap.__getitem__)
            return BloomSpec(words=words, hashes=best)
    raise AssertionError("unreachable")


@functools.lru_cache(maxsize=1 << 16)
def _positions_cached(term: str, bits: int, hashes: int) -> tuple[int, ...]:
    data = term.encode("utf-8")
    want = min(hashes, bits)
    out: list[int] = []
    seed = 0
    while len(out) < want:
        d = hashlib.blake2b(data, digest_size=8, person=_PERSON, salt=seed.to_bytes(8, "little"))
        p = int.from_bytes(d.digest(), "little") % bits
        if p not in out:
            out.append(p)
        seed += 1
    return tuple(out)


def term_positions(term: str, bits: int, hashes: int) -> list[int]:
    """The ``hashes`` distinct bit positions of ``term`` in a ``bits``-bit signature."""
    return list(_positions_cached(term, bits, hashes))


def term_words(terms: list[str], spec: BloomSpec) -> torch.Tensor:
    """[T] terms → [T, W] int64 words with each term's bits set."""
    words = np.zeros((len(terms), spec.words), dtype=np.uint64)
    for t, term in enumerate(terms):
        for p in term_positions(term, spec.bits, spec.hashes):
            words[t, p // 64] |= np.uint64(1) << np.uint64(p % 64)
    return torch.from_numpy(words.view(np.int64))


def item_signatures(
    attr_ids: torch.Tensor, attr_offsets: torch.Tensor, vocab_words: torch.Tensor
) -> torch.Tensor:
    """OR of each item's term words: CSR [N] lists of vocab ids → [N, W] int64.

    Negative ids (the "no attribute" padding left by in-place updates) set no bits.
    """
    N = attr_offsets.numel() - 1
    W = vocab_words.shape[1]
    sig = torch.zeros(N, W, dtype=torch.int64)
    if N == 0 or attr_ids.numel() == 0:
        return sig
    lengths = attr_offsets[1:] - attr_offsets[:-1]
    L = int(lengths.max())
    starts = attr_offsets[:-1]
    padded = torch.cat([vocab_words, torch.zeros(1, W, dtype=torch.int64)])  # row V = no bits
    V = vocab_words.shape[0]
    for j in range(L):
        rows = (lengths > j).nonzero().squeeze(1)
        ids = attr_ids[starts[rows] + j].long()
        sig[rows] |= padded[torch.where(ids >= 0, ids, torch.full_like(ids, V))]
    return sig


def bit_slice(signatures: torch.Tensor, *, chunk: int = 1 << 20) -> torch.Tensor:
    """Item-major [N, W] int64 signatures → bit-sliced [64·W, ceil(N/64)] int64.

    Row b, word c holds bit b of items 64c … 64c+63 (item 64c+i is bit i).
    Padding items beyond N have no bits set.
    """
    N, W = signatures.shape
    NW = (N + 63) // 64
    out = np.zeros((64 * W, NW), dtype=np.uint64)
    sig = signatures.contiguous().numpy().view(np.uint8)  # [N, 8W], bit b = byte b//8 bit b%8
    chunk = max(64, chunk // 64 * 64)
    for s in range(0, N, chunk):
        e = min(N, s + chunk)
        bits = np.unpackbits(sig[s:e], axis=1, bitorder="little")  # [n, 64W] item-major bits
        if (e - s) % 64:
            bits = np.concatenate([bits, np.zeros(((-(e - s)) % 64, bits.shape[1]), np.uint8)])
        packed = np.packbits(bits, axis=0, bitorder="little")  # [n/8, 64W], 8 items per byte
        out[:, s // 64 : s // 64 + packed.shape[0] // 8] = (
            np.ascontiguousarray(packed.T).view(np.uint64)
        )
    return torch.from_numpy(out.view(np.int64))


def measure_fpr(index, *, samples: int = 200_000, seed: int = 0) -> float:
    """Measured Bloom false-positive rate per term, before exact verification.

    Tests random (item, term) pairs where the item truly lacks the term and
    counts how often its signature claims the term anyway. At a rate of
    1e-3, 200,000 samples see about 200 false positives (±7 %).
    """
    V = len(index.vocab)
    live = (index.item_ids >= 0).nonzero().squeeze(1)
    if V == 0 or live.numel() == 0:
        return 0.0
    g = torch.Generator().manual_seed(seed)
    items = live[torch.randint(0, live.numel(), (samples,), generator=g)]
    terms = torch.randint(0, V, (samples,), generator=g)
    vocab_words = term_words(index.vocab, index.bloom_spec)
    w = vocab_words[terms]  # [S, W]
    claimed = ((index.bloom[items] & w) == w).all(dim=1)
    # Exact membership by binary search in the sorted (slot, term) pairs: memory O(nnz + samples),
    # whatever the longest item (a padded [samples, max terms] matrix would be 16 GB at 10k terms).
    lengths = index.attr_offsets[1:] - index.attr_offsets[:-1]
    slot_of = torch.repeat_interleave(torch.arange(lengths.numel()), lengths)
    term_ids = index.attr_ids.long()
    keep = term_ids >= 0
    keys = (slot_of[keep] * V + term_ids[keep]).sort().values
    want = items * V + terms
    pos = torch.searchsorted(keys, want).clamp(max=max(keys.numel() - 1, 0))
    has = (keys[pos] == want) if keys.numel() else torch.zeros(samples, dtype=torch.bool)
    negatives = ~has
    if not bool(negatives.any()):
        return 0.0
    return float((claimed & negatives).sum()) / float(negatives.sum())
