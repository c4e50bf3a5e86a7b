"""asyncio helpers that keep cancellation intact on Python 3.11.

``asyncio.wait_for`` of 3.11 swallows a cancellation when the awaited future completes at the
moment the caller is cancelled: it returns the result instead of raising ``CancelledError``
(CPython gh-86296, fixed in 3.12 by reimplementing it on ``asyncio.timeout``). A loop that is
told to stop then runs on; seen here as a ULD pre-copy loop that kept copying for three minutes
while QEMU waited, paused, for the switch-over. :func:`wait_for` is the 3.12 behaviour (ruff bans
``asyncio.wait_for`` in this project, see pyproject.toml), and :func:`cancel_and_wait` stops a task
even if something inside it swallowed one cancellation.
"""
from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable
from typing import Any, TypeVar

T = TypeVar("T")
log = logging.getLogger("hvbase.aio")


async def wait_for(aw: Awaitable[T], timeout: float | None) -> T:
    """``await aw`` with a timeout (``TimeoutError``); a cancellation of the caller always propagates."""
    async with asyncio.timeout(timeout):
        return await aw


async def cancel_and_wait(task: asyncio.Future[Any], retry_s: float = 0.5) -> None:
    """Cancel ``task`` and wait until it is done, cancelling again every ``retry_s`` seconds if
    something inside it swallowed the cancellation. Its own outcome is not raised (it was cancelled
    on purpose); a cancellation of the caller is (after the task is cancelled once more)."""
    while not task.done():
        task.cancel()
        try:
            await asyncio.wait([task], timeout=retry_s)
        except asyncio.CancelledError:
            task.cancel()
            raise
    if not task.cancelled():
        task.exception()          # retrieved: no "exception was never retrieved" warning


async def all_or_first_error(*aws: Awaitable[Any]) -> list[Any]:
    """Run ``aws`` together and return their results in order. The first one to fail cancels the
    others (and is waited for), and its exception is raised as itself, not inside an
    ExceptionGroup (so callers keep catching the error types they know); a later failure is
    logged. A cancellation of the caller cancels them all and propagates."""
    tasks: list[asyncio.Task[Any]] = []
    try:
        async with asyncio.TaskGroup() as tg:
            tasks = [tg.create_task(_as_coro(a)) for a in aws]
    except BaseExceptionGroup as eg:
        errors = [e for e in eg.exceptions if not isinstance(e, asyncio.CancelledError)]
        if not errors:
            raise
        for e in errors[1:]:
            log.warning("also failed, beside %r: %r", errors[0], e)
        raise errors[0] from errors[0].__cause__
    return [t.result() for t in tasks]


async def _as_coro(aw: Awaitable[T]) -> T:
    return await aw


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
            await wait_for(proc.wait(), timeout)
        except TimeoutError:
            proc.kill()
            await proc.wait()
    return proc.returncode if proc.returncode is not None else await proc.wait()
