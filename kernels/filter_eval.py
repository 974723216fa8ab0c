"""Evaluation of compiled filter programs over blocks of items.

A filter expression is compiled (``sterling.model.filter``) into postfix
programs over a shared list of T terms. Each term carries Bloom bit words
(for the approximate pass inside the scan) and an exact vocabulary id (for
verification against the exact attribute store).

Bloom semantics are a *superset* of the truth: a term's Bloom hit is true for
every item that has the term (plus false positives), AND/OR preserve that,
and NOT of a superset is not a superset, so NOT evaluates to "maybe" (true)
in the Bloom pass and is decided only by the exact check.

Opcodes (postfix): ``OP_TERM t`` pushes term t's hits, ``OP_TRUE`` /
``OP_FALSE`` push constants, ``OP_NOT`` / ``OP_AND`` / ``OP_OR`` pop and push.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

__all__ = [
    "OP_TERM",
    "OP_TRUE",
    "OP_FALSE",
    "OP_NOT",
    "OP_AND",
    "OP_OR",
    "bloom_term_hits",
    "exact_term_hits",
    "eval_programs",
]

OP_TERM, OP_TRUE, OP_FALSE, OP_NOT, OP_AND, OP_OR = range(6)

Program = Sequence[tuple[int, int]]  # (opcode, term index or 0)


def bloom_term_hits(signatures: torch.Tensor, term_words: torch.Tensor) -> torch.Tensor:
    """Bloom membership of T terms in M items.

    Args:
        signatures: [M, W] int64, item-major Bloom words.
        term_words: [T, W] int64, each term's k hash bits.
    Returns:
        [T, M] bool: every bit of the term is set in the item's signature.
    """
    if term_words.shape[0] == 0:
        return torch.zeros(0, signatures.shape[0], dtype=torch.bool, device=signatures.device)
    out = torch.empty(term_words.shape[0], signatures.shape[0], dtype=torch.bool, device=signatures.device)
    for t in range(term_words.shape[0]):
        w = term_words[t]
        out[t] = ((signatures & w) == w).all(dim=1)
    return out


def exact_term_hits(
    attr_ids: torch.Tensor,
    attr_offsets: torch.Tensor,
    positions: torch.Tensor,
    term_vocab: torch.Tensor,
) -> torch.Tensor:
    """Exact membership of T vocabulary ids in the attribute lists of M items.

    Args:
        attr_ids: [nnz] int32, CSR values (vocabulary ids).
        attr_offsets: [N + 1] int64, CSR row pointers.
        positions: [M] int64 item positions (−1 entries never match).
        term_vocab: [T] int64 vocabulary ids (−1 = unknown term, never matches).
    Returns:
        [T, M] bool.
    """
    M = positions.numel()
    T = term_vocab.numel()
    if M == 0 or T == 0:
        return torch.zeros(T, M, dtype=torch.bool, device=positions.device)
    ok = positions >= 0
    pos = positions.clamp(min=0)
    start = attr_offsets[pos]
    length = torch.where(ok, attr_offsets[pos + 1] - start, torch.zeros_like(start))
    L = int(length.max().item()) if M else 0
    if L == 0:
        return torch.zeros(T, M, dtype=torch.bool, device=positions.device)
    j = torch.arange(L, device=positions.device)
    present = j[None, :] < length[:, None]  # [M, L]
    idx = (start[:, None] + j[None, :]).clamp(max=max(attr_ids.numel() - 1, 0))
    attrs = torch.where(present, attr_ids[idx].long(), torch.full_like(idx, -2))  # [M, L]
    return (attrs[None, :, :] == term_vocab[:, None, None]).any(dim=2)


def eval_programs(
    term_hits: torch.Tensor, programs: Sequence[Program], *, bloom: bool
) -> torch.Tensor:
    """Evaluate P postfix programs over [T, M] term hits → [P, M] bool.

    With ``bloom=True`` NOT yields "maybe" (all true), so the result is a
    superset of the exact answer whenever ``term_hits`` is a superset.
    """
    M = term_hits.shape[1]
    device = term_hits.device
    out = torch.empty(len(programs), M, dtype=torch.bool, device=device)
    ones = torch.ones(M, dtype=torch.bool, device=device)
    zeros = torch.zeros(M, dtype=torch.bool, device=device)
    for p, program in enumerate(programs):
        stack: list[torch.Tensor] = []
        for op, arg in program:
            if op == OP_TERM:
                stack.append(term_hits[arg])
            elif op == OP_TRUE:
                stack.append(ones)
            elif op == OP_FALSE:
                stack.append(zeros)
            elif op == OP_NOT:
                a = stack.pop()
                stack.append(ones if bloom else ~a)
            elif op == OP_AND:
                b, a = stack.pop(), stack.pop()
                stack.append(a & b)
            elif op == OP_OR:
                b, a = stack.pop(), stack.pop()
                stack.append(a | b)
            else:
                raise ValueError(f"unknown filter opcode {op}")
        if len(stack) != 1:
            raise ValueError(f"malformed filter program {list(program)}: stack ends with {len(stack)} values")
        out[p] = stack[0]
    return out
