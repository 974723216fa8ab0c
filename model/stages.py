"""Per-stage wall time of one search: tower, probe, filter, scan, rerank.

A caller that wants the split wraps its call in ``record_stages()``; the
search marks its stages with ``stage(name)``. Outside ``record_stages`` a
``stage`` costs one context-variable read, so searches nobody measures pay
nothing measurable (a batch-1 search is ~0.5 ms; four marks are ~1 µs).

Times are *exclusive*: a stage nested in another (the Bloom pass a scan
calls back into) counts once, in the inner stage, and the outer one gets
the rest. Where the compiled CPU scan evaluates the filter inside its loop
(the fused path) that work is part of ``scan``; ``filter`` then holds the
expression compile and any exact re-check outside the kernel.

Example:
    >>> with record_stages() as st:
    ...     model(query=xq, k=10, where="lang:en")
    >>> st.ms()
    {'filter': 0.02, 'probe': 0.05, 'scan': 0.41}
"""

from __future__ import annotations

import functools
import time
from contextvars import ContextVar
from dataclasses import dataclass, field

import torch

STAGES = ("tower", "probe", "filter", "scan", "rerank")


@dataclass(slots=True)
class StageTimes:
    """Seconds per stage name (exclusive times; see the module docstring)."""

    seconds: dict[str, float] = field(default_factory=dict)
    _stack: list[list] = field(default_factory=list, repr=False)

    def ms(self) -> dict[str, float]:
        return {k: v * 1e3 for k, v in self.seconds.items()}


_ACTIVE: ContextVar[StageTimes | None] = ContextVar("sterling_stage_times", default=None)


class stage:  # noqa: N801 - used like a function: ``with stage("scan"):``
    """Attribute the enclosed wall time to ``name`` when a ``record_stages`` is active."""

    __slots__ = ("name", "times", "t0")

    def __init__(self, name: str) -> None:
        self.name = name

    def __enter__(self) -> None:
        self.times = _ACTIVE.get()
        if self.times is not None:
            self.t0 = time.perf_counter()
            self.times._stack.append([0.0])  # time spent in nested stages

    def __exit__(self, *exc) -> None:
        st = self.times
        if st is None:
            return
        elapsed = time.perf_counter() - self.t0
        nested = st._stack.pop()[0]
        st.seconds[self.name] = st.seconds.get(self.name, 0.0) + elapsed - nested
        if st._stack:
            st._stack[-1][0] += elapsed


class record_stages:  # noqa: N801
    """Collect the stage times of everything run inside this block (this thread / context only)."""

    __slots__ = ("times", "token")

    def __enter__(self) -> StageTimes:
        self.times = StageTimes()
        self.token = _ACTIVE.set(self.times)
        return self.times

    def __exit__(self, *exc) -> None:
        _ACTIVE.reset(self.token)


def staged(name: str):
    """Decorator form of ``stage``: the whole call counts as ``name``."""

    def wrap(fn):
        @functools.wraps(fn)
        def inner(*args, **kwargs):
            if torch.compiler.is_compiling() or _ACTIVE.get() is None:  # traced: no timing
                return fn(*args, **kwargs)
            with stage(name):
                return fn(*args, **kwargs)

        return inner

    return wrap
