"""The embedded store: one SQLite file (WAL, ``synchronous=FULL``), sqlite3 run off the event
loop on one dedicated thread, every operation one SQLite transaction.

- Revisions: a counter in ``meta``; each write transaction takes the next one (etcd's rule).
- Writes run under ``BEGIN IMMEDIATE`` and return only after ``COMMIT`` (with FULL, the WAL is
  fsynced at every commit), so an acknowledged write survives a crash of the process or machine.
  Writes that queue up while a commit is under way are group-committed: one SQLite transaction,
  each write in its own savepoint with its own revision (a failing one is rolled back alone),
  all acknowledged after the one fsync.
- Watches: every change is also appended to an ``events`` table (the last ``keep_events``
  revisions are kept; older ones are compacted away, as in etcd), so a watch can start at a past
  revision and a watcher in another process sees changes too (it polls; in this process it is
  woken at once).
- Leases are rows with an expiry time (wall clock): a key with an expired lease is invisible to
  reads at once and deleted (with a delete event) by the next write or by a reaper task.
  **Single-site only**: expiry trusts this machine's clock, and fencing holds between processes
  that share this file, not across machines. Use etcd for anything that spans sites.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import os
import secrets
import sqlite3
import time
from collections import deque
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

from hvbase.aio import wait_for
from ..errors import CompactedError, ControlInputError, LeaseExpiredError, StoreError, StoreUnavailableError
from .base import (
    Compare, Delete, EventKind, Get, KeyValue, Lease, Op, OpResult, Page, Put, Store, Txn, TxnResult,
    Watch, WatchEvent, check_key, check_limit, check_prefix, check_ttl, check_txn, check_value, prefix_end,
)

log = logging.getLogger("hvsim.control.store.sqlite")
T = TypeVar("T")
_Rows = list[Any]

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta(k TEXT PRIMARY KEY, v INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS kv(key TEXT PRIMARY KEY, value BLOB NOT NULL, create_rev INTEGER NOT NULL,
    mod_rev INTEGER NOT NULL, version INTEGER NOT NULL, lease INTEGER NOT NULL DEFAULT 0) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS kv_lease ON kv(lease) WHERE lease != 0;
CREATE TABLE IF NOT EXISTS leases(id INTEGER PRIMARY KEY, ttl INTEGER NOT NULL, expires REAL NOT NULL);
CREATE INDEX IF NOT EXISTS leases_expires ON leases(expires);
CREATE TABLE IF NOT EXISTS events(rev INTEGER NOT NULL, seq INTEGER NOT NULL, kind INTEGER NOT NULL,
    key TEXT NOT NULL, value BLOB NOT NULL, PRIMARY KEY(rev, seq)) WITHOUT ROWID;
INSERT OR IGNORE INTO meta(k, v) VALUES ('revision', 0), ('compacted', 0);
"""
_VISIBLE = "(lease = 0 OR lease IN (SELECT id FROM leases WHERE expires > ?))"
_COLS = "key, value, create_rev, mod_rev, version, lease"


def _kv(row: tuple[Any, ...]) -> KeyValue:
    return KeyValue(row[0], bytes(row[1]), row[2], row[3], row[4], row[5])


