"""The shim's device checkpoint (format version 2): round trips, deltas, refusals, quiesce, the
state file, and the binary control commands, on in-process exports and a real control socket."""
from __future__ import annotations

import asyncio
import hashlib
import json
import os
import struct
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hvbase.aio import wait_for
from hvsim.drivers.shim import checkpoint as ckfmt
from hvsim.drivers.shim.cache import PAGE
from hvsim.drivers.shim.checkpoint import CheckpointFormatError, ShimCheckpoint, apply_delta, decode, encode
from hvsim.drivers.shim.control import ShimControlClient
from hvsim.drivers.shim.daemon import ShimDaemon
from hvsim.drivers.shim.devstate import DeviceState, StateFile
from hvsim.drivers.shim.errors import ControlError
from hvsim.drivers.shim.export import Export
from hvsim.drivers.shim.store import BackingStore

NPAGES = 256


def new_export(path: Path, name: str = "t") -> Export:
    if not path.exists():
        path.write_bytes(os.urandom(NPAGES * PAGE))
    return Export(name, BackingStore(path)).open()


@pytest.fixture
async def pair(tmp_path: Path) -> AsyncIterator[tuple[Export, Export]]:
    """Two exports of one shared backing file (the datastore both hosts reach)."""
    img = tmp_path / "shared.img"
    a, b = new_export(img), new_export(img)
    yield a, b
    await a.close()
    await b.close()


def state_of(e: Export) -> dict[str, Any]:
    return {"tracker": list(e.tracker.pages.items()), "tracker_seq": e.tracker.seq,
            "header": (e.tracker.swap_header, e.tracker.swap_last_page),
            "cache": [(p, bytes(b)) for p, b in e.cache.pages.items()], "budget": e.cache.budget_bytes,
            "counters": dict(e.counters)}


async def write(e: Export, page: int, byte: int) -> None:
    await e.write(page * PAGE, bytes([byte]) * PAGE)


async def warm(e: Export, pages: list[int], budget_pages: int) -> None:
    for p in pages:
        await write(e, p, p % 251)
    await e.prefetch(budget_pages * PAGE)
    await e.wait_prefetch()


def sections_of(data: bytes) -> tuple[dict[str, Any], int]:
    _, _, _, hlen = struct.unpack_from("<8sHHI", data)
    return json.loads(data[16:16 + hlen]), 16 + hlen


def resign(data: bytearray) -> bytes:
    """Recompute the trailing checksum (to get past it and reach the checks behind it)."""
    body = bytes(data[:-32])
    return body + hashlib.sha256(body).digest()


# -- format ----------------------------------------------------------------------------------------
async def test_full_round_trip_keeps_every_part(pair: tuple[Export, Export]) -> None:
    a, _ = pair
    await warm(a, [5, 6, 7, 40, 41], budget_pages=4)
    await a.read(40 * PAGE, PAGE)
    ck = DeviceState(a).capture()
    back = decode(encode(ck))
    assert back == ck
    assert back.tracker_items() == list(a.tracker.pages.items())
    assert list(back.cache_pages) == list(a.cache.pages) and len(back.cache_pages) == 4
    assert back.cached()[40] == bytes(a.cache.pages[40])
    assert back.counters["hits"] == 1 and back.budget_bytes == 4 * PAGE
    assert not back.is_delta and back.nbytes >= len(encode(ck)) - 1024


async def test_delta_holds_only_what_changed_and_applies_to_the_same_state(pair: tuple[Export, Export]) -> None:
    a, _ = pair
    dev = DeviceState(a)
    await warm(a, list(range(10, 30)), budget_pages=16)
    full = dev.capture()
    assert 15 in a.cache.pages
    await write(a, 15, 1)                  # a cached page patched + its tracker entry updated
    await a.trim(20 * PAGE, 2 * PAGE)      # two pages forgotten (tracker and cache)
    await write(a, 100, 2)                 # a new swap page
    delta = dev.capture(since=full.seq)
    assert delta.base_seq == full.seq and delta.is_delta
    assert sorted(p for p, _ in delta.tracker_items()) == [15, 100]
    assert sorted(delta.tracker_del) == [20, 21]
    assert list(delta.cache_pages) == [15] and sorted(delta.cache_del) == [p for p in (20, 21) if p in full.cache_pages]
    assert len(encode(delta)) < len(encode(full)) / 4
    now = dev.capture(track=False)
    merged = apply_delta(full, decode(encode(delta)))
    assert merged.tracker_items() == now.tracker_items()
    assert merged.cached() == now.cached() and list(merged.cache_pages) == list(now.cache_pages)
    assert merged.counters == now.counters


