"""Host side of the hvsim guest agent (virtio-serial port ``org.hvsim.agent``).

Protocol: see images/src/agent.c. Many commands may run concurrently; each has a timeout, after
which the host asks the agent to kill the command's process group and raises AgentTimeoutError.
"""
from __future__ import annotations

import asyncio
import itertools
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qmp_bridge.errors import QEMUExitedError, QMPTimeoutError

from .errors import AgentDisconnectedError, AgentError, AgentTimeoutError

log = logging.getLogger("hvsim.core.agent")


@dataclass(frozen=True)
class ExecResult:
    command: str
    exit_code: int
    stdout: str
    stderr: str
    signal: int = 0
    timed_out: bool = False

    @property
    def ok(self) -> bool:
        return self.exit_code == 0

    def check(self) -> ExecResult:
        if self.exit_code != 0:
            raise AgentError(f"guest command {self.command!r} exited {self.exit_code}: "
                             f"{self.stderr.strip()[-500:] or self.stdout.strip()[-500:]}")
        return self


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
        self._pending: dict[int, asyncio.Future[Any]] = {}
        self._ids = itertools.count(1)
        self._write_lock = asyncio.Lock()

    @property
    def connected(self) -> bool:
        return self._task is not None and not self._task.done()

    async def _wait(self, aw: Awaitable[Any], what: str, timeout: float | None) -> Any:
        if self._guard is not None:
            return await self._guard(aw, what, timeout)
        try:
            return await asyncio.wait_for(aw, timeout)
        except TimeoutError as exc:
            raise AgentTimeoutError(f"{self.vm_name}: timed out after {timeout}s waiting for {what}") from exc

    async def connect(self) -> None:
        if self.connected:
            return
        self._reader, self._writer = await asyncio.open_unix_connection(str(self.socket_path))
        self._task = asyncio.create_task(self._read_loop(), name=f"agent-{self.vm_name}")

    async def _read_loop(self) -> None:
        assert self._reader is not None
        err: BaseException = AgentDisconnectedError(f"{self.vm_name}: agent channel closed")
        try:
            while True:
                line = await self._reader.readline()
                if not line:
                    break
                parts = line.decode(errors="replace").split()
                if not parts:
                    continue
                if parts[0] == "PONG" and len(parts) >= 3:
                    self._resolve(int(parts[1]), int(parts[2]))
                elif parts[0] == "DONE" and len(parts) == 7:
                    rid, code, sig, tmo, olen, elen = (int(x) for x in parts[1:])
                    out = await self._reader.readexactly(olen) if olen else b""
                    errb = await self._reader.readexactly(elen) if elen else b""
                    self._resolve(rid, (code, sig, bool(tmo), out, errb))
                elif parts[0] == "HELLO":
                    log.debug("%s: agent says hello", self.vm_name)
        except (OSError, asyncio.IncompleteReadError) as exc:
            err = AgentDisconnectedError(f"{self.vm_name}: agent channel broke: {exc}")
        for fut in self._pending.values():
            if not fut.done():
                fut.set_exception(err)
        self._pending.clear()

    def _resolve(self, rid: int, value: Any) -> None:
        fut = self._pending.pop(rid, None)
        if fut is not None and not fut.done():
            fut.set_result(value)

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

    async def exec(self, command: str, timeout: float = 60.0, check: bool = False) -> ExecResult:
        """Run ``command`` with /bin/sh -c in the guest; returns exit code, stdout and stderr."""
        if not command:
            raise AgentError("empty command")
        rid = next(self._ids)
        payload = command.encode()
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._pending[rid] = fut
        guest_ms = int(timeout * 1000) + 2000 if timeout else 0
        try:
            await self._send(f"EXEC {rid} {guest_ms} {len(payload)}\n".encode() + payload)
            try:
                code, sig, tmo, out, err = await self._wait(asyncio.shield(fut), f"guest command {command!r}", timeout)
            except (AgentTimeoutError, QMPTimeoutError) as exc:
                await self._kill_quietly(rid)
                raise AgentTimeoutError(f"{self.vm_name}: guest command {command!r} timed out after {timeout}s") from exc
            except QEMUExitedError as exc:
                raise AgentDisconnectedError(f"{self.vm_name}: QEMU exited while running {command!r}") from exc
        finally:
            self._pending.pop(rid, None)
        result = ExecResult(command, code, out.decode(errors="replace"), err.decode(errors="replace"), sig, tmo)
        return result.check() if check else result

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
