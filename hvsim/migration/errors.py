"""Errors of hvsim.migration, under hvsim's root; the root cause is kept as ``__cause__``.

    MigrationError (HvsimError)
     +-- MigrationInputError      bad arguments (unknown policy, negative timeout, same host, ...) (an InputError)
     +-- MigrationRefusedError    refused before any process started (also a CapacityError)
     |    +-- IncompatibleMachinesError  the destination host's profile gives another machine (machine
     |                            type, CPU, disk bus, NIC model): QEMU cannot cross it; ``exc.blockers``
     +-- MigrationStateError      an operation not allowed in the migration's (or the VM's) state (a StateError)
     +-- DestinationStartError    the destination QEMU did not start or could not listen
     +-- MigrationFailedError     QEMU reported the migration failed (source kept running)
     +-- MigrationAbortedError    the policy aborted it (e.g. Nova's completion timeout)
     +-- MigrationTimeoutError    the caller's timeout expired (source kept running)
     +-- MigrationCancelledError  cancel() was called (source kept running)
     +-- MigrationPlanError       the plan cannot meet the contract and the caller asked to refuse then
     |                            (nothing migrated; also a MigrationRefusedError)
     +-- PostcopyPausedError      the stream broke during postcopy and did not come back within the bound:
                                  the guest waits on the destination, its pages are kept on the source;
                                  ``exc.migration.recover()`` resumes it once the link is back
"""
from __future__ import annotations

from typing import Any

from ..core.errors import CapacityError, HvsimError, InputError, StateError


class MigrationError(HvsimError):
    """Root of every error raised by hvsim.migration. A migration that ran attaches itself and its
    result (``exc.migration``, ``exc.result``)."""
    migration: Any = None
    result: Any = None


class MigrationInputError(MigrationError, InputError):
    pass


class MigrationRefusedError(MigrationError, CapacityError):
    pass


class IncompatibleMachinesError(MigrationRefusedError):
    def __init__(self, message: str, blockers: list[str]) -> None:
        super().__init__(message)
        self.blockers = list(blockers)


class MigrationStateError(MigrationError, StateError):
    pass


class DestinationStartError(MigrationError):
    pass


class MigrationFailedError(MigrationError):
    pass


class MigrationAbortedError(MigrationError):
    pass


class MigrationTimeoutError(MigrationError):
    pass


class MigrationCancelledError(MigrationError):
    pass


class MigrationPlanError(MigrationRefusedError):
    """The predicted plan cannot meet the contract (``if_infeasible="refuse"``); ``.plan`` holds it."""
    plan: Any = None


class PostcopyPausedError(MigrationError):
    pass
