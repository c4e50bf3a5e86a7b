"""hvbase.events: named, filtered subscriptions that cannot leak; callbacks; history; closing."""
from __future__ import annotations

import asyncio
from dataclasses import dataclass

import pytest

from hvbase.aio import wait_for
from hvbase.events import EventBus, SubscriptionClosed


@dataclass(frozen=True)
class Ping:
    n: int


@dataclass(frozen=True)
class Pong:
    n: int


async def test_kinds_and_filter_select_what_a_subscriber_gets() -> None:
    bus: EventBus[object] = EventBus("t")
    with bus.subscribe("evens", kinds=(Ping,), filter=lambda e: e.n % 2 == 0) as sub:  # type: ignore[attr-defined]
        for i in range(5):
            bus.publish(Ping(i))
            bus.publish(Pong(i))
        got = [await sub.get(timeout=1) for _ in range(3)]
        assert got == [Ping(0), Ping(2), Ping(4)] and sub.pending() == 0
        with pytest.raises(TimeoutError):
            await sub.get(timeout=0.05)
    assert bus.subscriptions() == []           # leaving the block removed it


async def test_a_waiting_get_wakes_on_publish() -> None:
    bus: EventBus[int] = EventBus("t")
    with bus.subscribe("w") as sub:
        waiter = asyncio.ensure_future(sub.get(timeout=5))
        await asyncio.sleep(0)
        bus.publish(7)
        assert await waiter == 7


async def test_callbacks_run_at_publish_and_their_errors_do_not_reach_the_publisher() -> None:
    bus: EventBus[int] = EventBus("t")
    seen: list[int] = []

    def bad(_i: int) -> None:
        raise RuntimeError("subscriber bug")
    with bus.subscribe("bad", callback=bad), bus.subscribe("good", callback=seen.append):
        bus.publish(1)
        bus.publish(2)
    assert seen == [1, 2]
    bus.publish(3)
    assert seen == [1, 2]


async def test_history_replay_and_bounded_queue() -> None:
    bus: EventBus[int] = EventBus("t", history=3)
    for i in range(5):
        bus.publish(i)
    assert bus.history() == [2, 3, 4]
    with bus.subscribe("late", replay=True, filter=lambda i: i != 3) as sub:
        assert [sub.get_nowait(), sub.get_nowait(), sub.get_nowait()] == [2, 4, None]
    with bus.subscribe("small", maxsize=2) as small:
        for i in range(4):
            bus.publish(i)
        assert small.dropped == 2 and [small.get_nowait(), small.get_nowait()] == [2, 3]


async def test_closing_the_bus_ends_iterators_and_wakes_waiters() -> None:
    bus: EventBus[int] = EventBus("t")
    sub = bus.subscribe("it")
    bus.publish(1)

    async def drain() -> list[int]:
        return [i async for i in sub]
    task = asyncio.ensure_future(drain())
    await asyncio.sleep(0)
    bus.close()
    assert await wait_for(task, 1) == [1]
    with pytest.raises(SubscriptionClosed):
        await sub.get()
    assert bus.subscribe("after").closed
