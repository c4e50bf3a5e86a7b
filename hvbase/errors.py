"""The one error root of hvsim, at the bottom layer so that ``qmp_bridge`` can stand under it too.

Everything hvsim and qmp_bridge raise derives from :class:`HvsimError`; ``except HvsimError``
catches QEMU, shim, network, placement and migration failures alike. The root cause is always
kept as ``__cause__``. The whole tree (each package documents its own branch in its errors
module)::

    HvsimError                                   hvbase.errors
     +-- StateError                              an operation or transition not allowed in a state
     |    +-- IllegalTransitionError             (hvsim.core.errors) VM lifecycle
     |    |    +-- MemoryStateError              (hvsim.memory)
     |    +-- ProcessStateError                  (qmp_bridge.errors) QEMU process
     |    +-- ComponentStateError                (hvsim.core.errors) a VM component
     |    +-- ShimStateError                     (hvsim.drivers.shim.errors)
     |    +-- MigrationStateError                (hvsim.migration.errors)
     |    +-- network StateError                 (hvsim.network.errors)
     +-- InputError                              bad input (a field, option or argument): CLIs exit 2
     |    +-- SpecError, MigrationInputError, TopologyError, ProblemError, ShimConfigError, ...
     +-- QEMUBridgeError                         qmp_bridge.errors: launch, exit, QMP timeout/connection/command
     +-- SpecError, CapacityError, NotFoundError, VMError, AgentError, ComponentError, CheckpointError
     |                                           hvsim.core.errors
     +-- ShimError                               hvsim.drivers.shim.errors
     +-- NetworkError                            hvsim.network.errors
     +-- MigrationError                          hvsim.migration.errors
     +-- PlacementError                          hvsim.placement (problem, refusal, rule conflict)
"""
from __future__ import annotations

from collections.abc import Collection
from typing import Any


class HvsimError(Exception):
    """Root of every error raised by hvsim (qmp_bridge included)."""


class InputError(HvsimError, ValueError):
    """Bad input: a field, option or argument that is malformed, out of range or conflicting.
    The message names the field. Nothing was created or changed. Command lines exit 2 on it."""


def _name(state: Any) -> str:
    value = getattr(state, "value", state)
    return str(value)


class StateError(HvsimError):
    """An operation (or a state change) that is not allowed in the object's current state.

    Carries ``obj`` (what was asked, e.g. ``"vm 'web-1'"``), ``state`` (its current state),
    ``allowed`` (the states the operation is allowed from, or the states the object may move to)
    and ``action`` (the operation, or ``None`` for a plain transition)."""

    def __init__(self, obj: str, state: Any = None, allowed: Collection[Any] = (), action: str | None = None,
                 target: Any = None, message: str | None = None) -> None:
        if state is None and not allowed and action is None and target is None and message is None:
            message = obj    # StateError("a sentence") for callers that know no more than that
        self.obj = obj
        self.state = state
        self.allowed = tuple(allowed)
        self.action = action
        self.target = target
        if message is None:
            names = ", ".join(sorted(_name(s) for s in self.allowed)) or "none"
            if action is not None:
                message = f"cannot {action} {obj}: it is {_name(state)} (allowed from: {names})"
            else:
                message = (f"{obj}: illegal state change {_name(state)} -> {_name(target)} "
                           f"(allowed: {names})")
        super().__init__(message)
