"""The VM's operation lock: one lifecycle operation (or one migration) at a time, with its holder
named, so a refusal can say what the VM is busy with; ``try_acquire`` for callers that must refuse at
once instead of waiting (starting a migration is synchronous)."""
from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import AsyncIterator


class OpLock:
    def __init__(self) -> None:
        self.holder: str | None = None
        self._waiters: deque[asyncio.Future[None]] = deque()

    @property
    def locked(self) -> bool:
        return self.holder is not None

    def try_acquire(self, holder: str) -> bool:
        if self.holder is not None or self._waiters:
            return False
        self.holder = holder
        return True

    async def acquire(self, holder: str) -> None:
        if self.try_acquire(holder):
            return
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(fut)
        try:
            await fut
        except asyncio.CancelledError:
            if fut.done() and not fut.cancelled():   # handed over just as we were cancelled: pass it on
                self.holder = None
                self._wake_next()
            raise
        finally:
            with contextlib.suppress(ValueError):
                self._waiters.remove(fut)
        self.holder = holder

    def release(self) -> None:
        if self.holder is None:
            raise RuntimeError("OpLock.release() of a lock that is not held")
        self.holder = None
        self._wake_next()

    def _wake_next(self) -> None:
        while self._waiters:
            fut = self._waiters.popleft()
            if not fut.done():
                self.holder = "(handing over)"
                fut.set_result(None)
                return

    @contextlib.asynccontextmanager
    async def hold(self, holder: str) -> AsyncIterator[None]:
        await self.acquire(holder)
        try:
            yield
        finally:
            self.release()
