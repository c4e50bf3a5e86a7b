"""Small asyncio helpers shared across hvsim."""
from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable
from typing import TypeVar

T = TypeVar("T")
log = logging.getLogger("hvsim.core.aio")


async def run_to_completion(aw: Awaitable[T]) -> T:
    """Await ``aw`` to the end even if the caller is cancelled meanwhile (teardown, rollback);
    the cancellation is re-raised afterwards, never swallowed. If ``aw`` itself failed after the
    caller was cancelled, its error is logged and the cancellation wins."""
    task = asyncio.ensure_future(aw)
    cancelled = False
    while True:
        try:
            result = await asyncio.shield(task)
            break
        except asyncio.CancelledError:
            if task.done():
                if task.cancelled() or not cancelled:
                    raise
                break
            cancelled = True
    if cancelled:
        if not task.cancelled() and task.exception() is not None:
            log.error("work finished after cancellation failed: %s", task.exception())
        raise asyncio.CancelledError()
    return result


async def stop_process(proc: asyncio.subprocess.Process, timeout: float = 5.0) -> int:
    """SIGTERM, wait up to ``timeout`` seconds, then SIGKILL; returns the exit code."""
    if proc.returncode is None:
        proc.terminate()
        try:
            await asyncio.wait_for(proc.wait(), timeout)
        except TimeoutError:
            proc.kill()
            await proc.wait()
    return proc.returncode if proc.returncode is not None else await proc.wait()
