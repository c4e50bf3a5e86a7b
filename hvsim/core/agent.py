"""Host side of the hvsim guest agent (virtio-serial port ``org.hvsim.agent``).

Protocol (version 2): see images/src/agent.c. Many commands may run concurrently; each has a
timeout, after which the host asks the agent to kill the command's process group and raises
AgentTimeoutError.

Two ways to run a command:

- :meth:`GuestAgent.exec` returns an :class:`ExecResult` with the whole output. The guest keeps at
  most :data:`MAX_OUTPUT` (8 MiB) of each of stdout and stderr; beyond that the output is dropped
  and the result says so (``truncated``, ``stdout_truncated``, ``stdout_bytes`` = what the command
  really wrote).
- :meth:`GuestAgent.exec_stream` streams the output as it comes, with no limit on its total size::

      async with agent.exec_stream("cat /dev/vda", timeout=120) as stream:
          async for chunk in stream:          # chunk.fd is 1 (stdout) or 2 (stderr)
              sink.write(chunk.data)
      print(stream.result.exit_code, stream.result.stdout_bytes)

  Flow control is by credit: the guest sends at most ``window`` bytes the host has not consumed, so
  the host never buffers more than that per stream, and a slow reader only slows its own command.

The guest is not trusted: every field and length it sends is validated, and what the host buffers
is bounded (:data:`MAX_OUTPUT` per stream of a buffered command, the window of a streamed one, one
:data:`MAX_CHUNK` of discarded data). A violation drops the channel with :class:`AgentProtocolError`.
"""
from __future__ import annotations

import asyncio
import itertools
import logging
import weakref
from collections import deque
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

from hvbase.aio import wait_for
from qmp_bridge.errors import QEMUExitedError, QMPTimeoutError

from .errors import AgentDisconnectedError, AgentError, AgentTimeoutError

log = logging.getLogger("hvsim.core.agent")

PROTOCOL_VERSION = 2
MAX_OUTPUT = 8 << 20            # what the guest keeps of each stream of a buffered command (agent.c MAX_OUT)
MAX_CHUNK = 65536               # longest DATA payload (agent.c MAX_CHUNK)
MAX_WINDOW = 64 << 20           # most a stream may have outstanding (agent.c MAX_WINDOW)
DEFAULT_WINDOW = 1 << 20        # what exec_stream lets the guest send ahead of the consumer
MAX_LINE = 4096                 # longest header line the host accepts
_DISCARD = 1 << 16


class AgentProtocolError(AgentDisconnectedError):
    """The guest broke the agent protocol (a malformed header, a length out of range, more data than
    granted); the channel is dropped and every command waiting on it fails with this error."""


@dataclass(frozen=True)
class ExecResult:
    command: str
    exit_code: int
    stdout: str
    stderr: str
    signal: int = 0
    timed_out: bool = False
    stdout_truncated: bool = False      # the guest kept only the first MAX_OUTPUT bytes of stdout
    stderr_truncated: bool = False
    stdout_bytes: int = 0               # bytes the command wrote to stdout (all of them, also when truncated)
    stderr_bytes: int = 0

    @property
    def ok(self) -> bool:
        return self.exit_code == 0

    @property
    def truncated(self) -> bool:
        """True if stdout or stderr was cut at :data:`MAX_OUTPUT` (use ``exec_stream`` for all of it)."""
        return self.stdout_truncated or self.stderr_truncated

    def check(self) -> ExecResult:
        if self.exit_code != 0:
            raise AgentError(f"guest command {self.command!r} exited {self.exit_code}: "
                             f"{self.stderr.strip()[-500:] or self.stdout.strip()[-500:]}")
        return self


@dataclass(frozen=True)
class Chunk:
    """A piece of a streamed command's output: ``fd`` 1 is stdout, 2 is stderr."""
    fd: int
    data: bytes


@dataclass(frozen=True)
class _Done:
    code: int
    sig: int
    timed_out: bool
    out: bytes
    err: bytes
    flags: int
    out_total: int
    err_total: int


def _ints(parts: list[str], what: str) -> list[int]:
    try:
        values = [int(p) for p in parts]
    except ValueError:
        raise AgentProtocolError(f"malformed {what} header from the guest agent: {' '.join(parts)[:200]!r}") from None
    if any(v < 0 for v in values):
        raise AgentProtocolError(f"negative field in {what} header from the guest agent: {values}")
    return values


