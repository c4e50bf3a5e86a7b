"""Errors raised by hvsim.network. One tree; the root cause is kept as ``__cause__``.

    NetworkError
     +-- TopologyError        bad input: duplicate/invalid host names, bad bandwidth, bad subnet
     +-- UnknownHostError     a host name that is not part of this underlay
     +-- StateError           an operation not allowed in the underlay's current state
     +-- CommandError         an iproute2/tc (or helper) command failed: argv, exit code, stderr
     +-- SetupError           bringing the underlay up failed (cause attached; already torn down)
     +-- TeardownError        tearing down left something behind (names listed)
     +-- ProbeError           a throughput probe failed (sender/receiver died or timed out)
"""
from __future__ import annotations

from typing import Sequence


class NetworkError(Exception):
    """Root of every error raised by hvsim.network."""


class TopologyError(NetworkError, ValueError):
    """Invalid topology input (names, bandwidth, subnet, shaping parameters)."""


class UnknownHostError(NetworkError, KeyError):
    def __init__(self, host: str, known: Sequence[str]) -> None:
        self.host = host
        self.known = list(known)
        super().__init__(f"unknown host {host!r}; this underlay has: {', '.join(self.known) or '(none)'}")

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0])


class StateError(NetworkError):
    def __init__(self, what: str, state: object, allowed: Sequence[object]) -> None:
        self.what = what
        self.state = state
        self.allowed = list(allowed)
        names = ", ".join(getattr(s, "name", str(s)) for s in self.allowed)
        super().__init__(f"cannot {what} while underlay is {getattr(state, 'name', state)} (allowed in: {names})")


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
