"""Errors of the cross-cloud migration (:mod:`hvsim.crosscloud`), under :class:`hvbase.errors.HvsimError`::

    HvsimError
     +-- InputError
     |    +-- CrossCloudInputError        a bad option, field or argument (names it)
     |         +-- UnknownProviderError   a cloud/provider nobody registered
     |         +-- NativeMigrationRefusedError  the profiles differ: QEMU cannot live-migrate (names each difference)
     +-- StateError
     |    +-- CrossCloudStateError        an operation the migration's state does not allow
     +-- CrossCloudError                  the root of the runtime failures below
          +-- CredentialsError            a provider refused the credentials
          +-- NoCapacityError             the destination cloud cannot take the VM
          +-- NoAgentChannelError         the guest has no (working) guest-agent channel
          +-- AgentFailedError            a migration agent failed (its output tail attached)
          +-- ReplicationError            the replication cannot go on (source guest crashed, ...)
          +-- VerificationError           destination disk or records do not match
          +-- CutoverRefusedError         the predicted downtime does not fit the budget (the options)
          +-- OperationBusyError          another orchestrator holds the operation's lease
"""
from __future__ import annotations

from hvbase.errors import HvsimError, InputError, StateError


class CrossCloudInputError(InputError):
    pass


class UnknownProviderError(CrossCloudInputError):
    pass


class NativeMigrationRefusedError(CrossCloudInputError):
    """QEMU's live migration cannot move a guest between these machine profiles."""

    def __init__(self, message: str, blockers: list[str]) -> None:
        self.blockers = list(blockers)
        super().__init__(message)


class CrossCloudStateError(StateError):
    pass


class CrossCloudError(HvsimError):
    pass


class CredentialsError(CrossCloudError):
    pass


class NoCapacityError(CrossCloudError):
    pass


class NoAgentChannelError(CrossCloudError):
    pass


class AgentFailedError(CrossCloudError):
    def __init__(self, message: str, output_tail: str = "") -> None:
        self.output_tail = output_tail
        super().__init__(message + (f"\nagent output (tail):\n{output_tail}" if output_tail else ""))


class ReplicationError(CrossCloudError):
    pass


class VerificationError(CrossCloudError):
    pass


class CutoverRefusedError(CrossCloudError):
    """Cutover refused: the predicted downtime exceeds the budget. ``achievable_s`` is the downtime
    the current write rate allows, ``options`` what the operator can do about it."""

    def __init__(self, message: str, predicted_s: float, budget_s: float, achievable_s: float,
                 options: list[str]) -> None:
        self.predicted_s = predicted_s
        self.budget_s = budget_s
        self.achievable_s = achievable_s
        self.options = list(options)
        super().__init__(message)


class OperationBusyError(CrossCloudError):
    """Another orchestrator drives this operation (its lease has not expired)."""
