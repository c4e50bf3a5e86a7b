"""Asyncio NBD server: fixed newstyle negotiation, simple replies, concurrent out-of-order requests.

One ``NbdConnection`` (an ``asyncio.BufferedProtocol``) per client. The transport reads straight
into the connection's preallocated receive buffer (``recv_into``, no allocation per read); a write
payload that did not arrive with its header is received directly into its own buffer. Negotiation
is a coroutine reading from that buffer; transmission is parsed in ``buffer_updated``: a read the
export can answer without waiting (shim-cache or OS page-cache hit) is answered inline, the reply
header and data built in one buffer, everything else runs as a task whose reply goes out when it
completes (out of order). Replies produced in one loop iteration are written to the transport in
one call (``writelines``: one ``writev`` under uvloop).

Error policy (proto.md): unknown command or flag -> EINVAL; read or trim past the end -> EINVAL;
write or write-zeroes past the end -> ENOSPC; offset+length overflowing 64 bits -> EINVAL; read or
write longer than the 32 MiB maximum block size -> EOVERFLOW (a write's payload is read and
discarded so the stream stays in sync); write on a read-only export -> EPERM; any request after
shutdown began -> ESHUTDOWN. A bad request magic or a malformed handshake is a protocol violation:
the connection is dropped, the server keeps serving everyone else.
"""
from __future__ import annotations

import asyncio
import itertools
import logging
import os
from enum import StrEnum
from pathlib import Path
from collections.abc import Iterable
from typing import Any, cast

from hvbase.aio import wait_for
from hvbase.fsm import StateMachine

from . import protocol as P
from .errors import NbdProtocolError, ShimConfigError, ShimStateError, StoreError
from .export import Export
from .sockets import prepare_socket_path, secure_socket

log = logging.getLogger(__name__)

_KNOWN_CMDS = frozenset({P.Cmd.READ, P.Cmd.WRITE, P.Cmd.DISC, P.Cmd.FLUSH, P.Cmd.TRIM, P.Cmd.WRITE_ZEROES})
_WRITE_LIKE = frozenset({P.Cmd.WRITE, P.Cmd.TRIM, P.Cmd.WRITE_ZEROES})
MAX_INFLIGHT_BYTES = 64 * 1024 * 1024  # per connection: stop parsing past this much pending I/O
RECV_BUFFER = 256 * 1024  # per connection receive buffer (grows only for a long negotiation backlog)
RECV_MIN_FREE = 64 * 1024  # compact (or grow) the buffer when less than this is free at its end
_REPLY_MAGIC = P.SIMPLE_REPLY_MAGIC


class ServerState(StrEnum):
    CREATED = "created"
    SERVING = "serving"
    SHUTTING_DOWN = "shutting_down"
    STOPPED = "stopped"


class ConnPhase(StrEnum):
    NEGOTIATING = "negotiating"
    TRANSMISSION = "transmission"
    CLOSING = "closing"
    CLOSED = "closed"


_S, _C = ServerState, ConnPhase
SERVER_TRANSITIONS = {_S.CREATED: {_S.SERVING, _S.STOPPED}, _S.SERVING: {_S.SHUTTING_DOWN},
                      _S.SHUTTING_DOWN: {_S.STOPPED}, _S.STOPPED: set()}
CONN_TRANSITIONS = {_C.NEGOTIATING: {_C.TRANSMISSION, _C.CLOSING, _C.CLOSED},
                    _C.TRANSMISSION: {_C.CLOSING, _C.CLOSED}, _C.CLOSING: {_C.CLOSED}, _C.CLOSED: {_C.CLOSED}}


