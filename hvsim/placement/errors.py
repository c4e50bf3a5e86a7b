"""Placement's branch of the error tree (the whole tree: ``hvbase.errors``)::

    HvsimError                                   hvbase.errors
     +-- PlacementError                          every error the placement package raises
          +-- ProblemError (InputError)          bad input; ``errors`` lists (field, message)
          |    +-- RuleConflictError             required rules that can never hold together
          |    +-- ProblemTooLargeError          beyond a documented size limit (docs/placement.md)
          +-- PlacementRefused                   no placement (``place_group(raise_on_refusal=True)``; in result.py)

``ProblemError`` is an ``InputError`` (so also a ``ValueError``): command lines exit 2 on it.
Its ``str()`` is one line naming the first offending field (and how many more there are),
followed by one line per problem.
"""
from __future__ import annotations

import reprlib
from typing import Any

from hvbase.errors import HvsimError, InputError

MAX_REPORTED = 50  # problems kept in one ProblemError (the rest are counted)
SHOW_MAX = 120

_repr = reprlib.Repr()
_repr.maxstring = 60
_repr.maxother = 60
_repr.maxlong = 40
_repr.maxlist = _repr.maxtuple = _repr.maxdict = _repr.maxset = 4
_repr.maxlevel = 3


def show(value: Any) -> str:
    """A short repr of a value from outside, for messages (long strings, numbers with thousands
    of digits and deep structures are cut; at most ``SHOW_MAX`` characters)."""
    text = _repr.repr(value)
    return text if len(text) <= SHOW_MAX else text[:SHOW_MAX - 3] + "..."


def key(value: Any) -> str:
    """A mapping key from outside as part of a field name (``current.web-0``)."""
    return value[:128] if isinstance(value, str) else show(value)


class PlacementError(HvsimError):
    """Root of the placement package's errors."""


class ProblemError(PlacementError, InputError):
    """Invalid problem. ``errors`` lists ``(field, message)`` (at most ``MAX_REPORTED``;
    ``more`` counts the rest); ``source`` names the file or document when known."""

    def __init__(self, errors: list[tuple[str, str]], *, more: int = 0, source: str | None = None) -> None:
        errs = list(errors)
        self.more = more + max(0, len(errs) - MAX_REPORTED)
        self.errors = errs[:MAX_REPORTED]
        self.source = source
        super().__init__(self._message())

    def _message(self) -> str:
        lines = [f"{f}: {m}" if f else m for f, m in self.errors] or ["invalid problem"]
        n = len(lines) + self.more
        head = lines[0] + (f" (and {n - 1} more problem{'s' if n > 2 else ''})" if n > 1 else "")
        if self.source:
            src = self.source if len(self.source) <= 200 else self.source[:200] + "..."
            head = f"{src}: {head}"
        rest = lines[1:] + ([f"... {self.more} more"] if self.more else [])
        return "\n".join([head, *rest]) if len(lines) > 1 or self.more else head

    def set_source(self, source: str) -> None:
        """Name ``source`` (the file or document) in the message."""
        self.source = source
        self.args = (self._message(),)


class RuleConflictError(ProblemError):
    """Required rules that contradict each other; ``rules`` names them."""

    def __init__(self, errors: list[tuple[str, str]], rules: list[tuple[str, ...]], *, more: int = 0,
                 source: str | None = None) -> None:
        super().__init__(errors, more=more, source=source)
        self.rules = rules


class ProblemTooLargeError(ProblemError):
    """The problem is beyond a documented size limit (``hvsim.placement.limits``)."""
