"""Errors raised by hvsim's core. One tree; the root cause is kept as ``__cause__``.

    HvsimError
     +-- SpecError               an invalid spec (bad name, non-positive size, duplicate, ...)
     +-- CapacityError           a host cannot take a VM
     +-- IllegalTransitionError  a lifecycle action not allowed in the VM's current state
     +-- NotFoundError           unknown host / VM / datacenter
     +-- VMError                 an operation on a VM failed (wraps qmp_bridge errors)
     |    +-- GuestNotReadyError the guest did not become ready (console tail attached)
     +-- AgentError              guest agent failure
          +-- AgentTimeoutError
          +-- AgentDisconnectedError
"""
from __future__ import annotations


class HvsimError(Exception):
    """Root of every hvsim core error."""


class SpecError(HvsimError, ValueError):
    pass


class CapacityError(HvsimError):
    pass


class IllegalTransitionError(HvsimError):
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


class AgentError(HvsimError):
    pass


class AgentTimeoutError(AgentError):
    pass


class AgentDisconnectedError(AgentError):
    pass
