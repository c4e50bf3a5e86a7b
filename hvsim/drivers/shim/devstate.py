"""Device state of a live export: checkpoints taken from it and restored into it, quiesce and resume,
and the state file a restarted shim comes back from. Runs inside the shim process.

One :class:`DeviceState` per export. Checkpoints form a chain: a full one starts change tracking in
the export's swap map and cache (:mod:`.cache`), and from then on ``capture(since=s)`` lists what
changed after checkpoint ``s`` was taken, for any ``s`` of the chain (taking a delta does not reset
anything, so a delta that never arrived costs nothing but its bytes: the next one is taken since the
last one that did arrive). Capturing is synchronous on the shim's event loop, so every checkpoint is
one consistent instant of the export. On the receiving side ``apply`` refuses a delta that does not
continue the chain it holds.

Quiesce (before the final checkpoint of a migration): writes, trims and zeroings are *held* from
then on (not acknowledged), writes in flight finish, the prefetcher stops after its reads in flight
(keeping what it still had to fetch: the in-flight state of the checkpoint), and the backing file is
flushed. ``resume`` (the migration failed) lets the held writes through and resumes the prefetch;
if the migration completes, the source shim is stopped and held writes fail with ESHUTDOWN. So
nothing acknowledged is lost and nothing is written by both shims.

The state file (``--state-file``, supervision): every ``interval`` seconds, if anything changed, an
*index-only* checkpoint (swap map, cache index, counters, in-flight state; no page data) is written
atomically (0600, temp file + rename). A shim started with an existing state file restores it and
refetches the cached pages from the backing store, which holds the current data: a stale checkpoint
can make the cache choose the wrong pages, never serve wrong data.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from pathlib import Path
from typing import Any

from .cache import PAGE, SwapTracker
from .checkpoint import CheckpointFormatError, ShimCheckpoint, decode, encode, page_array
from .errors import ShimConfigError
from .export import Export, ExportState, PrefetchState

log = logging.getLogger(__name__)


class DeviceState:
    """Checkpoint/restore/quiesce of one export (see the module docstring)."""

    def __init__(self, export: Export) -> None:
        self.export = export
        self.seq = 0                          # seq of the last checkpoint taken from this export
        self.chain: int | None = None         # seq of the full checkpoint change tracking started with
        self.restored_seq: int | None = None  # the last checkpoint applied into this export
        self.quiesced = False
        self.last_quiesce: dict[str, float] = {}

    # -- taking ------------------------------------------------------------------------------------
    def capture(self, since: int | None = None, *, index_only: bool = False, track: bool = True) -> ShimCheckpoint:
        """A checkpoint of now: full (``since`` None; with ``track`` it starts a new change-tracking
        chain) or the delta since checkpoint ``since`` of the current chain."""
        e = self.export
        t, c = e.tracker, e.cache
        if since is not None:
            if self.chain is None or t.changes is None or c.changes is None:
                raise CheckpointFormatError(f"no delta since {since}: no full checkpoint started change tracking")
            if not self.chain <= since <= self.seq:
                raise CheckpointFormatError(f"no delta since {since}: the current chain holds checkpoints "
                                            f"{self.chain}..{self.seq}")
        self.seq += 1
        seq = self.seq
        planned, skipped, unused = e.prefetch_plan()
        ck = ShimCheckpoint(
            export=e.name, size=e.size, seq=seq, base_seq=since, index_only=index_only,
            budget_bytes=c.budget_bytes, counters=dict(e.counters), tracker_seq=t.seq,
            swap_header=t.swap_header, swap_version=t.swap_version, swap_last_page=t.swap_last_page,
            prefetch_state=e.prefetch_state.value, planned=page_array(sorted(planned)),
            skipped=page_array(sorted(skipped)), unused=page_array(sorted(unused)))
        if since is None:
            ck.tracker = page_array(x for ps in t.pages.items() for x in ps)
            ck.cache_pages = page_array(c.pages)
            if not index_only:
                ck.cache_data = b"".join(c.pages.values())
            if track:
                t.changes, c.changes = {}, {}
                self.chain = seq
        else:
            assert t.changes is not None and c.changes is not None
            tp = t.pages
            changed_t = [p for p, g in t.changes.items() if g > since]
            ck.tracker = page_array(x for p in sorted((p for p in changed_t if p in tp), key=tp.__getitem__)
                                    for x in (p, tp[p]))
            ck.tracker_del = page_array(sorted(p for p in changed_t if p not in tp))
            changed_c = {p for p, g in c.changes.items() if g > since}
            if changed_c:
                present = [p for p in c.pages if p in changed_c]     # LRU order
                ck.cache_pages = page_array(present)
                ck.cache_del = page_array(sorted(changed_c.difference(c.pages)))
                if not index_only:
                    ck.cache_data = b"".join(c.pages[p] for p in present)
        if track or since is not None:
            t.epoch = c.epoch = seq + 1
        return ck

    def state_size(self, since: int | None = None) -> int:
        """About how many bytes ``capture(since)`` would give now (no copy)."""
        e = self.export
        t, c = e.tracker, e.cache
        if since is None or t.changes is None or c.changes is None or self.chain is None or since < self.chain:
            return 2048 + 16 * len(t.pages) + (8 + PAGE) * len(c.pages)
        nt = sum(1 for g in t.changes.values() if g > since)
        nc = sum(1 for g in c.changes.values() if g > since)
        return 2048 + 16 * nt + (8 + PAGE) * nc

    def stop_tracking(self) -> None:
        self.export.tracker.changes = None
        self.export.cache.changes = None
        self.chain = None

    # -- applying ----------------------------------------------------------------------------------
    async def apply(self, ck: ShimCheckpoint, *, final: bool = False, refill: bool = False) -> dict[str, Any]:
        """Load ``ck`` into the export: a full checkpoint replaces its state, a delta continues the
        chain restored so far. ``final`` (the source was quiesced: this export takes over) resumes
        the prefetch where the source left it; an index-only checkpoint (``refill``) refetches the
        cached pages from the backing store."""
        e = self.export
        t0 = time.monotonic()
        if (ck.export, ck.size) != (e.name, e.size):
            raise CheckpointFormatError(f"checkpoint is of export {ck.export!r} ({ck.size} bytes), this is "
                                        f"{e.name!r} ({e.size} bytes)")
        if ck.index_only and not refill:
            raise CheckpointFormatError("an index-only checkpoint has no page data; restore it with refill")
        if ck.is_delta and ck.base_seq != self.restored_seq:
            raise CheckpointFormatError(f"delta {ck.seq} applies on top of checkpoint {ck.base_seq}, this shim "
                                        f"holds {self.restored_seq if self.restored_seq is not None else 'none'}")
        if ck.is_delta:
            await e.pause_prefetch()
        else:
            await e.drop_cache()
        t, c = e.tracker, e.cache
        if not ck.is_delta:
            tracker = SwapTracker()
            tracker.pages = dict(ck.tracker_items())
            tracker.seq = max([ck.tracker_seq, *tracker.pages.values()])
            e.tracker = t = tracker
            c.set_budget(ck.budget_bytes)
        else:
            for p in ck.tracker_del:
                t.pages.pop(p, None)
            for p, s in ck.tracker_items():
                t.pages.pop(p, None)
                t.pages[p] = s
            t.seq = max(t.seq, ck.tracker_seq)
            for p in ck.cache_del:
                c.pages.pop(p, None)
            c.set_budget(ck.budget_bytes)
        t.swap_header, t.swap_version, t.swap_last_page = ck.swap_header, ck.swap_version, ck.swap_last_page
        if not ck.index_only:
            data = memoryview(ck.cache_data)
            for i, p in enumerate(ck.cache_pages):
                buf = c.pages.get(p)
                if buf is not None:
                    buf[:] = data[i * PAGE:(i + 1) * PAGE]
                elif len(c.pages) + c.reserved < c.budget_pages:
                    c.pages[p] = bytearray(data[i * PAGE:(i + 1) * PAGE])
        e.counters = {k: int(ck.counters.get(k, 0)) for k in e.counters}
        self.restored_seq = ck.seq
        planned = 0
        if refill:
            e.set_unused_prefetched(())
            planned = e.resume_prefetch([*ck.cache_pages, *ck.planned], ck.skipped)
        elif final:
            e.set_unused_prefetched(p for p in ck.unused if p in c.pages)
            e.restore_prefetch_state(PrefetchState(ck.prefetch_state), "final checkpoint restored")
            # what the source's prefetch still had to fetch, and the pages it skipped (a miss wakes them)
            planned = e.resume_prefetch(ck.planned if ck.prefetch_state == PrefetchState.RUNNING.value else (),
                                        ck.skipped)
        return {"seq": ck.seq, "cache_pages": len(c.pages), "tracked_pages": len(t.pages),
                "prefetch_planned": planned, "restore_s": time.monotonic() - t0}

    # -- quiesce -----------------------------------------------------------------------------------
    async def quiesce(self, timeout: float = 30.0) -> dict[str, float]:
        """Hold new writes, let those in flight finish, stop the prefetcher, flush the backing file."""
        e = self.export
        t0 = time.monotonic()
        e.hold_writes()
        self.quiesced = True
        try:
            await e.wait_writes_idle(timeout)
            t1 = time.monotonic()
            await e.pause_prefetch()
            t2 = time.monotonic()
            await e.store.flush()
        except BaseException:
            await self.resume()
            raise
        t3 = time.monotonic()
        self.last_quiesce = {"writes_s": t1 - t0, "prefetch_s": t2 - t1, "flush_s": t3 - t2, "total_s": t3 - t0}
        return self.last_quiesce

    async def resume(self) -> None:
        """Let held writes through and resume the prefetch (after a quiesce that led nowhere)."""
        e = self.export
        self.quiesced = False
        e.release_writes()
        if e.state is ExportState.OPEN:
            e.resume_prefetch()


class StateFile:
    """Periodic index-only checkpoints of one export in a file; restored at start (supervision)."""

    def __init__(self, path: Path, device: DeviceState, interval: float = 1.0) -> None:
        self.path = Path(path)
        self.device = device
        self.interval = interval
        self._task: asyncio.Task[None] | None = None
        self._last: tuple[Any, ...] | None = None
        self.saves = 0

    def load(self) -> dict[str, Any] | None:
        """Restore the export from the file if there is one; a file that cannot be used is logged,
        renamed ``*.bad`` and ignored (the shim starts empty: correct, only colder)."""
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise ShimConfigError(f"cannot read state file {self.path}: {exc.strerror}") from exc
        try:
            ck = decode(data, max_bytes=64 << 20)
            if not ck.index_only or ck.is_delta:
                raise CheckpointFormatError("a state file holds one full index-only checkpoint")
        except CheckpointFormatError as exc:
            log.error("state file %s refused (%s); starting without it", self.path, exc)
            with contextlib.suppress(OSError):
                self.path.replace(self.path.with_suffix(self.path.suffix + ".bad"))
            return None
        return {"checkpoint": ck}

    def _fingerprint(self) -> tuple[Any, ...]:
        e = self.device.export
        return (e.tracker.seq, len(e.tracker.pages), len(e.cache.pages), e.cache.budget_bytes,
                e.prefetch_state.value)

    def save(self) -> bool:
        fp = self._fingerprint()
        if fp == self._last:
            return False
        ck = self.device.capture(index_only=True, track=False)
        data = encode(ck)
        tmp = self.path.with_name(self.path.name + ".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
        finally:
            os.close(fd)
        os.replace(tmp, self.path)
        self._last = fp
        self.saves += 1
        return True

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name=f"shim-state-{self.path.name}")

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            try:
                self.save()
            except OSError as exc:
                log.warning("saving state file %s failed: %s", self.path, exc)

    async def close(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            await asyncio.wait([task])
        try:
            self.save()
        except OSError as exc:
            log.warning("saving state file %s at shutdown failed: %s", self.path, exc)
