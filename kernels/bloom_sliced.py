"""Whole-catalog Bloom filtering over bit-sliced signatures (BitFunnel style).

Layout (``sterling.model.bloom.bit_slice``): ``sliced[b, c]`` holds bit b of
the signatures of items 64c … 64c+63 (item 64c+i is bit i of the word). A
term with k hash positions matches 64 items per word with k−1 ANDs of its k
rows; the filter's postfix programs then combine those words with the same
``FilterPlan`` as the item-major path, 64 items per operation. Only the rows
of the batch's terms are read, so the cost is O(k · terms · N/64) words,
independent of the signature width.

This is a derived structure for passes over the whole catalog (pre-filter,
the benchmark); the scan inside search reads item-major words per list block.
Pure PyTorch: runs on any device; the CPU path is the reference.
"""

from __future__ import annotations

import torch

from sterling.kernels.filter_eval import FilterPlan

__all__ = [
    "positions_from_words",
    "sliced_term_hits",
    "filter_sliced",
    "words_to_positions",
    "popcount_words",
]

# word columns per chunk: keeps the plan's node table [nodes, chunk] int64 small and in cache
_COLS = 1 << 13


def positions_from_words(term_words: torch.Tensor) -> torch.Tensor:
    """[T, W] int64 term words → [T, k] int64 bit rows (k = most bits of any term; short rows repeat)."""
    T, W = term_words.shape
    if T == 0:
        return torch.zeros(0, 1, dtype=torch.int64, device=term_words.device)
    shifts = torch.arange(64, device=term_words.device, dtype=torch.int64)
    bits = ((term_words[:, :, None] >> shifts) & 1).reshape(T, 64 * W).bool()
    k = max(int(bits.sum(1).max()), 1)
    order = torch.argsort(bits.to(torch.int8), dim=1, descending=True, stable=True)[:, :k]
    present = bits.gather(1, order)
    return torch.where(present, order, order[:, :1])


def sliced_term_hits(sliced: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """Bloom hits of T terms, 64 items per word.

    Args:
        sliced: [R, NW] int64 bit-sliced signatures (R = bits per signature).
        positions: [T, k] int64 bit rows of each term (pad a short row by
            repeating one of its positions).
    Returns:
        [T, NW] int64; bit i of word c is set when item 64c+i may hold the term.
    """
    T = positions.shape[0]
    if T == 0:
        return torch.zeros(0, sliced.shape[1], dtype=torch.int64, device=sliced.device)
    acc = sliced[positions[:, 0]]
    for j in range(1, positions.shape[1]):
        acc &= sliced[positions[:, j]]
    return acc


def filter_sliced(
    sliced: torch.Tensor,
    plan: FilterPlan,
    positions: torch.Tensor,
    *,
    n_items: int,
    alive_words: torch.Tensor | None = None,
) -> torch.Tensor:
    """Evaluate a batch's Bloom plan over every item → [P, NW] int64 bitmaps.

    Args:
        sliced: [R, NW] int64 bit-sliced signatures.
        plan: ``FilterPlan`` built with ``bloom=True`` (NOT folded to "maybe").
        positions: [len(plan.terms), k] int64 bit rows of the plan's leaves.
        n_items: N; bits of padding items (≥ N) are cleared.
        alive_words: optional [NW] int64 mask of live items.
    Returns:
        [P, NW] int64: a superset of each program's eligible items.
    """
    NW = sliced.shape[1]
    P = plan.roots.numel()
    out = torch.empty(P, NW, dtype=torch.int64, device=sliced.device)
    for c in range(0, NW, _COLS):
        e = min(NW, c + _COLS)
        out[:, c:e] = plan.eval(sliced_term_hits(sliced[:, c:e], positions))
    if alive_words is not None:
        out &= alive_words
    tail = n_items % 64
    if tail and NW:
        out[:, -1] &= (1 << tail) - 1
    return out


def words_to_positions(words: torch.Tensor) -> torch.Tensor:
    """[NW] int64 bitmap → int64 positions of its set bits, ascending."""
    shifts = torch.arange(64, device=words.device, dtype=torch.int64)
    bits = (words[:, None] >> shifts) & 1  # [NW, 64]
    return bits.reshape(-1).nonzero().squeeze(1)


def popcount_words(words: torch.Tensor) -> torch.Tensor:
    """Set bits per row of [..., NW] int64 words → [...] int64."""
    x = words.view(torch.uint8) if words.is_contiguous() else words.contiguous().view(torch.uint8)
    table = _POP8.to(words.device)
    return table[x.long()].reshape(*words.shape, 8).sum(dim=(-1, -2))


_POP8 = torch.tensor([bin(i).count("1") for i in range(256)], dtype=torch.int64)
