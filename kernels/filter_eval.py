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

Evaluation is vectorised across the whole batch (``FilterPlan``): the P
postfix programs are turned once into one shared expression DAG (common
sub-expressions merged, n-ary AND/OR flattened, constants folded, and in the
Bloom pass every NOT replaced by "maybe"), grouped by height; each height
costs a handful of tensor ops whatever P is. The same plan evaluates bool
hits [T, M] (one byte per item) or packed int64 words [T, M/64] (64 items
per word, the bit-sliced path).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

__all__ = [
    "OP_TERM",
    "OP_TRUE",
    "OP_FALSE",
    "OP_NOT",
    "OP_AND",
    "OP_OR",
    "bloom_term_hits",
    "bloom_term_hits_reference",
    "exact_term_hits",
    "eval_programs",
    "eval_programs_reference",
    "FilterPlan",
]

OP_TERM, OP_TRUE, OP_FALSE, OP_NOT, OP_AND, OP_OR = range(6)

Program = Sequence[tuple[int, int]]  # (opcode, term index or 0)


def bloom_term_hits_reference(signatures: torch.Tensor, term_words: torch.Tensor) -> torch.Tensor:
    """Bloom membership of T terms in M items (one term at a time; the reference).

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

    Work is O(M·L) (L = longest list among the M items), not O(T·M·L): a
    lookup table maps each vocabulary id to its term row, and every
    (item, attribute) pair scatters one True.

    Args:
        attr_ids: [nnz] int32, CSR values (vocabulary ids; negative = padding).
        attr_offsets: [N + 1] int64, CSR row pointers.
        positions: [M] int64 item positions (−1 entries never match).
        term_vocab: [T] int64 distinct vocabulary ids (−1 = unknown term, never matches).
    Returns:
        [T, M] bool.
    """
    M = positions.numel()
    T = term_vocab.numel()
    device = positions.device
    if M == 0 or T == 0:
        return torch.zeros(T, M, dtype=torch.bool, device=device)
    ok = positions >= 0
    pos = positions.clamp(min=0)
    start = attr_offsets[pos]
    length = torch.where(ok, attr_offsets[pos + 1] - start, torch.zeros_like(start))
    L = int(length.max().item())
    out = torch.zeros(T + 1, M, dtype=torch.bool, device=device)  # row T = "not a query term"
    if L == 0:
        return out[:T]
    size = int(term_vocab.max().item()) + 1
    if size <= 0:
        return out[:T]
    lut = torch.full((size + 1,), T, dtype=torch.int64, device=device)  # slot `size` = out of range
    valid = term_vocab >= 0
    lut[term_vocab[valid]] = torch.arange(T, device=device)[valid]
    cols = torch.arange(M, device=device)
    for j in range(L):
        has = j < length
        a = attr_ids[(start + j).clamp(max=max(attr_ids.numel() - 1, 0))].long()
        a = torch.where(has & (a >= 0) & (a < size), a, torch.full_like(a, size))
        out[lut[a], cols] = True
    return out[:T]


def eval_programs_reference(
    term_hits: torch.Tensor, programs: Sequence[Program], *, bloom: bool
) -> torch.Tensor:
    """Evaluate P postfix programs over [T, M] term hits → [P, M] bool (stack machine; the reference).

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


# Term-hit chunk: items per chunk so that [items, T, J] int64 stays ≈ 32 MB.
_GATHER_BUDGET = 1 << 22


def bloom_term_hits(signatures: torch.Tensor, term_words: torch.Tensor) -> torch.Tensor:
    """Bloom membership of T terms in M items, all terms at once.

    Each term touches at most k of the W words; only those are gathered:
    ``hit[t, m] = AND_j (sig[m, widx[t, j]] & mask[t, j]) == mask[t, j]``.

    Args:
        signatures: [M, W] int64, item-major Bloom words.
        term_words: [T, W] int64, each term's k hash bits.
    Returns:
        [T, M] bool (same as ``bloom_term_hits_reference``).
    """
    T, M = term_words.shape[0], signatures.shape[0]
    device = signatures.device
    if T == 0 or M == 0:
        return torch.zeros(T, M, dtype=torch.bool, device=device)
    widx, mask = _touched_words(term_words)  # [T, J]
    J = widx.shape[1]
    flat_idx = widx.reshape(-1)
    flat_mask = mask.reshape(1, -1)
    out = torch.empty(M, T, dtype=torch.bool, device=device)
    step = max(1, _GATHER_BUDGET // max(T * J, 1))
    for s in range(0, M, step):
        g = signatures[s : s + step].index_select(1, flat_idx)  # [m, T*J]
        ok = (g & flat_mask) == flat_mask
        out[s : s + step] = ok.view(-1, T, J).all(dim=2) if J > 1 else ok
    return out.t()


def _touched_words(term_words: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[T, W] words → (word index [T, J], mask [T, J]) of the non-zero words; pads are mask 0."""
    nz = term_words != 0
    J = max(int(nz.sum(1).max()), 1)
    order = torch.argsort(nz.to(torch.int8), dim=1, descending=True, stable=True)[:, :J]
    mask = term_words.gather(1, order)
    return order, mask


