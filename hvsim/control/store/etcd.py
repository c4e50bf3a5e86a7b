"""The etcd store: etcd's v3 gRPC API through the ``aetcd`` package's generated stubs
(``aetcd.rpc``) on ``grpc.aio`` channels, one channel per cluster member, with our own failover.

Why this and not etcd's JSON gateway with httpx (which this module used first): measured on this
machine against the same 3-member etcd 3.4 cluster on loopback, in one run, a get costs 0.37 ms of
client CPU and 0.9 ms wall through gRPC, against 2.8 ms CPU and 14 ms wall through the gateway
with httpx (the gateway also costs etcd a JSON <-> gRPC hop); with the manager in front, a VM
define cost the manager 8 ms of CPU over the gateway. ``aetcd``'s own ``Client`` is not used:
it dials one ``host:port`` (no failover), opens insecure channels only and has no range limit;
its stubs expose all of etcd's API (range limit and count, nested transactions, lease keep-alive,
watch from a revision) and grpc gives TLS with client certificates.

Failover: requests go to one member; when it cannot be reached the next is tried, until
``retry_for`` seconds passed. Reads, puts, deletes and lease calls are retried on any
"unavailable" answer (member down, no leader, leader changed, timed out); a transaction
(compare-and-set) is retried only when it cannot have reached the cluster (no connection, or no
leader). Otherwise its outcome is unknown and :class:`StoreUnavailableError` with
``ambiguous=True`` is raised: read back before retrying. ``serializable=True`` reads from the
member itself without a leader round trip (may be stale; used to check what one member has).
"""
from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit

import grpc
from aetcd import rpc

from hvbase.aio import wait_for
from ..errors import (
    CompactedError, ControlError, ControlInputError, LeaseExpiredError, StoreError, StoreUnavailableError,
)
from .base import (
    Cmp, Compare, Delete, EventKind, Get, KeyValue, Lease, Op, OpResult, Page, Put, Store, Target, Txn,
    TxnResult, Watch, WatchEvent, check_key, check_limit, check_prefix, check_ttl, check_txn, check_value,
    prefix_end,
)

log = logging.getLogger("hvsim.control.store.etcd")
T = TypeVar("T")

_LEASE_GONE = "requested lease not found"
_SAFE = ("no leader", "failed to connect", "connection refused", "connections to all backends failing",
         "name resolution", "dns resolution")
_TARGET = {Target.VALUE: (rpc.Compare.VALUE, "value"), Target.VERSION: (rpc.Compare.VERSION, "version"),
           Target.CREATE: (rpc.Compare.CREATE, "create_revision"), Target.MOD: (rpc.Compare.MOD, "mod_revision"),
           Target.LEASE: (rpc.Compare.LEASE, "lease")}
_RESULT = {Cmp.EQ: rpc.Compare.EQUAL, Cmp.NE: rpc.Compare.NOT_EQUAL, Cmp.LT: rpc.Compare.LESS,
           Cmp.GT: rpc.Compare.GREATER}
_RETRY_CODES = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.RESOURCE_EXHAUSTED)


@dataclass(frozen=True)
class TLSFiles:
    """PEM files for a TLS client: the CA to trust, and our certificate and key."""
    ca: Path
    cert: Path
    key: Path

    def credentials(self) -> grpc.ChannelCredentials:
        return grpc.ssl_channel_credentials(root_certificates=self.ca.read_bytes(),
                                            private_key=self.key.read_bytes(),
                                            certificate_chain=self.cert.read_bytes())


def check_endpoint(ep: object, tls: bool) -> str:
    """``http(s)://HOST:PORT`` -> the gRPC target ``HOST:PORT``."""
    if not isinstance(ep, str):
        raise ControlInputError("endpoints", f"{ep!r} is not a string")
    u = urlsplit(ep)
    try:
        port = u.port
    except ValueError:
        port = None
    if u.scheme not in ("http", "https") or not u.hostname or port is None or u.path not in ("", "/"):
        raise ControlInputError("endpoints", f"{ep!r} must be http(s)://HOST:PORT")
    if (u.scheme == "https") != tls:
        raise ControlInputError("endpoints", f"{ep!r}: https endpoints need tls files, http ones none")
    host = f"[{u.hostname}]" if ":" in u.hostname else u.hostname
    return f"{host}:{port}"


