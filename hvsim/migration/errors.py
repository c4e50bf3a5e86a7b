"""Errors of hvsim.migration. One tree; the root cause is kept as ``__cause__``.

    MigrationError (HvsimError)
     +-- MigrationInputError      bad arguments (unknown policy, negative timeout, same host, ...)
     +-- MigrationRefusedError    refused before any process started (also a CapacityError)
     +-- MigrationStateError      an operation not allowed in the migration's current state
     +-- DestinationStartError    the destination QEMU did not start or could not listen
     +-- MigrationFailedError     QEMU reported the migration failed (source kept running)
     +-- MigrationAbortedError    the policy aborted it (e.g. Nova's completion timeout)
     +-- MigrationTimeoutError    the caller's timeout expired (source kept running)
     +-- MigrationCancelledError  cancel() was called (source kept running)
"""
from __future__ import annotations

from ..core.errors import CapacityError, HvsimError


class MigrationError(HvsimError):
    """Root of every error raised by hvsim.migration."""


class MigrationInputError(MigrationError, ValueError):
    pass


class MigrationRefusedError(MigrationError, CapacityError):
    pass


class MigrationStateError(MigrationError):
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
