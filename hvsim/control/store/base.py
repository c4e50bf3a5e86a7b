"""The store interface of the control plane, one async API over SQLite and etcd.

The model is etcd's: a flat, ordered key space of ``str`` keys (``/hosts/h1``) and ``bytes``
values; every write transaction gets the next **revision** of the store, and every key carries
its ``create_revision``, ``mod_revision`` and ``version``. Operations:

- :meth:`Store.get`, :meth:`Store.put`, :meth:`Store.delete`;
- :meth:`Store.list` by prefix with pagination (``limit``, ``after`` = the last key of the page
  before), :meth:`Store.count`;
- :meth:`Store.txn`: compare-and-set over several keys, ``if all(compares) then success else
  failure``, atomically; ops may nest a :class:`Txn` (as etcd's ``request_txn``);
- :meth:`Store.watch`: a context manager that, once entered, delivers every later change under a
  prefix (or from ``start_revision`` on), in revision order;
- leases: :meth:`Store.grant` (TTL in seconds), :meth:`Store.keep_alive`, :meth:`Store.revoke`;
  keys put with a lease are deleted when it ends. :meth:`Store.keep` keeps one alive in a task;
- fencing: :meth:`Store.acquire` takes a named lease key (``/_lease/NAME``) under a lease; its
  ``create_revision`` is the **fencing token** (it grows with every new holder). A
  :meth:`Store.fenced_txn` succeeds only while that key still exists with that token: it is a
  transaction on the lease key, so a holder whose lease expired (or that was replaced) cannot
  write, whatever it believes.

A write returns only once the store has committed it (SQLite: WAL commit with
``synchronous=FULL``; etcd: the raft entry is committed and applied).
"""
from __future__ import annotations

import abc
import asyncio
import enum
import json
import logging
import re
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Union

from hvbase.aio import wait_for
from hvbase.fsm import StateMachine

from ..errors import ControlInputError, FencedError, LeaseExpiredError, StoreError, StoreUnavailableError

log = logging.getLogger("hvsim.control.store")

MAX_KEY_BYTES = 512
MAX_VALUE_BYTES = 1 << 20          # etcd's default request limit is 1.5 MiB
MAX_LIST_LIMIT = 1000
MAX_TTL_S = 86400
MAX_TXN_OPS = 128                  # etcd's default --max-txn-ops
LEASE_PREFIX = "/_lease/"
#: a fenced write also puts ``/_fence/NAME/TOKEN`` (see :meth:`Store.fenced_txn`): the audit trail
FENCE_JOURNAL = "/_fence/"
#: a kept lease is acted on only until TTL minus this (or a tenth of the TTL, if more) after the
#: send time of its last acknowledged keep-alive
LEASE_MARGIN = 0.3
_KEY_RE = re.compile(r"^/[\x21-\x7e]*$")   # printable ASCII without space, starting with '/'


def check_key(key: object, field_name: str = "key") -> str:
    """A valid key: ``str``, starts with '/', printable ASCII without spaces, <= 512 bytes."""
    if not isinstance(key, str):
        raise ControlInputError(field_name, f"must be a string, not {type(key).__name__}")
    if not key or len(key) > MAX_KEY_BYTES:
        raise ControlInputError(field_name, f"length must be 1..{MAX_KEY_BYTES}, got {len(key)}")
    if not _KEY_RE.match(key):
        raise ControlInputError(field_name, f"{key[:40]!r} must start with '/' and hold printable ASCII only")
    return key


def check_prefix(prefix: object) -> str:
    return check_key(prefix, "prefix")


def check_value(value: object) -> bytes:
    if not isinstance(value, bytes | bytearray):
        raise ControlInputError("value", f"must be bytes, not {type(value).__name__}")
    if len(value) > MAX_VALUE_BYTES:
        raise ControlInputError("value", f"{len(value)} bytes is more than {MAX_VALUE_BYTES}")
    return bytes(value)


def check_limit(limit: object) -> int:
    if not isinstance(limit, int) or isinstance(limit, bool) or not 1 <= limit <= MAX_LIST_LIMIT:
        raise ControlInputError("limit", f"must be an integer 1..{MAX_LIST_LIMIT}, got {limit!r}")
    return limit


def check_ttl(ttl: object) -> int:
    if not isinstance(ttl, int | float) or isinstance(ttl, bool) or not 1 <= ttl <= MAX_TTL_S:
        raise ControlInputError("ttl", f"must be 1..{MAX_TTL_S} seconds, got {ttl!r}")
    return max(1, round(ttl))


def prefix_end(prefix: str) -> str:
    """The first key after every key that starts with ``prefix`` (keys are ASCII)."""
    return prefix[:-1] + chr(ord(prefix[-1]) + 1)


