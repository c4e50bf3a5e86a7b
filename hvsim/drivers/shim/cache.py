"""Swap tracking and the page cache that prefetched swap pages land in.

``SwapTracker`` records every page-sized (4096-byte) location the guest writes, with a write
sequence number, recognises the Linux swap header (``SWAPSPACE2`` at offset 4086 of page 0; page 0
is then the header and never a swap page), and forgets pages that TRIM or WRITE_ZEROES cover.

``PageCache`` holds whole pages within a byte budget. Space is reserved before a prefetch read is
issued, so ``cache_bytes + reserved_bytes <= budget_bytes`` holds at every instant.

Prefetch order (``SwapTracker.plan``): the ``n`` most recently written pages are chosen (Linux
reclaim evicts the coldest pages first, so the pages swapped out last were the warmest and are the
likeliest to be touched soon after memory comes back), then adjacent chosen pages are coalesced into
runs of at most ``max_run`` pages (the swap allocator hands out slots in sequential clusters, so
one larger read replaces many 4 KiB round trips to the slow store), and the runs are ordered by the
most recent write they contain. ``skip_recent`` leaves out the newest pages when the caller knows
the guest still holds that many swapped pages in memory (its swap cache: the last pages written
before reclaim stopped were often not freed yet); the export fetches them after all, with their
neighbours, as soon as the guest reads one of them.

Change tracking (for checkpoint deltas, :mod:`.devstate`): while ``changes`` is a dict (off, None,
by default: no cost on the data path), every page whose entry is set, updated or removed is recorded
with the current ``epoch`` (the seq of the next checkpoint), so the pages changed since any earlier
checkpoint can be listed.
"""
from __future__ import annotations

import heapq
import struct
from collections import OrderedDict
from typing import Any

from .errors import ShimConfigError

PAGE = 4096
SWAP_MAGIC = b"SWAPSPACE2"
SWAP_MAGIC_OFFSET = PAGE - len(SWAP_MAGIC)  # 4086
_SWAP_INFO = struct.Struct("<II")  # version, last_page at offset 1024 of the header page