class RecvBuffer:
    """A linear receive buffer the transport reads into: bytes ``[start, end)`` are unparsed.

    ``free()`` hands out the space after ``end`` (compacting first when little is left, growing
    only when the unparsed backlog itself is that large); the parser consumes by moving ``start``.
    """

    __slots__ = ("data", "view", "start", "end")

    def __init__(self, size: int = RECV_BUFFER) -> None:
        self.data = bytearray(size)
        self.view = memoryview(self.data)
        self.start = 0
        self.end = 0

    def __len__(self) -> int:
        return self.end - self.start

    def free(self) -> memoryview:
        if self.start == self.end:
            self.start = self.end = 0
            if len(self.data) > RECV_BUFFER:  # a backlog grew it: give the memory back
                self.data = bytearray(RECV_BUFFER)
                self.view = memoryview(self.data)
        elif len(self.data) - self.end < RECV_MIN_FREE:
            pending = bytes(self.view[self.start:self.end])
            if len(self.data) - len(pending) < RECV_MIN_FREE:
                self.data = bytearray(max(2 * len(self.data), len(pending) + RECV_MIN_FREE))
                self.view = memoryview(self.data)
            self.data[:len(pending)] = pending
            self.start, self.end = 0, len(pending)
        return self.view[self.end:]

    def take(self, n: int) -> bytes:
        data = bytes(self.view[self.start:self.start + n])
        self.start += n
        return data

    def clear(self) -> None:
        self.start = self.end = 0