async def test_live_restore_of_full_then_deltas_mirrors_the_source(pair: tuple[Export, Export]) -> None:
    a, b = pair
    src, dst = DeviceState(a), DeviceState(b)
    await warm(a, list(range(1, 60)), budget_pages=40)
    last = src.capture()
    await dst.apply(decode(encode(last)))
    for round_ in range(3):
        await write(a, 2 + round_, 200 + round_)
        await a.read((30 + round_) * PAGE, PAGE)
        await a.prefetch(30 * PAGE)          # the budget shrinks: evictions travel as removals
        await a.wait_prefetch()
        d = src.capture(since=last.seq)
        await dst.apply(decode(encode(d)))
        last = d
    assert state_of(b) == state_of(a)
    # the mirror serves the same bytes from its own cache
    for p in list(a.cache.pages)[:5]:
        assert await b.read(p * PAGE, PAGE) == await a.read(p * PAGE, PAGE)


async def test_a_lost_delta_costs_nothing_the_next_is_taken_since_the_last_delivered(pair) -> None:
    a, b = pair
    src, dst = DeviceState(a), DeviceState(b)
    await warm(a, [1, 2, 3], budget_pages=8)
    full = src.capture()
    await dst.apply(full)
    await write(a, 4, 9)
    src.capture(since=full.seq)              # taken, never delivered
    await write(a, 5, 9)
    d = src.capture(since=full.seq)          # since the last one that arrived: holds 4 and 5
    assert sorted(p for p, _ in d.tracker_items()) == [4, 5]
    await dst.apply(d)
    assert state_of(b)["tracker"] == state_of(a)["tracker"]


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops=st.lists(st.tuples(st.sampled_from(["write", "trim", "read", "budget", "ckpt"]),
                              st.integers(0, NPAGES - 2), st.integers(0, 40)), min_size=1, max_size=40))
def test_any_history_of_deltas_reproduces_the_source(tmp_path_factory: pytest.TempPathFactory,
                                                     ops: list[tuple[str, int, int]]) -> None:
    async def run() -> None:
        img = tmp_path_factory.mktemp("h") / "s.img"
        a, b = new_export(img), new_export(img)
        try:
            src, dst = DeviceState(a), DeviceState(b)
            await a.prefetch(8 * PAGE)
            last = src.capture()
            base = decode(encode(last))
            await dst.apply(base)
            for op, page, n in ops:
                if op == "write":
                    await write(a, page, n)
                elif op == "trim":
                    await a.trim(page * PAGE, (n % 3 + 1) * PAGE)
                elif op == "read":
                    await a.read(page * PAGE, PAGE)
                elif op == "budget":
                    await a.prefetch(n * PAGE)
                    await a.wait_prefetch()
                else:
                    d = decode(encode(src.capture(since=last.seq)))
                    base = apply_delta(base, d)
                    await dst.apply(d)
                    last = d
            d = decode(encode(src.capture(since=last.seq)))
            base = apply_delta(base, d)
            await dst.apply(d)
            assert state_of(b) == state_of(a)
            now = src.capture(track=False)
            assert base.tracker_items() == now.tracker_items() and base.cached() == now.cached()
        finally:
            await a.close()
            await b.close()
    asyncio.run(run())


# -- refusals --------------------------------------------------------------------------------------
@pytest.fixture
async def sample(pair: tuple[Export, Export]) -> bytes:
    a, _ = pair
    await warm(a, [3, 4, 5], budget_pages=2)
    return encode(DeviceState(a).capture())


