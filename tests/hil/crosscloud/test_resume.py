"""A cross-cloud migration is a durable operation (issue 15): its orchestrator crashes twice, in the
middle of the first round and in the middle of the cutover, and a new one (a fresh store handle
on the same SQLite file, as after a manager restart) takes it over from the record each time.

What must hold: while the dead orchestrator's lease lasts nobody else may drive the operation;
after the first crash only the chunks the destination does not hold yet are copied again; after
the second (before the disks were verified) the source goes on as it was, its application
acknowledging records again; in the end every acknowledged record is at the destination and the
source is gone."""
from __future__ import annotations

import asyncio
import contextlib
import time
from pathlib import Path

import pytest

from hvsim.control.store import SQLiteStore
from hvsim.crosscloud.errors import OperationBusyError
from hvsim.crosscloud.journal import OperationJournal
from hvsim.crosscloud.orchestrator import CrossCloudMigration, XState
from hvsim.crosscloud.scene import two_clouds

pytestmark = [pytest.mark.hil, pytest.mark.timeout(600)]
MiB = 1 << 20
TTL = 5.0          # the keep-alives of a busy orchestrator (TCG guests in its own loop) must not miss it


async def until(pred, timeout: float, what: str) -> None:  # type: ignore[no-untyped-def]
    t = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > t:
            raise AssertionError(f"{what}: not seen in {timeout} s")
        await asyncio.sleep(0.1)


def used_bytes(img: Path) -> int:
    """Bytes in the non-zero 4 KiB blocks of the image (what a first round must copy)."""
    n = 0
    with open(img, "rb") as f:
        while blk := f.read(4096):
            n += 4096 if blk.count(0) != len(blk) else 0
    return n


async def agents_gone(cloud, vm: str, timeout: float = 20.0) -> None:  # type: ignore[no-untyped-def]
    t = time.monotonic() + timeout
    while True:
        r = await cloud.exec(vm, "pidof hvsim-migrate || echo none")
        if r.stdout.strip() == "none":
            return
        if time.monotonic() > t:
            raise AssertionError(f"the migration agent (pid {r.stdout.strip()}) still runs in {vm} "
                                 f"{timeout} s after its stream closed")
        await asyncio.sleep(0.5)


async def crash(m: CrossCloudMigration, task: asyncio.Task[object], store: SQLiteStore) -> None:
    await m.abandon()
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    await store.close()


