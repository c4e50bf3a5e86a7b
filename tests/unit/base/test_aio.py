"""hvbase.aio: a cancellation is never swallowed (the 3.11 asyncio.wait_for bug, gh-86296), and a
task that swallows one is still stopped."""
from __future__ import annotations

import asyncio
import sys

import pytest

from hvbase.aio import cancel_and_wait, wait_for


async def test_wait_for_returns_and_times_out() -> None:
    assert await wait_for(asyncio.sleep(0, "x"), 1) == "x"
    with pytest.raises(TimeoutError):
        await wait_for(asyncio.sleep(5), 0.01)


async def _cancel_when_inner_completes(waiter: object) -> bool:
    """Cancel a task awaiting ``waiter(fut, 10)`` in the same loop iteration that completes ``fut``;
    True when the cancellation reached the task."""
    fut: asyncio.Future[int] = asyncio.get_running_loop().create_future()

    async def body() -> str:
        await waiter(fut, 10)  # type: ignore[operator]
        await asyncio.sleep(0.2)   # a loop told to stop would go on here
        return "ran on"

    task = asyncio.create_task(body())
    await asyncio.sleep(0.01)
    fut.set_result(1)
    task.cancel()
    try:
        await task
    except asyncio.CancelledError:
        return True
    return False


async def test_a_cancel_racing_completion_is_kept() -> None:
    assert await _cancel_when_inner_completes(wait_for)


async def test_the_stdlib_wait_for_of_311_swallows_it() -> None:
    # why hvbase.aio exists: the interpreter's behaviour we guard against (3.12 fixed it)
    kept = await _cancel_when_inner_completes(asyncio.wait_for)  # noqa: TID251
    assert kept is (sys.version_info >= (3, 12))


async def test_cancel_and_wait_stops_a_task_that_swallows_one_cancel() -> None:
    swallowed = 0

    async def stubborn() -> None:
        nonlocal swallowed
        while True:
            try:
                await asyncio.sleep(1)
            except asyncio.CancelledError:
                if swallowed == 0:
                    swallowed += 1
                    continue          # what the 3.11 wait_for does, once
                raise

    task = asyncio.create_task(stubborn())
    await asyncio.sleep(0.01)
    await cancel_and_wait(task, retry_s=0.05)
    assert task.cancelled() and swallowed == 1


async def test_all_or_first_error_raises_the_first_failure_itself_and_cancels_the_rest() -> None:
    from hvbase.aio import all_or_first_error
    cancelled: list[str] = []

    async def ok(v: int) -> int:
        await asyncio.sleep(0.01)
        return v

    async def slow() -> None:
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            cancelled.append("slow")
            raise

    async def bad() -> None:
        await asyncio.sleep(0.02)
        try:
            raise OSError("root")
        except OSError as e:
            raise KeyError("boom") from e
    assert await all_or_first_error(ok(1), ok(2)) == [1, 2]
    with pytest.raises(KeyError, match="boom") as ei:
        await all_or_first_error(ok(1), slow(), bad())
    assert isinstance(ei.value.__cause__, OSError)          # the root cause kept, no ExceptionGroup
    assert cancelled == ["slow"]
    # the caller's cancellation propagates and cancels them all
    t = asyncio.ensure_future(all_or_first_error(slow(), slow()))
    await asyncio.sleep(0.05)
    t.cancel()
    with pytest.raises(asyncio.CancelledError):
        await t
    assert cancelled == ["slow", "slow", "slow"]