def _kv(m: Any) -> KeyValue:
    return KeyValue(m.key.decode(), bytes(m.value), m.create_revision, m.mod_revision, m.version, m.lease)


def _details(e: grpc.aio.AioRpcError) -> str:
    return (e.details() or "").strip()


class EtcdStore(Store):
    """etcd v3 over gRPC (see the module docstring)."""

    backend = "etcd"

    def __init__(self, endpoints: Sequence[str], *, tls: TLSFiles | None = None, timeout: float = 5.0,
                 retry_for: float = 15.0, serializable: bool = False) -> None:
        super().__init__()
        if isinstance(endpoints, str) or not endpoints:
            raise ControlInputError("endpoints", "give a non-empty list of http(s)://HOST:PORT")
        self.endpoints = list(endpoints)
        self.targets = [check_endpoint(e, tls is not None) for e in endpoints]
        self.tls = tls
        self.timeout = timeout
        self.retry_for = retry_for
        self.serializable = serializable
        self._current = 0
        self._channels: dict[int, grpc.aio.Channel] = {}
        self._creds: grpc.ChannelCredentials | None = None

    async def _open(self) -> None:
        if self.tls is not None and self._creds is None:
            try:
                self._creds = self.tls.credentials()
            except OSError as e:
                raise ControlInputError("tls", f"cannot read the TLS files: {e}") from e

    async def _close(self) -> None:
        channels, self._channels = self._channels, {}
        for ch in channels.values():
            await ch.close()

    @property
    def endpoint(self) -> str:
        return self.endpoints[self._current]

    def _channel(self, i: int) -> grpc.aio.Channel:
        ch = self._channels.get(i)
        if ch is None:
            opts = [("grpc.max_receive_message_length", 16 << 20), ("grpc.enable_retries", 0)]
            if self._creds is not None:
                ch = grpc.aio.secure_channel(self.targets[i], self._creds, options=opts)
            else:
                ch = grpc.aio.insecure_channel(self.targets[i], options=opts)
            self._channels[i] = ch
        return ch

    def member_channel(self) -> tuple[int, grpc.aio.Channel]:
        """The member in use (its index) and its channel (for this module's watch streams)."""
        return self._current, self._channel(self._current)

    def member_failed(self, i: int) -> None:
        """Member ``i`` failed: move on to the next one (unless that happened already)."""
        self._failover(i)

    def _failover(self, i: int) -> None:
        if self._current == i and len(self.targets) > 1:
            self._current = (i + 1) % len(self.targets)
            self.stats.failovers += 1
            log.info("etcd: %s failed, now using %s", self.endpoints[i], self.endpoint)

    async def _rpc(self, name: str, call: Callable[[grpc.aio.Channel], Awaitable[T]], *, idempotent: bool) -> T:
        if not self.opened:
            raise StoreError("etcd store is not open")
        deadline = time.monotonic() + self.retry_for
        delay = 0.05
        self.stats.requests += 1
        self.stats.by_op[name] = self.stats.by_op.get(name, 0) + 1
        while True:
            i = self._current
            try:
                return await call(self._channel(i))
            except grpc.aio.AioRpcError as e:
                msg = _details(e)
                if e.code() not in _RETRY_CODES:
                    raise _mapped(e, name) from e
                safe = any(s in msg.lower() for s in _SAFE)
                if not idempotent and not safe:
                    self._failover(i)            # the next call goes to another member
                    raise StoreUnavailableError(f"etcd {self.endpoints[i]} {name}: {msg}; the write's outcome "
                                                "is unknown", ambiguous=True) from e
                why = e
            self._failover(i)
            if time.monotonic() + delay > deadline:
                raise StoreUnavailableError(f"etcd: no member answered {name} within {self.retry_for} s "
                                            f"(last: {self.endpoints[i]}: {_details(why)})") from why
            self.stats.retries += 1
            await asyncio.sleep(delay)
            delay = min(delay * 2, 0.5)

    # -- key-value ----------------------------------------------------------------------------
    async def get(self, key: str) -> KeyValue | None:
        check_key(key)
        req = rpc.RangeRequest(key=key.encode(), serializable=self.serializable)
        resp = await self._rpc("range", lambda ch: rpc.KVStub(ch).Range(req, timeout=self.timeout), idempotent=True)
        return _kv(resp.kvs[0]) if resp.kvs else None

    async def put(self, key: str, value: bytes, *, lease: Lease | None = None) -> int:
        check_key(key)
        req = rpc.PutRequest(key=key.encode(), value=check_value(value), lease=lease.id if lease else 0)
        try:
            resp = await self._rpc("put", lambda ch: rpc.KVStub(ch).Put(req, timeout=self.timeout), idempotent=True)
        except _LeaseGone as e:
            raise LeaseExpiredError(lease.id if lease else 0) from e
        return int(resp.header.revision)

    async def delete(self, key: str) -> bool:
        check_key(key)
        req = rpc.DeleteRangeRequest(key=key.encode())
        resp = await self._rpc("delete", lambda ch: rpc.KVStub(ch).DeleteRange(req, timeout=self.timeout),
                               idempotent=True)
        return int(resp.deleted) > 0

    async def list(self, prefix: str, *, limit: int = 100, after: str | None = None) -> Page:
        check_prefix(prefix)
        check_limit(limit)
        start = prefix
        if after is not None:
            check_key(after, "after")
            if not after.startswith(prefix):
                raise ControlInputError("after", f"{after!r} is not under prefix {prefix!r}")
            start = after + "\x00"
        req = rpc.RangeRequest(key=start.encode(), range_end=prefix_end(prefix).encode(), limit=limit,
                               serializable=self.serializable)
        resp = await self._rpc("range", lambda ch: rpc.KVStub(ch).Range(req, timeout=self.timeout), idempotent=True)
        items = tuple(_kv(m) for m in resp.kvs)
        return Page(items, items[-1].key if resp.more and items else None, int(resp.header.revision), int(resp.count))

    async def count(self, prefix: str) -> int:
        check_prefix(prefix)
        req = rpc.RangeRequest(key=prefix.encode(), range_end=prefix_end(prefix).encode(), count_only=True,
                               serializable=self.serializable)
        resp = await self._rpc("range", lambda ch: rpc.KVStub(ch).Range(req, timeout=self.timeout), idempotent=True)
        return int(resp.count)

    async def revision(self) -> int:
        req = rpc.RangeRequest(key=b"/_revision", count_only=True, serializable=self.serializable)
        resp = await self._rpc("range", lambda ch: rpc.KVStub(ch).Range(req, timeout=self.timeout), idempotent=True)
        return int(resp.header.revision)

    async def txn(self, compares: Sequence[Compare], success: Sequence[Op] = (),
                  failure: Sequence[Op] = ()) -> TxnResult:
        t = check_txn(compares, success, failure)
        req = _txn_msg(t)
        try:
            resp = await self._rpc("txn", lambda ch: rpc.KVStub(ch).Txn(req, timeout=self.timeout), idempotent=False)
        except _LeaseGone as e:
            leases = [op.lease for op in _puts(t) if op.lease]
            raise LeaseExpiredError(leases[0] if leases else 0) from e
        return _txn_result(t, resp, int(resp.header.revision))

    def watch(self, prefix: str, *, start_revision: int | None = None) -> Watch:
        check_prefix(prefix)
        if start_revision is not None and (not isinstance(start_revision, int) or start_revision < 1):
            raise ControlInputError("start_revision", f"must be a positive integer, got {start_revision!r}")
        return _EtcdWatch(self, prefix, start_revision)

    # -- leases -------------------------------------------------------------------------------
    async def grant(self, ttl: float) -> Lease:
        req = rpc.LeaseGrantRequest(TTL=check_ttl(ttl))
        resp = await self._rpc("lease-grant", lambda ch: rpc.LeaseStub(ch).LeaseGrant(req, timeout=self.timeout),
                               idempotent=True)
        if resp.error:
            raise StoreError(f"etcd refused the lease: {resp.error}")
        return Lease(int(resp.ID), int(resp.TTL))

    async def keep_alive(self, lease: Lease) -> int:
        async def once(ch: grpc.aio.Channel) -> Any:
            call = rpc.LeaseStub(ch).LeaseKeepAlive(timeout=self.timeout)
            try:
                await call.write(rpc.LeaseKeepAliveRequest(ID=lease.id))
                return await call.read()
            finally:
                call.cancel()
        resp = await self._rpc("lease-keepalive", once, idempotent=True)
        if resp is grpc.aio.EOF or int(resp.TTL) <= 0:
            raise LeaseExpiredError(lease.id)
        return int(resp.TTL)

    async def revoke(self, lease: Lease) -> None:
        req = rpc.LeaseRevokeRequest(ID=lease.id)
        try:
            await self._rpc("lease-revoke", lambda ch: rpc.LeaseStub(ch).LeaseRevoke(req, timeout=self.timeout),
                            idempotent=True)
        except _LeaseGone:
            pass

    async def lease_ttl(self, lease: Lease) -> int | None:
        req = rpc.LeaseTimeToLiveRequest(ID=lease.id)
        resp = await self._rpc("lease-ttl", lambda ch: rpc.LeaseStub(ch).LeaseTimeToLive(req, timeout=self.timeout),
                               idempotent=True)
        return None if int(resp.TTL) < 0 else int(resp.TTL)


