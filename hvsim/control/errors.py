"""Errors of the control plane (store, etcd runner, PKI, operations, manager API and its client).

One branch of the hvsim tree (root :class:`hvbase.errors.HvsimError`); the cause is always kept
as ``__cause__``::

    HvsimError
     +-- ControlError                    hvsim.control
     |    +-- StoreError                 a store operation failed
     |    |    +-- StoreUnavailableError no member answered in time, or a write's outcome is unknown
     |    |    +-- CompactedError        a watch asked for history the store no longer keeps
     |    |    +-- LeaseExpiredError     the lease is gone (expired or revoked)
     |    |    +-- FencedError           a fenced write refused: its fence (lease key) is not held
     |    +-- EtcdClusterError           the etcd runner: a member failed to start, no leader, ...
     |    +-- PKIError                   certificate or key could not be made or loaded
     |    +-- NotFoundError              no such host / VM / group / operation (API: 404)
     |    +-- ConflictError              exists already, still referenced, wrong state (API: 409)
     |    |    +-- StaleTokenError       a host agent refused a fencing token older than one it saw
     |    |    +-- ImageLockedError      a QEMU found its disk image locked (another QEMU runs the guest)
     |    +-- NotLeaderError             this manager does not hold the manager lease (API: 503 naming the leader)
     |    +-- OperationFailedError       an operation was carried out and failed (API: 502)
     |    +-- ApiError                   the manager API answered an error (client side)
     |         +-- ApiAuthError          401/403: missing or wrong token
     |         +-- ApiNotFoundError      404
     |         +-- ApiConflictError      409
     |         |    +-- ApiFencedError   409 from a host agent: our fencing token is stale (a newer manager leads)
     |         +-- ApiNotImplementedError 501
     |         +-- ApiFailedError        502: the operation ran and failed (on a host), ``operation`` names it
     |         +-- ApiUnavailableError   the manager could not be reached, or answered 5xx
     |              +-- ApiNotLeaderError 503 from a manager that does not lead (``leader`` names who does)
     +-- InputError
     |    +-- ControlInputError          a malformed field (key, record, request); names the field
     |         +-- ApiInputError         400/422 from the manager API (also an ApiError)
     +-- StateError
          +-- OperationStateError        an illegal operation state change
"""
from __future__ import annotations

from typing import Any

from hvbase.errors import HvsimError, InputError, StateError


class ControlError(HvsimError):
    """Root of the control plane's errors."""


class ControlInputError(ControlError, InputError):
    """A malformed, out-of-range or conflicting field. ``field`` names it."""

    def __init__(self, field: str, message: str) -> None:
        self.field = field
        super().__init__(f"{field}: {message}")


class StoreError(ControlError):
    pass


class StoreUnavailableError(StoreError):
    """No member answered (after retries), or a write was sent and its outcome is unknown
    (``ambiguous``): read the key back before retrying it."""

    def __init__(self, message: str, ambiguous: bool = False) -> None:
        self.ambiguous = ambiguous
        super().__init__(message)


class CompactedError(StoreError):
    def __init__(self, requested: int, oldest: int) -> None:
        self.requested = requested
        self.oldest = oldest
        super().__init__(f"revision {requested} is compacted (oldest kept: {oldest})")


class LeaseExpiredError(StoreError):
    def __init__(self, lease_id: int) -> None:
        self.lease_id = lease_id
        super().__init__(f"lease {lease_id:x} expired or was revoked")


class FencedError(StoreError):
    """A fenced write was refused: the fence's lease key is gone or held under a newer token."""

    def __init__(self, name: str, token: int) -> None:
        self.name = name
        self.token = token
        super().__init__(f"fenced write refused: lease {name!r} is no longer held with token {token}")


class EtcdClusterError(ControlError):
    pass


class PKIError(ControlError):
    pass


class NotFoundError(ControlError, KeyError):
    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class ConflictError(ControlError):
    pass


class StaleTokenError(ConflictError):
    """A host agent refused a mutating call: its fencing token is older than the newest it saw
    (``newest``), or its lease deadline (``X-Fencing-Until``) had passed when the call arrived."""

    def __init__(self, token: int, newest: int, reason: str | None = None) -> None:
        self.token = token
        self.newest = newest
        self.reason = reason or f"stale fencing token {token}: this host agent has seen {newest} (a newer manager)"
        super().__init__(self.reason)


class ImageLockedError(ConflictError):
    """A guest's QEMU could not start: its disk image on the shared datastore is locked by another
    QEMU (QEMU's OFD image locks), i.e. the guest still runs somewhere. ``field`` is
    ``datastore-lock`` (what the manager's HA controller looks for in the agent's 409)."""

    field = "datastore-lock"


class NotLeaderError(ControlError):
    """This manager does not hold the manager lease: it changes nothing. ``operation``: the id of an
    operation it had recorded before it noticed (then the request was *partly* carried out: the next
    leader resolves that operation; a client must not blindly retry); ``None`` when nothing was
    written, so the request can be sent to the leader as is."""

    def __init__(self, message: str, operation: str | None = None) -> None:
        self.operation = operation
        super().__init__(message)


class OperationFailedError(ControlError):
    """An operation was carried out and failed (a guest that did not boot, a migration that failed);
    ``operation`` is its id when it was recorded."""

    def __init__(self, message: str, operation: str | None = None) -> None:
        self.operation = operation
        super().__init__(message)


class OperationStateError(StateError):
    pass


class ApiError(ControlError):
    """The manager answered ``status`` with ``detail`` (its message); ``field`` if it named one."""

    def __init__(self, status: int, detail: str, field: str | None = None, body: Any = None) -> None:
        self.status = status
        self.detail = detail
        self.field = field
        self.body = body
        super().__init__(f"HTTP {status}: {detail}" if status else detail)   # 0: no answer at all


class ApiInputError(ApiError, InputError):
    pass


class ApiAuthError(ApiError):
    pass


class ApiNotFoundError(ApiError):
    pass


class ApiConflictError(ApiError):
    pass


class ApiFencedError(ApiConflictError):
    """A host agent refused our fencing token: a newer manager holds the lease."""


class ApiNotImplementedError(ApiError):
    pass


class ApiFailedError(ApiError):
    """502: the operation was carried out and failed; ``operation`` is its id (if recorded)."""

    @property
    def operation(self) -> str | None:
        op = self.body.get("operation") if isinstance(self.body, dict) else None
        return str(op) if op else None


class ApiUnavailableError(ApiError):
    pass


class ApiNotLeaderError(ApiUnavailableError):
    """503 from a manager that does not lead: ``leader`` is ``{manager, address, token}`` of the
    one that does (``None``: none known yet), ``operation`` set when the request was partly
    carried out (see :class:`NotLeaderError`); ``retry_safe`` says the request changed nothing."""

    @property
    def leader(self) -> dict[str, Any] | None:
        v = self.body.get("leader") if isinstance(self.body, dict) else None
        return v if isinstance(v, dict) else None

    @property
    def operation(self) -> str | None:
        op = self.body.get("operation") if isinstance(self.body, dict) else None
        return str(op) if op else None

    @property
    def retry_safe(self) -> bool:
        return isinstance(self.body, dict) and self.body.get("applied") is False
