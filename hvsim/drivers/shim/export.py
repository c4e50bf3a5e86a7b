"""An export: one backing store, its swap tracker, its page cache and the background prefetcher.

The NBD server validates offsets and lengths, then calls the ``Export`` data methods. The export
keeps the cache correct under concurrent writes: a write patches cached pages before it reaches
the backing file, and a prefetch read that overlaps a write (begun before or during the fetch) is
discarded instead of being inserted, so stale data never enters the cache.
"""
from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Iterable
from enum import StrEnum
from typing import Any

from . import protocol as P
from .cache import PAGE, PageCache, SwapTracker, page_span
from hvbase.fsm import StateMachine

from .errors import ShimConfigError, ShimStateError, StoreError
from .store import BackingStore

log = logging.getLogger(__name__)

CHECKPOINT_VERSION = 1
_COUNTERS = (
    "reads", "writes", "flushes", "trims", "zeroes", "read_bytes", "write_bytes",
    "hits", "misses", "prefetched_pages", "prefetch_used_pages", "prefetched_in_time", "prefetch_late",
    "prefetch_discarded", "prefetch_errors", "prefetch_woken_pages",
)


class ExportState(StrEnum):
    CREATED = "created"
    OPEN = "open"
    CLOSING = "closing"
    CLOSED = "closed"


class PrefetchState(StrEnum):
    IDLE = "idle"
    RUNNING = "running"
    DONE = "done"
    CANCELLED = "cancelled"


E, F = ExportState, PrefetchState
EXPORT_TRANSITIONS = {E.CREATED: {E.OPEN, E.CLOSED}, E.OPEN: {E.CLOSING}, E.CLOSING: {E.CLOSED}, E.CLOSED: set()}
# a new plan may start from any state (a deeper consolidation re-plans); a restored checkpoint resets it
# a paused prefetch (a device checkpoint quiesces the shim) reads as the state it had before the pause
PREFETCH_TRANSITIONS = {F.IDLE: {F.RUNNING, F.DONE, F.IDLE}, F.RUNNING: {F.RUNNING, F.DONE, F.CANCELLED, F.IDLE},
                        F.DONE: {F.RUNNING, F.DONE, F.IDLE},
                        F.CANCELLED: {F.RUNNING, F.DONE, F.IDLE, F.CANCELLED}}


