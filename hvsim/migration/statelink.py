"""The link user-level-driver (ULD) state travels on between two hosts: TCP between the hosts'
network namespaces, across the shaped underlay like QEMU's RAM stream, so its transfer time is real.

Two small relay processes (:mod:`._relay`, standard library only) carry the bytes: a receiver in
the destination host's namespace listening on its underlay address (an ephemeral port), a sender in
the source host's namespace connected to it; the receiver demands a 32-byte random token first, so
nothing else in that namespace can feed the stream. The hvsim process writes frames into the
sender's stdin and reads them back from the receiver's stdout, so it knows exactly when each
checkpoint has crossed the link, and it validates every frame it reads (header size, transfer id,
offset, length) before using a byte of it.

Frame: ``u32`` header length (at most 4096), a JSON header ``{"t": transfer, "off": offset, "len":
n, "end": bool}``, ``n`` bytes (at most one chunk). A checkpoint is sent as chunks of
:data:`CHUNK` bytes and at most ``window`` bytes are in flight beyond what the receiver delivered,
so little is queued in the kernel and a transfer given up half-way (cancelled: the switch-over
arrived) leaves at most a window to drain; its late chunks are dropped on arrival. A transfer that
makes no progress for ``stall_timeout`` seconds fails with :class:`StateLinkError` (the link is down).
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import secrets
import struct
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hvbase.aio import wait_for
from qmp_bridge.process import die_with_parent

from ..core.host import Host
from .errors import MigrationFailedError

log = logging.getLogger("hvsim.migration.statelink")

RELAY = Path(__file__).with_name("_relay.py")
CHUNK = 256 * 1024
MAX_HEADER = 4096
_LEN = struct.Struct("<I")


class StateLinkError(MigrationFailedError):
    """The ULD state link failed: a relay did not start or died, the link stalled, or the stream
    broke the framing."""


@dataclass(frozen=True)
class LinkTransfer:
    """One payload that crossed the link."""
    label: str
    bytes: int          # payload bytes
    wire_bytes: int     # with frame headers
    seconds: float      # first byte written -> last byte read back


@dataclass
class _Pending:
    no: int
    size: int
    buf: bytearray
    got: int = 0
    future: asyncio.Future[bytearray] | None = None
    aborted: bool = False


class StateLink:
    """A one-way byte link from ``source`` to ``dest`` (see the module docstring)."""

    def __init__(self, name: str, source: Host, dest: Host, *, track_process: Callable[[int, str], None],
                 window: int = 512 << 10, stall_timeout: float = 5.0) -> None:
        self.name = name
        self.source, self.dest = source, dest
        self.track_process = track_process
        self.window = window
        self.stall_timeout = stall_timeout
        self.transfers: list[LinkTransfer] = []
        self.wire_bytes = 0
        self._recv: asyncio.subprocess.Process | None = None
        self._send: asyncio.subprocess.Process | None = None
        self._reader: asyncio.Task[None] | None = None
        self._pending: dict[int, _Pending] = {}
        self._next = 0
        self._lock = asyncio.Lock()
        self._delivered = 0        # payload bytes read back from the receiver (all transfers)
        self._written = 0          # payload bytes written into the sender (all transfers)
        self._progress = asyncio.Event()
        self._last_progress = time.monotonic()
        self._error: BaseException | None = None
        self.port: int | None = None

    @staticmethod
    def _argv(host: Host, *args: str) -> list[str]:
        base = [sys.executable, "-I", str(RELAY), *args]
        return (["ip", "netns", "exec", host.netns] if host.netns else []) + base

    # -- lifecycle -----------------------------------------------------------------------------------
    async def open(self, timeout: float = 15.0) -> None:
        """Start both relays and connect them (StateLinkError if they cannot)."""
        token = secrets.token_hex(32).encode() + b"\n"
        try:
            async with asyncio.timeout(timeout):
                self._recv = await self._spawn(self._argv(self.dest, "recv", "--bind", self.dest.address),
                                               f"ULD state receiver on {self.dest.name}", stdout=True)
                assert self._recv.stdin is not None and self._recv.stdout is not None
                self._recv.stdin.write(token)
                await self._recv.stdin.drain()
                line = await self._recv.stdout.readline()
                if not line.startswith(b"READY "):
                    raise StateLinkError(f"state link {self.name}: the receiver on {self.dest.name} did not start: "
                                         f"{line!r} {await self._stderr(self._recv)}")
                self.port = int(line.split()[1])
                self._send = await self._spawn(
                    self._argv(self.source, "send", "--connect", f"{self.dest.address}:{self.port}"),
                    f"ULD state sender on {self.source.name}", stdout=False)
                assert self._send.stdin is not None
                self._send.stdin.write(token)
                await self._send.stdin.drain()
        except TimeoutError as exc:
            await self.close()
            raise StateLinkError(f"state link {self.name}: relays not up within {timeout:g} s") from exc
        except BaseException:
            await self.close()
            raise
        self._reader = asyncio.create_task(self._read_loop(), name=f"statelink-{self.name}")
        log.info("state link %s: %s -> %s:%d", self.name, self.source.name, self.dest.address, self.port)

    async def _spawn(self, argv: list[str], what: str, stdout: bool) -> asyncio.subprocess.Process:
        try:
            proc = await asyncio.create_subprocess_exec(
                *argv, stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE if stdout else asyncio.subprocess.DEVNULL,
                stderr=asyncio.subprocess.PIPE, preexec_fn=die_with_parent(), limit=CHUNK + MAX_HEADER + 64)
        except OSError as exc:
            raise StateLinkError(f"state link {self.name}: cannot start the {what}: {exc}") from exc
        self.track_process(proc.pid, what)
        return proc

    @staticmethod
    async def _stderr(proc: asyncio.subprocess.Process | None) -> str:
        if proc is None or proc.stderr is None:
            return ""
        with contextlib.suppress(TimeoutError, OSError):
            data = await wait_for(proc.stderr.read(4096), 0.5)
            return data.decode(errors="replace").strip()
        return ""

    def pids(self) -> list[int]:
        return [p.pid for p in (self._recv, self._send) if p is not None and p.returncode is None]

    async def close(self) -> None:
        """Stop both relays (by pid) and fail whatever was still in flight. Idempotent."""
        reader, self._reader = self._reader, None
        if reader is not None:
            reader.cancel()
            await asyncio.wait([reader])
        for proc in (self._send, self._recv):
            if proc is not None and proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                await proc.wait()
        self._fail(StateLinkError(f"state link {self.name} closed"))

    # -- receiving -----------------------------------------------------------------------------------
    def _fail(self, exc: BaseException) -> None:
        if self._error is None:
            self._error = exc
        for p in self._pending.values():
            if p.future is not None and not p.future.done():
                p.future.set_exception(self._error)
        self._pending.clear()
        self._progress.set()

    async def _read_loop(self) -> None:
        assert self._recv is not None and self._recv.stdout is not None
        out = self._recv.stdout
        try:
            while True:
                try:
                    raw = await out.readexactly(_LEN.size)
                except asyncio.IncompleteReadError:
                    raise StateLinkError(f"state link {self.name}: the receiver on {self.dest.name} stopped "
                                         f"(exit {self._recv.returncode}) {await self._stderr(self._recv)}") from None
                (hlen,) = _LEN.unpack(raw)
                if not 0 < hlen <= MAX_HEADER:
                    raise StateLinkError(f"state link {self.name}: bad frame header length {hlen}")
                h = self._header(await out.readexactly(hlen))
                data = await out.readexactly(h["len"])
                p = self._pending.get(h["t"])
                self._delivered += h["len"]
                self._last_progress = time.monotonic()
                self._progress.set()
                if p is None or p.aborted:
                    if p is not None and h["end"]:
                        del self._pending[p.no]
                    continue
                if h["off"] != p.got or p.got + h["len"] > p.size:
                    raise StateLinkError(f"state link {self.name}: frame of transfer {p.no} at offset {h['off']} "
                                         f"(expected {p.got}, size {p.size})")
                p.buf[p.got:p.got + h["len"]] = data
                p.got += h["len"]
                if h["end"]:
                    if p.got != p.size:
                        raise StateLinkError(f"state link {self.name}: transfer {p.no} ended at {p.got} of "
                                             f"{p.size} bytes")
                    del self._pending[p.no]
                    if p.future is not None and not p.future.done():
                        p.future.set_result(p.buf)
        except asyncio.CancelledError:
            raise
        except (StateLinkError, asyncio.IncompleteReadError, OSError) as exc:
            err = exc if isinstance(exc, StateLinkError) else StateLinkError(
                f"state link {self.name}: stream broke: {exc!r}")
            log.error("%s", err)
            self._fail(err)

    def _header(self, raw: bytes) -> dict[str, Any]:
        try:
            h = json.loads(raw)
            ok = (isinstance(h, dict) and isinstance(h.get("t"), int) and isinstance(h.get("off"), int)
                  and isinstance(h.get("len"), int) and isinstance(h.get("end"), bool)
                  and 0 <= h["len"] <= CHUNK and h["off"] >= 0)
        except (UnicodeDecodeError, json.JSONDecodeError):
            ok = False
        if not ok:
            raise StateLinkError(f"state link {self.name}: malformed frame header {raw[:80]!r}")
        return h

    # -- sending -------------------------------------------------------------------------------------
    async def send(self, label: str, payload: bytes) -> tuple[bytes, LinkTransfer]:
        """Carry ``payload`` across; returns the bytes as read back at the destination. Cancelling it
        drops the rest of this payload; StateLinkError if the link fails or stalls."""
        async with self._lock:
            if self._error is not None:
                raise StateLinkError(f"state link {self.name} is unusable: {self._error}")
            if self._send is None or self._send.stdin is None:
                raise StateLinkError(f"state link {self.name} is not open")
            no = self._next
            self._next += 1
            loop = asyncio.get_running_loop()
            p = _Pending(no, len(payload), bytearray(len(payload)), future=loop.create_future())
            self._pending[no] = p
            t0 = time.monotonic()
            self._last_progress = t0
            wire = 0
            view = memoryview(payload)
            try:
                off = 0
                while True:
                    n = min(CHUNK, len(view) - off)
                    end = off + n >= len(view)
                    await self._wait_window()
                    hdr = json.dumps({"t": no, "off": off, "len": n, "end": end}).encode()
                    frame = _LEN.pack(len(hdr)) + hdr + view[off:off + n]
                    self._send.stdin.write(frame)
                    self._written += n
                    wire += len(frame)
                    self.wire_bytes += len(frame)
                    await self._drain()
                    off += n
                    if end:
                        break
                data = await self._wait_done(p)
            except BaseException as exc:
                p.aborted = True
                if p.future is not None and not p.future.done():
                    p.future.cancel()
                if isinstance(exc, StateLinkError):
                    self._fail(exc)        # a stalled or broken stream cannot carry the next payload
                raise
            tr = LinkTransfer(label, len(payload), wire, time.monotonic() - t0)
            self.transfers.append(tr)
            return bytes(data), tr

    async def _drain(self) -> None:
        """Wait until the sender took the bytes, checking for a stall meanwhile (a sender that no
        longer reads, because the link is down and its socket is full, blocks the pipe)."""
        assert self._send is not None and self._send.stdin is not None
        drain = asyncio.ensure_future(self._send.stdin.drain())
        try:
            while True:
                try:
                    await wait_for(asyncio.shield(drain), 0.5)
                    return
                except TimeoutError:
                    err = self._stalled()
                    if err is not None:
                        raise err from None
        except BaseException:
            if not drain.done():
                drain.cancel()
            raise

    def _stalled(self) -> StateLinkError | None:
        idle = time.monotonic() - self._last_progress
        if idle > self.stall_timeout:
            return StateLinkError(f"state link {self.name}: no ULD state arrived on {self.dest.name} for "
                                  f"{idle:.1f} s ({self._written - self._delivered} bytes in flight): the link "
                                  "is down or stalled")
        return None

    async def _wait_window(self) -> None:
        while self._written - self._delivered > self.window:
            if self._error is not None:
                raise self._error
            err = self._stalled()
            if err is not None:
                raise err
            self._progress.clear()
            with contextlib.suppress(TimeoutError):
                await wait_for(self._progress.wait(), 0.5)
        if self._error is not None:
            raise self._error

    async def _wait_done(self, p: _Pending) -> bytearray:
        assert p.future is not None
        while True:
            try:
                return await wait_for(asyncio.shield(p.future), 0.5)
            except TimeoutError:
                err = self._stalled()
                if err is not None:
                    raise err from None
