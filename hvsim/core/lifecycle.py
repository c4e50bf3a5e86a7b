"""VM lifecycle in libvirt's vocabulary: states, reasons and the legal transitions (pure logic)."""
from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field

from .errors import IllegalTransitionError


class VMState(enum.Enum):
    SHUTOFF = "shutoff"
    STARTING = "starting"
    RUNNING = "running"
    PAUSED = "paused"
    SHUTTING_DOWN = "shutting-down"
    CRASHED = "crashed"
    MIGRATING = "migrating"


S = VMState

# action -> states it may be invoked from
ALLOWED: dict[str, frozenset[VMState]] = {
    "start": frozenset({S.SHUTOFF, S.CRASHED}),
    "pause": frozenset({S.RUNNING}),
    "resume": frozenset({S.PAUSED}),
    "shutdown": frozenset({S.RUNNING}),
    "reset": frozenset({S.RUNNING, S.PAUSED}),
    "destroy": frozenset({S.STARTING, S.RUNNING, S.PAUSED, S.SHUTTING_DOWN, S.CRASHED, S.MIGRATING}),
    "migrate": frozenset({S.RUNNING, S.PAUSED}),
    "undefine": frozenset({S.SHUTOFF, S.CRASHED}),
    "agent": frozenset({S.RUNNING, S.PAUSED, S.MIGRATING}),  # paused: queued until resume
}

# state -> states it may move to (by actions or by events such as a crash)
TRANSITIONS: dict[VMState, frozenset[VMState]] = {
    S.SHUTOFF: frozenset({S.STARTING}),
    S.STARTING: frozenset({S.RUNNING, S.SHUTOFF, S.CRASHED}),
    S.RUNNING: frozenset({S.PAUSED, S.SHUTTING_DOWN, S.SHUTOFF, S.CRASHED, S.MIGRATING, S.RUNNING}),
    S.PAUSED: frozenset({S.RUNNING, S.SHUTOFF, S.CRASHED, S.MIGRATING}),
    S.SHUTTING_DOWN: frozenset({S.SHUTOFF, S.CRASHED, S.RUNNING}),
    S.CRASHED: frozenset({S.STARTING, S.SHUTOFF}),
    S.MIGRATING: frozenset({S.RUNNING, S.PAUSED, S.SHUTOFF, S.CRASHED}),
}


def check_action(vm: str, state: VMState, action: str) -> None:
    allowed = ALLOWED.get(action)
    if allowed is None:
        raise IllegalTransitionError(f"unknown action {action!r}")
    if state not in allowed:
        names = ", ".join(sorted(s.value for s in allowed))
        raise IllegalTransitionError(
            f"cannot {action} vm {vm!r}: it is {state.value} (allowed from: {names})")


def check_transition(vm: str, old: VMState, new: VMState) -> None:
    if new not in TRANSITIONS[old]:
        raise IllegalTransitionError(f"vm {vm!r}: illegal state change {old.value} -> {new.value}")


@dataclass(frozen=True)
class StateChange:
    vm: str
    old: VMState
    new: VMState
    reason: str
    at: float = field(default_factory=time.time)
