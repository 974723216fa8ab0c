"""Bloom eligibility signatures.

Every item gets a ``64 * W``-bit signature: the OR of its terms' bits. A term
``feature:value`` sets ``hashes`` distinct bit positions derived from a fixed
64-bit hash (documented so any device or language can reproduce it)::

    d  = blake2b(term.encode("utf-8"), digest_size=16, person=b"sterling.bloom1")
    h1 = int.from_bytes(d[:8], "little")
    h2 = int.from_bytes(d[8:], "little") | 1
    positions: (h1 + j * h2) mod bits for j = 0, 1, 2, …, skipping repeats
               until ``hashes`` distinct positions are found

Bit b lives in word b // 64, bit b % 64 (two's-complement int64 storage).
Hashing happens on the host per distinct term (vocabulary at build, query
terms per request); devices only AND/compare words, so CPU and GPU agree.

Sizing from data: with n terms per item and a target false-positive rate p,
``bits = -n ln p / (ln 2)^2`` rounded up to whole words, and
``hashes = round(bits / n * ln 2)``, using n = the largest number of terms any
item has (items with fewer terms only see a lower rate).
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass

import numpy as np
import torch

__all__ = ["BloomSpec", "size_bloom", "term_positions", "term_words", "item_signatures"]

_PERSON = b"sterling.bloom1"
MAX_WORDS = 64  # 4096 bits per item; beyond this a forward index is cheaper
MAX_HASHES = 16


@dataclass(frozen=True, slots=True)
class BloomSpec:
    words: int
    hashes: int

    @property
    def bits(self) -> int:
        return 64 * self.words

    def expected_fpr(self, n_terms: int) -> float:
        """False-positive probability of one term for an item with ``n_terms`` terms."""
        if n_terms <= 0:
            return 0.0
        return (1.0 - math.exp(-self.hashes * n_terms / self.bits)) ** self.hashes


def size_bloom(max_terms_per_item: int, target_fpr: float) -> BloomSpec:
    n = max(int(max_terms_per_item), 1)
    bits = -n * math.log(target_fpr) / (math.log(2) ** 2)
    words = min(max(1, math.ceil(bits / 64)), MAX_WORDS)
    hashes = min(max(1, round(64 * words / n * math.log(2))), MAX_HASHES)
    return BloomSpec(words=words, hashes=hashes)


def term_positions(term: str, bits: int, hashes: int) -> list[int]:
    d = hashlib.blake2b(term.encode("utf-8"), digest_size=16, person=_PERSON).digest()
    h1 = int.from_bytes(d[:8], "little")
    h2 = int.from_bytes(d[8:], "little") | 1
    want = min(hashes, bits)
    out: list[int] = []
    j = 0
    while len(out) < want:
        p = (h1 + j * h2) % bits
        if p not in out:
            out.append(p)
        j += 1
    return out


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
    """OR of each item's term words: CSR [N] lists of vocab ids → [N, W] int64."""
    N = attr_offsets.numel() - 1
    W = vocab_words.shape[1]
    sig = torch.zeros(N, W, dtype=torch.int64)
    lengths = attr_offsets[1:] - attr_offsets[:-1]
    L = int(lengths.max()) if N else 0
    starts = attr_offsets[:-1]
    for j in range(L):
        has = lengths > j
        rows = has.nonzero().squeeze(1)
        sig[rows] |= vocab_words[attr_ids[starts[rows] + j].long()]
    return sig


def measure_fpr(index, *, samples: int = 20_000, seed: int = 0) -> float:
    """Measured Bloom false-positive rate per term, before exact verification.

    Tests random (item, term) pairs where the item truly lacks the term and
    counts how often its signature claims the term anyway.
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
    start, end = index.attr_offsets[items], index.attr_offsets[items + 1]
    L = int((end - start).max())
    j = torch.arange(L)
    present = j[None, :] < (end - start)[:, None]
    idx = (start[:, None] + j).clamp(max=max(index.attr_ids.numel() - 1, 0))
    has = (present & (index.attr_ids[idx].long() == terms[:, None])).any(dim=1)
    negatives = ~has
    if not bool(negatives.any()):
        return 0.0
    return float((claimed & negatives).sum()) / float(negatives.sum())