@dataclass(slots=True)
class _Group:
    op: int  # OP_AND, OP_OR or OP_NOT
    nodes: torch.Tensor  # [g] node ids written
    children: torch.Tensor  # [g, c] node ids read (padded with the identity node)


@dataclass(slots=True)
class FilterPlan:
    """P postfix programs as one DAG, evaluated height by height.

    Node ids: 0 = FALSE, 1 = TRUE, 2 … 2+len(terms)−1 = term leaves, then
    internal nodes. ``terms`` lists the term indices the plan reads (in
    leaf order), so callers compute hits only for those.

    Attributes:
        terms: [L] int64 term indices of the leaves.
        groups: per height, one group per op (AND / OR / NOT).
        roots: [P] int64 node id of each program's result.
        n_nodes: total node count.
    """

    terms: torch.Tensor
    groups: list[_Group]
    roots: torch.Tensor
    n_nodes: int

    @classmethod
    def build(cls, programs: Sequence[Program], *, bloom: bool) -> FilterPlan:
        """Compile programs; with ``bloom=True`` NOT becomes TRUE ("maybe") before folding."""
        FALSE, TRUE = 0, 1
        key_of: dict[tuple, int] = {}
        height: list[int] = [0, 0]
        kind: list[tuple] = [("F",), ("T",)]
        leaf_terms: list[int] = []

        def node(key: tuple, h: int) -> int:
            nid = key_of.get(key)
            if nid is None:
                nid = key_of[key] = len(kind)
                kind.append(key)
                height.append(h)
            return nid

        def term(t: int) -> int:
            key = ("t", t)
            if key not in key_of:
                leaf_terms.append(t)
            return node(key, 0)

        def combine(op: int, a: int, b: int) -> int:
            absorb, ident = (FALSE, TRUE) if op == OP_AND else (TRUE, FALSE)
            if a == absorb or b == absorb:
                return absorb
            kids: set[int] = set()
            for x in (a, b):
                if x == ident:
                    continue
                if kind[x][0] == op:
                    kids.update(kind[x][1])
                else:
                    kids.add(x)
            if not kids:
                return ident
            if len(kids) == 1:
                return next(iter(kids))
            ks = tuple(sorted(kids))
            return node((op, ks), 1 + max(height[k] for k in ks))

        def negate(a: int) -> int:
            if bloom:
                return TRUE
            if a in (FALSE, TRUE):
                return TRUE - a
            if kind[a][0] == OP_NOT:
                return kind[a][1]
            return node((OP_NOT, a), 1 + height[a])

        roots: list[int] = []
        for program in programs:
            stack: list[int] = []
            for op, arg in program:
                if op == OP_TERM:
                    stack.append(term(int(arg)))
                elif op == OP_TRUE:
                    stack.append(TRUE)
                elif op == OP_FALSE:
                    stack.append(FALSE)
                elif op == OP_NOT:
                    if not stack:
                        raise ValueError(f"malformed filter program {list(program)}: NOT on an empty stack")
                    stack.append(negate(stack.pop()))
                elif op in (OP_AND, OP_OR):
                    if len(stack) < 2:
                        raise ValueError(f"malformed filter program {list(program)}: too few operands")
                    b, a = stack.pop(), stack.pop()
                    stack.append(combine(op, a, b))
                else:
                    raise ValueError(f"unknown filter opcode {op}")
            if len(stack) != 1:
                raise ValueError(f"malformed filter program {list(program)}: stack ends with {len(stack)} values")
            roots.append(stack[0])
        # keep only nodes reachable from a root (NOT-folding orphans subtrees)
        reach: set[int] = set()
        todo = list(roots)
        while todo:
            n = todo.pop()
            if n in reach:
                continue
            reach.add(n)
            if kind[n][0] == OP_NOT:
                todo.append(kind[n][1])
            elif kind[n][0] in (OP_AND, OP_OR):
                todo.extend(kind[n][1])
        leaf_terms = [t for t in leaf_terms if key_of[("t", t)] in reach]
        # renumber: FALSE, TRUE, leaves, then internal nodes by height
        internal = sorted(
            (n for n in range(2, len(kind)) if kind[n][0] != "t" and n in reach), key=lambda n: height[n]
        )
        leaves = [key_of[("t", t)] for t in leaf_terms]
        new_id = {FALSE: 0, TRUE: 1}
        for i, n in enumerate(leaves + internal):
            new_id[n] = 2 + i
        groups: list[_Group] = []
        by: dict[tuple[int, int], list[int]] = {}
        for n in internal:
            by.setdefault((height[n], kind[n][0]), []).append(n)
        for (_, op), ns in sorted(by.items()):
            if op == OP_NOT:
                children = torch.tensor([[new_id[kind[n][1]]] for n in ns], dtype=torch.int64)
            else:
                pad = 1 if op == OP_AND else 0
                width = max(len(kind[n][1]) for n in ns)
                children = torch.tensor(
                    [[new_id[c] for c in kind[n][1]] + [pad] * (width - len(kind[n][1])) for n in ns],
                    dtype=torch.int64,
                )
            groups.append(_Group(op, torch.tensor([new_id[n] for n in ns], dtype=torch.int64), children))
        return cls(
            terms=torch.tensor(leaf_terms, dtype=torch.int64),
            groups=groups,
            roots=torch.tensor([new_id[r] for r in roots], dtype=torch.int64),
            n_nodes=2 + len(leaves) + len(internal),
        )

    def eval(self, leaf_hits: torch.Tensor) -> torch.Tensor:
        """Evaluate on leaf values → [P, M].

        Args:
            leaf_hits: [len(terms), M] bool (one item per element) or int64
                (64 items per word; TRUE is all ones, −1).
        """
        M = leaf_hits.shape[1]
        dtype, device = leaf_hits.dtype, leaf_hits.device
        V = torch.empty(self.n_nodes, M, dtype=dtype, device=device)
        V[0] = 0 if dtype != torch.bool else False
        V[1] = -1 if dtype != torch.bool else True
        V[2 : 2 + leaf_hits.shape[0]] = leaf_hits
        for g in self.groups:
            ch = g.children.to(device)
            if g.op == OP_NOT:
                V[g.nodes.to(device)] = ~V[ch[:, 0]]
                continue
            acc = V[ch[:, 0]]
            for j in range(1, ch.shape[1]):
                if g.op == OP_AND:
                    acc &= V[ch[:, j]]
                else:
                    acc |= V[ch[:, j]]
            V[g.nodes.to(device)] = acc
        return V[self.roots.to(device)]


def eval_programs(
    term_hits: torch.Tensor, programs: Sequence[Program], *, bloom: bool
) -> torch.Tensor:
    """Evaluate P postfix programs over [T, M] term hits → [P, M] (vectorised ``FilterPlan``).

    With ``bloom=True`` NOT yields "maybe" (all true), so the result is a
    superset of the exact answer whenever ``term_hits`` is a superset.
    ``term_hits`` may be bool or packed int64 words.
    """
    plan = FilterPlan.build(programs, bloom=bloom)
    return plan.eval(term_hits[plan.terms.to(term_hits.device)])
