"""Swap tracking, prefetch ordering and the page cache (in-process, no NBD clients)."""
from __future__ import annotations

import asyncio
import os
import struct
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from hvsim.drivers.shim.cache import PAGE, SWAP_MAGIC, PageCache, SwapTracker
from hvsim.drivers.shim.errors import ShimConfigError, ShimStateError
from hvsim.drivers.shim.export import Export
from hvsim.drivers.shim.store import BackingStore, LinkSpec

NPAGES = 256


def swap_header(last_page: int = NPAGES - 1) -> bytes:
    page = bytearray(PAGE)
    struct.pack_into("<II", page, 1024, 1, last_page)
    page[PAGE - 10:] = SWAP_MAGIC
    return bytes(page)


@pytest.fixture
async def make_export(tmp_path: Path) -> AsyncIterator:
    made: list[Export] = []

    async def make(latency_s: float = 0.0, concurrency: int = 4, max_run: int = 32) -> Export:
        img = tmp_path / f"e{len(made)}.img"
        img.write_bytes(os.urandom(NPAGES * PAGE))
        e = Export("t", BackingStore(img, link=LinkSpec(latency_s=latency_s)),
                   prefetch_concurrency=concurrency, max_run_pages=max_run).open()
        made.append(e)
        return e

    yield make
    for e in made:
        await e.close()


def install_budget_checker(e: Export) -> list[int]:
    """Check cache_bytes + reserved <= budget after every cache mutation; returns observed peaks."""
    peaks: list[int] = []
    cache = e.cache
    for name in ("reserve", "insert_reserved", "release", "set_budget", "patch"):
        orig = getattr(cache, name)

        def wrapped(*a, _orig=orig, **kw):  # type: ignore[no-untyped-def]
            r = _orig(*a, **kw)
            used = (len(cache.pages) + cache.reserved) * PAGE
            assert used <= cache.budget_bytes, f"cache {used} bytes over budget {cache.budget_bytes}"
            peaks.append(len(cache.pages) * PAGE)
            return r
        setattr(cache, name, wrapped)
    return peaks


# tracker -------------------------------------------------------------------------------------
def test_swap_header_is_not_a_swap_page() -> None:
    t = SwapTracker()
    t.record_write(0, swap_header(1000))
    assert t.swap_header and t.swap_last_page == 1000 and len(t) == 0
    t.record_write(5 * PAGE, bytes(2 * PAGE))
    assert sorted(t.pages) == [5, 6]
    t.record_write(0, bytes(PAGE))  # header overwritten: page 0 is plain data again
    assert not t.swap_header and 0 in t


def test_page_zero_written_before_header_is_dropped_when_header_appears() -> None:
    t = SwapTracker()
    t.record_write(100, b"x")
    assert 0 in t
    t.record_write(0, swap_header())
    assert 0 not in t and t.swap_header


def test_forget_drops_only_fully_covered_pages() -> None:
    t = SwapTracker()
    t.record_write(PAGE, bytes(4 * PAGE))  # pages 1..4
    assert t.forget(PAGE + 1, 2 * PAGE) == 1  # covers page 2 fully, 1 and 3 partly
    assert sorted(t.pages) == [1, 3, 4]


def test_plan_most_recent_first_and_coalesced() -> None:
    t = SwapTracker()
    for p in (10, 11, 12, 50, 51, 5):
        t.record_write(p * PAGE, bytes(PAGE))
    assert t.plan(100) == [(5, 1), (50, 2), (10, 3)]
    assert t.plan(3) == [(5, 1), (50, 2)]  # budget keeps the 3 most recent pages
    assert t.plan(100, max_run=2) == [(5, 1), (50, 2), (12, 1), (10, 2)]
    assert t.plan(100, exclude={50, 11}) == [(5, 1), (51, 1), (12, 1), (10, 1)]
    t.record_write(10 * PAGE, bytes(PAGE))  # rewriting makes the run the most recent
    assert t.plan(100)[0] == (10, 3)


def test_tracker_checkpoint_round_trip() -> None:
    t = SwapTracker()
    t.record_write(0, swap_header())
    for p in (9, 3, 7):
        t.record_write(p * PAGE, bytes(PAGE))
    t2 = SwapTracker()
    t2.restore(t.checkpoint())
    assert t2.pages == t.pages and t2.seq == t.seq and t2.swap_header
    assert t2.plan(10) == t.plan(10)
    with pytest.raises(ShimConfigError):
        t2.restore({"pages": "nonsense"})