def _in_range(name: str, value: int, hi: int) -> int:
    if value > hi:
        raise AgentProtocolError(f"guest agent sent {name} {value}, over the limit {hi}")
    return value


class _StreamState:
    """Host-side bookkeeping of one streamed command (owned by the agent's read loop)."""

    def __init__(self, window: int) -> None:
        self.window = window
        self.granted = window           # total bytes the guest may have sent so far
        self.received = [0, 0]          # stdout, stderr bytes received
        self.chunks: deque[Chunk] = deque()
        self.buffered = 0
        self.consumed_unacked = 0
        self.done: _Done | None = None
        self.error: BaseException | None = None
        self.changed = asyncio.Event()

    @property
    def outstanding(self) -> int:
        return self.granted - self.received[0] - self.received[1]


@dataclass(frozen=True)
class _StreamChannel:
    """What a stream needs from its agent (bound methods, so the stream touches no private state)."""
    vm_name: str
    start: Callable[[str, float | None, int], Awaitable[tuple[int, _StreamState]]]
    grant: Callable[[int, _StreamState], Awaitable[None]]
    wait: Callable[[Awaitable[Any], str, float | None], Awaitable[Any]]
    release: Callable[[int, bool], Awaitable[None]]     # forget the command; kill it unless it finished


async def collect_stream(stream: Any, command: str, limit: int | None = None) -> tuple[bytes, bytes]:
    """Read a streamed exec to its end (``async with`` + ``async for`` of :class:`Chunk`):
    (stdout, stderr); AgentError if more than ``limit`` bytes arrive. Shared by every exec stream."""
    out, err = bytearray(), bytearray()
    async with stream:
        async for chunk in stream:
            (out if chunk.fd == 1 else err).extend(chunk.data)
            if limit is not None and len(out) + len(err) > limit:
                raise AgentError(f"guest command {command!r} wrote more than {limit} bytes")
    return bytes(out), bytes(err)


