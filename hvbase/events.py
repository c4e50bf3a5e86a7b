"""One event mechanism: a bus with named, filtered subscriptions that cannot leak.

A :class:`EventBus` fans every published item out to its subscriptions. A subscription has a
name (so a leak can be named), an optional filter (event classes and/or a predicate) and either a
queue (``await sub.get(timeout)``, ``async for e in sub``) or a callback run synchronously at
publish time. It is used as a context manager, so leaving the block removes it::

    with cluster.events.subscribe("placement", kinds=(VMMoved,)) as sub:
        moved = await sub.get(timeout=5)

    with bus.subscribe("log", callback=print):   # callbacks: errors are logged, never raised
        ...

A bus may keep a bounded history (``history=N``); ``subscribe(..., replay=True)`` first delivers
the matching part of it, so a subscriber that arrives late misses nothing that was kept.
QMP events (qmp_bridge), VM state changes, VM moves, component failures and migration progress
all travel on buses of this one kind.
"""
from __future__ import annotations

import asyncio
import itertools
import logging
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterable
from types import TracebackType
from typing import Generic, TypeVar

from .errors import HvsimError

T = TypeVar("T")
log = logging.getLogger("hvbase.events")


class SubscriptionClosed(HvsimError):
    """``get()`` on a subscription that was closed (its bus closed, or the subscriber left)."""


class Subscription(Generic[T]):
    """One subscriber's view of a bus. Create it with :meth:`EventBus.subscribe`."""

    def __init__(self, bus: EventBus[T], name: str, kinds: tuple[type, ...] | None,
                 predicate: Callable[[T], bool] | None, callback: Callable[[T], None] | None,
                 maxsize: int) -> None:
        self.bus = bus
        self.name = name
        self.kinds = kinds
        self.predicate = predicate
        self.callback = callback
        self.maxsize = maxsize
        self.dropped = 0
        self.closed = False
        self._items: deque[T] = deque()
        self._waiter: asyncio.Future[None] | None = None

    # -- delivery ------------------------------------------------------------------------------
    def accepts(self, item: T) -> bool:
        if self.kinds is not None and not isinstance(item, self.kinds):
            return False
        return self.predicate(item) if self.predicate is not None else True

    def _offer(self, item: T) -> None:
        if self.closed or not self.accepts(item):
            return
        if self.callback is not None:
            try:
                self.callback(item)
            except Exception:  # a subscriber's bug must not break the publisher
                log.exception("subscriber %r of bus %r failed", self.name, self.bus.name)
            return
        if self.maxsize and len(self._items) >= self.maxsize:
            self._items.popleft()
            self.dropped += 1
        self._items.append(item)
        self._wake()

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    # -- consumption ---------------------------------------------------------------------------
    def pending(self) -> int:
        return len(self._items)

    def get_nowait(self) -> T | None:
        return self._items.popleft() if self._items else None

    async def get(self, timeout: float | None = None) -> T:
        """The next item; ``TimeoutError`` after ``timeout`` s, SubscriptionClosed once closed."""
        if self.callback is not None:
            raise TypeError(f"subscription {self.name!r} delivers to a callback, not a queue")
        async with asyncio.timeout(timeout):
            while not self._items:
                if self.closed:
                    raise SubscriptionClosed(f"subscription {self.name!r} of bus {self.bus.name!r} is closed")
                self._waiter = asyncio.get_running_loop().create_future()
                try:
                    await self._waiter
                finally:
                    self._waiter = None
        return self._items.popleft()

    async def wait_for(self, predicate: Callable[[T], bool], timeout: float | None = None) -> T:
        """The first item (queued or later) that satisfies ``predicate``; others are consumed."""
        async with asyncio.timeout(timeout):
            while True:
                item = await self.get()
                if predicate(item):
                    return item

    def __aiter__(self) -> AsyncIterator[T]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[T]:
        while True:
            try:
                yield await self.get()
            except SubscriptionClosed:
                return

    # -- lifetime ------------------------------------------------------------------------------
    def close(self) -> None:
        """Leave the bus. Items already queued can still be read; then ``get`` raises."""
        if not self.closed:
            self.closed = True
            self.bus._remove(self)  # noqa: SLF001 (bus and subscription are one unit)
            self._wake()

    def __enter__(self) -> Subscription[T]:
        return self

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None) -> None:
        self.close()

    async def __aenter__(self) -> Subscription[T]:
        return self

    async def __aexit__(self, et: type[BaseException] | None, ev: BaseException | None,
                        tb: TracebackType | None) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<Subscription {self.name!r} on {self.bus.name!r}{' closed' if self.closed else ''}>"


class EventBus(Generic[T]):
    """Publish items to every matching subscription (synchronously, in subscription order)."""

    def __init__(self, name: str, history: int = 0) -> None:
        self.name = name
        self._subs: dict[int, Subscription[T]] = {}
        self._ids = itertools.count()
        self._history: deque[T] | None = deque(maxlen=history) if history else None
        self.closed = False

    def publish(self, item: T) -> None:
        if self._history is not None:
            self._history.append(item)
        for sub in list(self._subs.values()):
            sub._offer(item)  # noqa: SLF001 (bus and subscription are one unit)

    def subscribe(self, name: str, *, kinds: Iterable[type] | None = None,
                  filter: Callable[[T], bool] | None = None, callback: Callable[[T], None] | None = None,
                  replay: bool = False, maxsize: int = 100_000) -> Subscription[T]:
        """A new subscription (use it as a context manager). ``kinds``: accept only instances of
        these classes; ``filter``: and only items for which it returns true; ``callback``: deliver
        by calling it instead of queueing; ``replay``: first deliver the matching history;
        ``maxsize``: a queue keeps at most this many items (the oldest are dropped, counted)."""
        sub = Subscription(self, name, tuple(kinds) if kinds is not None else None, filter, callback, maxsize)
        if self.closed:
            sub.closed = True
            return sub
        if replay and self._history is not None:
            for item in list(self._history):
                sub._offer(item)  # noqa: SLF001 (bus and subscription are one unit)
        self._subs[id(sub)] = sub
        return sub

    def history(self, kinds: Iterable[type] | None = None,
                filter: Callable[[T], bool] | None = None) -> list[T]:
        ks = tuple(kinds) if kinds is not None else None
        return [i for i in (self._history or ()) if (ks is None or isinstance(i, ks))
                and (filter is None or filter(i))]

    def subscriptions(self) -> list[str]:
        """Names of the open subscriptions (a test can assert none leaked)."""
        return [s.name for s in self._subs.values()]

    def _remove(self, sub: Subscription[T]) -> None:
        self._subs.pop(id(sub), None)

    def close(self) -> None:
        """Close every subscription (their iterators end) and refuse new ones."""
        self.closed = True
        for sub in list(self._subs.values()):
            sub.close()

    def __repr__(self) -> str:
        return f"<EventBus {self.name!r} subscriptions={self.subscriptions()}>"
