"""Errors raised by hvsim's core, under the one root :class:`hvbase.errors.HvsimError` (the whole
tree, every package's branch included, is drawn in :mod:`hvbase.errors`). The root cause is kept as
``__cause__``.

    HvsimError
     +-- InputError                  bad input; nothing was created or changed (CLIs exit 2)
     |    +-- SpecError              an invalid spec (bad name, non-positive size, duplicate, ...)
     +-- StateError
     |    +-- IllegalTransitionError a lifecycle action not allowed in the VM's current state
     |    +-- ComponentStateError    a component operation not allowed in its state
     +-- CapacityError               a host (or the machine itself) cannot take a VM
     +-- NotFoundError               unknown host / VM / datacenter / component
     +-- VMError                     an operation on a VM failed (wraps qmp_bridge errors)
     |    +-- GuestNotReadyError     the guest did not become ready (console tail attached)
     |    +-- BusyError              the VM is in another operation (e.g. migrating)
     +-- AgentError                  guest agent failure
     |    +-- AgentTimeoutError
     |    +-- AgentDisconnectedError
     +-- ComponentError              a component (user-level driver) failed
     |    +-- CheckpointError        a checkpoint is truncated, corrupt or of another format/version
     +-- TeardownError               something of a VM/cluster survived its teardown
     +-- QEMUBridgeError             qmp_bridge's branch (launch, QEMU exit, QMP timeout, ...)
"""
from __future__ import annotations

from hvbase.errors import HvsimError, InputError, StateError
from qmp_bridge.errors import QEMUBridgeError

__all__ = ["HvsimError", "InputError", "StateError", "QEMUBridgeError", "SpecError", "CapacityError",
           "IllegalTransitionError", "NotFoundError", "VMError", "GuestNotReadyError", "BusyError", "AgentError",
           "AgentTimeoutError", "AgentDisconnectedError", "ComponentError", "ComponentStateError",
           "CheckpointError", "TeardownError"]


class SpecError(InputError):
    pass


class CapacityError(HvsimError):
    pass


class IllegalTransitionError(StateError):
    pass


class NotFoundError(HvsimError, KeyError):
    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class VMError(HvsimError):
    pass


class GuestNotReadyError(VMError):
    def __init__(self, message: str, console_tail: str = "") -> None:
        self.console_tail = console_tail
        super().__init__(message + ("\nguest console (tail):\n" + console_tail if console_tail else ""))


class BusyError(VMError):
    """The VM is held by another operation (a migration, a lifecycle action)."""


class AgentError(HvsimError):
    pass


class AgentTimeoutError(AgentError):
    pass


class AgentDisconnectedError(AgentError):
    pass


class ComponentError(HvsimError):
    pass


class ComponentStateError(StateError):
    pass


class CheckpointError(ComponentError):
    """A checkpoint that cannot be restored: truncated, corrupt, or of another kind/version."""


class TeardownError(HvsimError):
    def __init__(self, message: str, survivors: list[str]) -> None:
        self.survivors = list(survivors)
        super().__init__(f"{message}: {', '.join(self.survivors)}")
