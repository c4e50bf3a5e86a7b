"""Cross-cloud migration by agents in the guests (issue 15), against real guests: a guest on
provider A's profile (pc, virtio-blk) moves to provider B's (q35, virtio-scsi) over a shaped WAN,
its writer acknowledging records the whole time; every acknowledged record must be on B's disk."""
from __future__ import annotations


import pytest

from hvsim.crosscloud.app import verify_records
from hvsim.crosscloud.orchestrator import CrossCloudMigration, XState
from hvsim.crosscloud.scene import Scene
from .conftest import SharedClouds

pytestmark = [pytest.mark.hil, pytest.mark.timeout(600)]


def migration(s: Scene, app, **kw) -> CrossCloudMigration:  # type: ignore[no-untyped-def]
    return CrossCloudMigration(s.registry, vm=app.vm, source_cloud="cloud-a", source_credentials=s.a.credentials,
                               dest_cloud="cloud-b", dest_credentials=s.b.credentials, source_app=app,
                               workdir=s.workdir, **kw)


@pytest.mark.asyncio(loop_scope="class")
class TestCrossCloudOnSharedClouds:
    """One scene for the class (see conftest.py): the revert leaves the source running and clean and
    passes it on to the move, which finalizes it."""

    async def test_test_cutover_then_revert_leaves_the_source_as_it_was(self, shared_clouds: SharedClouds) -> None:
        scene = shared_clouds.scene
        app = await shared_clouds.source_vm("app1", disk_mib=64, prefill_mib=8, rate_kib=32)
        m = migration(scene, app, budget_s=10.0)
        await m.prepare()
        await m.replicate(rounds=1, until_ready=False)
        res = await m.test_cutover()
        # the clone saw every record acknowledged up to its point, ran the application, reached nobody
        assert res["ok"] and res["isolated"] and res["records"]["missing"] == 0 and res["point_seq"] > 0
        assert not scene.b.exists(res["clone"])                  # discarded
        assert m.state is XState.REPLICATING
        await m.replicate(rounds=1, until_ready=False)           # replication goes on after it
        n = m.acks.count
        await m.revert()
        assert m.state is XState.REVERTED and not scene.b.exists("app1")
        assert scene.a.state("app1") == "running" and app.proc is not None and app.proc.running
        assert scene.wan.service_at == ("app1", scene.a.host)
        r = await scene.a.exec("app1", "ls /run/hvmig 2>&1 || true")
        assert "hvsim-migrate" not in r.stdout
        await app.proc.wait_line(lambda line: line.startswith("ACK") and int(line.split()[1]) > n, 30)
        await app.stop()
        v = await verify_records(scene.a, "app1", m.acks)
        assert v["missing"] == 0 and v["changed"] == 0

    async def test_move_a_to_b_every_acknowledged_record_survives(self, shared_clouds: SharedClouds) -> None:
        scene = shared_clouds.scene
        app = await shared_clouds.source_vm("app1", disk_mib=64, prefill_mib=8, rate_kib=64)
        m = migration(scene, app, budget_s=10.0)
        await m.prepare()
        assert m.state is XState.REPLICATING
        d = await m.replicate()
        assert d.fits, d.reason
        res = await m.cutover()
        assert m.state is XState.CUT_OVER
        assert res["verify"]["source"]["digest"] == res["verify"]["destination"]["digest"]
        assert scene.wan.service_at == (m.dest_vm, scene.b.host) and scene.b.exists(m.dest_vm)
        # records written at B after the cutover are acknowledged too: the application runs there
        assert m.dest_app is not None and m.acks.first.get(m.dest_app.origin) is not None
        await m.dest_app.stop()
        v = await m.verify_destination()
        assert v["missing"] == 0 and v["changed"] == 0 and v["acked"] > res["last_source_seq"] > 0
        await m.finalize()
        assert not scene.a.exists("app1")
        assert m.state is XState.FINALIZED
