"""Planner errors: typed, with the numbers and numbered remedies.

Tests assert the type, never the text. The classes subclass
``sterling.model.errors.SterlingError`` so the CLI prints them cleanly (exit
code 2), but ``import sterling.planner`` must not import ``sterling.model``
(whose package imports torch and the whole model). So the classes are built
on first use (PEP 562 module ``__getattr__``): planning never touches them,
raising or catching one imports ``sterling.model.errors`` then. Refer to them
as ``errors.InfeasiblePlanError`` inside the planner, or import them by name
from outside (that is a first use too).
"""

from __future__ import annotations

from typing import Any

# Defined lazily by __getattr__ below.
__all__ = ["PlannerError", "InfeasiblePlanError", "InvalidPlanConfigError", "PlanFormatError"]  # noqa: F822

_classes: dict[str, type] = {}


def _build() -> dict[str, type]:
    from sterling.model.errors import InvalidInputError, SterlingError

    class PlannerError(SterlingError):
        """Root of the planner's errors."""

    class InvalidPlanConfigError(PlannerError, InvalidInputError):
        """A planning input out of range (zero items, nprobe > nlist, unknown GPU ...)."""

    class PlanFormatError(PlannerError, ValueError):
        """A plan JSON that cannot be read (wrong version, missing field)."""

    class InfeasiblePlanError(PlannerError):
        """No placement meets memory, latency or QPS within the allowed hardware.

        ``reason`` is ``memory``, ``latency``, ``qps``, ``nlist`` or ``sparse``;
        ``needed`` / ``available`` carry the numbers; ``remedies`` the fixes.
        """

        def __init__(
            self,
            message: str,
            *,
            reason: str,
            needed: float,
            available: float,
            remedies: list[str],
        ) -> None:
            numbered = "\n".join(f"  {i}) {r}" for i, r in enumerate(remedies, 1))
            super().__init__(f"{message}\nPossible solutions:\n{numbered}")
            self.reason = reason
            self.needed = needed
            self.available = available
            self.remedies = list(remedies)

        def __reduce__(self) -> Any:
            return (_rebuild_infeasible, (str(self), self.reason, self.needed, self.available,
                                          self.remedies))

    out: dict[str, type] = {}
    for cls in (PlannerError, InvalidPlanConfigError, PlanFormatError, InfeasiblePlanError):
        cls.__module__ = __name__
        cls.__qualname__ = cls.__name__
        out[cls.__name__] = cls
    return out


def _rebuild_infeasible(message: str, reason: str, needed: float, available: float,
                        remedies: list[str]) -> Exception:
    cls = __getattr__("InfeasiblePlanError")
    e = cls.__new__(cls)
    Exception.__init__(e, message)
    e.reason, e.needed, e.available, e.remedies = reason, needed, available, remedies
    return e


def __getattr__(name: str) -> type:
    if name not in __all__:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    if not _classes:
        _classes.update(_build())
        globals().update(_classes)
    return _classes[name]