@dataclass(frozen=True, slots=True)
class KeyValue:
    key: str
    value: bytes
    create_revision: int
    mod_revision: int
    version: int
    lease: int = 0


@dataclass(frozen=True, slots=True)
class Page:
    """One page of a listing. ``after`` is the cursor for the next page (``None``: last page);
    ``remaining`` counts the keys from this page's first on to the end of the prefix (on the first
    page: all of them), from the same read."""
    items: tuple[KeyValue, ...]
    after: str | None
    revision: int
    remaining: int = 0


class Target(enum.Enum):
    VALUE = "value"
    VERSION = "version"
    CREATE = "create"
    MOD = "mod"
    LEASE = "lease"


class Cmp(enum.Enum):
    EQ = "=="
    NE = "!="
    LT = "<"
    GT = ">"

    def holds(self, left: int | bytes, right: int | bytes) -> bool:
        if type(left) is not type(right):
            raise StoreError(f"cannot compare {type(left).__name__} with {type(right).__name__}")
        if self is Cmp.EQ:
            return left == right
        if self is Cmp.NE:
            return left != right
        if self is Cmp.LT:
            return left < right  # type: ignore[operator]
        return left > right  # type: ignore[operator]


@dataclass(frozen=True, slots=True)
class Compare:
    """``target(key) op value``. A missing key has version, create and mod revision 0, lease 0
    and an empty value (etcd's rule), so ``Compare.absent(key)`` is ``version == 0``."""
    key: str
    target: Target
    op: Cmp
    value: int | bytes

    def __post_init__(self) -> None:
        check_key(self.key, "compare.key")
        want = bytes if self.target is Target.VALUE else int
        if not isinstance(self.value, want) or isinstance(self.value, bool):
            raise ControlInputError("compare.value", f"{self.target.value} compares with {want.__name__}")

    @classmethod
    def absent(cls, key: str) -> Compare:
        return cls(key, Target.VERSION, Cmp.EQ, 0)

    @classmethod
    def exists(cls, key: str) -> Compare:
        return cls(key, Target.VERSION, Cmp.GT, 0)

    @classmethod
    def mod_revision(cls, key: str, revision: int) -> Compare:
        return cls(key, Target.MOD, Cmp.EQ, revision)

    @classmethod
    def create_revision(cls, key: str, revision: int) -> Compare:
        return cls(key, Target.CREATE, Cmp.EQ, revision)

    @classmethod
    def value_is(cls, key: str, value: bytes) -> Compare:
        return cls(key, Target.VALUE, Cmp.EQ, value)

    def holds(self, kv: KeyValue | None) -> bool:
        if self.target is Target.VALUE:
            return self.op.holds(kv.value if kv else b"", self.value)
        have = 0 if kv is None else {Target.VERSION: kv.version, Target.CREATE: kv.create_revision,
                                     Target.MOD: kv.mod_revision, Target.LEASE: kv.lease}[self.target]
        return self.op.holds(have, self.value)


@dataclass(frozen=True, slots=True)
class Put:
    key: str
    value: bytes
    lease: int = 0

    def __post_init__(self) -> None:
        check_key(self.key)
        check_value(self.value)


@dataclass(frozen=True, slots=True)
class Delete:
    key: str

    def __post_init__(self) -> None:
        check_key(self.key)


@dataclass(frozen=True, slots=True)
class Get:
    key: str

    def __post_init__(self) -> None:
        check_key(self.key)


@dataclass(frozen=True, slots=True)
class Txn:
    """A nested transaction (an op of another transaction)."""
    compares: tuple[Compare, ...]
    success: tuple[Op, ...]
    failure: tuple[Op, ...] = ()


Op = Union[Put, Delete, Get, Txn]
#: per op: Get -> KeyValue | None, Put -> None, Delete -> number deleted (0/1), Txn -> TxnResult
OpResult = Union[KeyValue, None, int, "TxnResult"]


@dataclass(frozen=True, slots=True)
class TxnResult:
    succeeded: bool
    revision: int
    results: tuple[OpResult, ...] = ()


