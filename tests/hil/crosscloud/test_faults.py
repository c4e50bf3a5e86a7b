"""Cross-cloud migration faults against real guests and real agents: the WAN link cut mid-round, a
corrupted block, a cancel, native live migration between the profiles. In every case no
acknowledged record is lost or changed, and a failure leaves the source running."""
from __future__ import annotations

import asyncio
import os
import signal
import time

import pytest

from hvsim.crosscloud.app import WriterApp, verify_records
from hvsim.core.model import VMSpec
from hvsim.crosscloud.errors import (CredentialsError, NativeMigrationRefusedError, NoAgentChannelError,
                                    NoCapacityError, ReplicationError, UnknownProviderError)
from hvsim.crosscloud.guestproc import fields
from hvsim.crosscloud.criterion import Decision
from hvsim.crosscloud.orchestrator import CrossCloudMigration, XState
from hvsim.crosscloud.scene import Scene
from hvsim.migration import IncompatibleMachinesError, migrate
from .conftest import SharedClouds

pytestmark = [pytest.mark.hil, pytest.mark.timeout(420)]
MiB = 1 << 20


def migration(s: Scene, app: WriterApp, dest_cloud: str = "cloud-b", dest_credentials: str | None = None,
              **kw: object) -> CrossCloudMigration:
    return CrossCloudMigration(s.registry, vm=app.vm, source_cloud="cloud-a", source_credentials=s.a.credentials,
                               dest_cloud=dest_cloud, dest_credentials=dest_credentials or s.b.credentials,
                               source_app=app, workdir=s.workdir, **kw)  # type: ignore[arg-type]


async def cut_over_and_verify(s: Scene, m: CrossCloudMigration) -> dict[str, object]:
    d = await m.replicate()
    res = await m.cutover(accept_downtime=not d.fits)
    assert m.dest_app is not None
    await m.dest_app.stop()
    v = await m.verify_destination()
    assert v["missing"] == 0 and v["changed"] == 0 and v["acked"] > 0
    return res


async def wait_for(pred, timeout: float, what: str) -> None:  # type: ignore[no-untyped-def]
    t = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > t:
            raise AssertionError(f"{what}: not seen in {timeout} s")
        await asyncio.sleep(0.2)


async def replicating(shared: SharedClouds) -> tuple[WriterApp, CrossCloudMigration, asyncio.Task[Decision]]:
    """The source guest with its writer, a migration prepared and replicating in a task (throttled
    to 1 MiB/s), once the agents have sent 1 MiB."""
    app = await shared.source_vm("app1", disk_mib=64, prefill_mib=24, rate_kib=32)
    m = migration(shared.scene, app, budget_s=10.0, rate_bps=1 * MiB)
    await m.prepare()
    assert m.transfer is not None
    st = m.transfer.stats
    task = asyncio.create_task(m.replicate())
    await wait_for(lambda: st.sent_total > 1 * MiB, 60, "1 MiB sent")
    return app, m, task


