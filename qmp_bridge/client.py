"""QMP session on top of ``qemu.qmp.QMPClient``.

Every command has a timeout; QMP error classes become typed exceptions; events are dispatched to
subscriptions with matching; every wait also ends, with QEMUExitedError, when QEMU dies.
"""
from __future__ import annotations

import asyncio
import json
import logging
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

from qemu.qmp import ExecuteError, QMPClient
from qemu.qmp.error import QMPError

from hvbase.aio import wait_for
from hvbase.events import EventBus, Subscription

from .errors import QEMUExitedError, QMPConnectionError, QMPTimeoutError, command_error

T = TypeVar("T")
log = logging.getLogger("qmp_bridge.client")

DEFAULT_TIMEOUT = 10.0


class _LoggingQMPClient(QMPClient):
    """QMPClient that writes every message in and out to a per-VM traffic log."""

    def __init__(self, name: str, traffic: Callable[[str, Any], None]) -> None:
        super().__init__(name)
        self._traffic = traffic

    def _cb_outbound(self, msg: Any) -> Any:
        self._traffic(">", msg)
        return super()._cb_outbound(msg)

    def _cb_inbound(self, msg: Any) -> Any:
        self._traffic("<", msg)
        return super()._cb_inbound(msg)


class EventSubscription:
    """A filtered subscription to one session's QMP events, on the session's event bus
    (``hvbase.events``). ``await sub.get(timeout)`` (raced against QEMU's exit), ``async for``,
    ``get_nowait()``; use it as a context manager so it cannot leak."""

    def __init__(self, session: QMPSession, sub: Subscription[dict[str, Any]]) -> None:
        self._session = session
        self._sub = sub

    @property
    def name(self) -> str:
        return self._sub.name

    def get_nowait(self) -> dict[str, Any] | None:
        return self._sub.get_nowait()

    async def get(self, timeout: float | None = None) -> dict[str, Any]:
        return await self._session.race(self._sub.get(), f"QMP {self._sub.name}", timeout)

    def __aiter__(self) -> AsyncIterator[dict[str, Any]]:
        return self._iter()

    async def _iter(self) -> AsyncIterator[dict[str, Any]]:
        while True:
            yield await self.get()

    def close(self) -> None:
        self._sub.close()

    def __enter__(self) -> EventSubscription:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _matcher(names: frozenset[str] | None, match: dict[str, Any],
             predicate: Callable[[dict[str, Any]], bool] | None) -> Callable[[dict[str, Any]], bool]:
    def accepts(event: dict[str, Any]) -> bool:
        if names is not None and event.get("event") not in names:
            return False
        data = event.get("data", {}) or {}
        if any(data.get(k) != v for k, v in match.items()):
            return False
        return predicate(event) if predicate else True
    return accepts


class QMPSession:
    """One QMP connection to one QEMU process."""

    def __init__(self, name: str, log_path: Path | None = None,
                 exited: asyncio.Future[int] | None = None,
                 console_tail: Callable[[], str] | None = None) -> None:
        self.name = name
        self._log_file = open(log_path, "a", buffering=1) if log_path else None
        self._qmp = _LoggingQMPClient(name, self._traffic)
        self._exited = exited
        self._console_tail = console_tail or (lambda: "")
        self.events: EventBus[dict[str, Any]] = EventBus(f"qmp {name}")
        self._dispatcher: asyncio.Task[None] | None = None
        self.log = log.getChild(name)

    # -- plumbing ---------------------------------------------------------------------------
    def _traffic(self, direction: str, msg: Any) -> None:
        if self._log_file and not self._log_file.closed:
            try:
                text = json.dumps(dict(msg), default=str)
            except (TypeError, ValueError):
                text = str(msg)
            self._log_file.write(f"{time.time():.6f} {direction} {text}\n")

    async def connect(self, sock: socket.socket, timeout: float = 30.0) -> None:
        try:
            await self.race(self._qmp.connect(sock), "QMP greeting", timeout)
        except QMPError as exc:
            raise QMPConnectionError(f"{self.name}: QMP session could not be established: {exc}") from exc
        self._dispatcher = asyncio.create_task(self._dispatch(), name=f"qmp-events-{self.name}")

    async def _dispatch(self) -> None:
        async for msg in self._qmp.events:
            self.events.publish(dict(msg))

    async def race(self, aw: Awaitable[T], what: str, timeout: float | None) -> T:
        """Await ``aw`` but give up on timeout or when QEMU exits, with typed errors."""
        task: asyncio.Future[T] = asyncio.ensure_future(aw)
        waits: set[asyncio.Future[Any]] = {task}
        if self._exited is not None:
            waits.add(self._exited)
        try:
            done, _ = await asyncio.wait(waits, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:
            task.cancel()
            raise
        if task in done:
            return task.result()
        task.cancel()
        try:
            await task
        except (asyncio.CancelledError, Exception):  # the outcome is reported below
            pass
        if self._exited is not None and self._exited.done():
            raise QEMUExitedError(self.name, self._exited.result(), what, self._console_tail())
        raise QMPTimeoutError(f"{what} on {self.name}", timeout or 0.0)

    # -- API ----------------------------------------------------------------------------------
    async def execute(self, command: str, arguments: dict[str, Any] | None = None,
                      timeout: float | None = DEFAULT_TIMEOUT) -> Any:
        try:
            return await self.race(self._qmp.execute(command, arguments), f"QMP {command}", timeout)
        except ExecuteError as exc:
            raise command_error(command, exc.error_class, str(exc), arguments) from exc
        except QMPError as exc:
            if self._exited is not None and self._exited.done():
                raise QEMUExitedError(self.name, self._exited.result(), f"QMP {command}",
                                      self._console_tail()) from exc
            raise QMPConnectionError(f"{self.name}: QMP {command} failed: {exc}") from exc

    def subscribe(self, names: str | list[str] | None = None, match: dict[str, Any] | None = None,
                  predicate: Callable[[dict[str, Any]], bool] | None = None) -> EventSubscription:
        """Start queueing matching events now (subscribe before triggering what you wait for)."""
        if isinstance(names, str):
            names = [names]
        wanted = frozenset(names) if names else None
        label = ",".join(sorted(wanted)) if wanted else "any event"
        return EventSubscription(self, self.events.subscribe(label, filter=_matcher(wanted, match or {}, predicate)))

    async def wait_event(self, names: str | list[str], match: dict[str, Any] | None = None,
                         timeout: float | None = DEFAULT_TIMEOUT,
                         trigger: Callable[[], Awaitable[Any]] | None = None) -> dict[str, Any]:
        """Wait for one matching event; ``trigger`` runs after subscribing (no lost event)."""
        with self.subscribe(names, match) as sub:
            if trigger is not None:
                await trigger()
            return await sub.get(timeout)

    @property
    def connected(self) -> bool:
        return self._dispatcher is not None and not self._dispatcher.done()

    async def close(self) -> None:
        try:
            await wait_for(self._qmp.disconnect(), 5)
        except (TimeoutError, QMPError, OSError, EOFError) as exc:
            self.log.debug("disconnect: %r", exc)
        if self._dispatcher is not None:
            self._dispatcher.cancel()
            await asyncio.gather(self._dispatcher, return_exceptions=True)
        self.events.close()
        if self._log_file:
            self._log_file.close()