class _LeaseGone(StoreError):
    pass


def _mapped(e: grpc.aio.AioRpcError, name: str) -> ControlError:
    msg = _details(e)
    if _LEASE_GONE in msg:
        return _LeaseGone(msg)
    if e.code() is grpc.StatusCode.INVALID_ARGUMENT:
        return ControlInputError(name, f"etcd refused it: {msg}")
    if e.code() is grpc.StatusCode.UNAUTHENTICATED or e.code() is grpc.StatusCode.PERMISSION_DENIED:
        return StoreError(f"etcd {name}: not allowed: {msg}")
    return StoreError(f"etcd {name}: {e.code().name}: {msg}")


def _puts(t: Txn) -> list[Put]:
    out: list[Put] = []
    for op in (*t.success, *t.failure):
        if isinstance(op, Put):
            out.append(op)
        elif isinstance(op, Txn):
            out.extend(_puts(op))
    return out


def _op_msg(op: Op) -> Any:
    if isinstance(op, Put):
        return rpc.RequestOp(request_put=rpc.PutRequest(key=op.key.encode(), value=op.value, lease=op.lease))
    if isinstance(op, Delete):
        return rpc.RequestOp(request_delete_range=rpc.DeleteRangeRequest(key=op.key.encode()))
    if isinstance(op, Get):
        return rpc.RequestOp(request_range=rpc.RangeRequest(key=op.key.encode()))
    return rpc.RequestOp(request_txn=_txn_msg(op))


