"""The state machine of one migration (pure logic)."""
from __future__ import annotations

import enum
import logging

from hvbase.fsm import StateMachine

from .errors import MigrationStateError

log = logging.getLogger("hvsim.migration")


class MigrationState(enum.Enum):
    NEW = "new"
    PREPARING = "preparing"            # capacity reserved, destination QEMU starting
    ACTIVE = "active"                  # precopy passes running
    SWITCHING_OVER = "switching-over"  # the policy decided; QEMU stops the source and copies the rest
    POSTCOPY = "postcopy"              # guest runs on the destination, pages pulled on demand
    POSTCOPY_PAUSED = "postcopy-paused"  # the stream broke in postcopy: the guest waits on the destination
                                       # for pages only the source has; both QEMUs kept (recover() resumes)
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"
    TIMED_OUT = "timed-out"

    @property
    def terminal(self) -> bool:
        return self in TERMINAL


M = MigrationState
TERMINAL = frozenset({M.COMPLETED, M.FAILED, M.CANCELLED, M.TIMED_OUT})

TRANSITIONS: dict[MigrationState, frozenset[MigrationState]] = {
    M.NEW: frozenset({M.PREPARING, M.FAILED, M.CANCELLED}),
    M.PREPARING: frozenset({M.ACTIVE, M.FAILED, M.CANCELLED, M.TIMED_OUT}),
    M.ACTIVE: frozenset({M.SWITCHING_OVER, M.POSTCOPY, M.COMPLETED, M.FAILED, M.CANCELLED, M.TIMED_OUT}),
    # QEMU may still fail the final phase (then the source resumes): FAILED/TIMED_OUT stay possible
    M.SWITCHING_OVER: frozenset({M.ACTIVE, M.POSTCOPY, M.COMPLETED, M.FAILED, M.CANCELLED, M.TIMED_OUT}),
    M.POSTCOPY: frozenset({M.COMPLETED, M.FAILED, M.POSTCOPY_PAUSED}),  # no way back: the guest runs on the destination
    M.POSTCOPY_PAUSED: frozenset({M.POSTCOPY, M.FAILED}),  # recovered, or abandoned by the VM's owner (destroy)
    M.COMPLETED: frozenset(),
    M.FAILED: frozenset(),
    M.CANCELLED: frozenset(),
    M.TIMED_OUT: frozenset(),
}


def machine(name: str) -> StateMachine[MigrationState]:
    """The state machine of migration ``name`` (MigrationStateError on an illegal change)."""
    return StateMachine(f"migration {name}", M.NEW, TRANSITIONS, error=MigrationStateError, log=log)