@pytest.mark.asyncio(loop_scope="class")
class TestFaultsOnSharedClouds:
    """One scene for the class (see conftest.py); the tests that leave the source running and clean
    come first, each passing its guest on, then those that consume it."""

    async def test_cancel_leaves_the_source_running_and_cleans_the_destination(
            self, shared_clouds: SharedClouds) -> None:
        scene = shared_clouds.scene
        app, m, task = await replicating(shared_clouds)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert m.state is XState.FAILED
        assert not scene.b.exists("app1")                   # the destination is gone
        assert scene.a.state("app1") == "running"
        assert app.proc is not None and app.proc.running    # the application never stopped
        n = m.acks.count
        await wait_for(lambda: m.acks.count > n, 30, "the source acknowledging new records")
        r = await scene.a.exec("app1", "ls /run/hvmig 2>&1; ls /sys/kernel/tracing/instances/")
        assert "hvsim-migrate" not in r.stdout and "hvmig" not in r.stdout.split("\n", 1)[-1]   # agents removed
        await app.stop()
        await verify_records(scene.a, "app1", m.acks)

    async def test_native_live_migration_between_the_profiles_is_refused_before_anything_starts(
            self, shared_clouds: SharedClouds) -> None:
        scene = shared_clouds.scene
        app = await shared_clouds.source_vm("app1", disk_mib=64, prefill_mib=24, rate_kib=16)
        m = migration(scene, app)
        with pytest.raises(NativeMigrationRefusedError) as ei:
            await m.migrate_native()
        assert "machine pc vs q35" in str(ei.value) and "disk bus virtio-blk vs scsi" in str(ei.value)
        assert not scene.b.exists("app1") and m.state is XState.NEW
        # bad input is refused before anything is created, too
        with pytest.raises(UnknownProviderError):
            await migration(scene, app, dest_cloud="cloud-z").prepare()
        with pytest.raises(CredentialsError):
            await migration(scene, app, dest_credentials="wrong").prepare()
        assert not scene.b.exists("app1") and scene.a.state("app1") == "running"
        # the migration engine itself refuses it, with the reasons, before it starts anything: cloud B's
        # host has profile B, so its QEMU would be q35/Westmere/scsi/e1000
        vm = scene.a.cluster.vm("app1")
        b1 = scene.b.cluster.host("b1")
        with pytest.raises(IncompatibleMachinesError) as ej:
            await migrate(vm, b1)
        assert {"machine pc vs q35", "cpu qemu64 vs Westmere", "disk bus virtio-blk vs scsi",
                "nic model virtio-net-pci vs e1000"} <= set(ej.value.blockers)
        assert not b1.allocations and not scene.b.cluster.vms
        assert vm.state.value == "running" and vm.host.name == "a1"
        seq = app.acks.last_seq
        await wait_for(lambda: app.acks.last_seq > seq, 30, "the writer still acknowledging at the source")

    async def test_no_capacity_and_no_agent_channel_are_refused_before_anything_is_created(
            self, shared_clouds: SharedClouds) -> None:
        scene = shared_clouds.scene
        app = await shared_clouds.source_vm("app1", disk_mib=64, prefill_mib=24, rate_kib=16)
        b1 = scene.b.cluster.host("b1")
        # another tenant holds almost all of cloud B's memory
        b1.reserve(VMSpec("tenant", memory_mib=b1.free_memory_mib - 64))
        m = migration(scene, app)
        with pytest.raises(NoCapacityError) as ei:
            await m.prepare()
        assert "cloud-b" in str(ei.value) and "memory" in str(ei.value)
        assert m.state is XState.NEW and not scene.b.cluster.vms and set(b1.allocations) == {"tenant"}
        assert not list(scene.workdir.glob("pki"))        # no migration credentials were made either
        b1.release("tenant")
        # the source's guest agent stops answering (SIGSTOP, from a detached shell so the exec returns)
        await app.stop()
        await scene.a.exec("app1", "setsid sh -c 'sleep 1; kill -STOP $(pidof hvsim-agent)' >/dev/null 2>&1 &")
        await asyncio.sleep(3)
        m2 = migration(scene, app)
        with pytest.raises(NoAgentChannelError) as ej:
            await m2.prepare()
        assert "agent" in str(ej.value) and "app1" in str(ej.value)
        assert m2.state is XState.NEW and not scene.b.cluster.vms and not b1.allocations
        assert scene.a.state("app1") == "running"

    async def test_wan_cut_mid_round_resumes_without_resending_acknowledged_data(
            self, shared_clouds: SharedClouds) -> None:
        scene = shared_clouds.scene
        app = await shared_clouds.source_vm("app1", disk_mib=64, prefill_mib=24, rate_kib=32)
        m = migration(scene, app, budget_s=10.0, rate_bps=2 * MiB)      # ~12 s for the first round
        await m.prepare()
        assert m.transfer is not None
        st = m.transfer.stats
        first = asyncio.create_task(m.round())
        await wait_for(lambda: st.sent_total > 4 * MiB, 60, "4 MiB sent")
        await scene.wan.set_wan_link("b1", False)
        await wait_for(lambda: any(" LINK down" in f" {e}" for _, e in st.events), 30,
                       "the source seeing the link down")
        await asyncio.sleep(2)
        await scene.wan.set_wan_link("b1", True)
        await first
        downs = [fields(e) for _, e in st.events if e.startswith("LINK down")]
        resumes = [fields(e) for _, e in st.events if e.startswith("RESUME")]
        assert downs and resumes
        # the source resumes after what the destination applied, never before what it had acknowledged
        assert int(resumes[0]["from_seq"]) > int(downs[0]["acked"])
        await cut_over_and_verify(scene, m)
        assert int(st.dest["dup"]) == 0           # the destination never received a message twice
        assert int(st.stat.get("reconnects", 0)) >= 1
        await m.finalize()

    async def test_destination_agent_killed_is_restarted_and_resumes(self, shared_clouds: SharedClouds) -> None:
        scene = shared_clouds.scene
        app = await shared_clouds.source_vm("app1", disk_mib=64, prefill_mib=24, rate_kib=32)
        m = migration(scene, app, budget_s=10.0, rate_bps=2 * MiB)
        await m.prepare()
        assert m.transfer is not None
        st = m.transfer.stats
        first = asyncio.create_task(m.round())
        await wait_for(lambda: st.sent_total > 4 * MiB, 60, "4 MiB sent")
        await m.transfer.kill_dest_agent()
        await first
        assert st.dest_restarts >= 1
        assert any(e.startswith("RESUME") for _, e in st.events)
        await cut_over_and_verify(scene, m)
        await m.finalize()

    async def test_a_corrupted_block_is_refused_and_sent_again(self, shared_clouds: SharedClouds) -> None:
        scene = shared_clouds.scene
        app = await shared_clouds.source_vm("app1", disk_mib=64, prefill_mib=8, rate_kib=32)
        m = migration(scene, app, budget_s=10.0, corrupt_seq=5)
        await m.prepare()
        res = await cut_over_and_verify(scene, m)
        assert m.transfer is not None
        ev = [e for _, e in m.transfer.stats.events]
        assert any(e.startswith("CORRUPTED seq=5") for e in ev)
        assert any(e.startswith("dest: REFUSED seq=5") for e in ev)       # the destination refused it ...
        assert int(m.transfer.stats.dest["refused"]) == 1
        verify = res["verify"]
        assert isinstance(verify, dict)
        assert verify["source"]["digest"] == verify["destination"]["digest"]    # ... and got it right
        await m.finalize()

    async def test_source_guest_crash_fails_the_migration_and_cleans_the_destination(
            self, shared_clouds: SharedClouds) -> None:
        scene = shared_clouds.scene
        app, m, task = await replicating(shared_clouds)
        pid = scene.a.cluster.vm("app1").pid
        assert pid
        os.kill(pid, signal.SIGKILL)                          # the source guest's QEMU dies
        with pytest.raises(ReplicationError):
            await task
        assert m.state is XState.FAILED and not m.result      # nothing claimed as migrated
        assert not scene.b.exists("app1")                      # the destination is cleaned
