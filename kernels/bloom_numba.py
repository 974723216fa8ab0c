"""Fused CPU pass of a batch's Bloom filters over bit-sliced signatures (numba).

Same contract as ``kernels.bloom_sliced.filter_sliced`` (its reference) and
the same answer bit for bit, but one pass over the word columns instead of
one tensor op per DAG height:

* the catalog is cut into blocks of 32 words (2,048 items); in each block
  each program's top-level conjuncts are evaluated in turn as small
  postfix programs whose every instruction runs over the 32 words (SIMD),
  and the program stops at the first conjunct that leaves no item of the
  block (a selective group makes the rest of the expression free there);
* a term's words (AND of its k bit rows) are computed lazily, at most once
  per block, and shared by every program of the batch that names it.

Optional: ``HAVE_NUMBA`` says whether it can run; callers fall back to the
reference when it is False.
"""

from __future__ import annotations

import numpy as np
import torch

from sterling.kernels.filter_eval import (
    OP_AND,
    OP_FALSE,
    OP_NOT,
    OP_OR,
    OP_TERM,
    OP_TRUE,
    FilterPlan,
)

__all__ = ["HAVE_NUMBA", "conjunct_programs", "filter_sliced_fused"]

try:  # optional dependency
    from numba import njit

    HAVE_NUMBA = True
except ImportError:  # pragma: no cover - exercised where numba is absent
    HAVE_NUMBA = False


def conjunct_programs(plan: FilterPlan) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Flatten a plan into per-program lists of postfix conjuncts.

    Returns:
        ops [I] int64, args [I] int64 (leaf index for OP_TERM),
        conj_off [Q+1] int64 (conjunct q is ops[conj_off[q]:conj_off[q+1]]),
        prog_off [P+1] int64 (program p owns conjuncts prog_off[p]:prog_off[p+1]).
    """
    n_leaves = plan.terms.numel()
    kids: dict[int, tuple[int, list[int]]] = {}
    for g in plan.groups:
        for node, ch in zip(g.nodes.tolist(), g.children.tolist()):
            pad = 1 if g.op == OP_AND else 0
            kids[node] = (g.op, [c for c in ch if not (g.op != OP_NOT and c == pad)])

    def emit(n: int, out_ops: list[int], out_args: list[int]) -> None:
        if n == 0 or n == 1:
            out_ops.append(OP_FALSE if n == 0 else OP_TRUE)
            out_args.append(0)
        elif n < 2 + n_leaves:
            out_ops.append(OP_TERM)
            out_args.append(n - 2)
        else:
            op, ch = kids[n]
            emit(ch[0], out_ops, out_args)
            for c in ch[1:]:
                emit(c, out_ops, out_args)
                out_ops.append(op)
                out_args.append(0)
            if op == OP_NOT:
                out_ops.append(OP_NOT)
                out_args.append(0)

    ops: list[int] = []
    args: list[int] = []
    conj_off = [0]
    prog_off = [0]
    for root in plan.roots.tolist():
        parts = kids[root][1] if root in kids and kids[root][0] == OP_AND else [root]
        # leaves first: a single term is the cheapest test and often the most selective
        parts = sorted(parts, key=lambda n: (n >= 2 + n_leaves, n))
        for c in parts:
            emit(c, ops, args)
            conj_off.append(len(ops))
        prog_off.append(len(conj_off) - 1)
    return (
        np.asarray(ops, dtype=np.int64),
        np.asarray(args, dtype=np.int64),
        np.asarray(conj_off, dtype=np.int64),
        np.asarray(prog_off, dtype=np.int64),
    )


if HAVE_NUMBA:

    @njit(cache=True, nogil=True)
    def _fused(sliced, term_pos, ops, args, conj_off, prog_off, out):  # pragma: no cover - compiled
        NW = sliced.shape[1]
        T, K = term_pos.shape
        P = prog_off.shape[0] - 1
        BW = 32  # word columns per block: each instruction runs over 32 words (2,048 items)
        ALL = np.uint64(0xFFFFFFFFFFFFFFFF)
        tval = np.zeros((T, BW), dtype=np.uint64)
        tstamp = np.full(T, -1, dtype=np.int64)
        stack = np.empty((max(ops.shape[0], 1) + 1, BW), dtype=np.uint64)
        acc = np.empty(BW, dtype=np.uint64)
        for c0 in range(0, NW, BW):
            n = min(BW, NW - c0)
            for p in range(P):
                acc[:n] = ALL
                for q in range(prog_off[p], prog_off[p + 1]):
                    sp = 0
                    for i in range(conj_off[q], conj_off[q + 1]):
                        op = ops[i]
                        if op == 0:  # OP_TERM
                            t = args[i]
                            if tstamp[t] != c0:
                                r0 = term_pos[t, 0]
                                for w in range(n):
                                    tval[t, w] = sliced[r0, c0 + w]
                                for j in range(1, K):
                                    r = term_pos[t, j]
                                    for w in range(n):
                                        tval[t, w] &= sliced[r, c0 + w]
                                tstamp[t] = c0
                            for w in range(n):
                                stack[sp, w] = tval[t, w]
                            sp += 1
                        elif op == 1:  # OP_TRUE
                            stack[sp, :n] = ALL
                            sp += 1
                        elif op == 2:  # OP_FALSE
                            stack[sp, :n] = 0
                            sp += 1
                        elif op == 3:  # OP_NOT
                            for w in range(n):
                                stack[sp - 1, w] = ~stack[sp - 1, w]
                        elif op == 4:  # OP_AND
                            sp -= 1
                            for w in range(n):
                                stack[sp - 1, w] &= stack[sp, w]
                        else:  # OP_OR
                            sp -= 1
                            for w in range(n):
                                stack[sp - 1, w] |= stack[sp, w]
                    any_left = np.uint64(0)
                    for w in range(n):
                        acc[w] &= stack[0, w]
                        any_left |= acc[w]
                    if any_left == 0:
                        break
                for w in range(n):
                    out[p, c0 + w] = acc[w]


assert (OP_TERM, OP_TRUE, OP_FALSE, OP_NOT, OP_AND, OP_OR) == (0, 1, 2, 3, 4, 5)  # the kernel's constants


def filter_sliced_fused(
    sliced: torch.Tensor,
    plan: FilterPlan,
    positions: torch.Tensor,
    *,
    n_items: int,
    alive_words: torch.Tensor | None = None,
) -> torch.Tensor:
    """``filter_sliced`` in one fused numba pass (CPU tensors; needs ``HAVE_NUMBA``).

    Args / returns: as ``kernels.bloom_sliced.filter_sliced``.
    """
    if not HAVE_NUMBA or sliced.device.type != "cpu":
        raise RuntimeError("filter_sliced_fused needs numba and CPU tensors; use bloom_sliced.filter_sliced")
    ops, args, conj_off, prog_off = conjunct_programs(plan)
    P, NW = plan.roots.numel(), sliced.shape[1]
    out = np.empty((P, NW), dtype=np.uint64)
    pos = positions.contiguous().numpy() if positions.numel() else np.zeros((0, 1), dtype=np.int64)
    _fused(sliced.contiguous().numpy().view(np.uint64), pos, ops, args, conj_off, prog_off, out)
    res = torch.from_numpy(out.view(np.int64))
    if alive_words is not None:
        res &= alive_words
    tail = n_items % 64
    if tail and NW:
        res[:, -1] &= (1 << tail) - 1
    return res