def check_txn(compares: Sequence[Compare], success: Sequence[Op], failure: Sequence[Op]) -> Txn:
    """Validate a transaction's shape: op types, size, and no key written twice in one branch
    (etcd refuses that: 'duplicate key given in txn request')."""
    def count(ops: Sequence[Op]) -> int:
        n = 0
        for op in ops:
            n += 1 + (count(op.success) + count(op.failure) if isinstance(op, Txn) else 0)
        return n
    for c in compares:
        if not isinstance(c, Compare):
            raise ControlInputError("compares", f"{c!r} is not a Compare")
    for branch, ops in (("success", success), ("failure", failure)):
        written: set[str] = set()
        for op in ops:
            if not isinstance(op, Put | Delete | Get | Txn):
                raise ControlInputError(branch, f"{op!r} is not an op")
            if isinstance(op, Put | Delete):
                if op.key in written:
                    raise ControlInputError(branch, f"key {op.key!r} is written twice in one transaction")
                written.add(op.key)
            if isinstance(op, Txn):
                check_txn(op.compares, op.success, op.failure)
    if len(compares) + count(success) + count(failure) > MAX_TXN_OPS:
        raise ControlInputError("txn", f"more than {MAX_TXN_OPS} compares and ops")
    return Txn(tuple(compares), tuple(success), tuple(failure))


def _writes(ops: Sequence[Op]) -> bool:
    """Whether ``ops`` may write (a put or delete, or a nested transaction that may)."""
    return any(isinstance(op, Put | Delete) or (isinstance(op, Txn) and (_writes(op.success) or _writes(op.failure)))
               for op in ops)


class EventKind(enum.Enum):
    PUT = "put"
    DELETE = "delete"


@dataclass(frozen=True, slots=True)
class WatchEvent:
    kind: EventKind
    key: str
    value: bytes
    revision: int


@dataclass(frozen=True, slots=True)
class Lease:
    id: int
    ttl: int          # granted TTL in seconds (etcd may raise a tiny TTL to its minimum)


@dataclass(frozen=True, slots=True)
class Fence:
    """A held named lease: writes fenced with it succeed only while ``/_lease/NAME`` exists with
    ``create_revision == token``."""
    name: str
    holder: str
    token: int
    lease: Lease
    since: float = 0.0          # wall clock when it was acquired (for the audit's timeline)

    @property
    def key(self) -> str:
        return LEASE_PREFIX + self.name

    @property
    def journal_key(self) -> str:
        return journal_key(self.name, self.token)


def journal_key(name: str, token: int) -> str:
    """The audit-trail key of the named lease's holder with ``token`` (zero-padded: listing order
    is token order)."""
    return f"{FENCE_JOURNAL}{name}/{token:020d}"


class Watch(abc.ABC):
    """A watch on a prefix. Entering it establishes the watch: every change committed after
    ``__aenter__`` returned (or from ``start_revision`` on) is delivered, in order."""

    async def __aenter__(self) -> Watch:
        await self.start()
        return self

    async def __aexit__(self, et: type[BaseException] | None, e: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.stop()

    @abc.abstractmethod
    async def start(self) -> None: ...

    @abc.abstractmethod
    async def stop(self) -> None: ...

    @abc.abstractmethod
    async def next(self, timeout: float | None = None) -> WatchEvent:
        """The next event; ``TimeoutError`` if none came within ``timeout``."""

    def __aiter__(self) -> AsyncIterator[WatchEvent]:
        return self._iter()

    async def _iter(self) -> AsyncIterator[WatchEvent]:
        while True:
            yield await self.next()


class KeptLease:
    """A lease kept alive by a task (every TTL/3). ``lost`` is set once the store says it is
    gone or no keep-alive succeeded before it would have expired: its holder must stop acting.

    ``valid_until`` (``time.monotonic()``) is how long the holder may *act* on its own clock: the
    send time of the last keep-alive the store acknowledged plus the TTL minus a margin
    (:data:`LEASE_MARGIN`). The store expires the lease no earlier than TTL after it *received*
    that keep-alive, which was after we sent it, so before ``valid_until`` the lease is held for
    sure (one clock, or clocks that tick at the same rate); after it, maybe not. A process that
    was frozen (SIGSTOP) wakes with ``valid_until`` in the past, before its keep-alive task has
    had a chance to run: :meth:`valid` is then already false."""

    def __init__(self, store: Store, lease: Lease, granted_at: float | None = None) -> None:
        self.store = store
        self.lease = lease
        self.lost = asyncio.Event()
        self.valid_until = (granted_at if granted_at is not None else time.monotonic()) + self._window(lease.ttl)
        self._task: asyncio.Task[None] | None = None

    @staticmethod
    def _window(ttl: float) -> float:
        return max(0.0, ttl - max(LEASE_MARGIN, 0.1 * ttl))

    def valid(self) -> bool:
        """Whether the lease is held for sure now (not lost, and within ``valid_until``)."""
        return not self.lost.is_set() and time.monotonic() < self.valid_until

    def remaining(self) -> float:
        """Seconds this lease is held for sure (0 when not)."""
        return max(0.0, self.valid_until - time.monotonic()) if not self.lost.is_set() else 0.0

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name=f"keep-lease-{self.lease.id:x}")

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.lease.ttl / 3)
            sent = time.monotonic()
            if sent >= self.valid_until:
                break                         # woke too late (frozen, or the loop was starved)
            try:
                ttl = await wait_for(self.store.keep_alive(self.lease), self.valid_until - sent)
                self.valid_until = max(self.valid_until, sent + self._window(ttl))
            except LeaseExpiredError:
                break
            except (StoreUnavailableError, TimeoutError) as e:
                log.warning("keep-alive of lease %x failed: %r", self.lease.id, e)
                if time.monotonic() >= self.valid_until:
                    break
        log.warning("lease %x lost", self.lease.id)
        self.lost.set()

    async def stop(self, revoke: bool = True) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                if not self._task.cancelled():
                    raise
                current = asyncio.current_task()
                if current is not None and current.cancelling():
                    raise
        if revoke and not self.lost.is_set():
            try:
                await self.store.revoke(self.lease)
            except StoreError as e:   # it expires on its own; nothing else to undo
                log.warning("revoking lease %x failed: %s", self.lease.id, e)

    async def __aenter__(self) -> KeptLease:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()