class NbdConnection(asyncio.BufferedProtocol):
    def __init__(self, server: NbdServer, conn_id: int) -> None:
        self.server = server
        self.id = conn_id
        self.log = log.getChild(f"conn{conn_id}")
        self.fsm: StateMachine[ConnPhase] = StateMachine(f"NBD connection {conn_id}", _C.NEGOTIATING,
                                                         CONN_TRANSITIONS, error=ShimStateError, log=self.log,
                                                         history=8, level=logging.DEBUG)
        self.export: Export | None = None
        self.transport: asyncio.Transport | None = None
        self._rx = RecvBuffer()
        # a write whose payload did not arrive with its header: received straight into _payload
        self._payload: bytearray | None = None
        self._payload_view: memoryview | None = None
        self._payload_got = 0
        self._payload_req: tuple[int, int, int] = (0, 0, 0)  # flags, cookie, offset
        self._waiter: asyncio.Future[None] | None = None
        self._eof = False
        self._lost = False
        self._tasks: dict[asyncio.Task[None], int] = {}
        self._inflight_bytes = 0
        self._out: list[bytes | bytearray] = []
        self._flush_scheduled = False
        self._read_paused = False
        self._write_paused = False
        self._disc = False
        self._shutting_down = False
        self._discard_left = 0
        self._discard_cookie = 0
        self._no_zeroes = False
        self._closed = asyncio.get_running_loop().create_future()
        self._negotiation: asyncio.Task[None] | None = None
        self.requests = 0

    # asyncio.Protocol ------------------------------------------------------------------------

    @property
    def phase(self) -> ConnPhase:
        return self.fsm.state
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # a stream transport (uvloop's are not asyncio.Transport subclasses, so no isinstance check)
        self.transport = cast(asyncio.Transport, transport)
        self._negotiation = asyncio.get_running_loop().create_task(self._negotiate(), name=f"nbd-negotiate-{self.id}")

    def get_buffer(self, sizehint: int) -> memoryview:
        pv = self._payload_view
        if pv is not None:
            return pv[self._payload_got:]
        return self._rx.free()

    def buffer_updated(self, nbytes: int) -> None:
        if self._payload_view is not None:
            self._payload_got += nbytes
            if self._payload_got < len(self._payload_view):
                return
            self._payload_complete()
            if self._lost:
                return
        else:
            self._rx.end += nbytes
        if self.phase is ConnPhase.TRANSMISSION:
            self._process()
        elif self.phase is ConnPhase.NEGOTIATING:
            if len(self._rx) > 4 * P.MAX_OPTION_LENGTH:
                self.log.warning("client floods negotiation with %d unread bytes; dropping it", len(self._rx))
                self.abort()
                return
            self._wake()
        else:  # CLOSING/CLOSED: input after NBD_CMD_DISC is ignored
            self._rx.clear()

    def eof_received(self) -> bool:
        self._eof = True
        self._wake()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self._lost = True
        self._eof = True
        self._wake()
        if self._negotiation is not None and not self._negotiation.done():
            self._negotiation.cancel()
        partial = len(self._rx) + self._discard_left + self._payload_got
        if self._discard_left or self._payload_view is not None or (self.phase is ConnPhase.TRANSMISSION and partial):
            self.log.info("client went away with %d bytes of an incomplete request", partial)
            self._payload = self._payload_view = None
        self.fsm.set(_C.CLOSED, "connection lost")
        self._maybe_done()

    def pause_writing(self) -> None:
        self._write_paused = True
        self._set_reading()

    def resume_writing(self) -> None:
        self._write_paused = False
        self._set_reading()
        if self.phase is ConnPhase.TRANSMISSION:
            self._process()

    # helpers ---------------------------------------------------------------------------------
    def _wake(self) -> None:
        w = self._waiter
        if w is not None and not w.done():
            w.set_result(None)

    def abort(self) -> None:
        """Drop the connection now (protocol violation, or the server's shutdown grace ran out)."""
        if self.transport is not None and not self._lost:
            self.transport.abort()

    def _maybe_done(self) -> None:
        if self._lost and not self._tasks and not self._closed.done():
            self._closed.set_result(None)
            self.server.forget(self)

    @property
    def closed(self) -> bool:
        """The connection is gone and every request it made has finished."""
        return self._closed.done()

    async def wait_closed(self) -> None:
        await asyncio.shield(self._closed)

    def begin_shutdown(self) -> None:
        self._shutting_down = True
        if self.phase is ConnPhase.TRANSMISSION:
            self._process()
        self._wake()

    def _send(self, *chunks: bytes | bytearray) -> None:
        if self._lost:
            return
        self._out.extend(chunks)
        if not self._flush_scheduled:
            self._flush_scheduled = True
            asyncio.get_running_loop().call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_scheduled = False
        if self._out and not self._lost and self.transport is not None:
            out, self._out = self._out, []
            if len(out) == 1:
                self.transport.write(out[0])
            else:
                self.transport.writelines(out)
        if self._disc and not self._tasks and self.transport is not None and not self._lost:
            self.transport.close()

    def _set_reading(self) -> None:
        if self.transport is None or self._lost:
            return
        want_pause = (self._write_paused or self._disc or len(self._tasks) >= self.server.max_inflight
                      or self._inflight_bytes >= MAX_INFLIGHT_BYTES)
        if want_pause and not self._read_paused:
            self.transport.pause_reading()
            self._read_paused = True
        elif not want_pause and self._read_paused:
            self.transport.resume_reading()
            self._read_paused = False

    # negotiation -----------------------------------------------------------------------------
    async def _read_exact(self, n: int) -> bytes:
        loop = asyncio.get_running_loop()
        while len(self._rx) < n:
            if self._eof:
                raise NbdProtocolError(f"client closed during negotiation ({len(self._rx)} of {n} bytes)")
            self._waiter = loop.create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        return self._rx.take(n)

    def _opt_reply(self, opt: int, rep: int, data: bytes = b"") -> None:
        assert self.transport is not None
        self.transport.write(P.option_reply(opt, rep, data))

    def _opt_error(self, opt: int, rep: P.Rep, message: str) -> None:
        self.log.debug("option %d refused with %s: %s", opt, rep.name, message)
        self._opt_reply(opt, rep, message.encode()[: P.MAX_STRING])

    async def _negotiate(self) -> None:
        assert self.transport is not None
        try:
            async with asyncio.timeout(self.server.handshake_timeout):
                await self._negotiate_inner()
        except asyncio.CancelledError:
            if not self._lost:
                self.abort()
            raise
        except (NbdProtocolError, TimeoutError, ConnectionError) as exc:
            self.log.info("negotiation ended: %s", exc or type(exc).__name__)
            self.abort()
        except Exception:  # never let one client take the server down
            self.log.exception("negotiation failed")
            self.abort()

    async def _negotiate_inner(self) -> None:
        assert self.transport is not None
        self.transport.write(P.greeting())
        (cflags,) = P.U32.unpack(await self._read_exact(4))
        if cflags & ~(P.FLAG_C_FIXED_NEWSTYLE | P.FLAG_C_NO_ZEROES):
            raise NbdProtocolError(f"client sent unknown client flags {cflags:#x}")
        fixed = bool(cflags & P.FLAG_C_FIXED_NEWSTYLE)
        self._no_zeroes = bool(cflags & P.FLAG_C_NO_ZEROES)
        while True:
            magic, opt, length = P.OPTION_HEADER.unpack(await self._read_exact(P.OPTION_HEADER.size))
            if magic != P.IHAVEOPT:
                raise NbdProtocolError(f"bad option magic {magic!r}")
            if length > P.MAX_OPTION_LENGTH:
                raise NbdProtocolError(f"option {opt} claims {length} bytes of data (limit {P.MAX_OPTION_LENGTH})")
            data = await self._read_exact(length)
            if opt == P.Opt.EXPORT_NAME:
                export = self.server.lookup(self._decode_name(data))
                if export is None or self._shutting_down:
                    raise NbdProtocolError(f"NBD_OPT_EXPORT_NAME for unknown export {data[:64]!r}")
                reply = P.U64.pack(export.size) + P.U16.pack(export.transmission_flags())
                if not self._no_zeroes:
                    reply += bytes(124)
                self.transport.write(reply)
                self._enter_transmission(export)
                return
            if not fixed:
                raise NbdProtocolError(f"option {opt} from a client without fixed newstyle")
            if opt == P.Opt.ABORT:
                self._opt_reply(opt, P.Rep.ACK)
                self.transport.close()
                return
            if self._shutting_down:
                self._opt_error(opt, P.Rep.ERR_SHUTDOWN, "server is shutting down")
                self.transport.close()
                return
            if opt == P.Opt.LIST:
                if length:
                    self._opt_error(opt, P.Rep.ERR_INVALID, "NBD_OPT_LIST takes no data")
                    continue
                for name in self.server.exports:
                    raw = name.encode()
                    self._opt_reply(opt, P.Rep.SERVER, P.U32.pack(len(raw)) + raw)
                self._opt_reply(opt, P.Rep.ACK)
            elif opt in (P.Opt.INFO, P.Opt.GO):
                export = self._info_or_go(opt, data)
                if export is not None and opt == P.Opt.GO:
                    self._enter_transmission(export)
                    return
            else:
                self._opt_error(opt, P.Rep.ERR_UNSUP, f"option {opt} is not supported")

    @staticmethod
    def _decode_name(raw: bytes) -> str | None:
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            return None

    def _info_or_go(self, opt: int, data: bytes) -> Export | None:
        if len(data) < 6:
            self._opt_error(opt, P.Rep.ERR_INVALID, f"option data of {len(data)} bytes is too short")
            return None
        (nlen,) = P.U32.unpack_from(data, 0)
        if nlen > P.MAX_STRING or 4 + nlen + 2 > len(data):
            self._opt_error(opt, P.Rep.ERR_INVALID, f"export name length {nlen} does not fit the option data")
            return None
        name = self._decode_name(data[4:4 + nlen])
        (nreq,) = P.U16.unpack_from(data, 4 + nlen)
        if 4 + nlen + 2 + 2 * nreq != len(data):
            self._opt_error(opt, P.Rep.ERR_INVALID, f"{nreq} information requests do not match the option length")
            return None
        if name is None:
            self._opt_error(opt, P.Rep.ERR_INVALID, "export name is not UTF-8")
            return None
        reqs = {P.U16.unpack_from(data, 6 + nlen + 2 * i)[0] for i in range(nreq)}
        export = self.server.lookup(name)
        if export is None:
            self._opt_error(opt, P.Rep.ERR_UNKNOWN, f"no export named {name!r}")
            return None
        self._opt_reply(opt, P.Rep.INFO, P.info_export(export.size, export.transmission_flags()))
        if P.Info.NAME in reqs:
            self._opt_reply(opt, P.Rep.INFO, P.info_name(export.name))
        if P.Info.DESCRIPTION in reqs and export.description:
            self._opt_reply(opt, P.Rep.INFO, P.info_description(export.description))
        self._opt_reply(opt, P.Rep.INFO, P.info_block_size())
        self._opt_reply(opt, P.Rep.ACK)
        return export

    def _enter_transmission(self, export: Export) -> None:
        self.export = export
        self.fsm.set(_C.TRANSMISSION, f"export {export.name}")
        self.log.debug("transmission on export %r", export.name)
        if len(self._rx):
            asyncio.get_running_loop().call_soon(self._process)

    # transmission ----------------------------------------------------------------------------
    def _validate(self, flags: int, cmd: int, offset: int, length: int) -> int:
        export = self.export
        assert export is not None
        if cmd not in _KNOWN_CMDS:
            return P.EINVAL
        allowed = P.CMD_FLAG_FUA | (P.CMD_FLAG_NO_HOLE if cmd == P.Cmd.WRITE_ZEROES else 0)
        if flags & ~allowed:
            return P.EINVAL
        if cmd == P.Cmd.FLUSH:
            return P.EINVAL if (offset or length) else 0
        if cmd in _WRITE_LIKE and export.read_only:
            return P.EPERM
        if length == 0:
            return P.EINVAL
        if cmd in (P.Cmd.READ, P.Cmd.WRITE) and length > P.MAX_BLOCK:
            return P.EOVERFLOW
        end = offset + length
        if end > 0xFFFF_FFFF_FFFF_FFFF:
            return P.EINVAL
        if end > export.size:
            return P.ENOSPC if cmd in (P.Cmd.WRITE, P.Cmd.WRITE_ZEROES) else P.EINVAL
        return 0

    def _process(self) -> None:
        """Parse and dispatch every complete request in the buffer (bounded by max_inflight)."""
        if self.phase is not ConnPhase.TRANSMISSION or self._lost:
            return
        rx = self._rx
        if self._disc:  # input after NBD_CMD_DISC is ignored
            rx.clear()
            return
        view = rx.view
        pos = rx.start
        end = rx.end
        max_inflight = self.server.max_inflight
        tasks = self._tasks
        unpack = P.REQUEST.unpack_from
        hdr = P.REQUEST_SIZE
        while True:
            if self._discard_left:
                take = min(self._discard_left, end - pos)
                pos += take
                self._discard_left -= take
                if self._discard_left:
                    break
                self._out.append(P.simple_reply(self._discard_cookie, P.EOVERFLOW))
                continue
            if (end - pos < hdr or len(tasks) >= max_inflight or self._write_paused
                    or self._inflight_bytes >= MAX_INFLIGHT_BYTES):
                break
            magic, flags, cmd, cookie, offset, length = unpack(view, pos)
            if magic != P.REQUEST_MAGIC:
                self.log.warning("bad request magic %#x: dropping the connection", magic)
                rx.clear()
                self._flush()
                self.abort()
                return
            pos += hdr
            if cmd == P.Cmd.WRITE:
                if length > P.MAX_BLOCK:
                    self._discard_left = length
                    self._discard_cookie = cookie
                    self.log.info("write of %d bytes exceeds the %d-byte maximum: discarding payload",
                                  length, P.MAX_BLOCK)
                    continue
                if end - pos < length:
                    # receive the rest of the payload straight into its own buffer
                    payload = bytearray(length)
                    have = end - pos
                    payload[:have] = view[pos:end]
                    rx.clear()
                    self._payload = payload
                    self._payload_view = memoryview(payload)
                    self._payload_got = have
                    self._payload_req = (flags, cookie, offset)
                    self._set_reading()
                    self._flush()
                    return
                self.requests += 1
                self._dispatch(flags, cmd, cookie, offset, length, bytes(view[pos:pos + length]))
                pos += length
                continue
            self.requests += 1
            if cmd == P.Cmd.DISC:
                self._disc = True
                pos = end
                break
            self._dispatch(flags, cmd, cookie, offset, length, None)
        rx.start = pos
        if pos == end:
            rx.clear()
        self._set_reading()
        self._flush()

    def _payload_complete(self) -> None:
        payload = self._payload
        assert payload is not None
        self._payload = self._payload_view = None
        self._payload_got = 0
        flags, cookie, offset = self._payload_req
        if self._lost or self.phase is not ConnPhase.TRANSMISSION:
            return
        self.requests += 1
        self._dispatch(flags, P.Cmd.WRITE, cookie, offset, len(payload), payload)

    def _dispatch(self, flags: int, cmd: int, cookie: int, offset: int, length: int,
                  payload: bytes | bytearray | None) -> None:
        """Answer one parsed request: an error or a hit inline, anything else in a task."""
        err = self._validate(flags, cmd, offset, length)
        if err:
            self._out.append(P.simple_reply(cookie, err))
            return
        if self._shutting_down:
            self._out.append(P.simple_reply(cookie, P.ESHUTDOWN))
            return
        export = self.export
        assert export is not None
        if cmd == P.Cmd.READ:
            reply = bytearray(16 + length)
            P.SIMPLE_REPLY.pack_into(reply, 0, _REPLY_MAGIC, 0, cookie)
            if export.read_into_nowait(memoryview(reply)[16:], offset, length):
                self._out.append(reply)
                return
        task = asyncio.get_running_loop().create_task(self._handle(cmd, flags, cookie, offset, length, payload))
        self._tasks[task] = length
        self._inflight_bytes += length
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[None]) -> None:
        self._inflight_bytes -= self._tasks.pop(task, 0)
        if not task.cancelled() and task.exception() is not None:
            self.log.error("request task failed: %r", task.exception())
        if self._lost:
            self._maybe_done()
            return
        self._set_reading()
        if len(self._rx) and len(self._tasks) < self.server.max_inflight and self._inflight_bytes < MAX_INFLIGHT_BYTES:
            self._process()
        elif self._disc and not self._tasks:
            self._flush()

    async def _handle(self, cmd: int, flags: int, cookie: int, offset: int, length: int,
                      payload: bytes | bytearray | None) -> None:
        export = self.export
        assert export is not None
        fua = bool(flags & P.CMD_FLAG_FUA)
        err = 0
        data: bytes | bytearray = b""
        try:
            if cmd == P.Cmd.READ:
                data = await export.read(offset, length)
            elif cmd == P.Cmd.WRITE:
                assert payload is not None
                await export.write(offset, payload, fua)
            elif cmd == P.Cmd.FLUSH:
                await export.flush()
            elif cmd == P.Cmd.TRIM:
                await export.trim(offset, length, fua)
            elif cmd == P.Cmd.WRITE_ZEROES:
                await export.write_zeroes(offset, length, no_hole=bool(flags & P.CMD_FLAG_NO_HOLE), fua=fua)
        except StoreError as exc:
            self.log.warning("%s at %d+%d failed: %s", P.Cmd(cmd).name, offset, length, exc)
            err = exc.errno
        except ShimStateError:
            err = P.ESHUTDOWN
        except Exception:
            self.log.exception("%s at %d+%d crashed", P.Cmd(cmd).name, offset, length)
            err = P.EIO
        if err or cmd != P.Cmd.READ:
            self._send(P.simple_reply(cookie, err))
        else:
            self._send(P.simple_reply(cookie, 0), data)