class ExecStream:
    """A command whose output is streamed (see :meth:`GuestAgent.exec_stream`). Iterate it (``async
    for chunk in stream``) once; ``result`` holds the exit code and byte counts after the last chunk.
    Leaving ``async with`` (or closing, or abandoning the iteration) early kills the command."""

    def __init__(self, channel: _StreamChannel, command: str, timeout: float | None, window: int) -> None:
        self.channel = channel
        self.command = command
        self.timeout = timeout
        self.window = window
        self.result: ExecResult | None = None
        self._rid: int | None = None
        self._state: _StreamState | None = None
        # weak: the iterator's frame holds this stream, and a cycle would delay the kill of an abandoned
        # iteration until the cyclic GC runs; without one, asyncio closes it as soon as it is dropped
        self._iter: weakref.ref[AsyncGenerator[Chunk, None]] | None = None
        self._finished = False

    async def __aenter__(self) -> ExecStream:
        await self._start()
        return self

    async def __aexit__(self, et: type[BaseException] | None, e: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.aclose()

    def __aiter__(self) -> AsyncIterator[Chunk]:
        if self._iter is not None:
            raise AgentError(f"the output of {self.command!r} can be iterated only once")
        gen = self._chunks()
        self._iter = weakref.ref(gen)
        return gen

    async def _start(self) -> None:
        if self._rid is None:
            self._rid, self._state = await self.channel.start(self.command, self.timeout, self.window)

    async def _chunks(self) -> AsyncGenerator[Chunk, None]:
        await self._start()
        assert self._rid is not None and self._state is not None
        st, ch = self._state, self.channel
        loop = asyncio.get_running_loop()
        deadline = None if not self.timeout else loop.time() + self.timeout
        try:
            while True:
                if st.chunks:
                    chunk = st.chunks.popleft()
                    st.buffered -= len(chunk.data)
                    st.consumed_unacked += len(chunk.data)
                    if st.done is None and st.consumed_unacked >= max(1, st.window // 4):
                        await ch.grant(self._rid, st)
                    yield chunk
                    continue
                if st.error is not None:
                    raise st.error
                if st.done is not None:
                    d = st.done
                    self.result = ExecResult(self.command, d.code, "", "", d.sig, d.timed_out,
                                             stdout_bytes=d.out_total, stderr_bytes=d.err_total)
                    self._finished = True
                    return
                st.changed.clear()
                remaining = None if deadline is None else max(0.0, deadline - loop.time())
                try:
                    await ch.wait(st.changed.wait(), f"output of guest command {self.command!r}", remaining)
                except (AgentTimeoutError, QMPTimeoutError) as exc:
                    raise AgentTimeoutError(f"{ch.vm_name}: guest command {self.command!r} timed out after "
                                            f"{self.timeout}s") from exc
                except QEMUExitedError as exc:
                    raise AgentDisconnectedError(f"{ch.vm_name}: QEMU exited while running "
                                                 f"{self.command!r}") from exc
        finally:
            await self._release()

    async def _release(self) -> None:
        rid, self._rid = self._rid, None
        if rid is None:
            return
        st = self._state
        if st is not None and st.done is None and st.error is None:
            st.error = AgentError(f"{self.channel.vm_name}: streamed command {self.command!r} was closed")
            st.changed.set()
        await self.channel.release(rid, not self._finished)

    async def aclose(self) -> None:
        """Stop reading: kill the command if it has not finished (idempotent)."""
        gen = self._iter() if self._iter is not None else None
        if gen is not None:
            await gen.aclose()
        await self._release()

    async def collect(self, limit: int | None = None) -> tuple[bytes, bytes]:
        """Read everything (stdout, stderr); AgentError if more than ``limit`` bytes arrive."""
        return await collect_stream(self, self.command, limit)


class GuestAgent:
    def __init__(self, vm_name: str, socket_path: Path,
                 guard: Callable[[Awaitable[Any], str, float | None], Awaitable[Any]] | None = None) -> None:
        """``guard(awaitable, what, timeout)`` races waits against QEMU's death (see QMPSession.race)."""
        self.vm_name = vm_name
        self.socket_path = Path(socket_path)
        self._guard = guard
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._task: asyncio.Task[None] | None = None
        self._pending: dict[int, asyncio.Future[Any] | _StreamState] = {}
        self._ids = itertools.count(1)
        self._write_lock = asyncio.Lock()
        self.guest_version: int | None = None
        self.protocol_error: AgentProtocolError | None = None

    @property
    def connected(self) -> bool:
        return self._task is not None and not self._task.done()

    async def _wait(self, aw: Awaitable[Any], what: str, timeout: float | None) -> Any:
        if self._guard is not None:
            return await self._guard(aw, what, timeout)
        try:
            return await wait_for(aw, timeout)
        except TimeoutError as exc:
            raise AgentTimeoutError(f"{self.vm_name}: timed out after {timeout}s waiting for {what}") from exc

    async def connect(self) -> None:
        if self.connected:
            return
        self._reader, self._writer = await asyncio.open_unix_connection(str(self.socket_path), limit=4 * MAX_CHUNK)
        self._task = asyncio.create_task(self._read_loop(), name=f"agent-{self.vm_name}")

    # -- reading (the guest is untrusted: validate everything) -------------------------------------
    async def _read_loop(self) -> None:
        assert self._reader is not None
        err: BaseException = AgentDisconnectedError(f"{self.vm_name}: agent channel closed")
        try:
            while True:
                try:
                    line = await self._reader.readline()
                except ValueError as exc:    # a line over the reader's limit
                    raise AgentProtocolError(f"{self.vm_name}: over-long header line from the guest agent") from exc
                if not line:
                    break
                if len(line) > MAX_LINE:
                    raise AgentProtocolError(f"{self.vm_name}: {len(line)}-byte header line from the guest agent")
                await self._handle(line.decode(errors="replace").split())
        except AgentProtocolError as exc:
            log.error("%s: %s; dropping the agent channel", self.vm_name, exc)
            self.protocol_error = exc
            err = exc
            if self._writer is not None:
                self._writer.close()
        except (OSError, asyncio.IncompleteReadError) as exc:
            err = AgentDisconnectedError(f"{self.vm_name}: agent channel broke: {exc}")
        for entry in self._pending.values():
            if isinstance(entry, _StreamState):
                if entry.done is None and entry.error is None:
                    entry.error = err
                    entry.changed.set()
            elif not entry.done():
                entry.set_exception(err)
        self._pending.clear()

    async def _handle(self, parts: list[str]) -> None:
        assert self._reader is not None
        if not parts:
            return
        kind, fields = parts[0], parts[1:]
        if kind == "PONG" and len(fields) == 2:
            rid, ns = _ints(fields, "PONG")
            self._resolve(rid, ns)
        elif kind == "DATA" and len(fields) == 3:
            rid, fd, n = _ints(fields, "DATA")
            if fd not in (1, 2) or not 1 <= n <= MAX_CHUNK:
                raise AgentProtocolError(f"{self.vm_name}: guest agent sent DATA fd {fd} with {n} bytes "
                                         f"(fd must be 1 or 2, 1..{MAX_CHUNK} bytes)")
            entry = self._pending.get(rid)
            if isinstance(entry, asyncio.Future):
                raise AgentProtocolError(f"{self.vm_name}: guest agent sent DATA for buffered command {rid}")
            if entry is None or entry.error is not None:
                await self._discard(n)       # a stream we stopped reading (killed, timed out)
                return
            if n > entry.outstanding:
                raise AgentProtocolError(f"{self.vm_name}: guest agent sent {n} bytes for command {rid} with only "
                                         f"{entry.outstanding} granted")
            data = await self._reader.readexactly(n)
            entry.received[fd - 1] += n
            entry.chunks.append(Chunk(fd, data))
            entry.buffered += n
            entry.changed.set()
        elif kind == "DONE" and len(fields) == 9:
            rid, code, sig, tmo, olen, elen, flags, otot, etot = _ints(fields, "DONE")
            _in_range("exit code", code, 255)
            _in_range("signal", sig, 128)
            _in_range("timed-out flag", tmo, 1)
            _in_range("stdout length", olen, MAX_OUTPUT)
            _in_range("stderr length", elen, MAX_OUTPUT)
            _in_range("flags", flags, 3)
            if otot < olen or etot < elen:
                raise AgentProtocolError(f"{self.vm_name}: guest agent reports totals {otot}/{etot} below the "
                                         f"lengths {olen}/{elen} it sends")
            entry = self._pending.get(rid)
            if entry is None or (isinstance(entry, asyncio.Future) and entry.done()):
                await self._discard(olen + elen)
                return
            if isinstance(entry, _StreamState):
                if olen or elen:
                    raise AgentProtocolError(f"{self.vm_name}: DONE of streamed command {rid} carries output")
                if entry.error is None and [otot, etot] != entry.received:
                    entry.error = AgentError(f"{self.vm_name}: streamed command {rid}: the guest sent {otot}+{etot} "
                                             f"bytes but {entry.received[0]}+{entry.received[1]} arrived")
                entry.done = _Done(code, sig, bool(tmo), b"", b"", flags, otot, etot)
                entry.changed.set()
                return
            out = await self._reader.readexactly(olen) if olen else b""
            errb = await self._reader.readexactly(elen) if elen else b""
            self._resolve(rid, _Done(code, sig, bool(tmo), out, errb, flags, otot, etot))
        elif kind == "HELLO" and len(fields) == 1:
            (self.guest_version,) = _ints(fields, "HELLO")
            if self.guest_version != PROTOCOL_VERSION:
                raise AgentProtocolError(f"{self.vm_name}: the guest agent speaks protocol {self.guest_version}, "
                                         f"this host {PROTOCOL_VERSION}: rebuild the guest images (make images)")
            log.debug("%s: agent says hello", self.vm_name)
        else:
            # an unknown header could be followed by a payload we cannot skip: the framing is lost
            raise AgentProtocolError(f"{self.vm_name}: unexpected message from the guest agent: "
                                     f"{' '.join(parts)[:200]!r}")

    async def _discard(self, n: int) -> None:
        assert self._reader is not None
        while n > 0:
            got = await self._reader.readexactly(min(n, _DISCARD))
            n -= len(got)

    def _resolve(self, rid: int, value: Any) -> None:
        entry = self._pending.get(rid)
        if isinstance(entry, asyncio.Future):
            self._pending.pop(rid, None)
            if not entry.done():
                entry.set_result(value)

    # -- writing --------------------------------------------------------------------------------
    async def _send(self, data: bytes) -> None:
        if not self.connected or self._writer is None:
            raise AgentDisconnectedError(f"{self.vm_name}: agent not connected")
        async with self._write_lock:
            self._writer.write(data)
            await self._writer.drain()

    async def ping(self, timeout: float = 5.0) -> int:
        """Round trip to the agent; returns the guest's monotonic clock in ns."""
        rid = next(self._ids)
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._pending[rid] = fut
        try:
            await self._send(f"PING {rid}\n".encode())
            try:
                return int(await self._wait(asyncio.shield(fut), "agent PONG", timeout))
            except QMPTimeoutError as exc:
                raise AgentTimeoutError(f"{self.vm_name}: no PONG from the agent in {timeout}s") from exc
            except QEMUExitedError as exc:
                raise AgentDisconnectedError(f"{self.vm_name}: QEMU exited during ping") from exc
        finally:
            self._pending.pop(rid, None)

    @staticmethod
    def _payload(command: str) -> bytes:
        if not command:
            raise AgentError("empty command")
        payload = command.encode()
        if len(payload) > 1 << 20:
            raise AgentError(f"command is {len(payload)} bytes, over the agent's 1 MiB limit")
        return payload

    @staticmethod
    def _guest_ms(timeout: float | None) -> int:
        return int(timeout * 1000) + 2000 if timeout else 0

    async def exec(self, command: str, timeout: float = 60.0, check: bool = False) -> ExecResult:
        """Run ``command`` with /bin/sh -c in the guest; returns exit code, stdout and stderr (each cut
        at :data:`MAX_OUTPUT`, flagged in the result: use :meth:`exec_stream` for more)."""
        payload = self._payload(command)
        rid = next(self._ids)
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._pending[rid] = fut
        try:
            await self._send(f"EXEC {rid} {self._guest_ms(timeout)} {len(payload)}\n".encode() + payload)
            try:
                d: _Done = await self._wait(asyncio.shield(fut), f"guest command {command!r}", timeout)
            except (AgentTimeoutError, QMPTimeoutError) as exc:
                await self._kill_quietly(rid)
                raise AgentTimeoutError(f"{self.vm_name}: guest command {command!r} timed out after "
                                        f"{timeout}s") from exc
            except QEMUExitedError as exc:
                raise AgentDisconnectedError(f"{self.vm_name}: QEMU exited while running {command!r}") from exc
        finally:
            self._pending.pop(rid, None)
        result = ExecResult(command, d.code, d.out.decode(errors="replace"), d.err.decode(errors="replace"), d.sig,
                            d.timed_out, stdout_truncated=bool(d.flags & 1), stderr_truncated=bool(d.flags & 2),
                            stdout_bytes=d.out_total, stderr_bytes=d.err_total)
        if result.truncated:
            log.warning("%s: output of %r truncated at %d bytes per stream (wrote %d + %d bytes)", self.vm_name,
                        command, MAX_OUTPUT, d.out_total, d.err_total)
        return result.check() if check else result

    def exec_stream(self, command: str, timeout: float | None = 60.0, window: int = DEFAULT_WINDOW) -> ExecStream:
        """Run ``command`` and stream its output (no size limit): ``async for chunk in agent.exec_stream(cmd)``
        (or ``async with`` it, to be sure it is killed if you stop early). At most ``window`` bytes are
        buffered on the host; ``timeout`` covers the whole command."""
        self._payload(command)
        if isinstance(window, bool) or not isinstance(window, int) or not MAX_CHUNK <= window <= MAX_WINDOW:
            raise AgentError(f"window must be {MAX_CHUNK}..{MAX_WINDOW} bytes, got {window!r}")
        return ExecStream(_StreamChannel(self.vm_name, self._start_stream, self._grant, self._wait,
                                         self._release_stream), command, timeout, window)

    async def _start_stream(self, command: str, timeout: float | None, window: int) -> tuple[int, _StreamState]:
        payload = self._payload(command)
        rid = next(self._ids)
        st = _StreamState(window)
        self._pending[rid] = st
        try:
            await self._send(f"STREAM {rid} {self._guest_ms(timeout)} {window} {len(payload)}\n".encode() + payload)
        except BaseException:
            self._pending.pop(rid, None)
            raise
        return rid, st

    async def _release_stream(self, rid: int, kill: bool) -> None:
        self._pending.pop(rid, None)
        if kill:
            await self._kill_quietly(rid)

    async def _grant(self, rid: int, st: _StreamState) -> None:
        n, st.consumed_unacked = st.consumed_unacked, 0
        st.granted += n
        try:
            await self._send(f"ACK {rid} {n}\n".encode())
        except AgentError as exc:
            if st.error is None:
                st.error = exc

    async def _kill_quietly(self, rid: int) -> None:
        try:
            await self._send(f"KILL {rid}\n".encode())
        except AgentError:
            pass

    async def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            try:
                await self._writer.wait_closed()
            except OSError:
                pass
        if self._task is not None:
            await asyncio.gather(self._task, return_exceptions=True)
        self._task = None
        self._writer = self._reader = None
