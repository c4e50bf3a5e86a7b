"""VM lifecycle in libvirt's vocabulary: states, the actions allowed in each, the legal transitions
(pure logic; the VM's :class:`~hvbase.fsm.StateMachine` is built here)."""
from __future__ import annotations

import enum
import logging
from collections.abc import Callable

from hvbase.fsm import StateMachine, Transition

from .errors import IllegalTransitionError

log = logging.getLogger("hvsim.core.vm")


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
    "attach": frozenset({S.SHUTOFF, S.CRASHED}),   # adopt a QEMU that runs already (VM.attach_running)
    "agent": frozenset({S.RUNNING, S.PAUSED, S.MIGRATING}),  # paused: queued until resume
}

# state -> states it may move to (by actions or by events such as a crash)
TRANSITIONS: dict[VMState, frozenset[VMState]] = {
    S.SHUTOFF: frozenset({S.STARTING}),
    S.STARTING: frozenset({S.RUNNING, S.PAUSED, S.SHUTOFF, S.CRASHED}),   # PAUSED: a paused QEMU re-attached
    S.RUNNING: frozenset({S.PAUSED, S.SHUTTING_DOWN, S.SHUTOFF, S.CRASHED, S.MIGRATING, S.RUNNING}),
    S.PAUSED: frozenset({S.RUNNING, S.SHUTOFF, S.CRASHED, S.MIGRATING}),
    S.SHUTTING_DOWN: frozenset({S.SHUTOFF, S.CRASHED, S.RUNNING}),
    S.CRASHED: frozenset({S.STARTING, S.SHUTOFF}),
    S.MIGRATING: frozenset({S.RUNNING, S.PAUSED, S.SHUTOFF, S.CRASHED}),
}


def machine(vm: str, initial: VMState = S.SHUTOFF,
            on_change: Callable[[Transition[VMState]], None] | None = None) -> StateMachine[VMState]:
    """The state machine of VM ``vm``: TRANSITIONS, IllegalTransitionError, logged."""
    return StateMachine(f"vm {vm!r}", initial, TRANSITIONS, error=IllegalTransitionError, log=log,
                        on_change=on_change)


def require(m: StateMachine[VMState], action: str) -> None:
    """Refuse ``action`` unless the VM is in a state ALLOWED for it (IllegalTransitionError
    naming the VM, its state and the allowed states)."""
    allowed = ALLOWED.get(action)
    if allowed is None:
        raise IllegalTransitionError(m.obj, m.state, (), action=action,
                                     message=f"unknown action {action!r}; known: {sorted(ALLOWED)}")
    m.require(action, *allowed)