class NbdServer:
    """Serves exports on a unix socket (mode 0600, private directory)."""

    def __init__(self, socket_path: str | os.PathLike[str], exports: Iterable[Export] = (), *,
                 default_export: str | None = None, handshake_timeout: float = 30.0, max_inflight: int = 128) -> None:
        self.socket_path = Path(socket_path)
        self.fsm: StateMachine[ServerState] = StateMachine("NBD server", _S.CREATED, SERVER_TRANSITIONS,
                                                           error=ShimStateError, log=log)
        self.exports: dict[str, Export] = {}
        for e in exports:
            self.add_export(e)
        self.default_export = default_export
        self.handshake_timeout = handshake_timeout
        self.max_inflight = max_inflight
        self._server: asyncio.AbstractServer | None = None
        self._conns: set[NbdConnection] = set()
        self._ids = itertools.count(1)
        self.connections_total = 0


    @property
    def state(self) -> ServerState:
        return self.fsm.state
    def add_export(self, export: Export) -> None:
        if self.state in (ServerState.SHUTTING_DOWN, ServerState.STOPPED):
            raise ShimStateError(f"cannot add export {export.name!r}: server is {self.state.value}")
        if export.name in self.exports:
            raise ShimConfigError(f"duplicate export name {export.name!r}")
        self.exports[export.name] = export

    def lookup(self, name: str | None) -> Export | None:
        if name is None:
            return None
        if name == "" and "" not in self.exports:
            name = self.default_export if self.default_export is not None else next(iter(self.exports), "")
        return self.exports.get(name)

    def _new_connection(self) -> NbdConnection:
        conn = NbdConnection(self, next(self._ids))
        self._conns.add(conn)
        self.connections_total += 1
        if self.state is not ServerState.SERVING:
            conn.begin_shutdown()
        return conn

    def forget(self, conn: NbdConnection) -> None:
        """A connection is closed and its requests are done: stop tracking it."""
        self._conns.discard(conn)

    async def start(self) -> None:
        self.fsm.require("start", _S.CREATED)
        if not self.exports:
            raise ShimConfigError("server has no exports")
        path = prepare_socket_path(self.socket_path)
        loop = asyncio.get_running_loop()
        try:
            self._server = await loop.create_unix_server(self._new_connection, str(path))
        except OSError as exc:
            raise ShimConfigError(f"cannot listen on {path}: {exc.strerror}") from exc
        secure_socket(path)
        self.fsm.set(_S.SERVING, f"listening on {self.socket_path}")
        log.info("NBD server on %s with exports %s", path, ", ".join(repr(n) for n in self.exports))

    def stats(self) -> dict[str, Any]:
        return {"state": self.state.value, "socket": str(self.socket_path), "connections": len(self._conns),
                "connections_total": self.connections_total}

    async def shutdown(self, grace: float = 5.0) -> None:
        """Stop accepting, answer ESHUTDOWN to new requests, let in-flight ones finish, then close."""
        if self.state in (ServerState.SHUTTING_DOWN, ServerState.STOPPED):
            return
        if self.state is ServerState.CREATED:
            self.fsm.set(_S.STOPPED, "stopped before serving")
            return
        self.fsm.set(_S.SHUTTING_DOWN, "shutdown")
        assert self._server is not None
        self._server.close()
        conns = list(self._conns)
        for c in conns:
            c.begin_shutdown()
        if conns:
            done, pending = await asyncio.wait([asyncio.ensure_future(c.wait_closed()) for c in conns], timeout=grace)
            for c in list(self._conns):
                c.abort()
            for p in pending:
                p.cancel()
            still = [c for c in conns if not c.closed]
            if still:
                await asyncio.wait([asyncio.ensure_future(c.wait_closed()) for c in still], timeout=grace)
        try:
            await wait_for(self._server.wait_closed(), timeout=1.0)
        except TimeoutError:
            pass
        try:
            self.socket_path.unlink()
        except FileNotFoundError:
            pass
        self.fsm.set(_S.STOPPED, "stopped")
        log.info("NBD server on %s stopped", self.socket_path)