def page_span(offset: int, length: int) -> range:
    """Pages touched by [offset, offset+length)."""
    if length <= 0:
        return range(0)
    return range(offset // PAGE, (offset + length - 1) // PAGE + 1)


def full_pages(offset: int, length: int) -> range:
    """Pages entirely covered by [offset, offset+length)."""
    first = -(-offset // PAGE)
    last = (offset + length) // PAGE
    return range(first, max(first, last))


class SwapTracker:
    """Which pages hold data the guest wrote, and how recently."""

    def __init__(self) -> None:
        self.pages: dict[int, int] = {}
        self.seq = 0
        self.changes: dict[int, int] | None = None   # page -> epoch of its last change (tracking on)
        self.epoch = 0
        self.swap_header = False
        self.swap_version: int | None = None
        self.swap_last_page: int | None = None

    def __len__(self) -> int:
        return len(self.pages)

    def __contains__(self, page: int) -> bool:
        return page in self.pages

    def _check_header(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        end = offset + len(data)
        if offset <= SWAP_MAGIC_OFFSET and end >= PAGE:
            magic = bytes(data[SWAP_MAGIC_OFFSET - offset:PAGE - offset])
            was = self.swap_header
            self.swap_header = magic == SWAP_MAGIC
            if self.swap_header and offset <= 1024 and end >= 1032:
                self.swap_version, self.swap_last_page = _SWAP_INFO.unpack(bytes(data[1024 - offset:1032 - offset]))
            if self.swap_header and not was:
                self.pages.pop(0, None)
                if self.changes is not None:
                    self.changes[0] = self.epoch
            if not self.swap_header:
                self.swap_version = self.swap_last_page = None

    def record_write(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        if offset < PAGE:
            self._check_header(offset, data)
        self.seq += 1
        seq = self.seq
        pages = self.pages
        changes = self.changes
        for p in page_span(offset, len(data)):
            if p == 0 and self.swap_header:
                continue
            pages.pop(p, None)  # re-insert so dict order follows recency too
            pages[p] = seq
            if changes is not None:
                changes[p] = self.epoch

    def forget(self, offset: int, length: int) -> int:
        """Forget pages fully covered by a discard/zeroing; returns how many were dropped."""
        span = full_pages(offset, length)
        if len(span) > len(self.pages):
            doomed = [p for p in self.pages if p in span]
        else:
            doomed = [p for p in span if p in self.pages]
        for p in doomed:
            del self.pages[p]
        if self.changes is not None:
            for p in doomed:
                self.changes[p] = self.epoch
        n = len(doomed)
        if offset == 0 and length >= PAGE and self.swap_header:
            self.swap_header = False
            self.swap_version = self.swap_last_page = None
        return n

    def recent(self, n: int) -> set[int]:
        """The ``n`` most recently written pages."""
        if n <= 0:
            return set()
        return {p for p, _ in heapq.nlargest(n, self.pages.items(), key=lambda ps: ps[1])}

    def plan(self, max_pages: int, exclude: set[int] | dict[int, Any] | None = None,
             max_run: int = 32, skip_recent: int = 0) -> list[tuple[int, int]]:
        """Runs ``(first_page, n_pages)`` to prefetch, highest priority first (see module doc).

        ``skip_recent``: leave out the that many most recently written pages (the guest still holds
        the last pages it wrote out in its swap cache: they will not be read back)."""
        if max_pages <= 0 or not self.pages:
            return []
        if max_run < 1:
            raise ShimConfigError(f"max_run must be >= 1, got {max_run}")
        if skip_recent < 0:
            raise ShimConfigError(f"skip_recent must be >= 0, got {skip_recent}")
        items: Any = self.pages.items()
        skip = self.recent(skip_recent)
        if exclude or skip:
            items = [(p, s) for p, s in items if p not in skip and not (exclude and p in exclude)]
        chosen = heapq.nlargest(max_pages, items, key=lambda ps: ps[1])
        chosen.sort()
        runs: list[tuple[int, int, int]] = []  # (-max_seq, first, n)
        first, n, best = -1, 0, 0
        for p, s in chosen:
            if n and p == first + n and n < max_run:
                n += 1
                best = max(best, s)
                continue
            if n:
                runs.append((-best, first, n))
            first, n, best = p, 1, s
        if n:
            runs.append((-best, first, n))
        runs.sort()
        return [(f, k) for _, f, k in runs]

    # serialisable state ------------------------------------------------------------------------
    def checkpoint(self) -> dict[str, Any]:
        return {
            "pages": [[p, s] for p, s in self.pages.items()],
            "seq": self.seq,
            "swap_header": self.swap_header,
            "swap_version": self.swap_version,
            "swap_last_page": self.swap_last_page,
        }

    def restore(self, state: dict[str, Any]) -> None:
        try:
            pages = {int(p): int(s) for p, s in state["pages"]}
            seq = int(state["seq"])
            header = bool(state["swap_header"])
        except (KeyError, TypeError, ValueError) as exc:
            raise ShimConfigError(f"invalid tracker state: {exc!r}") from exc
        self.pages = dict(sorted(pages.items(), key=lambda ps: ps[1]))
        self.seq = max([seq, *self.pages.values()])
        self.swap_header = header
        self.swap_version = state.get("swap_version")
        self.swap_last_page = state.get("swap_last_page")


class PageCache:
    """Whole pages in host memory, never more than ``budget_bytes`` (reservations included)."""

    def __init__(self, budget_bytes: int = 0) -> None:
        self.pages: OrderedDict[int, bytearray] = OrderedDict()
        self.reserved = 0
        self.budget_pages = 0
        self.changes: dict[int, int] | None = None   # page -> epoch of its last change (tracking on)
        self.epoch = 0
        self.set_budget(budget_bytes)

    @property
    def budget_bytes(self) -> int:
        return self.budget_pages * PAGE

    @property
    def cache_bytes(self) -> int:
        return len(self.pages) * PAGE

    def __contains__(self, page: int) -> bool:
        return page in self.pages

    def __len__(self) -> int:
        return len(self.pages)

    def set_budget(self, budget_bytes: int) -> int:
        """Set the budget (rounded down to whole pages); evict oldest pages beyond it. Returns evictions."""
        if budget_bytes < 0:
            raise ShimConfigError(f"cache budget must be >= 0 bytes, got {budget_bytes}")
        self.budget_pages = budget_bytes // PAGE
        evicted = 0
        while self.pages and len(self.pages) + self.reserved > self.budget_pages:
            page, _ = self.pages.popitem(last=False)
            if self.changes is not None:
                self.changes[page] = self.epoch
            evicted += 1
        return evicted

    def free_pages(self) -> int:
        return max(0, self.budget_pages - len(self.pages) - self.reserved)

    def reserve(self, n: int) -> bool:
        if n <= 0 or len(self.pages) + self.reserved + n > self.budget_pages:
            return False
        self.reserved += n
        return True

    def release(self, n: int) -> None:
        self.reserved = max(0, self.reserved - n)

    def insert_reserved(self, page: int, data: bytes | bytearray | memoryview) -> None:
        """Insert a page whose space was reserved (the reservation is consumed either way)."""
        self.release(1)
        if page in self.pages:
            return
        if len(self.pages) + self.reserved >= self.budget_pages:
            return  # budget shrank since the reservation
        buf = bytearray(data)
        if len(buf) < PAGE:
            buf.extend(bytes(PAGE - len(buf)))
        self.pages[page] = buf
        if self.changes is not None:
            self.changes[page] = self.epoch

    def get(self, page: int) -> bytearray | None:
        return self.pages.get(page)

    def read(self, offset: int, length: int) -> bytes | None:
        """Bytes [offset, offset+length) if every page is cached, else None."""
        first = offset // PAGE
        last = (offset + length - 1) // PAGE
        pages = self.pages
        if first == last:
            buf = pages.get(first)
            if buf is None:
                return None
            start = offset - first * PAGE
            return bytes(buf[start:start + length])
        out = bytearray()
        for p in range(first, last + 1):
            buf = pages.get(p)
            if buf is None:
                return None
            out += buf
        start = offset - first * PAGE
        return bytes(out[start:start + length])

    def read_into(self, view: memoryview, offset: int, length: int) -> bool:
        """Copy bytes [offset, offset+length) into ``view`` if every page is cached; False (``view``
        untouched) otherwise."""
        first = offset // PAGE
        last = (offset + length - 1) // PAGE
        pages = self.pages
        start = offset - first * PAGE
        if first == last:
            buf = pages.get(first)
            if buf is None:
                return False
            view[:length] = memoryview(buf)[start:start + length]
            return True
        bufs = []
        for p in range(first, last + 1):
            buf = pages.get(p)
            if buf is None:
                return False
            bufs.append(buf)
        pos = 0
        for i, buf in enumerate(bufs):
            lo = start if i == 0 else 0
            hi = min(PAGE, lo + length - pos)
            view[pos:pos + hi - lo] = memoryview(buf)[lo:hi]
            pos += hi - lo
        return True

    def patch(self, offset: int, data: bytes | bytearray | memoryview) -> int:
        """Apply a write to every cached page it touches; returns pages patched."""
        if not self.pages:
            return 0
        n = 0
        view = memoryview(data)
        end = offset + len(view)
        for p in page_span(offset, len(view)):
            buf = self.pages.get(p)
            if buf is None:
                continue
            lo = max(offset, p * PAGE)
            hi = min(end, (p + 1) * PAGE)
            buf[lo - p * PAGE:hi - p * PAGE] = view[lo - offset:hi - offset]
            if self.changes is not None:
                self.changes[p] = self.epoch
            n += 1
        return n

    def drop(self, offset: int, length: int) -> int:
        if not self.pages:
            return 0
        span = page_span(offset, length)
        doomed = [p for p in self.pages if p in span] if len(span) > len(self.pages) else \
            [p for p in span if p in self.pages]
        for p in doomed:
            del self.pages[p]
        if self.changes is not None:
            for p in doomed:
                self.changes[p] = self.epoch
        return len(doomed)

    def clear(self) -> None:
        if self.changes is not None:
            for p in self.pages:
                self.changes[p] = self.epoch
        self.pages.clear()
