"""Errors raised by hvsim.network, under hvsim's root; the root cause is kept as ``__cause__``.

    NetworkError (HvsimError)
     +-- TopologyError        bad input: duplicate/invalid host names, bad bandwidth, bad subnet (an InputError)
     +-- UnknownHostError     a host name that is not part of this underlay
     +-- StateError           an operation not allowed in the underlay's current state (hvbase's StateError)
     +-- CommandError         an iproute2/tc (or helper) command failed: argv, exit code, stderr
     +-- SetupError           bringing the underlay up failed (cause attached; already torn down)
     +-- TeardownError        tearing down left something behind (names listed)
     +-- ProbeError           a throughput probe failed (sender/receiver died or timed out)
     +-- TenantInputError     bad tenant network / ENI definition (also an hvbase InputError):
     |    +-- UnknownNetworkError    an ENI names a network the controller does not have
     |    +-- UnknownEniError        an ENI id the controller does not know
     |    +-- AddressConflictError   a MAC or IP already used by another ENI of the network
     +-- BindingStateError    an ENI binding, move or controller operation not allowed in its state
     |                        (also an hvbase StateError: obj, state, allowed, action)
     +-- ProgrammingError     netlink (pyroute2) or nftables refused a change on a host: host, what, cause
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from hvbase.errors import HvsimError, InputError
from hvbase.errors import StateError as _BaseStateError


class NetworkError(HvsimError):
    """Root of every error raised by hvsim.network."""


class TopologyError(NetworkError, InputError):
    """Invalid topology input (names, bandwidth, subnet, shaping parameters)."""


class UnknownHostError(NetworkError, KeyError):
    def __init__(self, host: str, known: Sequence[str]) -> None:
        self.host = host
        self.known = list(known)
        super().__init__(f"unknown host {host!r}; this underlay has: {', '.join(self.known) or '(none)'}")

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0])


class StateError(NetworkError, _BaseStateError):
    """An underlay operation or state change not allowed in its current state."""

    def __init__(self, obj: str, state: Any = None, allowed: Sequence[Any] = (), action: str | None = None,
                 target: Any = None, message: str | None = None) -> None:
        _BaseStateError.__init__(self, obj, state, allowed, action=action, target=target, message=message)


class CommandError(NetworkError):
    def __init__(self, argv: Sequence[str], returncode: int | None, stderr: str, stdin: str | None = None) -> None:
        self.argv = list(argv)
        self.returncode = returncode
        self.stderr = stderr
        self.stdin = stdin
        msg = f"command failed (exit {returncode}): {' '.join(self.argv)}"
        if stderr.strip():
            msg += "\nstderr: " + stderr.strip()
        if stdin:
            msg += "\nbatch input:\n" + stdin.rstrip()
        super().__init__(msg)


class SetupError(NetworkError):
    """Bringing the underlay up failed; everything created so far was torn down."""


class TeardownError(NetworkError):
    def __init__(self, message: str, leftovers: Sequence[str]) -> None:
        self.leftovers = list(leftovers)
        super().__init__(f"{message}: {', '.join(self.leftovers)}")


class ProbeError(NetworkError):
    """A throughput probe did not produce a measurement."""


class TenantInputError(NetworkError, InputError):
    """A tenant network or ENI definition is malformed or conflicts; nothing was programmed."""


class UnknownNetworkError(TenantInputError):
    def __init__(self, network: str, known: Sequence[str]) -> None:
        self.network = network
        self.known = list(known)
        super().__init__(f"unknown tenant network {network!r}; defined: {', '.join(self.known) or '(none)'}")


class UnknownEniError(TenantInputError):
    def __init__(self, eni: str, known: Sequence[str]) -> None:
        self.eni = eni
        self.known = list(known)
        super().__init__(f"unknown ENI {eni!r}; defined: {', '.join(self.known) or '(none)'}")


class AddressConflictError(TenantInputError):
    """A MAC or IP that another ENI of the same network already has."""


class BindingStateError(NetworkError, _BaseStateError):
    """An ENI binding, a move or the controller is not in a state that allows the operation."""


class ProgrammingError(NetworkError):
    """A host refused a change (netlink or nftables). ``host`` and ``what`` name it; the
    library's error is the ``__cause__``."""

    def __init__(self, host: str, what: str, detail: str = "") -> None:
        self.host = host
        self.what = what
        self.detail = detail
        super().__init__(f"host {host!r}: {what} failed" + (f": {detail}" if detail else ""))
