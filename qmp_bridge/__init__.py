"""qmp_bridge: the only code that starts QEMU or speaks QMP."""
from .client import EventSubscription, QMPSession
from .errors import (AttachError, CommandNotFoundError, DeviceNotActiveError, DeviceNotFoundError, GenericError,
                     LaunchError, ProcessStateError, QEMUBridgeError, QEMUExitedError, QMPCommandError,
                     QMPConnectionError, QMPTimeoutError)
from .machine import Drive, MachineSpec, MachineSpecError, Nic, SerialPort, build_argv
from .process import ProcState, QemuProcess

__all__ = [
    "EventSubscription", "QMPSession", "AttachError", "CommandNotFoundError", "DeviceNotActiveError",
    "DeviceNotFoundError", "GenericError", "LaunchError", "QEMUBridgeError", "QEMUExitedError",
    "QMPCommandError", "QMPConnectionError", "QMPTimeoutError", "Drive", "MachineSpec",
    "MachineSpecError", "Nic", "SerialPort", "build_argv", "ProcState", "QemuProcess", "ProcessStateError",
]