def test_page_cache_budget_and_patch() -> None:
    c = PageCache(3 * PAGE + 100)  # rounds down to 3 pages
    assert c.budget_bytes == 3 * PAGE
    assert c.reserve(2) and not c.reserve(2)
    c.insert_reserved(1, b"a" * PAGE)
    c.insert_reserved(2, b"b" * PAGE)
    assert c.cache_bytes == 2 * PAGE and c.reserved == 0
    c.patch(PAGE + PAGE - 2, b"XYZW")
    assert c.read(PAGE + PAGE - 2, 4) == b"XYZW"
    assert c.set_budget(PAGE) == 1 and len(c) == 1
    with pytest.raises(ShimConfigError):
        c.set_budget(-1)


# export + prefetch ---------------------------------------------------------------------------
async def fill_swap(e: Export, pages: list[int]) -> dict[int, bytes]:
    await e.write(0, swap_header())
    written = {}
    for p in pages:
        data = os.urandom(PAGE)
        await e.write(p * PAGE, data)
        written[p] = data
    return written


async def test_prefetch_serves_hits_and_never_exceeds_budget(make_export) -> None:
    e = await make_export(latency_s=0.002)
    written = await fill_swap(e, list(range(1, 101)))
    peaks = install_budget_checker(e)
    info = await e.prefetch(40 * PAGE)
    assert info["planned_pages"] == 40
    await e.wait_prefetch()
    st = e.stats()
    assert st["cache_bytes"] == 40 * PAGE and max(peaks) <= 40 * PAGE
    assert st["prefetched_pages"] == 40
    cached = sorted(e.cache.pages)
    assert cached == list(range(61, 101))  # the 40 most recently written pages
    backing_reads = e.store.backing_reads
    for p in cached:
        assert await e.read(p * PAGE, PAGE) == written[p]
    assert e.store.backing_reads == backing_reads  # all served from cache
    st = e.stats()
    assert st["hits"] == 40 and st["misses"] == 0 and st["hit_rate"] == 1.0
    assert st["accuracy"] == 1.0 and st["prefetched_in_time"] == 40
    assert st["coverage"] == pytest.approx(40 / 100)
    assert await e.read(5 * PAGE, PAGE) == written[5]
    assert e.stats()["misses"] == 1


async def test_fast_path_read_counts_hits(make_export) -> None:
    e = await make_export()
    written = await fill_swap(e, [3, 4])
    await e.prefetch(10 * PAGE)
    await e.wait_prefetch()
    assert e.read_nowait(3 * PAGE + 100, 2 * PAGE - 200) == (written[3] + written[4])[100:2 * PAGE - 100]
    assert e.stats()["hits"] == 2


async def test_write_to_cached_page_stays_correct(make_export) -> None:
    e = await make_export()
    written = await fill_swap(e, [7, 8, 9])
    await e.prefetch(10 * PAGE)
    await e.wait_prefetch()
    assert 8 in e.cache
    await e.write(8 * PAGE + 1000, b"\xab" * 5000)  # straddles pages 8 and 9
    expect = bytearray(written[8] + written[9])
    expect[1000:6000] = b"\xab" * 5000
    assert await e.read(8 * PAGE, 2 * PAGE) == bytes(expect)
    with open(e.store.path, "rb") as f:
        f.seek(8 * PAGE)
        assert f.read(2 * PAGE) == bytes(expect)


async def test_trim_and_write_zeroes_forget_and_drop(make_export) -> None:
    e = await make_export()
    await fill_swap(e, [10, 11, 12, 13])
    await e.prefetch(10 * PAGE)
    await e.wait_prefetch()
    await e.trim(10 * PAGE, 2 * PAGE)
    await e.write_zeroes(12 * PAGE, PAGE)
    assert sorted(e.tracker.pages) == [13]
    assert sorted(e.cache.pages) == [13]
    assert await e.read(12 * PAGE, PAGE) == bytes(PAGE)
    await e.prefetch(10 * PAGE)
    assert e.stats()["prefetch_planned_pages"] == 0  # page 13 is already cached; nothing else tracked


async def test_write_during_prefetch_never_caches_stale_data(make_export) -> None:
    e = await make_export(latency_s=0.05, concurrency=1, max_run=1)
    await fill_swap(e, [20, 21])
    await e.prefetch(10 * PAGE)
    await asyncio.sleep(0.01)  # the fetch of page 21 (most recent) is in flight now
    assert 21 in e._inflight
    new = b"\x99" * PAGE
    await e.write(21 * PAGE, new)
    await e.wait_prefetch()
    assert await e.read(21 * PAGE, PAGE) == new
    assert 21 not in e.cache or bytes(e.cache.pages[21]) == new
    assert e.stats()["prefetch_discarded"] == 1


async def test_read_during_fetch_waits_and_counts_late(make_export) -> None:
    e = await make_export(latency_s=0.05, concurrency=1)
    written = await fill_swap(e, [30, 31, 32])
    await e.prefetch(10 * PAGE)
    await asyncio.sleep(0.01)
    before = e.store.backing_reads
    assert await e.read(31 * PAGE, PAGE) == written[31]
    assert e.store.backing_reads == before + 1  # only the prefetch read itself
    st = e.stats()
    assert st["prefetch_late"] == 1 and st["hits"] == 1