def test_truncated_checkpoints_are_refused_at_every_length(sample: bytes) -> None:
    for cut in sorted({0, 5, 16, 40, len(sample) // 2, len(sample) - 33, len(sample) - 1}):
        with pytest.raises(CheckpointFormatError, match="truncated|checksum"):
            decode(sample[:cut])


def test_a_flipped_byte_anywhere_is_a_checksum_mismatch(sample: bytes) -> None:
    for pos in (20, len(sample) // 2, len(sample) - 40, len(sample) - 1):
        bad = bytearray(sample)
        bad[pos] ^= 0x40
        with pytest.raises(CheckpointFormatError, match="checksum mismatch|corrupt"):
            decode(bytes(bad))


def test_another_format_version_or_magic_is_refused_by_name(sample: bytes) -> None:
    bad = bytearray(sample)
    struct.pack_into("<H", bad, 8, 3)
    with pytest.raises(CheckpointFormatError, match=r"format version 3 is not supported \(supported: \[2\]\)"):
        decode(resign(bad))
    bad = bytearray(sample)
    bad[:8] = b"NOTSHIM!"
    with pytest.raises(CheckpointFormatError, match="not a shim checkpoint"):
        decode(resign(bad))
    with pytest.raises(CheckpointFormatError, match="exceeds the limit"):
        decode(sample, max_bytes=100)


def test_a_page_beyond_the_export_is_refused_even_with_a_valid_checksum(sample: bytes) -> None:
    header, pos = sections_of(sample)
    bad = bytearray(sample)
    struct.pack_into("<Q", bad, pos, NPAGES + 5)   # first tracker entry's page number
    with pytest.raises(CheckpointFormatError, match="beyond the export"):
        decode(resign(bad))
    assert header["lengths"]["tracker"] > 0


def test_structural_lies_are_refused() -> None:
    ok = ShimCheckpoint(export="t", size=NPAGES * PAGE, seq=1, budget_bytes=PAGE)
    for bad, why in [
        (ShimCheckpoint(export="t", size=NPAGES * PAGE, seq=1, cache_pages=ckfmt.page_array([1])), "cache data"),
        (ShimCheckpoint(export="t", size=NPAGES * PAGE, seq=1, tracker=ckfmt.page_array([1, 2, 1, 3])), "twice"),
        (ShimCheckpoint(export="t", size=NPAGES * PAGE, seq=1, tracker_del=ckfmt.page_array([1])), "no removals"),
        (ShimCheckpoint(export="t", size=NPAGES * PAGE, seq=2, base_seq=2), "go forward"),
        (ShimCheckpoint(export="t", size=NPAGES * PAGE, seq=1, cache_pages=ckfmt.page_array([1, 2]),
                        cache_data=bytes(2 * PAGE), budget_bytes=PAGE), "do not fit the budget"),
    ]:
        with pytest.raises(CheckpointFormatError, match=why):
            encode(bad)
    assert decode(encode(ok)) == ok


async def test_a_delta_off_the_chain_or_of_another_export_is_refused(pair: tuple[Export, Export],
                                                                     tmp_path: Path) -> None:
    a, b = pair
    src, dst = DeviceState(a), DeviceState(b)
    await warm(a, [1, 2], budget_pages=2)
    full = src.capture()
    await write(a, 3, 1)
    d1 = src.capture(since=full.seq)
    with pytest.raises(CheckpointFormatError, match=r"applies on top of checkpoint 1, this shim holds none"):
        await dst.apply(d1)
    with pytest.raises(CheckpointFormatError, match="applies on top of checkpoint 1, not 2"):
        apply_delta(apply_delta(full, d1), d1)
    other = Export("other", BackingStore(tmp_path / "o.img", size=NPAGES * PAGE)).open()
    try:
        with pytest.raises(CheckpointFormatError, match="of export 't'"):
            await DeviceState(other).apply(full)
    finally:
        await other.close()
    with pytest.raises(CheckpointFormatError, match="no delta since 7"):
        src.capture(since=7)


# -- quiesce, resume -------------------------------------------------------------------------------
async def test_quiesce_holds_writes_unacknowledged_and_resume_lets_them_through(pair) -> None:
    a, _ = pair
    dev = DeviceState(a)
    await write(a, 9, 1)
    times = await dev.quiesce()
    assert set(times) == {"writes_s", "prefetch_s", "flush_s", "total_s"}
    held = asyncio.ensure_future(write(a, 9, 2))
    await asyncio.sleep(0.05)
    assert not held.done(), "a write was acknowledged while quiesced"
    assert await a.read(9 * PAGE, PAGE) == bytes([1]) * PAGE     # reads go on
    final = dev.capture()
    assert final.tracker_items()[-1][0] == 9
    await dev.resume()
    await wait_for(held, 5)
    assert await a.read(9 * PAGE, PAGE) == bytes([2]) * PAGE


async def test_quiesce_keeps_the_prefetch_plan_and_the_final_restore_resumes_it(tmp_path: Path) -> None:
    from hvsim.drivers.shim.store import LinkSpec
    img = tmp_path / "s.img"
    img.write_bytes(os.urandom(NPAGES * PAGE))
    a = Export("t", BackingStore(img, link=LinkSpec(latency_s=0.01)), prefetch_concurrency=1, max_run_pages=1).open()
    b = Export("t", BackingStore(img)).open()
    try:
        for p in range(1, 41):
            await write(a, p, p)
        await a.prefetch(64 * PAGE)
        await asyncio.sleep(0.05)              # a few fetched, most still planned
        src, dst = DeviceState(a), DeviceState(b)
        await src.quiesce()
        ck = src.capture()
        assert ck.prefetch_state == "running" and 0 < len(ck.planned) < 40
        assert not set(ck.planned) & set(ck.cache_pages)
        result = await dst.apply(decode(encode(ck)), final=True)
        assert result["prefetch_planned"] == len(ck.planned)
        await b.wait_prefetch()
        assert set(b.cache.pages) == set(range(1, 41))
    finally:
        await a.close()
        await b.close()


async def test_pages_skipped_as_guest_resident_carry_over_to_the_destination(pair) -> None:
    """A finished prefetch that left the guest's swap-cache pages out: after quiesce + final restore
    the destination still knows them, and a miss on one wakes its neighbours there."""
    a, b = pair
    for p in range(1, 101):
        await write(a, p, p)
    await a.prefetch(200 * PAGE, skip_recent_pages=40)
    await a.wait_prefetch()
    assert a.stats()["prefetch_skipped_pages"] == 40
    src, dst = DeviceState(a), DeviceState(b)
    full = src.capture()
    await dst.apply(decode(encode(full)))
    await src.quiesce()
    final = src.capture(since=full.seq)
    assert len(final.skipped) == 40 and final.prefetch_state == "done"
    await dst.apply(decode(encode(final)), final=True)
    assert b.stats()["prefetch_skipped_pages"] == 40
    assert await b.read(80 * PAGE, PAGE) == bytes([80]) * PAGE       # a miss on a skipped page ...
    await b.wait_prefetch()
    assert b.stats()["prefetch_woken_pages"] == 39                    # ... fetches the others
    await src.resume()                                                # and the source keeps them too
    assert a.stats()["prefetch_skipped_pages"] == 40


async def test_held_writes_fail_when_the_export_closes(pair) -> None:
    a, _ = pair
    dev = DeviceState(a)
    await dev.quiesce()
    held = asyncio.ensure_future(write(a, 3, 1))
    await asyncio.sleep(0.02)
    await a.close()
    from hvsim.drivers.shim.errors import ShimStateError
    with pytest.raises(ShimStateError):
        await held


# -- state file (supervision) ----------------------------------------------------------------------
async def test_state_file_restores_index_and_refetches_current_data(pair, tmp_path: Path) -> None:
    a, b = pair
    await warm(a, list(range(1, 21)), budget_pages=10)
    sf = StateFile(tmp_path / "st" / "swap.state", DeviceState(a))
    sf.path.parent.mkdir()
    assert sf.save() and not sf.save()              # nothing changed: not rewritten
    assert (sf.path.stat().st_mode & 0o777) == 0o600
    cached = list(a.cache.pages)
    await write(a, cached[0], 77)                   # newer data than the checkpoint knew
    loaded = StateFile(sf.path, DeviceState(b)).load()
    assert loaded is not None and loaded["checkpoint"].index_only
    await DeviceState(b).apply(loaded["checkpoint"], refill=True)
    await b.wait_prefetch()
    assert set(b.cache.pages) == set(cached)
    assert await b.read(cached[0] * PAGE, PAGE) == bytes([77]) * PAGE   # from the backing store, current


async def test_a_corrupt_state_file_is_set_aside_not_trusted(pair, tmp_path: Path) -> None:
    a, _ = pair
    path = tmp_path / "swap.state"
    path.write_bytes(b"HVSHIMCK garbage")
    assert StateFile(path, DeviceState(a)).load() is None
    assert not path.exists() and path.with_suffix(".state.bad").exists()


# -- over the control socket -----------------------------------------------------------------------
async def test_binary_checkpoint_and_restore_over_the_control_socket(shim: ShimDaemon, tmp_path: Path) -> None:
    assert shim.config.control is not None
    ctl = ShimControlClient(shim.config.control)
    e = shim.export(None)
    await warm(e, [2, 3, 4], budget_pages=3)
    info, data = await ctl.call_bin("checkpoint_bin")
    assert data is not None and info["length"] == len(data) and info["cache_pages"] == 3
    assert decode(data).cache_pages.tolist() == list(e.cache.pages)
    assert (await ctl.call("state_size"))["bytes"] >= len(data) - 1024
    # restore it into the second export of the same shim: refused (another export) with a clear error
    with pytest.raises(ControlError, match="of export 'shim'"):
        await ctl.call_bin("restore_bin", data, export="second")
    # restore into the same export (a fresh full state) works and answers with what it loaded
    result, _ = await ctl.call_bin("restore_bin", data)
    assert result["cache_pages"] == 3
    # a corrupted payload is refused with the reason; the connection stays usable for the next call
    bad = bytearray(data)
    bad[-1] ^= 1
    with pytest.raises(ControlError, match="checksum mismatch"):
        await ctl.call_bin("restore_bin", bytes(bad))
    assert (await ctl.ping())["exports"]
    await ctl.call("quiesce")
    await ctl.call("resume")


async def test_restore_bin_with_an_absurd_length_is_refused_before_reading(shim: ShimDaemon) -> None:
    assert shim.config.control is not None
    reader, writer = await asyncio.open_unix_connection(str(shim.config.control))
    writer.write(json.dumps({"cmd": "restore_bin", "length": 1 << 40}).encode() + b"\n")
    await writer.drain()
    answer = json.loads(await reader.readline())
    assert not answer["ok"] and "length must be within" in answer["error"]
    assert await reader.read() == b""            # then dropped: the bytes that follow cannot be trusted
    writer.close()
