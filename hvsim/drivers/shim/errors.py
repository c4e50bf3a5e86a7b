"""Exceptions of the block-device shim.

Error tree (under ``hvbase.errors.HvsimError``; the root cause is always kept as ``__cause__``)::

    ShimError
     +-- ShimConfigError        bad arguments: sizes, paths, socket directory permissions (an InputError)
     +-- ShimStateError         an illegal state transition (server, export, process) (a StateError)
     +-- NbdProtocolError       a peer broke the NBD protocol (the connection is dropped)
     +-- StoreError             the backing store failed (carries an NBD errno)
     +-- ControlError           the JSON control channel failed or answered an error
     +-- ShimProcessError       the shim process could not start or stopped badly
          +-- ShimCrashed       the shim process exited while it was expected to run
"""
from __future__ import annotations

from hvbase.errors import HvsimError, InputError, StateError


class ShimError(HvsimError):
    """Root of every shim error (under hvsim's root)."""


class ShimConfigError(ShimError, InputError):
    """Invalid configuration or argument."""


class ShimStateError(ShimError, StateError):
    """An operation is not legal in the object's current state."""


class NbdProtocolError(ShimError):
    """The peer violated the NBD protocol; the connection must be dropped."""


class StoreError(ShimError):
    """The backing store failed. ``errno`` is the NBD error value to answer with."""

    def __init__(self, message: str, errno: int) -> None:
        super().__init__(message)
        self.errno = errno


class ControlError(ShimError):
    """The control channel failed, or the shim answered a command with an error."""


class ShimProcessError(ShimError):
    """The shim process failed to start or to stop."""


class ShimCrashed(ShimProcessError):
    """The shim process exited on its own."""

    def __init__(self, message: str, returncode: int | None, log_tail: str = "") -> None:
        super().__init__(message + (f"\n--- shim log tail ---\n{log_tail}" if log_tail else ""))
        self.returncode = returncode
        self.log_tail = log_tail
