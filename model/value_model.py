"""The Value Model: a per-request formula over task scores, parsed once into tensor ops.

Grammar (no Python ``eval``)::

    expr    := cmp
    cmp     := sum (('<' | '<=' | '>' | '>=' | '==' | '!=') sum)?
    sum     := product (('+' | '-') product)*
    product := unary (('*' | '/') unary)*
    unary   := '-' unary | atom
    atom    := number | task | func '(' expr (',' expr)* ')' | '(' expr ')'
    func    := min | max | pow | log | exp

Task names refer to per-task scores σ(logit) ∈ (0, 1) of every candidate.
Documented results instead of errors on numeric edge cases: ``a / 0`` is
0; ``log(x)`` is ``log(max(x, 1e-30))``; ``pow`` and ``exp`` are clamped to
±1e30 so a ranking never sees inf or NaN; comparisons give 1.0 or 0.0.
Malformed formulas raise ``FormulaSyntaxError`` (with the position), unknown
task names ``UnknownTaskError``.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Callable

import torch

from sterling.model.errors import InvalidInputError

__all__ = ["FormulaError", "FormulaSyntaxError", "UnknownTaskError", "ValueModel", "parse_formula"]

MAX_FORMULA_CHARS = 2000
MAX_NODES = 512
_BIG = 1e30


class FormulaError(InvalidInputError):
    """A value formula that cannot be evaluated."""


class FormulaSyntaxError(FormulaError):
    def __init__(self, message: str, *, formula: str, position: int) -> None:
        super().__init__(
            f"{message} at position {position} in value formula:\n  {formula}\n  {' ' * position}^\n"
            "Formulas combine task names, numbers, + - * /, comparisons and min/max/pow/log/exp, "
            'e.g. "click + 2 * like - 0.5 * (share < 0.1)".'
        )
        self.position = position


class UnknownTaskError(FormulaError):
    """A task name in the formula that the model has no head for."""


_TOKEN = re.compile(r"\s*(?:(\d+\.\d*|\.\d+|\d+)(?:[eE][+-]?\d+)?|([A-Za-z_][A-Za-z0-9_]*)|(<=|>=|==|!=|[-+*/(),<>]))")
_FUNCS = {"min": (2, None), "max": (2, None), "pow": (2, 2), "log": (1, 1), "exp": (1, 1)}
Node = Callable[[dict[str, torch.Tensor]], torch.Tensor]


def _tokens(formula: str) -> list[tuple[str, str, int]]:
    out, pos = [], 0
    while pos < len(formula):
        if formula[pos:].strip() == "":
            break
        m = _TOKEN.match(formula, pos)
        if not m:
            p = pos + len(formula[pos:]) - len(formula[pos:].lstrip())
            raise FormulaSyntaxError(f"unexpected character {formula[p]!r}", formula=formula, position=p)
        start = m.start(m.lastindex)
        if m.group(1) is not None:
            out.append(("num", m.group(0).strip(), start))
        elif m.group(2) is not None:
            out.append(("name", m.group(2), start))
        else:
            out.append(("op", m.group(3), start))
        pos = m.end()
    return out


def _safe_div(a, b):
    zero = b == 0
    return torch.where(zero, torch.zeros_like(a * b), a / torch.where(zero, torch.ones_like(b), b))


class _Parser:
    def __init__(self, formula: str, tasks: list[str]) -> None:
        self.f, self.tasks, self.toks, self.i, self.nodes = formula, set(tasks), _tokens(formula), 0, 0
        self.used: set[str] = set()

    def peek(self):
        return self.toks[self.i] if self.i < len(self.toks) else ("end", "", len(self.f))

    def take(self, kind=None, text=None):
        t = self.peek()
        if (kind and t[0] != kind) or (text and t[1] != text):
            want = text or kind
            got = "end of formula" if t[0] == "end" else repr(t[1])
            raise FormulaSyntaxError(f"expected {want!r}, found {got}", formula=self.f, position=t[2])
        self.i += 1
        self.nodes += 1
        if self.nodes > MAX_NODES:
            raise FormulaError(f"value formula has more than {MAX_NODES} tokens; simplify it")
        return t

    def parse(self) -> Node:
        if not self.toks:
            raise FormulaSyntaxError("empty formula", formula=self.f, position=0)
        node = self.cmp()
        if self.peek()[0] != "end":
            t = self.peek()
            raise FormulaSyntaxError(f"unexpected {t[1]!r}", formula=self.f, position=t[2])
        return node

    def cmp(self) -> Node:
        a = self.sum()
        t = self.peek()
        ops = {"<": torch.lt, "<=": torch.le, ">": torch.gt, ">=": torch.ge, "==": torch.eq, "!=": torch.ne}
        if t[0] == "op" and t[1] in ops:
            self.take()
            b, op = self.sum(), ops[t[1]]
            return lambda s: op(a(s), b(s)).to(torch.float32)
        return a

    def sum(self) -> Node:
        a = self.product()
        while self.peek()[0] == "op" and self.peek()[1] in "+-":
            op = self.take()[1]
            b, prev = self.product(), a
            a = (lambda p, q: lambda s: p(s) + q(s))(prev, b) if op == "+" else (lambda p, q: lambda s: p(s) - q(s))(prev, b)
        return a

    def product(self) -> Node:
        a = self.unary()
        while self.peek()[0] == "op" and self.peek()[1] in "*/":
            op = self.take()[1]
            b, prev = self.unary(), a
            a = (lambda p, q: lambda s: p(s) * q(s))(prev, b) if op == "*" else (lambda p, q: lambda s: _safe_div(p(s), q(s)))(prev, b)
        return a

    def unary(self) -> Node:
        if self.peek()[:2] == ("op", "-"):
            self.take()
            a = self.unary()
            return lambda s: -a(s)
        return self.atom()

    def atom(self) -> Node:
        t = self.peek()
        if t[0] == "num":
            self.take()
            c = float(t[1])
            return lambda s: torch.tensor(c)
        if t[0] == "op" and t[1] == "(":
            self.take()
            a = self.cmp()
            self.take("op", ")")
            return a
        if t[0] == "name":
            self.take()
            if self.peek()[:2] == ("op", "("):
                return self.call(t)
            if t[1] not in self.tasks:
                raise UnknownTaskError(
                    f"value formula names task {t[1]!r} at position {t[2]}; this model's tasks are {sorted(self.tasks)}"
                )
            name = t[1]
            self.used.add(name)
            return lambda s: s[name]
        got = "end of formula" if t[0] == "end" else repr(t[1])
        raise FormulaSyntaxError(f"expected a number, task name or '(' but found {got}", formula=self.f, position=t[2])

    def call(self, t) -> Node:
        name = t[1]
        if name not in _FUNCS:
            raise FormulaSyntaxError(
                f"unknown function {name!r} (functions: {sorted(_FUNCS)})", formula=self.f, position=t[2]
            )
        self.take("op", "(")
        args = [self.cmp()]
        while self.peek()[:2] == ("op", ","):
            self.take()
            args.append(self.cmp())
        self.take("op", ")")
        lo, hi = _FUNCS[name]
        if len(args) < lo or (hi is not None and len(args) > hi):
            raise FormulaSyntaxError(
                f"{name}() takes {lo if lo == hi else f'at least {lo}'} arguments, got {len(args)}",
                formula=self.f,
                position=t[2],
            )
        if name == "log":
            (a,) = args
            return lambda s: torch.log(torch.clamp(a(s), min=1e-30))
        if name == "exp":
            (a,) = args
            return lambda s: torch.exp(torch.clamp(a(s), max=69.0))
        if name == "pow":
            a, b = args
            return lambda s: torch.nan_to_num(torch.pow(a(s), b(s)), nan=0.0, posinf=_BIG, neginf=-_BIG).clamp(-_BIG, _BIG)
        op = torch.minimum if name == "min" else torch.maximum

        def reduce(s):
            out = args[0](s)
            for g in args[1:]:
                out = op(out, g(s))
            return out

        return reduce


def parse_formula(formula: str, tasks: list[str]) -> Node:
    """Parse once; the result maps ``{task: [B, K] scores}`` → [B, K] values."""
    if not isinstance(formula, str):
        raise FormulaError(f"value formula must be a string, got {type(formula).__name__}")
    if len(formula) > MAX_FORMULA_CHARS:
        raise FormulaError(f"value formula has {len(formula)} characters; the limit is {MAX_FORMULA_CHARS}")
    return _Parser(formula, tasks).parse()


class ValueModel:
    """Formulas → compiled tensor programs, cached by text (a formula is parsed once)."""

    def __init__(self, tasks: list[str], default: str | None = None, cache_size: int = 256) -> None:
        self.tasks = list(tasks)
        self.default = default or self.tasks[0]
        self._cache: dict[str, Node] = {}
        self._cache_size = cache_size
        self._lock = threading.Lock()  # a server compiles formulas from several request threads
        self.compile(self.default)

    def compile(self, formula: str) -> Node:
        fn = self._cache.get(formula)
        if fn is None:
            fn = parse_formula(formula, self.tasks)
            with self._lock:
                if len(self._cache) >= self._cache_size:
                    self._cache.pop(next(iter(self._cache)), None)
                self._cache[formula] = fn
        return fn

    def __call__(self, scores: torch.Tensor, formula: str | None = None) -> torch.Tensor:
        """[B, K, T] task scores → [B, K] values."""
        fn = self.compile(formula or self.default)
        named = {t: scores[..., i] for i, t in enumerate(self.tasks)}
        out = fn(named)
        out = out.to(torch.float32)
        return out.expand(scores.shape[:-1]) if out.shape != scores.shape[:-1] else out