def _txn_msg(t: Txn) -> Any:
    compares = []
    for c in t.compares:
        target, field = _TARGET[c.target]
        compares.append(rpc.Compare(key=c.key.encode(), target=target, result=_RESULT[c.op], **{field: c.value}))
    return rpc.TxnRequest(compare=compares, success=[_op_msg(o) for o in t.success],
                          failure=[_op_msg(o) for o in t.failure])


def _txn_result(t: Txn, resp: Any, revision: int) -> TxnResult:
    ok = bool(resp.succeeded)
    ops = t.success if ok else t.failure
    if len(resp.responses) != len(ops):
        raise StoreError(f"etcd answered {len(resp.responses)} results for {len(ops)} ops")
    results: list[OpResult] = []
    for op, r in zip(ops, resp.responses, strict=True):
        if isinstance(op, Get):
            kvs = r.response_range.kvs
            results.append(_kv(kvs[0]) if kvs else None)
        elif isinstance(op, Put):
            results.append(None)
        elif isinstance(op, Delete):
            results.append(int(r.response_delete_range.deleted))
        else:
            results.append(_txn_result(op, r.response_txn, revision))
    return TxnResult(ok, revision, tuple(results))


class _EtcdWatch(Watch):
    """A watch stream on one member; re-established on another member (from the next revision)
    when the stream breaks, so no event is missed or repeated."""

    def __init__(self, store: EtcdStore, prefix: str, start_revision: int | None) -> None:
        self.store = store
        self.prefix = prefix
        self.next_rev = start_revision
        self._queue: asyncio.Queue[WatchEvent | BaseException] = asyncio.Queue()
        self._task: asyncio.Task[None] | None = None
        self._created: asyncio.Future[None] | None = None

    async def start(self) -> None:
        if not self.store.opened:
            raise StoreError("etcd store is not open")
        self._created = asyncio.get_running_loop().create_future()
        self._task = asyncio.create_task(self._run(), name=f"etcd-watch-{self.prefix}")
        try:
            await wait_for(asyncio.shield(self._created), self.store.retry_for + self.store.timeout)
        except BaseException:
            await self.stop()
            raise

    async def stop(self) -> None:
        if self._task is not None:
            task, self._task = self._task, None
            task.cancel()
            try:
                await task
            except asyncio.CancelledError:
                current = asyncio.current_task()
                if current is not None and current.cancelling():
                    raise

    async def next(self, timeout: float | None = None) -> WatchEvent:
        if self._task is None and self._queue.empty():
            raise StoreError("watch is not started (use it as `async with store.watch(...)`)")
        item = await wait_for(self._queue.get(), timeout)
        if isinstance(item, BaseException):
            raise item
        return item

    def _signal(self, exc: BaseException | None = None) -> None:
        if self._created is not None and not self._created.done():
            if exc is None:
                self._created.set_result(None)
            else:
                self._created.set_exception(exc)
        elif exc is not None:
            self._queue.put_nowait(exc)

    async def _run(self) -> None:
        deadline = time.monotonic() + self.store.retry_for
        while True:
            i, channel = self.store.member_channel()
            call = rpc.WatchStub(channel).Watch()
            try:
                await call.write(rpc.WatchRequest(create_request=rpc.WatchCreateRequest(
                    key=self.prefix.encode(), range_end=prefix_end(self.prefix).encode(),
                    start_revision=self.next_rev or 0)))
                async for resp in call:
                    if resp.compact_revision > 0:
                        raise CompactedError(self.next_rev or 0, int(resp.compact_revision))
                    if resp.created:
                        if self.next_rev is None:
                            self.next_rev = int(resp.header.revision) + 1
                        self._signal()
                        deadline = time.monotonic() + self.store.retry_for
                    for ev in resp.events:
                        kv = _kv(ev.kv)
                        kind = EventKind.DELETE if ev.type == rpc.Event.DELETE else EventKind.PUT
                        self._queue.put_nowait(WatchEvent(kind, kv.key, kv.value, kv.mod_revision))
                        self.next_rev = kv.mod_revision + 1
                    if resp.canceled:
                        raise StoreUnavailableError(f"etcd canceled the watch: {resp.cancel_reason}")
                why: BaseException = StoreUnavailableError("watch stream ended")
            except CompactedError as e:
                self._signal(e)
                return
            except (grpc.aio.AioRpcError, StoreUnavailableError) as e:
                why = e
            finally:
                call.cancel()
            self.store.member_failed(i)
            if time.monotonic() > deadline:
                self._signal(StoreUnavailableError(f"etcd: watch on {self.prefix!r} lost: {why!r}"))
                return
            await asyncio.sleep(0.1)
