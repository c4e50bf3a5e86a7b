"""One state-machine helper for every long-lived object (VM, process, component, migration, ...).

An object owns a :class:`StateMachine` built from its state enum and a transition table. The
machine guards operations (:meth:`StateMachine.require`, or the :func:`guarded` decorator on
methods), refuses illegal changes with a :class:`~hvbase.errors.StateError` that carries the
object, its state and the allowed states, and has exactly one setter (:meth:`StateMachine.set`)
that checks the table, logs, keeps a bounded history and calls the owner's ``on_change`` hook
(where owners publish the change on their event bus). :meth:`StateMachine.set_if` is the
compare-and-set for changes that race with another task (a process's exit watcher)::

    class Proc:
        def __init__(self):
            self.fsm = StateMachine("proc 'x'", St.NEW, TABLE, log=log)

        @guarded(St.NEW)
        async def launch(self): ...
"""
from __future__ import annotations

import enum
import functools
import inspect
import logging
import time
from collections import deque
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from .errors import StateError

S = TypeVar("S", bound=enum.Enum)
F = TypeVar("F", bound=Callable[..., Any])

_log = logging.getLogger("hvbase.fsm")


@dataclass(frozen=True)
class Transition(Generic[S]):
    """One state change of one object."""
    obj: str
    old: S
    new: S
    reason: str
    at: float = field(default_factory=time.time)


class StateMachine(Generic[S]):
    """The state of one object, changed only through :meth:`set` along ``table``."""

    def __init__(self, obj: str, initial: S, table: Mapping[S, Collection[S]], *,
                 error: type[StateError] = StateError, log: logging.Logger | None = None,
                 on_change: Callable[[Transition[S]], None] | None = None, history: int = 200,
                 level: int = logging.INFO) -> None:
        members = set(type(initial))
        missing = members - set(table)
        if missing:
            raise ValueError(f"transition table of {obj} has no row for {sorted(m.name for m in missing)}")
        for src, dsts in table.items():
            stray = set(dsts) - members
            if stray:
                raise ValueError(f"transition table of {obj}: {src.name} -> unknown states {stray}")
        self.obj = obj
        self._state = initial
        self._table = {k: frozenset(v) for k, v in table.items()}
        self._error = error
        self._log = log or _log
        self._on_change = on_change
        self._level = level
        self.history: deque[Transition[S]] = deque(maxlen=history)

    @property
    def state(self) -> S:
        return self._state

    def next_states(self, state: S | None = None) -> frozenset[S]:
        return self._table[self._state if state is None else state]

    def can(self, new: S) -> bool:
        return new in self._table[self._state]

    def is_in(self, *states: S) -> bool:
        return self._state in states

    def require(self, action: str, *states: S) -> None:
        """Raise the machine's StateError unless the object is in one of ``states``."""
        if self._state not in states:
            raise self._error(self.obj, self._state, states, action=action)

    def set(self, new: S, reason: str = "") -> Transition[S]:
        """The one setter: check the table, log, record, tell the owner."""
        old = self._state
        if new not in self._table[old]:
            raise self._error(self.obj, old, self._table[old], target=new)
        self._state = new
        change = Transition(self.obj, old, new, reason)
        self.history.append(change)
        self._log.log(self._level, "%s: %s -> %s%s", self.obj, old.value, new.value, f" ({reason})" if reason else "")
        if self._on_change is not None:
            try:
                self._on_change(change)
            except Exception:  # an observer's bug must not break the owner's state
                self._log.exception("%s: state-change hook failed", self.obj)
        return change

    def set_if(self, expected: Collection[S], new: S, reason: str = "") -> bool:
        """Compare-and-set: change to ``new`` only if the state is one of ``expected`` (and the
        table allows it); returns whether it changed. For changes another task may have
        overtaken, e.g. a launch that finishes after the exit watcher saw the process die."""
        if self._state not in expected or new not in self._table[self._state]:
            return False
        self.set(new, reason)
        return True

    def __repr__(self) -> str:
        return f"<StateMachine {self.obj} {self._state.value}>"


def guarded(*states: enum.Enum, action: str | None = None) -> Callable[[F], F]:
    """Method decorator: the object's ``fsm`` must be in one of ``states`` when the method runs
    (for a coroutine method: when it starts). ``action`` names the operation in the error
    (default: the method's name)."""
    def deco(fn: F) -> F:
        what = action or fn.__name__.strip("_").replace("_", " ")
        if inspect.iscoroutinefunction(fn):
            @functools.wraps(fn)
            async def async_wrapper(self: Any, *args: Any, **kwargs: Any) -> Any:
                self.fsm.require(what, *states)
                return await fn(self, *args, **kwargs)
            return async_wrapper  # type: ignore[return-value]

        @functools.wraps(fn)
        def wrapper(self: Any, *args: Any, **kwargs: Any) -> Any:
            self.fsm.require(what, *states)
            return fn(self, *args, **kwargs)
        return wrapper  # type: ignore[return-value]
    return deco
