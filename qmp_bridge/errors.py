"""Errors raised by qmp_bridge. One tree under hvsim's root (``hvbase.errors.HvsimError``); the root
cause is always kept as ``__cause__``.

    HvsimError (hvbase)
     +-- ProcessStateError      an operation not allowed in the QEMU process's state (a StateError)
     +-- QEMUBridgeError
     +-- LaunchError            QEMU did not start (exit code, argv, console tail)
     +-- AttachError            a running QEMU could not be re-attached (pid, socket, QMP)
     +-- QEMUExitedError        QEMU died while we were waiting on it
     +-- QMPConnectionError     the QMP session broke or could not be set up
     +-- QMPTimeoutError        a command or event wait exceeded its timeout
     +-- QMPCommandError        QEMU answered a command with an error
     |    +-- GenericError, CommandNotFoundError, DeviceNotFoundError,
     |        DeviceNotActiveError, KVMMissingCapError   (by QMP error class)
     +-- AccelProbeError        the accelerator probe itself failed to run
    InputError (hvbase)
     +-- MachineSpecError       (qmp_bridge.machine) a machine description QEMU could not run
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from hvbase.errors import HvsimError, StateError


class QEMUBridgeError(HvsimError):
    """Root of qmp_bridge's own errors (under hvsim's root)."""


class ProcessStateError(StateError):
    """A QEMU process operation (launch, ...) not allowed in its current state."""


class LaunchError(QEMUBridgeError):
    def __init__(self, message: str, *, argv: Sequence[str], exit_code: int | None,
                 console_tail: str = "", log_tail: str = "") -> None:
        self.argv = list(argv)
        self.exit_code = exit_code
        self.console_tail = console_tail
        self.log_tail = log_tail
        detail = [message, f"exit code: {exit_code}", "argv: " + " ".join(self.argv)]
        if log_tail:
            detail.append("qemu output (tail):\n" + log_tail)
        if console_tail:
            detail.append("guest console (tail):\n" + console_tail)
        super().__init__("\n".join(detail))


class AttachError(QEMUBridgeError):
    """A running QEMU could not be re-attached (wrong pid, gone, QMP not answering)."""


class QEMUExitedError(QEMUBridgeError):
    def __init__(self, name: str, exit_code: int | None, waiting_for: str, console_tail: str = "") -> None:
        self.name = name
        self.exit_code = exit_code
        self.waiting_for = waiting_for
        self.console_tail = console_tail
        msg = f"QEMU of {name!r} exited (code {exit_code}) while waiting for {waiting_for}"
        if console_tail:
            msg += "\nguest console (tail):\n" + console_tail
        super().__init__(msg)


class QMPConnectionError(QEMUBridgeError):
    pass


class QMPTimeoutError(QEMUBridgeError):
    def __init__(self, what: str, timeout: float) -> None:
        self.what = what
        self.timeout = timeout
        super().__init__(f"timed out after {timeout:g}s waiting for {what}")


class QMPCommandError(QEMUBridgeError):
    """QEMU returned an error for a command. ``error_class`` is QMP's class name."""

    error_class = "GenericError"

    def __init__(self, command: str, error_class: str, desc: str, arguments: dict[str, Any] | None = None) -> None:
        self.command = command
        self.error_class = error_class
        self.desc = desc
        self.arguments = arguments or {}
        super().__init__(f"{command}: {error_class}: {desc}")


class GenericError(QMPCommandError):
    pass


class CommandNotFoundError(QMPCommandError):
    pass


class DeviceNotFoundError(QMPCommandError):
    pass


class DeviceNotActiveError(QMPCommandError):
    pass


class KVMMissingCapError(QMPCommandError):
    pass


_BY_CLASS: dict[str, type[QMPCommandError]] = {
    "GenericError": GenericError,
    "CommandNotFound": CommandNotFoundError,
    "DeviceNotFound": DeviceNotFoundError,
    "DeviceNotActive": DeviceNotActiveError,
    "KVMMissingCap": KVMMissingCapError,
}


def command_error(command: str, error_class: str, desc: str,
                  arguments: dict[str, Any] | None = None) -> QMPCommandError:
    """Build the typed exception for QMP error class ``error_class``."""
    cls = _BY_CLASS.get(error_class, QMPCommandError)
    return cls(command, error_class, desc, arguments)


class AccelProbeError(QEMUBridgeError):
    pass