class _Writer:
    """The state of one write transaction: revision taken lazily on the first change."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self.conn = conn
        self.base = conn.execute("SELECT v FROM meta WHERE k='revision'").fetchone()[0]
        self.rev = self.base
        self.seq = 0

    def _bump(self) -> int:
        if self.rev == self.base:
            self.rev = self.base + 1
        return self.rev

    def get(self, key: str) -> KeyValue | None:
        row = self.conn.execute(f"SELECT {_COLS} FROM kv WHERE key = ?", (key,)).fetchone()
        return _kv(row) if row else None

    def put(self, key: str, value: bytes, lease: int) -> None:
        if lease and self.conn.execute("SELECT 1 FROM leases WHERE id = ?", (lease,)).fetchone() is None:
            raise LeaseExpiredError(lease)
        rev = self._bump()
        self.conn.execute(
            "INSERT INTO kv(key, value, create_rev, mod_rev, version, lease) VALUES (?, ?, ?, ?, 1, ?) "
            "ON CONFLICT(key) DO UPDATE SET value = excluded.value, mod_rev = excluded.mod_rev, "
            "version = version + 1, lease = excluded.lease", (key, value, rev, rev, lease))
        self._event(EventKind.PUT, key, value)

    def delete(self, key: str) -> int:
        if self.conn.execute("DELETE FROM kv WHERE key = ?", (key,)).rowcount == 0:
            return 0
        self._bump()
        self._event(EventKind.DELETE, key, b"")
        return 1

    def _event(self, kind: EventKind, key: str, value: bytes) -> None:
        self.seq += 1
        self.conn.execute("INSERT INTO events(rev, seq, kind, key, value) VALUES (?, ?, ?, ?, ?)",
                          (self.rev, self.seq, 0 if kind is EventKind.PUT else 1, key, value))

    def apply(self, txn: Txn) -> TxnResult:
        ok = all(c.holds(self.get(c.key)) for c in txn.compares)
        results: list[OpResult] = []
        for op in txn.success if ok else txn.failure:
            if isinstance(op, Get):
                results.append(self.get(op.key))
            elif isinstance(op, Put):
                self.put(op.key, op.value, op.lease)
                results.append(None)
            elif isinstance(op, Delete):
                results.append(self.delete(op.key))
            else:
                results.append(self.apply(op))
        return TxnResult(ok, self.rev, tuple(results))

    def finish(self) -> int:
        if self.rev != self.base:
            self.conn.execute("UPDATE meta SET v = ? WHERE k = 'revision'", (self.rev,))
        return self.rev


class SQLiteStore(Store):
    """The embedded store in one SQLite file (see the module docstring)."""

    backend = "sqlite"

    def __init__(self, path: str | os.PathLike[str], *, keep_events: int = 20000,
                 reap_interval: float = 0.5, poll_interval: float = 0.2) -> None:
        super().__init__()
        self.path = Path(path)
        self.keep_events = keep_events
        self.reap_interval = reap_interval
        self.poll_interval = poll_interval
        self._pool: concurrent.futures.ThreadPoolExecutor | None = None
        self._conn: sqlite3.Connection | None = None
        self._changed = asyncio.Event()
        self._reaper: asyncio.Task[None] | None = None
        self._writes = 0
        self.max_batch = 256
        self._queue: list[tuple[Callable[[_Writer], Any], asyncio.Future[Any]]] = []
        self._flusher: asyncio.Task[None] | None = None

    # -- plumbing -----------------------------------------------------------------------------
    async def _open(self) -> None:
        parent = self.path.parent
        if not parent.is_dir():
            raise ControlInputError("path", f"directory {parent} does not exist")
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="hvsim-sqlite")
        try:
            await self._call(self._connect)
        except BaseException:
            self._pool.shutdown(wait=True)
            self._pool = None
            raise
        self._reaper = asyncio.create_task(self._reap_loop(), name=f"sqlite-reaper-{self.path.name}")

    def _connect(self) -> None:
        new = not self.path.exists()
        conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False, timeout=10)
        if new:
            os.chmod(self.path, 0o600)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=FULL")
        conn.execute("PRAGMA busy_timeout=10000")
        conn.executescript(SCHEMA)
        self._conn = conn

    async def _close(self) -> None:
        if self._reaper is not None:
            self._reaper.cancel()
            try:
                await self._reaper
            except asyncio.CancelledError:
                current = asyncio.current_task()
                if current is not None and current.cancelling():
                    raise
            self._reaper = None
        if self._flusher is not None and not self._flusher.done():
            await asyncio.wait([self._flusher])       # acknowledge what is queued before closing
        if self._pool is not None:
            pool, self._pool = self._pool, None
            if self._conn is not None:
                conn, self._conn = self._conn, None
                await asyncio.get_running_loop().run_in_executor(pool, conn.close)
            pool.shutdown(wait=True)

    async def _call(self, fn: Callable[..., T], *args: Any) -> T:
        if self._pool is None:
            raise StoreError(f"store {self.path} is not open")
        self.stats.requests += 1
        try:
            return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)
        except sqlite3.OperationalError as e:
            raise StoreUnavailableError(f"sqlite {self.path}: {e}") from e
        except sqlite3.DatabaseError as e:
            raise StoreError(f"sqlite {self.path}: {e}") from e

    @property
    def conn(self) -> sqlite3.Connection:
        if self._conn is None:
            raise StoreError(f"store {self.path} is not open")
        return self._conn

    def _write_batch(self, bodies: Sequence[Callable[[_Writer], Any]]) -> list[tuple[bool, Any]]:
        """Group commit: the write transactions that queued up meanwhile run in one SQLite
        transaction, each inside its own savepoint (one that raises is rolled back alone) and
        with its own revision, and are acknowledged together after the one COMMIT (fsync)."""
        conn = self.conn
        out: list[tuple[bool, Any]] = []
        conn.execute("BEGIN IMMEDIATE")
        try:
            self._expire(conn, time.time())
            for body in bodies:
                conn.execute("SAVEPOINT job")
                try:
                    w = _Writer(conn)
                    res = body(w)
                    w.finish()
                    conn.execute("RELEASE job")
                    out.append((True, res))
                except Exception as e:  # this job fails alone; the batch goes on
                    conn.execute("ROLLBACK TO job")
                    conn.execute("RELEASE job")
                    out.append((False, e))
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        before = self._writes
        self._writes += len(bodies)
        if self._writes // 1000 != before // 1000:
            self._compact(conn)
        return out

    async def _submit(self, body: Callable[[_Writer], T]) -> T:
        """Queue a write transaction for the next group commit and wait for its outcome."""
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._queue.append((body, fut))
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.create_task(self._flush(), name=f"sqlite-commit-{self.path.name}")
        result: T = await asyncio.shield(fut)
        return result

    async def _flush(self) -> None:
        while self._queue:
            batch, self._queue = self._queue[:self.max_batch], self._queue[self.max_batch:]
            try:
                outcomes = await self._call(self._write_batch, [b for b, _ in batch])
            except BaseException as e:
                for _, fut in batch:
                    if not fut.done():
                        fut.set_exception(e if isinstance(e, Exception) else StoreError(f"commit interrupted: {e!r}"))
                if not isinstance(e, Exception):
                    raise
                continue
            self.stats.by_op["batches"] = self.stats.by_op.get("batches", 0) + 1
            for (_, fut), (ok, value) in zip(batch, outcomes, strict=True):
                if fut.done():
                    continue
                if ok:
                    fut.set_result(value)
                elif isinstance(value, sqlite3.DatabaseError):
                    fut.set_exception(StoreError(f"sqlite {self.path}: {value}"))
                else:
                    fut.set_exception(value)
            self._notify()

    def _expire(self, conn: sqlite3.Connection, now: float) -> None:
        dead = [r[0] for r in conn.execute("SELECT id FROM leases WHERE expires <= ?", (now,))]
        if dead:
            self._drop_leases(conn, dead)

    def _drop_leases(self, conn: sqlite3.Connection, ids: Sequence[int]) -> None:
        w = _Writer(conn)
        for lid in ids:
            for (key,) in conn.execute("SELECT key FROM kv WHERE lease = ? ORDER BY key", (lid,)).fetchall():
                w.delete(key)
            conn.execute("DELETE FROM leases WHERE id = ?", (lid,))
        w.finish()

    def _compact(self, conn: sqlite3.Connection) -> None:
        rev = conn.execute("SELECT v FROM meta WHERE k='revision'").fetchone()[0]
        upto = rev - self.keep_events
        if upto > 0:
            conn.execute("BEGIN IMMEDIATE")
            conn.execute("DELETE FROM events WHERE rev <= ?", (upto,))
            conn.execute("UPDATE meta SET v = max(v, ?) WHERE k = 'compacted'", (upto,))
            conn.execute("COMMIT")

    def _notify(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    async def _reap_loop(self) -> None:
        while True:
            await asyncio.sleep(self.reap_interval)
            try:
                if await self._call(self._due):
                    await self._submit(lambda w: None)   # every write expires what is due first
            except StoreError as e:
                log.warning("lease reaper: %s", e)

    def _due(self) -> bool:
        row = self.conn.execute("SELECT min(expires) FROM leases").fetchone()
        return row[0] is not None and row[0] <= time.time()

    # -- key-value ----------------------------------------------------------------------------
    async def get(self, key: str) -> KeyValue | None:
        check_key(key)
        row = await self._call(lambda: self.conn.execute(
            f"SELECT {_COLS} FROM kv WHERE key = ? AND {_VISIBLE}", (key, time.time())).fetchone())
        return _kv(row) if row else None

    async def put(self, key: str, value: bytes, *, lease: Lease | None = None) -> int:
        check_key(key)
        value = check_value(value)
        res = await self.txn((), [Put(key, value, lease.id if lease else 0)])
        return res.revision

    async def delete(self, key: str) -> bool:
        check_key(key)
        res = await self.txn((), [Delete(key)])
        return res.results[0] == 1

    async def list(self, prefix: str, *, limit: int = 100, after: str | None = None) -> Page:
        check_prefix(prefix)
        check_limit(limit)
        start = prefix
        if after is not None:
            check_key(after, "after")
            if not after.startswith(prefix):
                raise ControlInputError("after", f"{after!r} is not under prefix {prefix!r}")
            start = after + "\x00"
        end = prefix_end(prefix)

        def q() -> tuple[_Rows, int, int]:
            conn = self.conn
            now = time.time()
            conn.execute("BEGIN")
            try:
                rows = conn.execute(
                    f"SELECT {_COLS} FROM kv WHERE key >= ? AND key < ? AND {_VISIBLE} ORDER BY key LIMIT ?",
                    (start, end, now, limit + 1)).fetchall()
                remaining = len(rows) if len(rows) <= limit else conn.execute(
                    f"SELECT count(*) FROM kv WHERE key >= ? AND key < ? AND {_VISIBLE}",
                    (start, end, now)).fetchone()[0]
                rev = conn.execute("SELECT v FROM meta WHERE k='revision'").fetchone()[0]
            finally:
                conn.execute("COMMIT")
            return rows, rev, remaining
        rows, rev, remaining = await self._call(q)
        more = len(rows) > limit
        items = tuple(_kv(r) for r in rows[:limit])
        return Page(items, items[-1].key if more else None, rev, int(remaining))

    async def count(self, prefix: str) -> int:
        check_prefix(prefix)
        row = await self._call(lambda: self.conn.execute(
            f"SELECT count(*) FROM kv WHERE key >= ? AND key < ? AND {_VISIBLE}",
            (prefix, prefix_end(prefix), time.time())).fetchone())
        return int(row[0])

    async def revision(self) -> int:
        row = await self._call(lambda: self.conn.execute("SELECT v FROM meta WHERE k='revision'").fetchone())
        return int(row[0])

    async def txn(self, compares: Sequence[Compare], success: Sequence[Op] = (),
                  failure: Sequence[Op] = ()) -> TxnResult:
        t = check_txn(compares, success, failure)
        return await self._submit(lambda w: w.apply(t))

    def watch(self, prefix: str, *, start_revision: int | None = None) -> Watch:
        check_prefix(prefix)
        if start_revision is not None and (not isinstance(start_revision, int) or start_revision < 1):
            raise ControlInputError("start_revision", f"must be a positive integer, got {start_revision!r}")
        return _SQLiteWatch(self, prefix, start_revision)

    # -- leases -------------------------------------------------------------------------------
    async def grant(self, ttl: float) -> Lease:
        sec = check_ttl(ttl)
        lid = secrets.randbits(62) + 1

        def body(w: _Writer) -> None:
            w.conn.execute("INSERT INTO leases(id, ttl, expires) VALUES (?, ?, ?)", (lid, sec, time.time() + sec))
        await self._submit(body)
        return Lease(lid, sec)

    async def keep_alive(self, lease: Lease) -> int:
        def body(w: _Writer) -> bool:
            now = time.time()
            return w.conn.execute("UPDATE leases SET expires = ? + ttl WHERE id = ? AND expires > ?",
                                  (now, lease.id, now)).rowcount == 1
        if not await self._submit(body):
            raise LeaseExpiredError(lease.id)
        return lease.ttl

    async def revoke(self, lease: Lease) -> None:
        await self._submit(lambda w: self._drop_leases(w.conn, [lease.id]))

    async def lease_ttl(self, lease: Lease) -> int | None:
        row = await self._call(lambda: self.conn.execute(
            "SELECT expires FROM leases WHERE id = ?", (lease.id,)).fetchone())
        if row is None:
            return None
        left = row[0] - time.time()
        return None if left <= 0 else max(0, int(left))

    # -- watch support ------------------------------------------------------------------------
    @property
    def changed(self) -> asyncio.Event:
        """Set (and replaced) after every commit of this store object: wakes its watches."""
        return self._changed

    async def events_since(self, rev: int, prefix: str, limit: int) -> tuple[_Rows, int]:
        """Events of whole revisions >= ``rev`` under ``prefix`` and the compaction mark."""
        return await self._call(self._events_since, rev, prefix, limit)

    def _events_since(self, rev: int, prefix: str, limit: int) -> tuple[_Rows, int]:
        """Events of whole revisions >= ``rev`` under ``prefix`` (about ``limit`` rows), and the
        compaction mark."""
        conn = self.conn
        compacted = conn.execute("SELECT v FROM meta WHERE k='compacted'").fetchone()[0]
        sel = "SELECT rev, kind, key, value FROM events WHERE key >= ? AND key < ? AND "
        end = prefix_end(prefix)
        rows = conn.execute(sel + "rev >= ? ORDER BY rev, seq LIMIT ?", (prefix, end, rev, limit)).fetchall()
        if limit and len(rows) == limit:
            last = rows[-1][0]
            if rows[0][0] == last:      # one revision bigger than a batch: take all of it
                rows = conn.execute(sel + "rev = ? ORDER BY seq", (prefix, end, last)).fetchall()
            else:                       # never hand out part of a revision
                rows = [r for r in rows if r[0] != last]
        return rows, compacted


class _SQLiteWatch(Watch):
    def __init__(self, store: SQLiteStore, prefix: str, start_revision: int | None) -> None:
        self.store = store
        self.prefix = prefix
        self.start_revision = start_revision
        self.next_rev = 0
        self._buf: deque[WatchEvent] = deque()
        self._started = False

    async def start(self) -> None:
        if self.start_revision is None:
            self.next_rev = await self.store.revision() + 1
        else:
            self.next_rev = self.start_revision
            _, compacted = await self.store.events_since(self.next_rev, self.prefix, 0)
            if self.next_rev <= compacted:
                raise CompactedError(self.next_rev, compacted + 1)
        self._started = True

    async def stop(self) -> None:
        self._started = False

    async def next(self, timeout: float | None = None) -> WatchEvent:
        if not self._started:
            raise StoreError("watch is not started (use it as `async with store.watch(...)`)")
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self._buf:
            changed = self.store.changed
            rows, compacted = await self.store.events_since(self.next_rev, self.prefix, 500)
            if self.next_rev <= compacted:
                raise CompactedError(self.next_rev, compacted + 1)
            for rev, kind, key, value in rows:
                self._buf.append(WatchEvent(EventKind.PUT if kind == 0 else EventKind.DELETE, key, bytes(value), rev))
            if rows:
                self.next_rev = rows[-1][0] + 1
                break
            wait = self.store.poll_interval
            if deadline is not None:
                wait = min(wait, deadline - time.monotonic())
                if wait <= 0:
                    raise TimeoutError(f"no event under {self.prefix!r} within {timeout} s")
            try:
                await wait_for(changed.wait(), wait)
            except TimeoutError:
                pass
        return self._buf.popleft()