async def test_resumed_after_two_orchestrator_crashes_without_losing_a_record(tmp_path: Path) -> None:
    db = tmp_path / "xcloud.db"
    async with two_clouds(wan_mbit=40.0) as s:
        app = await s.source_vm("app1", disk_mib=64, prefill_mib=24, rate_kib=32)
        used = used_bytes(s.workdir / "app1-data.img")

        async def resume(holder: str, wait_s: float, on_event=None) -> tuple[CrossCloudMigration, SQLiteStore]:  # type: ignore[no-untyped-def]
            store = SQLiteStore(db)
            await store.open()
            try:
                m = await CrossCloudMigration.resume(OperationJournal(store, holder, ttl=TTL), "op1", s.registry,
                                                     source_credentials=s.a.credentials,
                                                     dest_credentials=s.b.credentials, source_app=app,
                                                     workdir=s.workdir, wait_s=wait_s, on_event=on_event)
            except BaseException:
                await store.close()
                raise
            return m, store

        # -- life 1: crash in the middle of the first round ------------------------------------------
        store1 = SQLiteStore(db)
        await store1.open()
        m1 = CrossCloudMigration(s.registry, vm="app1", source_cloud="cloud-a", source_credentials=s.a.credentials,
                                 dest_cloud="cloud-b", dest_credentials=s.b.credentials, source_app=app,
                                 workdir=s.workdir, budget_s=10.0, rate_bps=2 * MiB,
                                 journal=OperationJournal(store1, "manager-1", ttl=TTL), op_id="op1")
        await m1.prepare()
        assert m1.transfer is not None
        task: asyncio.Task[object] = asyncio.create_task(m1.round())
        # the source agent keeps at most 8 MiB unacknowledged (its window): what it sent minus that
        # is on the destination's disk
        await until(lambda: m1.transfer is not None and m1.transfer.stats.sent_total >= 14 * MiB, 60, "14 MiB sent")
        sent_before = m1.transfer.stats.sent_total
        applied_before = sent_before - 8 * MiB
        assert not task.done(), "the first round ended before the crash: nothing is tested"
        await crash(m1, task, store1)
        # the guests' agents die with the orchestrator's streams (the guest agent's SIGKILL is sent
        # without waiting: a killed agent in the middle of a disk read goes a moment later); the
        # application does not
        await agents_gone(s.a, "app1")
        assert app.proc is not None and app.proc.running

        # no two orchestrators: the dead one's lease still holds the operation
        with pytest.raises(OperationBusyError, match="manager-1"):
            await resume("manager-2", wait_s=0)

        # -- life 2: resumed from the record; crash in the middle of the cutover ----------------------
        m2, store2 = await resume("manager-2", wait_s=4 * TTL)
        assert m2.state is XState.REPLICATING and m2.transfer is not None
        rs = m2.resumes[-1]
        assert rs["action"] == "replication resumed" and rs["previous_holder"] == "manager-1", rs
        diff = rs["resync"]
        # only what the destination does not hold is copied again (plus the writer's few blocks)
        assert 0 < diff["differ_bytes"] <= used - applied_before + 2 * MiB, (diff, used, applied_before)
        d = await m2.replicate()
        assert len(m2.transfer.stats.rounds) >= 1 and m2.transfer.stats.rounds[0].round == 1
        # over both lives (the record was last written before life 1's round), the bytes sent stay
        # near the disk's used bytes: nothing was copied twice
        total = sent_before + m2.transfer.stats.sent_total
        assert total <= 1.3 * used + 2 * MiB, (total, sent_before, used)
        cut: asyncio.Task[object] = asyncio.create_task(m2.cutover(accept_downtime=not d.fits))
        await until(lambda: app.proc is not None and not app.proc.running, 60, "the source application quiesced")
        n_source = app.acks.last_seq
        await crash(m2, cut, store2)

        # -- life 3: the cutover had not verified the disks: rolled back, the source goes on; then a
        # crash right after the disks were verified equal (the point of no return) ------------------
        crashing: list[asyncio.Task[None]] = []

        def on_event(kind: str, data: dict[str, object]) -> None:
            if kind == "phase" and data.get("phase") == "cutover verified" and not crashing:
                crashing.append(asyncio.ensure_future(crash(m3, cut3, store3)))

        m3, store3 = await resume("manager-3", wait_s=4 * TTL, on_event=on_event)
        assert m3.state is XState.REPLICATING, m3.resumes
        assert m3.resumes[-1]["action"] == "cutover rolled back"
        assert await s.a.vm_state("app1") == "running"
        assert app.proc is not None
        await app.proc.wait_line(lambda ln: ln.startswith("ACK") and int(ln.split()[1]) > n_source, 60)
        d = await m3.replicate()
        cut3: asyncio.Task[object] = asyncio.create_task(m3.cutover(accept_downtime=not d.fits))
        await until(lambda: bool(crashing), 120, "the cutover's verification")
        await crashing[0]
        assert cut3.done()

        # -- life 4: completed at the destination; every acknowledged record is there ---------------
        m4, store4 = await resume("manager-4", wait_s=4 * TTL)
        try:
            assert m4.state is XState.CUT_OVER and m4.resumes[-1]["action"] == "cutover completed", m4.resumes
            assert await s.a.vm_state("app1") == "paused"          # stopped, not deleted before finalize
            assert m4.dest_app is not None and m4.dest_app.proc is not None
            await m4.dest_app.proc.wait_line(lambda ln: ln.startswith("ACK"), 60)
            assert s.wan.service_at == (m4.dest_vm, s.b.host)
            await m4.dest_app.stop()
            v = await m4.verify_destination()
            assert v["missing"] == 0 and v["changed"] == 0 and v["acked"] == app.acks.count > n_source
            await m4.finalize()
            assert not s.a.exists("app1") and m4.state is XState.FINALIZED
            rec = await m4.journal.load("op1")  # type: ignore[union-attr]
            assert rec is not None and rec["state"] == "finalized" and len(rec["resumes"]) == 3
            assert [r["action"] for r in rec["resumes"]] == ["replication resumed", "cutover rolled back",
                                                            "cutover completed"]
            assert await store4.holder("xcloud/op1") is None          # released at the end
        finally:
            await store4.close()