class Export:
    """A named export. ``open()`` it, serve it, ``await close()`` it."""

    def __init__(self, name: str, store: BackingStore, *, description: str = "",
                 prefetch_concurrency: int = 4, max_run_pages: int = 32) -> None:
        if len(name.encode()) > P.MAX_STRING:
            raise ShimConfigError(f"export name longer than {P.MAX_STRING} bytes")
        if prefetch_concurrency < 1:
            raise ShimConfigError(f"prefetch concurrency must be >= 1, got {prefetch_concurrency}")
        self.name = name
        self.description = description
        self.store = store
        self.prefetch_concurrency = prefetch_concurrency
        self.max_run_pages = max_run_pages
        self.fsm: StateMachine[ExportState] = StateMachine(f"export {name!r}", E.CREATED, EXPORT_TRANSITIONS,
                                                           error=ShimStateError, log=log)
        self.prefetch_fsm: StateMachine[PrefetchState] = StateMachine(
            f"prefetch of export {name!r}", F.IDLE, PREFETCH_TRANSITIONS, error=ShimStateError, log=log)
        self.tracker = SwapTracker()
        self.cache = PageCache(0)
        self.counters: dict[str, int] = dict.fromkeys(_COUNTERS, 0)
        self._prefetch_task: asyncio.Task[None] | None = None
        self._queue: deque[tuple[int, int]] = deque()
        self._urgent: deque[tuple[int, int]] = deque()
        self._planned: set[int] = set()
        self._skipped: set[int] = set()   # left out of the plan as guest-resident; woken by a miss
        self._inflight: dict[int, asyncio.Future[None]] = {}
        self._poisoned: set[int] = set()
        self._writing: dict[int, int] = {}
        self._unused_prefetched: set[int] = set()
        self._epoch_planned = 0
        self._epoch_tracked = 0
        self._epoch_prefetched = 0
        self._writes_open: asyncio.Event | None = None   # set while quiesced: writes wait for it
        self._paused_plan: tuple[set[int], set[int]] | None = None
        self._writes_idle: asyncio.Event | None = None

    @property
    def state(self) -> ExportState:
        return self.fsm.state

    @property
    def prefetch_state(self) -> PrefetchState:
        return self.prefetch_fsm.state

    # lifecycle -------------------------------------------------------------------------------
    def open(self) -> Export:
        self.fsm.require("open", E.CREATED)
        self.store.open()
        self.fsm.set(E.OPEN, "opened")
        return self

    async def close(self) -> None:
        if self.state in (E.CLOSING, E.CLOSED):
            return
        if self.state is E.CREATED:
            self.fsm.set(E.CLOSED, "closed before open")
            return
        self.fsm.set(E.CLOSING, "close")
        self.release_writes()          # held writes now see the export closing (ESHUTDOWN)
        await self._cancel_prefetch()
        await asyncio.to_thread(self.store.close)
        self.fsm.set(E.CLOSED, "closed")

    def _require_open(self) -> None:
        self.fsm.require("serve", E.OPEN)

    @property
    def size(self) -> int:
        return self.store.size

    @property
    def read_only(self) -> bool:
        return self.store.read_only

    def transmission_flags(self) -> int:
        flags = (P.FLAG_HAS_FLAGS | P.FLAG_SEND_FLUSH | P.FLAG_SEND_FUA | P.FLAG_CAN_MULTI_CONN)
        if self.read_only:
            flags |= P.FLAG_READ_ONLY
        else:
            flags |= P.FLAG_SEND_TRIM | P.FLAG_SEND_WRITE_ZEROES
        return flags

    # accounting ------------------------------------------------------------------------------
    def _account(self, span: range, cached: bool | set[int], late: set[int] | None = None) -> None:
        c = self.counters
        if cached is True:
            hit_pages: Any = span
            miss_pages: Any = ()
        elif cached is False:
            hit_pages, miss_pages = (), span
        else:
            hit_pages = [p for p in span if p in cached]
            miss_pages = [p for p in span if p not in cached]
        c["hits"] += len(hit_pages)
        c["misses"] += len(miss_pages)
        unused = self._unused_prefetched
        if unused:
            for p in hit_pages:
                if p in unused:
                    unused.discard(p)
                    c["prefetch_used_pages"] += 1
                    if late and p in late:
                        c["prefetch_late"] += 1
                    else:
                        c["prefetched_in_time"] += 1
        planned = self._planned
        if planned and miss_pages:
            for p in miss_pages:
                if p in planned:
                    # demand-read now: do not fetch it again, and pull its successors forward
                    planned.discard(p)
                    if p + 1 in planned:
                        self._urgent.append((p + 1, self.max_run_pages))
        if self._skipped and miss_pages:
            for p in miss_pages:
                if p in self._skipped:
                    self._wake_skipped(p)

    def _wake_skipped(self, page: int) -> None:
        """A skipped page was read after all: the guest did not hold it. Fetch its skipped
        neighbours (a window of ``max_run_pages`` each side: swap slots were written in clusters)."""
        skipped = self._skipped
        skipped.discard(page)
        lo, hi = page - self.max_run_pages + 1, page + self.max_run_pages
        woken = [q for q in range(lo, hi) if q in skipped]
        if not woken or not self.cache.free_pages():
            return
        for q in woken:
            skipped.discard(q)
            self._planned.add(q)
        self.counters["prefetch_woken_pages"] += len(woken)
        self._urgent.append((lo, hi - lo))
        if self._prefetch_task is None or self._prefetch_task.done():
            self.prefetch_fsm.set(F.RUNNING, "a miss woke skipped pages")
            self._prefetch_task = asyncio.get_running_loop().create_task(
                self._prefetch_main(), name=f"shim-prefetch-{self.name}")

    # data path -------------------------------------------------------------------------------
    def read_nowait(self, offset: int, length: int) -> bytes | None:
        """Serve a read without awaiting (cache hit or OS page-cache hit), or None."""
        buf = bytearray(length)
        return bytes(buf) if self.read_into_nowait(memoryview(buf), offset, length) else None

    def read_into_nowait(self, view: memoryview, offset: int, length: int) -> bool:
        """Fill ``view`` (``length`` bytes) without awaiting: from the shim cache, or from the OS page
        cache when no emulated link is in the way. False (``view`` content undefined) when the read
        has to wait: a page missing, a prefetch of one of its pages in flight, or the export not open."""
        if self.state is not ExportState.OPEN:
            return False
        cache = self.cache
        pages = cache.pages
        if pages:
            if cache.read_into(view, offset, length):
                c = self.counters
                c["reads"] += 1
                c["read_bytes"] += length
                self._account(page_span(offset, length), True)
                return True
            span = page_span(offset, length)
            for p in span:
                if p in pages:
                    return False
        else:
            span = page_span(offset, length)
        inflight = self._inflight
        if inflight:
            for p in span:
                if p in inflight:
                    return False
        if not self.store.try_read_into_nowait(view, offset, length):
            return False
        c = self.counters
        c["reads"] += 1
        c["read_bytes"] += length
        if self._planned or self._skipped:
            self._account(span, False)
        else:  # nothing to learn from this miss: count it
            c["misses"] += len(span)
        return True

    async def read(self, offset: int, length: int) -> bytes | bytearray:
        self._require_open()
        span = page_span(offset, length)
        late: set[int] = set()
        if self._inflight:
            waits = {}
            for p in span:
                fut = self._inflight.get(p)
                if fut is not None:
                    waits[id(fut)] = fut
                    late.add(p)
            if waits:
                await asyncio.gather(*(asyncio.shield(f) for f in waits.values()))
        self.counters["reads"] += 1
        self.counters["read_bytes"] += length
        pages = self.cache.pages
        data = self.cache.read(offset, length) if pages else None
        if data is not None:
            self._account(span, True, late)
            return data
        cached = {p for p in span if p in pages} if pages else set()
        if not cached:
            self._account(span, False)
            return await self.store.read(offset, length)
        # mixed: copy cached segments now, fetch the rest from the backing store
        self._account(span, cached, late)
        end = offset + length
        segments: list[tuple[bool, int, int]] = []
        for p in span:
            lo, hi = max(offset, p * PAGE), min(end, (p + 1) * PAGE)
            hit = p in cached
            if segments and segments[-1][0] == hit and segments[-1][2] == lo:
                segments[-1] = (hit, segments[-1][1], hi)
            else:
                segments.append((hit, lo, hi))
        parts: list[Any] = []
        for hit, lo, hi in segments:
            if hit:
                parts.append(self.cache.read(lo, hi - lo) or None)
            else:
                parts.append(None)
        fetch = [(i, lo, hi) for i, (hit, lo, hi) in enumerate(segments) if parts[i] is None]
        results = await asyncio.gather(*(self.store.read(lo, hi - lo) for _, lo, hi in fetch))
        for (i, _, _), data_i in zip(fetch, results, strict=True):
            parts[i] = data_i
        return b"".join(parts)

    def _writes_begin(self, span: range) -> None:
        writing = self._writing
        inflight = self._inflight
        for p in span:
            writing[p] = writing.get(p, 0) + 1
            if inflight and p in inflight:
                self._poisoned.add(p)

    def _writes_end(self, span: range) -> None:
        writing = self._writing
        for p in span:
            n = writing[p] - 1
            if n:
                writing[p] = n
            else:
                del writing[p]
        if not writing and self._writes_idle is not None:
            self._writes_idle.set()
            self._writes_idle = None

    async def write(self, offset: int, data: bytes | bytearray | memoryview, fua: bool = False) -> None:
        self._require_open()
        if self._writes_open is not None:
            await self._writes_open.wait()   # quiesced (a final checkpoint): held, not acknowledged
            self._require_open()
        span = page_span(offset, len(data))
        self._writes_begin(span)
        try:
            self.cache.patch(offset, data)
            self.tracker.record_write(offset, data)
            await self.store.write(offset, data, fua)
        except BaseException:
            self.cache.drop(offset, len(data))
            raise
        finally:
            self._writes_end(span)
        self.counters["writes"] += 1
        self.counters["write_bytes"] += len(data)

    async def _discard(self, offset: int, length: int, op: str, fua: bool, may_punch: bool) -> None:
        self._require_open()
        if self._writes_open is not None:
            await self._writes_open.wait()
            self._require_open()
        span = page_span(offset, length)
        self._writes_begin(span)
        try:
            self.cache.drop(offset, length)
            self.tracker.forget(offset, length)
            if op == "trim":
                await self.store.trim(offset, length, fua)
            else:
                await self.store.write_zeroes(offset, length, may_punch=may_punch, fua=fua)
        finally:
            self._writes_end(span)
        self.counters["trims" if op == "trim" else "zeroes"] += 1

    async def trim(self, offset: int, length: int, fua: bool = False) -> None:
        await self._discard(offset, length, "trim", fua, True)

    async def write_zeroes(self, offset: int, length: int, *, no_hole: bool = False, fua: bool = False) -> None:
        await self._discard(offset, length, "zero", fua, not no_hole)

    async def flush(self) -> None:
        self._require_open()
        await self.store.flush()
        self.counters["flushes"] += 1

    # prefetch --------------------------------------------------------------------------------
    async def prefetch(self, budget_bytes: int, skip_recent_pages: int = 0) -> dict[str, Any]:
        """Set the cache budget and prefetch recorded swap pages into it in the background.

        A new call replaces the running prefetch. ``budget_bytes=0`` empties the cache.
        ``skip_recent_pages``: how many of the most recently written pages the guest still holds
        in memory (its swap cache, e.g. ``SwapCached`` of /proc/meminfo): they are not fetched.
        """
        self._require_open()
        for what, v in (("budget_bytes", budget_bytes), ("skip_recent_pages", skip_recent_pages)):
            if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                raise ShimConfigError(f"{what} must be an integer >= 0, got {v!r}")
        await self._cancel_prefetch()
        self.cache.set_budget(budget_bytes)
        skipped = self.tracker.recent(skip_recent_pages)
        runs = self.tracker.plan(self.cache.free_pages(), exclude=self.cache.pages, max_run=self.max_run_pages,
                                 skip_recent=skip_recent_pages)
        self._skipped = skipped.difference(self.cache.pages)
        self._queue = deque(runs)
        self._urgent = deque()
        self._planned = {p for first, n in runs for p in range(first, first + n)}
        self._epoch_planned = len(self._planned)
        self._epoch_tracked = len(self.tracker)
        self._epoch_prefetched = 0
        if runs:
            self.prefetch_fsm.set(F.RUNNING, f"{len(runs)} runs planned")
            self._prefetch_task = asyncio.get_running_loop().create_task(
                self._prefetch_main(), name=f"shim-prefetch-{self.name}")
        else:
            self.prefetch_fsm.set(F.DONE, "nothing to prefetch")
        return {"budget_bytes": self.cache.budget_bytes, "planned_pages": self._epoch_planned,
                "runs": len(runs), "cached_pages": len(self.cache), "tracked_pages": self._epoch_tracked,
                "skipped_recent_pages": len(self._skipped)}

    async def wait_prefetch(self) -> None:
        task = self._prefetch_task
        if task is not None:
            await asyncio.shield(task)

    async def drop_cache(self) -> None:
        await self._cancel_prefetch()
        self.cache.clear()
        self._unused_prefetched.clear()

    async def _cancel_prefetch(self) -> None:
        task, self._prefetch_task = self._prefetch_task, None
        self._queue.clear()
        self._urgent.clear()
        self._planned.clear()
        self._skipped.clear()
        if task is not None and not task.done():
            task.cancel()
            await asyncio.wait([task])  # waits without swallowing a cancellation aimed at us
            if self.prefetch_state is F.RUNNING:
                self.prefetch_fsm.set(F.CANCELLED, "cancelled")

    async def _prefetch_main(self) -> None:
        try:
            while True:  # a miss may wake skipped pages while the last workers finish
                await asyncio.gather(*(self._prefetch_worker() for _ in range(self.prefetch_concurrency)))
                if not (self._urgent or self._queue) or not self.cache.free_pages():
                    break
        finally:
            self._planned.clear()
        self.prefetch_fsm.set(F.DONE, f"{len(self.cache)} pages in cache")
        log.info("prefetch %s done: %d pages in cache", self.name, len(self.cache))

    def _next_run(self) -> tuple[int, int] | None:
        if self._urgent:
            return self._urgent.popleft()
        if self._queue:
            return self._queue.popleft()
        return None

    async def _prefetch_worker(self) -> None:
        loop = asyncio.get_running_loop()
        while (run := self._next_run()) is not None:
            first, n = run
            planned = self._planned
            cand = [p for p in range(first, first + n) if p in planned]
            for p in cand:
                planned.discard(p)
            cand = [p for p in cand if p in self.tracker and p not in self.cache.pages
                    and p not in self._writing and p not in self._inflight]
            i = 0
            while i < len(cand):
                j = i + 1
                while j < len(cand) and cand[j] == cand[j - 1] + 1:
                    j += 1
                sub = cand[i:j]
                i = j
                if not self.cache.reserve(len(sub)):
                    self._queue.clear()
                    self._urgent.clear()
                    self._planned.clear()
                    return
                await self._fetch(loop, sub)

    async def _fetch(self, loop: asyncio.AbstractEventLoop, sub: list[int]) -> None:
        fut: asyncio.Future[None] = loop.create_future()
        for p in sub:
            self._inflight[p] = fut
        remaining = len(sub)
        try:
            off = sub[0] * PAGE
            length = min(len(sub) * PAGE, self.size - off)
            data = await self.store.read(off, length)
            view = memoryview(data)
            for k, p in enumerate(sub):
                remaining -= 1
                if p in self._poisoned or p not in self.tracker:
                    self.cache.release(1)
                    self.counters["prefetch_discarded"] += 1
                    continue
                self.cache.insert_reserved(p, view[k * PAGE:(k + 1) * PAGE])
                if p in self.cache.pages:
                    self._unused_prefetched.add(p)
                    self.counters["prefetched_pages"] += 1
                    self._epoch_prefetched += 1
        except StoreError as exc:
            self.counters["prefetch_errors"] += 1
            log.warning("prefetch read of pages %d..%d failed: %s", sub[0], sub[-1], exc)
        finally:
            self.cache.release(remaining)
            for p in sub:
                self._inflight.pop(p, None)
                self._poisoned.discard(p)
            fut.set_result(None)

    # device state (checkpoints, quiesce: used by .devstate) -----------------------------------------
    @property
    def quiesced(self) -> bool:
        return self._writes_open is not None

    def hold_writes(self) -> None:
        """From now on writes, trims and zeroings wait (they are not acknowledged) until
        :meth:`release_writes`; reads and flushes go on."""
        if self._writes_open is None:
            self._writes_open = asyncio.Event()

    def release_writes(self) -> None:
        ev, self._writes_open = self._writes_open, None
        if ev is not None:
            ev.set()

    async def wait_writes_idle(self, timeout: float = 30.0) -> None:
        """Wait until no write is in flight (one that began before :meth:`hold_writes`)."""
        if not self._writing:
            return
        if self._writes_idle is None:
            self._writes_idle = asyncio.Event()
        async with asyncio.timeout(timeout):
            await self._writes_idle.wait()

    def prefetch_plan(self) -> tuple[set[int], set[int], set[int]]:
        """(pages the prefetch still has to fetch, in-flight reads included; pages it skipped as
        guest-resident; prefetched pages not used yet)."""
        if self._paused_plan is not None:
            planned, skipped = self._paused_plan
            return set(planned), set(skipped), set(self._unused_prefetched)
        return (set(self._planned) | set(self._inflight), set(self._skipped), set(self._unused_prefetched))

    async def pause_prefetch(self) -> None:
        """Stop the prefetcher after its reads in flight, keeping what it still had to do and the
        pages it skipped (a later miss still wakes them once resumed)."""
        if self._paused_plan is not None:
            return
        running = self._prefetch_task is not None and not self._prefetch_task.done()
        state = self.prefetch_state
        planned, skipped, _ = self.prefetch_plan()
        await self._cancel_prefetch()
        self._paused_plan = (planned - set(self.cache.pages) if running else set(), skipped)
        self.prefetch_fsm.set(F.RUNNING if running else state, "paused (kept for resume)")

    def resume_prefetch(self, planned: Iterable[int] | None = None, skipped: Iterable[int] = ()) -> int:
        """Prefetch ``planned`` pages (default: what :meth:`pause_prefetch` kept) into the cache's free
        budget, most recently written first; returns how many pages were planned."""
        if planned is None:
            if self._paused_plan is None:
                return 0
            planned, skipped = self._paused_plan
        self._paused_plan = None
        self._require_open()
        want = {p for p in planned if p in self.tracker and p not in self.cache.pages}
        self._skipped = set(skipped).difference(self.cache.pages)
        order = sorted(want, key=lambda p: self.tracker.pages[p], reverse=True)[:self.cache.free_pages()]
        runs: list[tuple[int, int]] = []
        for p in sorted(order):
            if runs and runs[-1][0] + runs[-1][1] == p and runs[-1][1] < self.max_run_pages:
                runs[-1] = (runs[-1][0], runs[-1][1] + 1)
            else:
                runs.append((p, 1))
        rank = {p: i for i, p in enumerate(order)}
        runs.sort(key=lambda r: min(rank[q] for q in range(r[0], r[0] + r[1])))
        self._queue = deque(runs)
        self._urgent = deque()
        self._planned = set(order)
        if runs:
            self.prefetch_fsm.set(F.RUNNING, f"{len(runs)} runs resumed")
            self._prefetch_task = asyncio.get_running_loop().create_task(
                self._prefetch_main(), name=f"shim-prefetch-{self.name}")
        return len(order)

    def restore_prefetch_state(self, state: PrefetchState, reason: str = "restored") -> None:
        """Take over the prefetch state of a restored device checkpoint."""
        self.prefetch_fsm.set(state, reason)

    def set_unused_prefetched(self, pages: Iterable[int]) -> None:
        """Restore the accuracy accounting: prefetched pages not read yet."""
        self._unused_prefetched = set(pages)

    # stats and state ---------------------------------------------------------------------------
    def stats(self) -> dict[str, Any]:
        c = self.counters
        looked = c["hits"] + c["misses"]
        link = self.store.link
        return {
            "export": self.name,
            "state": self.state.value,
            "size": self.size,
            **c,
            "hit_rate": c["hits"] / looked if looked else 0.0,
            "accuracy": c["prefetch_used_pages"] / c["prefetched_pages"] if c["prefetched_pages"] else 0.0,
            "coverage": min(1.0, self._epoch_prefetched / self._epoch_tracked) if self._epoch_tracked else 0.0,
            "cache_bytes": self.cache.cache_bytes,
            "cache_pages": len(self.cache),
            "reserved_bytes": self.cache.reserved * PAGE,
            "budget_bytes": self.cache.budget_bytes,
            "tracked_pages": len(self.tracker),
            "swap_header": self.tracker.swap_header,
            "swap_last_page": self.tracker.swap_last_page,
            "prefetch_state": self.prefetch_state.value,
            "prefetch_planned_pages": self._epoch_planned,
            "prefetch_pending_pages": len(self._planned),
            "prefetch_skipped_pages": len(self._skipped),
            "prefetch_inflight_pages": len(self._inflight),
            "backing_reads": self.store.backing_reads,
            "backing_read_bytes": self.store.backing_read_bytes,
            "backing_writes": self.store.backing_writes,
            "backing_write_bytes": self.store.backing_write_bytes,
            "latency_ms": link.latency_s * 1000.0,
            "bandwidth_bps": link.bandwidth_bps,
        }

    def reset_stats(self) -> None:
        self.counters = dict.fromkeys(_COUNTERS, 0)
        self._unused_prefetched.clear()
        self._epoch_planned = self._epoch_tracked = self._epoch_prefetched = 0
        s = self.store
        s.backing_reads = s.backing_read_bytes = s.backing_writes = s.backing_write_bytes = 0

    def checkpoint(self) -> dict[str, Any]:
        """Serialisable device state (the cache contents are not part of it: re-prefetch after restore)."""
        return {
            "version": CHECKPOINT_VERSION,
            "export": self.name,
            "size": self.size,
            "budget_bytes": self.cache.budget_bytes,
            "tracker": self.tracker.checkpoint(),
            "counters": dict(self.counters),
        }

    async def restore(self, state: dict[str, Any]) -> None:
        self._require_open()
        if not isinstance(state, dict) or state.get("version") != CHECKPOINT_VERSION:
            raise ShimConfigError(f"checkpoint version must be {CHECKPOINT_VERSION}, got "
                                  f"{state.get('version') if isinstance(state, dict) else type(state).__name__}")
        if state.get("size") != self.size:
            raise ShimConfigError(f"checkpoint is for a {state.get('size')}-byte export, this one has {self.size}")
        tracker = SwapTracker()
        tracker.restore(state.get("tracker", {}))
        await self.drop_cache()
        self.tracker = tracker
        self.cache.set_budget(int(state.get("budget_bytes", 0)))
        counters = state.get("counters", {})
        self.counters = {k: int(counters.get(k, 0)) for k in _COUNTERS}
        self.prefetch_fsm.set(F.IDLE, "restored")
