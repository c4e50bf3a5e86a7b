"""Postcopy recovery: a migration stream that breaks during postcopy never loses the guest.

Once postcopy started, the guest runs on the destination but part of its memory is still only on
the source: neither side may be killed. QEMU 7.2 can resume a broken postcopy stream:

1. **Pause** both sides: ``migrate-pause`` on the source and on the destination (a link that stops
   carrying packets does not break a TCP stream by itself: without this both sides wait for
   minutes). Both then report ``postcopy-paused``; the guest's vCPU waits for any page it touches
   that has not arrived, the source keeps every page.
2. **Listen again** on the destination: ``migrate-recover tcp:<dest address>:<new port>`` (once).
3. **Resume** from the source: ``migrate`` with ``resume: true`` to that address, retried every
   ``interval`` s until the source leaves ``postcopy-paused`` (a failed connect leaves it paused) or
   the bound passes. When it resumes, the migration goes on where it stopped and completes.

If the bound passes, the caller gets a clear error while both QEMUs stay as they are: the guest
waits on the destination, its pages are kept on the source, and :meth:`PostcopyRecovery.resume`
can be called again later (the destination is still listening).
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from dataclasses import dataclass, field
from typing import Any

from qmp_bridge import QEMUBridgeError, QMPSession, QMPTimeoutError

log = logging.getLogger("hvsim.migration")

PAUSED = "postcopy-paused"


@dataclass
class RecoveryStep:
    t: float           # seconds since the recovery started
    step: str          # pause-source | pause-destination | recover | resume
    ok: bool
    detail: str = ""

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass
class PostcopyRecovery:
    """Pause and resume one broken postcopy migration (see the module docstring)."""
    src: QMPSession
    dst: QMPSession
    dest_address: str
    port: int | None = None
    interval: float = 0.5
    steps: list[RecoveryStep] = field(default_factory=list)
    uri: str | None = None
    recoveries: int = 0
    _t0: float = field(default_factory=time.monotonic)

    def _note(self, step: str, ok: bool, detail: str = "") -> None:
        self.steps.append(RecoveryStep(round(time.monotonic() - self._t0, 3), step, ok, detail))
        (log.info if ok else log.warning)("postcopy recovery: %s %s %s", step, "ok" if ok else "failed", detail)

    @staticmethod
    async def status(qmp: QMPSession) -> str:
        info = await qmp.execute("query-migrate", timeout=5)
        return str(info.get("status", "none"))

    async def _status_or_none(self, qmp: QMPSession) -> str | None:
        """The status, or None while the monitor does not answer: a destination in postcopy can block
        its main loop on a page that was crossing the broken link (it answers again once the link
        is back or QEMU gives the page request up)."""
        try:
            return await self.status(qmp)
        except QMPTimeoutError:
            return None

    async def pause(self, timeout: float = 30.0) -> None:
        """Bring both sides to ``postcopy-paused`` (each side may already be there). A side whose
        monitor does not answer is asked again until ``timeout``."""
        self._t0 = time.monotonic()
        self.uri = None
        deadline = time.monotonic() + timeout
        for side, qmp in (("source", self.src), ("destination", self.dst)):
            st = await self._status_or_none(qmp)
            if st == PAUSED:
                self._note(f"pause-{side}", True, "already paused")
                continue
            try:
                await qmp.execute("migrate-pause", timeout=5)
                self._note(f"pause-{side}", True, f"was {st or 'unresponsive'}")
            except QEMUBridgeError as exc:
                self._note(f"pause-{side}", False, f"was {st or 'unresponsive'}: {exc}")
        while True:
            src, dst = await self._status_or_none(self.src), await self._status_or_none(self.dst)
            if src == PAUSED and dst == PAUSED:
                return
            if src == "completed":
                return          # the stream finished just before the pause: nothing to recover
            if time.monotonic() > deadline:
                raise TimeoutError(f"postcopy did not pause within {timeout:g} s: source "
                                   f"{src or 'unresponsive'!s}, destination {dst or 'unresponsive'!s}")
            await asyncio.sleep(0.1)

    async def _listen(self) -> None:
        ports = [self.port] if self.port else random.sample(range(20000, 60000), 3)
        last: Exception | None = None
        for p in ports:
            uri = f"tcp:{self.dest_address}:{p}"
            try:
                await self.dst.execute("migrate-recover", {"uri": uri}, timeout=5)
                self.uri = uri
                self._note("recover", True, uri)
                return
            except QEMUBridgeError as exc:
                last = exc
                self._note("recover", False, f"{uri}: {exc}")
        assert last is not None
        raise last

    async def resume(self, deadline: float) -> bool:
        """Try to resume until ``deadline`` (monotonic); True once the source streams again."""
        if self.uri is None:
            await self._listen()
        assert self.uri is not None
        while True:
            st = await self.status(self.src)
            if st != PAUSED:
                self.recoveries += 1
                self._note("resume", True, f"source {st}")
                return True
            try:
                await self.src.execute("migrate", {"uri": self.uri, "resume": True}, timeout=5)
            except QEMUBridgeError as exc:
                log.info("postcopy recovery: migrate resume refused: %s", exc)
            # a failed connect leaves the source paused; a good one moves it on within a moment
            settle = time.monotonic() + min(2.0, max(0.2, deadline - time.monotonic()))
            while time.monotonic() < settle:
                await asyncio.sleep(0.1)
                with contextlib.suppress(QEMUBridgeError):
                    if await self.status(self.src) != PAUSED:
                        break
            if await self.status(self.src) != PAUSED:
                continue
            self._note("resume", False, "the source is still postcopy-paused (no connection)")
            if time.monotonic() >= deadline:
                return False
            await asyncio.sleep(min(self.interval, max(0.0, deadline - time.monotonic())))