async def test_demand_miss_promotes_following_pages(make_export) -> None:
    e = await make_export(latency_s=0.02, concurrency=1, max_run=4)
    # oldest writes first: pages 100..115 are the least recent, so they are planned last
    await fill_swap(e, list(range(100, 116)) + list(range(40, 56)))
    order: list[int] = []
    orig = e.store.read

    async def spy(offset: int, length: int) -> bytes:
        order.append(offset // PAGE)
        return await orig(offset, length)
    e.store.read = spy  # type: ignore[method-assign]
    await e.prefetch(64 * PAGE)
    await asyncio.sleep(0.005)
    await e.read(100 * PAGE, PAGE)  # the guest faults on an old page: a demand miss
    await e.wait_prefetch()
    # after the demand read, the next fetch is page 101's run, not the remaining recent runs
    demand = order.index(100)
    assert order[demand + 1] == 101
    assert 100 not in e.cache  # demand-read pages are not fetched twice
    assert e.stats()["prefetched_pages"] == 31


async def test_new_budget_replaces_and_zero_empties(make_export) -> None:
    e = await make_export()
    await fill_swap(e, list(range(1, 51)))
    peaks = install_budget_checker(e)
    await e.prefetch(30 * PAGE)
    await e.wait_prefetch()
    await e.prefetch(10 * PAGE)
    assert e.stats()["cache_bytes"] <= 10 * PAGE
    await e.prefetch(0)
    assert e.stats()["cache_bytes"] == 0 and max(peaks) <= 30 * PAGE
    with pytest.raises(ShimConfigError):
        await e.prefetch(-5)


async def test_checkpoint_restore_round_trip(make_export) -> None:
    e = await make_export()
    await fill_swap(e, [3, 9, 27])
    await e.prefetch(2 * PAGE)
    await e.wait_prefetch()
    state = e.checkpoint()
    import json
    state = json.loads(json.dumps(state))  # must be JSON-serialisable
    e2 = await make_export()
    await e2.restore(state)
    assert e2.tracker.pages == e.tracker.pages and e2.tracker.swap_header
    assert e2.cache.budget_bytes == 2 * PAGE and len(e2.cache) == 0
    await e2.prefetch(2 * PAGE)
    await e2.wait_prefetch()
    assert sorted(e2.cache.pages) == [9, 27]
    with pytest.raises(ShimConfigError):
        await e2.restore({**state, "size": 1})


async def test_closed_export_refuses_io(make_export) -> None:
    e = await make_export()
    await e.close()
    with pytest.raises(ShimStateError):
        await e.read(0, PAGE)
    assert e.read_nowait(0, PAGE) is None


def test_plan_skips_the_most_recent_writes() -> None:
    t = SwapTracker()
    for p in (10, 11, 12, 50, 51, 5):
        t.record_write(p * PAGE, bytes(PAGE))
    assert t.recent(2) == {51, 5}
    assert t.plan(100, skip_recent=2) == [(50, 1), (10, 3)]
    assert t.plan(2, skip_recent=2) == [(50, 1), (12, 1)]
    assert t.plan(100, skip_recent=100) == []
    with pytest.raises(ShimConfigError):
        t.plan(100, skip_recent=-1)


async def test_skipped_recent_pages_are_woken_by_a_miss(tmp_path: Path) -> None:
    """Pages left out as guest-resident are fetched after all once the guest reads one of them."""
    path = tmp_path / "b.img"
    path.write_bytes(bytes(256 * PAGE))
    exp = Export("x", BackingStore(path, link=LinkSpec(latency_s=0.001))).open()
    try:
        for p in range(1, 101):
            await exp.write(p * PAGE, bytes([p]) * PAGE)
        info = await exp.prefetch(200 * PAGE, skip_recent_pages=40)  # pages 61..100 left out
        assert info["planned_pages"] == 60 and info["skipped_recent_pages"] == 40
        await exp.wait_prefetch()
        assert set(exp.cache.pages) == set(range(1, 61))
        assert await exp.read(80 * PAGE, PAGE) == bytes([80]) * PAGE  # a miss on a skipped page
        st = exp.stats()
        assert st["misses"] == 1 and st["prefetch_woken_pages"] == 39
        await exp.wait_prefetch()
        assert set(exp.cache.pages) == set(range(1, 101)) - {80}
        assert exp.stats()["prefetch_skipped_pages"] == 0
        for p in (61, 79, 81, 100):
            assert await exp.read(p * PAGE, PAGE) == bytes([p]) * PAGE
        assert exp.stats()["hits"] == 4
    finally:
        await exp.close()