@dataclass
class _Stats:
    requests: int = 0
    retries: int = 0
    failovers: int = 0
    by_op: dict[str, int] = field(default_factory=dict)


class StoreState(enum.Enum):
    NEW = "new"
    OPENING = "opening"
    OPEN = "open"
    CLOSING = "closing"
    CLOSED = "closed"


STORE_TABLE = {
    StoreState.NEW: {StoreState.OPENING, StoreState.CLOSED},
    StoreState.OPENING: {StoreState.OPEN, StoreState.CLOSED},
    StoreState.OPEN: {StoreState.CLOSING},
    StoreState.CLOSING: {StoreState.CLOSED},
    StoreState.CLOSED: set(),
}


class Store(abc.ABC):
    """One async store interface; see the module docstring. Use as ``async with``.
    States: new -> opening -> open -> closing -> closed (a closed store is not reopened)."""

    backend: str = "?"

    def __init__(self) -> None:
        self.stats = _Stats()
        self.fsm = StateMachine(f"{self.backend} store", StoreState.NEW, STORE_TABLE, log=log)

    async def __aenter__(self) -> Store:
        await self.open()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    @property
    def opened(self) -> bool:
        return self.fsm.state is StoreState.OPEN

    async def open(self) -> None:
        if self.fsm.state is StoreState.OPEN:
            return
        self.fsm.require("open", StoreState.NEW)
        self.fsm.set(StoreState.OPENING)
        try:
            await self._open()
        except BaseException as e:
            self.fsm.set(StoreState.CLOSED, f"open failed: {e!r}")
            raise
        self.fsm.set(StoreState.OPEN)

    async def close(self) -> None:
        """Close (idempotent); writes already queued are acknowledged first."""
        if self.fsm.state in (StoreState.CLOSING, StoreState.CLOSED):
            return
        if self.fsm.state is StoreState.NEW:
            self.fsm.set(StoreState.CLOSED, "closed before open")
            return
        self.fsm.set(StoreState.CLOSING)
        try:
            await self._close()
        finally:
            self.fsm.set(StoreState.CLOSED)

    @abc.abstractmethod
    async def _open(self) -> None: ...

    @abc.abstractmethod
    async def _close(self) -> None: ...

    # -- key-value ----------------------------------------------------------------------------
    @abc.abstractmethod
    async def get(self, key: str) -> KeyValue | None: ...

    @abc.abstractmethod
    async def put(self, key: str, value: bytes, *, lease: Lease | None = None) -> int:
        """Store ``value`` at ``key``; returns the revision of the write."""

    @abc.abstractmethod
    async def delete(self, key: str) -> bool:
        """Delete ``key``; returns whether it existed."""

    @abc.abstractmethod
    async def list(self, prefix: str, *, limit: int = 100, after: str | None = None) -> Page:
        """Keys starting with ``prefix``, in key order, at most ``limit``, starting after the key
        ``after`` (the previous page's cursor)."""

    @abc.abstractmethod
    async def count(self, prefix: str) -> int: ...

    @abc.abstractmethod
    async def txn(self, compares: Sequence[Compare], success: Sequence[Op] = (),
                  failure: Sequence[Op] = ()) -> TxnResult: ...

    @abc.abstractmethod
    def watch(self, prefix: str, *, start_revision: int | None = None) -> Watch: ...

    @abc.abstractmethod
    async def revision(self) -> int:
        """The store's current revision."""

    # -- leases -------------------------------------------------------------------------------
    @abc.abstractmethod
    async def grant(self, ttl: float) -> Lease: ...

    @abc.abstractmethod
    async def keep_alive(self, lease: Lease) -> int:
        """Renew ``lease`` for its TTL; returns the TTL. ``LeaseExpiredError`` if it is gone."""

    @abc.abstractmethod
    async def revoke(self, lease: Lease) -> None:
        """End ``lease`` now (its keys are deleted); a lease already gone is not an error."""

    @abc.abstractmethod
    async def lease_ttl(self, lease: Lease) -> int | None:
        """Seconds left on ``lease``, or ``None`` if it is gone."""

    async def keep(self, ttl: float) -> KeptLease:
        """Grant a lease and keep it alive in a task until the returned object is stopped
        (``async with await store.keep(5) as kept: ...``)."""
        sent = time.monotonic()
        kept = KeptLease(self, await self.grant(ttl), granted_at=sent)
        kept.start()
        return kept

    # -- built on txn -------------------------------------------------------------------------
    async def cas(self, key: str, value: bytes, *, expected_mod: int | None) -> bool:
        """Put ``value`` only if ``key``'s mod_revision is ``expected_mod`` (``None``: only if
        absent). Returns whether it was written."""
        cmp = Compare.absent(key) if expected_mod is None else Compare.mod_revision(key, expected_mod)
        return (await self.txn([cmp], [Put(key, value)])).succeeded

    async def acquire(self, name: str, holder: str, lease: Lease) -> Fence | None:
        """Take the named lease key for ``holder`` under ``lease``; ``None`` if someone holds it.
        The key's create_revision is the fencing token."""
        key = check_key(LEASE_PREFIX + name, "name")
        since = time.time()        # before: the audit's "in force from" never postdates the acquisition
        res = await self.txn([Compare.absent(key)], [Put(key, holder.encode(), lease=lease.id), Get(key)])
        if not res.succeeded:
            return None
        kv = res.results[1]
        if not isinstance(kv, KeyValue):
            raise StoreError(f"lease key {key} vanished inside its own transaction")
        return Fence(name, holder, kv.create_revision, lease, since=since)

    async def holder(self, name: str) -> tuple[str, int] | None:
        """The current holder of the named lease and its token, or ``None``."""
        kv = await self.get(check_key(LEASE_PREFIX + name, "name"))
        return None if kv is None else (kv.value.decode(errors="replace"), kv.create_revision)

    async def release(self, fence: Fence) -> bool:
        """Give the named lease up (only if still held with this token)."""
        res = await self.txn([Compare.create_revision(fence.key, fence.token)], [Delete(fence.key)])
        return res.succeeded

    async def fenced_txn(self, fence: Fence, compares: Sequence[Compare] = (), success: Sequence[Op] = (),
                         failure: Sequence[Op] = (), *, mark: bool = False) -> TxnResult:
        """``txn(compares, success, failure)``, executed only while ``fence`` is held: one
        transaction whose outer compare is on the lease key's create_revision. Raises
        :class:`FencedError` (and changes nothing) when the fence is gone.

        When the branch taken writes (or ``mark``, on success), it also puts the holder's
        journal key (:func:`journal_key`, no lease: it outlives the holder): its ``mod_revision``
        is the revision of the last write made under this token, its ``version`` how many there
        were. That is what makes fencing auditable (:func:`hvsim.control.fencing.store_terms`): a
        token's last write must precede the next token's acquisition (its create revision),
        whatever the holder believed."""
        check_txn(compares, success, failure)
        stamp = json.dumps({"token": fence.token, "holder": fence.holder, "since": fence.since,
                            "wall": time.time()}).encode()
        j_ok, j_fail = mark or _writes(success), _writes(failure)
        if j_ok:
            success = [*success, Put(fence.journal_key, stamp)]
        if j_fail:
            failure = [*failure, Put(fence.journal_key, stamp)]
        inner = check_txn(compares, success, failure)
        res = await self.txn([Compare.create_revision(fence.key, fence.token)], [inner], [Get(fence.key)])
        if not res.succeeded:
            raise FencedError(fence.name, fence.token)
        out = res.results[0]
        if not isinstance(out, TxnResult):
            raise StoreError("fenced transaction returned no inner result")
        if (j_ok and out.succeeded) or (j_fail and not out.succeeded):
            out = TxnResult(out.succeeded, out.revision, out.results[:-1])
        return out

    async def fenced_put(self, fence: Fence, key: str, value: bytes) -> int:
        return (await self.fenced_txn(fence, (), [Put(key, value)])).revision
