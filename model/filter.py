"""The filter language and its compilation into tensor programs.

Grammar (keywords case-insensitive; a term always contains ``:``)::

    expr  := or
    or    := and ( "OR" and )*
    and   := unary ( "AND" unary )*
    unary := "NOT" unary | "(" expr ")" | term
    term  := feature ":" value        value: bare (no space, parens, quote)
                                      or "double quoted" with \\" and \\\\ escapes

An empty expression matches every item. A ``feature:value`` whose value
never occurs in the catalog matches nothing (so ``NOT lang:xx`` matches
everything): that is data, not an error. A *feature* the catalog has never
seen is, by default, treated the same way (document shards must not fail on
a feature another shard has); with ``unknown_features="error"`` it raises
``UnknownFeatureError`` naming the feature and the known ones — the mode for
a whole-catalog index, where an unknown feature is almost always a typo.

Each request's expression is parsed once and compiled into a postfix program
over a batch-wide list of distinct terms (``CompiledFilters``); the scan
evaluates programs on Bloom words and the verifier on exact attribute ids.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Union

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
from sterling.model.errors import FilterError, FilterSyntaxError, FilterTooLargeError

__all__ = [
    "Term",
    "Not",
    "And",
    "Or",
    "Node",
    "parse_filter",
    "CompiledFilters",
    "compile_filters",
    "DEFAULT_MAX_TERMS",
    "MAX_DEPTH",
    "check_program_terms",
    "UnknownFeatureError",
]

DEFAULT_MAX_TERMS = 256
MAX_DEPTH = 64  # nesting of parentheses and NOTs one expression may have
_FEATURE_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_.\-]*\Z")


@dataclass(frozen=True, slots=True)
class Term:
    feature: str
    value: str

    @property
    def text(self) -> str:
        return f"{self.feature}:{self.value}"


@dataclass(frozen=True, slots=True)
class Not:
    child: Node


@dataclass(frozen=True, slots=True)
class And:
    children: tuple[Node, ...]


@dataclass(frozen=True, slots=True)
class Or:
    children: tuple[Node, ...]


Node = Union[Term, Not, And, Or]  # noqa: UP007 (used at runtime in isinstance-free code)

_KEYWORDS = {"AND", "OR", "NOT"}


class UnknownFeatureError(FilterError):
    """A filter names a feature that no item of the catalog has (strict mode)."""


@dataclass(frozen=True, slots=True)
class _Tok:
    kind: str  # "(", ")", "AND", "OR", "NOT", "TERM", "END"
    pos: int
    term: Term | None = None


def _tokenize(expr: str) -> list[_Tok]:
    toks: list[_Tok] = []
    i, n = 0, len(expr)
    while i < n:
        c = expr[i]
        if c.isspace():
            i += 1
            continue
        if c in "()":
            toks.append(_Tok(c, i))
            i += 1
            continue
        start = i
        while i < n and not expr[i].isspace() and expr[i] not in '()"':
            i += 1
        word = expr[start:i]
        if i < n and expr[i] == '"':
            if not word.endswith(":"):
                raise FilterSyntaxError(
                    "a quoted value must follow `feature:`", expression=expr, position=i
                )
            j, buf = i + 1, []
            while j < n and expr[j] != '"':
                if expr[j] == "\\" and j + 1 < n:
                    j += 1
                buf.append(expr[j])
                j += 1
            if j >= n:
                raise FilterSyntaxError("unterminated quoted value", expression=expr, position=i)
            value = "".join(buf)
            i = j + 1
            toks.append(_Tok("TERM", start, _make_term(word[:-1], value, expr, start)))
            continue
        if word.upper() in _KEYWORDS and ":" not in word:
            toks.append(_Tok(word.upper(), start))
            continue
        if ":" not in word:
            raise FilterSyntaxError(
                f"expected a term `feature:value` or AND/OR/NOT, found {word!r}",
                expression=expr,
                position=start,
            )
        feature, value = word.split(":", 1)
        toks.append(_Tok("TERM", start, _make_term(feature, value, expr, start)))
    toks.append(_Tok("END", n))
    return toks


def _make_term(feature: str, value: str, expr: str, pos: int) -> Term:
    if not _FEATURE_RE.match(feature):
        raise FilterSyntaxError(
            f"bad feature name {feature!r} (letters, digits, _ . - ; not starting with a digit)",
            expression=expr,
            position=pos,
        )
    if value == "":
        raise FilterSyntaxError(f"empty value for feature {feature!r}", expression=expr, position=pos)
    return Term(feature, value)


class _Parser:
    def __init__(self, expr: str, max_terms: int) -> None:
        self.expr = expr
        self.toks = _tokenize(expr)
        self.i = 0
        self.max_terms = max_terms
        self.n_terms = 0
        self.depth = 0

    def peek(self) -> _Tok:
        return self.toks[self.i]

    def take(self) -> _Tok:
        tok = self.toks[self.i]
        self.i += 1
        return tok

    def fail(self, msg: str, tok: _Tok) -> FilterSyntaxError:
        return FilterSyntaxError(msg, expression=self.expr, position=tok.pos)

    def parse(self) -> Node:
        node = self.parse_or()
        tok = self.peek()
        if tok.kind != "END":
            what = "unbalanced ')'" if tok.kind == ")" else f"unexpected {tok.kind if tok.kind != 'TERM' else 'term'}"
            raise self.fail(f"{what}; expected AND, OR or the end", tok)
        return node

    def parse_or(self) -> Node:
        parts = [self.parse_and()]
        while self.peek().kind == "OR":
            self.take()
            parts.append(self.parse_and())
        return parts[0] if len(parts) == 1 else Or(tuple(parts))

    def parse_and(self) -> Node:
        parts = [self.parse_unary()]
        while self.peek().kind == "AND":
            self.take()
            parts.append(self.parse_unary())
        return parts[0] if len(parts) == 1 else And(tuple(parts))

    def nest(self, tok: _Tok) -> None:
        self.depth += 1
        if self.depth > MAX_DEPTH:
            raise FilterTooLargeError(
                f"filter nests parentheses and NOTs more than {MAX_DEPTH} deep (the limit, MAX_DEPTH) at "
                f"position {tok.pos}; flatten it (NOT NOT x is x; (a AND (b AND c)) is a AND b AND c)"
            )

    def parse_unary(self) -> Node:
        tok = self.take()
        if tok.kind == "NOT":
            self.nest(tok)
            node = Not(self.parse_unary())
            self.depth -= 1
            return node
        if tok.kind == "(":
            self.nest(tok)
            node = self.parse_or()
            self.depth -= 1
            close = self.take()
            if close.kind != ")":
                raise self.fail("missing ')' to close the '(' opened at position " f"{tok.pos}", close)
            return node
        if tok.kind == "TERM":
            self.n_terms += 1
            if self.n_terms > self.max_terms:
                raise FilterTooLargeError(
                    f"filter has more than {self.max_terms} terms (the configured limit); "
                    "split the request, or raise IndexConfig.max_filter_terms"
                )
            assert tok.term is not None
            return tok.term
        if tok.kind == "END":
            raise self.fail("expression ends early; expected a term, NOT or '('", tok)
        raise self.fail(f"unexpected {tok.kind!r}; expected a term, NOT or '('", tok)


def parse_filter(expr: str | None, *, max_terms: int = DEFAULT_MAX_TERMS) -> Node | None:
    """Parse a filter expression; ``None`` for an empty one (match all)."""
    if expr is None or expr.strip() == "":
        return None
    return _Parser(expr, max_terms).parse()


@dataclass(slots=True)
class CompiledFilters:
    """A batch's filters as tensors and postfix programs.

    Attributes:
        programs: P postfix programs over the term list (see kernels.filter_eval).
        term_words: [T, W] int64 Bloom words of each term.
        term_vocab: [T] int64 exact vocabulary id of each term.
        query_program: [B] int64 program per query, −1 = unfiltered.
    """

    programs: list[list[tuple[int, int]]]
    term_words: torch.Tensor
    term_vocab: torch.Tensor
    query_program: torch.Tensor
    _plans: dict = field(default_factory=dict, repr=False)

    @property
    def any(self) -> bool:
        return bool((self.query_program >= 0).any())

    def plan(self, *, bloom: bool) -> FilterPlan:
        """The batch's programs as one vectorised ``FilterPlan`` (built once, cached).

        The Bloom plan (``bloom=True``) replaces NOT by "maybe" and folds it
        away, so it reads only the terms that can narrow the Bloom pass.
        """
        if bloom not in self._plans:
            self._plans[bloom] = FilterPlan.build(self.programs, bloom=bloom)
        return self._plans[bloom]


def compile_filters(
    where: str | list[str | None] | None,
    batch: int,
    *,
    vocab_index: dict[str, int],
    term_words_fn,
    max_terms: int = DEFAULT_MAX_TERMS,
    unknown_features: str = "match_nothing",
) -> CompiledFilters:
    """Compile one expression (for every query) or one per query.

    ``term_words_fn(list[str]) -> [T, W] int64`` hashes terms into Bloom words.
    Terms absent from ``vocab_index`` compile to constant false (exact).
    ``unknown_features``: ``"match_nothing"`` (default) or ``"error"``
    (raise ``UnknownFeatureError`` for a feature no catalog term has).
    """
    if unknown_features not in ("match_nothing", "error"):
        from sterling.model.errors import InvalidInputError

        raise InvalidInputError(
            f"unknown_features ({unknown_features!r}) must be 'match_nothing' or 'error'"
        )
    known = _features_of(vocab_index) if unknown_features == "error" else None
    if where is None or isinstance(where, str):
        exprs: list[str | None] = [where] * batch
    else:
        exprs = list(where)
        if len(exprs) != batch:
            from sterling.model.errors import InvalidInputError

            raise InvalidInputError(
                f"`where` has {len(exprs)} expressions for {batch} queries; "
                "pass one string for all queries or one per query"
            )
    distinct: dict[str, int] = {}
    programs: list[list[tuple[int, int]]] = []
    terms: dict[str, int] = {}
    query_program = torch.full((batch,), -1, dtype=torch.int64)
    for q, expr in enumerate(exprs):
        if expr is None or expr.strip() == "":
            continue
        if expr not in distinct:
            node = parse_filter(expr, max_terms=max_terms)
            if node is None:
                continue
            if known is not None:
                _check_features(node, known, expr)
            program: list[tuple[int, int]] = []
            _emit(node, program, terms, vocab_index)
            distinct[expr] = len(programs)
            programs.append(program)
        query_program[q] = distinct[expr]
    names = list(terms)
    term_words = term_words_fn(names)
    term_vocab = torch.tensor([vocab_index[t] for t in names], dtype=torch.int64)
    return CompiledFilters(programs, term_words, term_vocab, query_program)


def check_program_terms(filters: CompiledFilters, limit: int, *, backend: str) -> None:
    """Raise ``FilterTooLargeError`` when a program has more distinct terms than ``backend`` takes.

    Called when a batch's filters compile, so the limit surfaces as a typed
    input error naming it, never as an error from inside a kernel.
    """
    for p, program in enumerate(filters.programs):
        n = len({arg for op, arg in program if op == OP_TERM})
        if n > limit:
            raise FilterTooLargeError(
                f"filter {p} of the batch has {n} distinct terms; the {backend} scan takes at most {limit} per "
                f"expression (its truth table has 2^{limit} entries). Split the expression, or search a CPU copy "
                "of the index (no per-expression limit there)"
            )


_FEATURES_CACHE: dict[int, tuple[int, frozenset[str]]] = {}


def _features_of(vocab_index: dict[str, int]) -> frozenset[str]:
    """Features of a vocabulary (cached per dict while its size is unchanged; vocabularies only grow)."""
    hit = _FEATURES_CACHE.get(id(vocab_index))
    if hit is None or hit[0] != len(vocab_index):
        hit = (len(vocab_index), frozenset(t.split(":", 1)[0] for t in vocab_index))
        _FEATURES_CACHE.clear()
        _FEATURES_CACHE[id(vocab_index)] = hit
    return hit[1]


def _check_features(node: Node, known: frozenset[str], expr: str) -> None:
    if isinstance(node, Term):
        if node.feature not in known:
            raise UnknownFeatureError(
                f"filter {expr!r} names feature {node.feature!r}, which no item has; known features: "
                f"{sorted(known)[:20]}{' …' if len(known) > 20 else ''}. Fix the name, or compile with "
                "unknown_features='match_nothing' to let it match no item"
            )
    elif isinstance(node, Not):
        _check_features(node.child, known, expr)
    else:
        for child in node.children:
            _check_features(child, known, expr)


def _emit(node: Node, out: list[tuple[int, int]], terms: dict[str, int], vocab: dict[str, int]) -> None:
    if isinstance(node, Term):
        if node.text not in vocab:
            out.append((OP_FALSE, 0))
            return
        t = terms.setdefault(node.text, len(terms))
        out.append((OP_TERM, t))
    elif isinstance(node, Not):
        _emit(node.child, out, terms, vocab)
        out.append((OP_NOT, 0))
    else:
        op = OP_AND if isinstance(node, And) else OP_OR
        _emit(node.children[0], out, terms, vocab)
        for child in node.children[1:]:
            _emit(child, out, terms, vocab)
            out.append((op, 0))


# OP_TRUE is part of the program vocabulary for kernels and later passes
# (e.g. constant folding); the parser itself never needs to emit it.
_ = OP_TRUE
