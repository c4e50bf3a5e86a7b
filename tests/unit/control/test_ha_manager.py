"""The reservation and HA through a real manager and store (no guests: the HIL tests run those):
``GET /v1/reservation`` sizes the reservation, its rules are applied as placement rules, and a
define that would consume it is refused naming the rule; the HA controller of an in-process
manager (SQLite) judges a host without power evidence lost after the grace period and tries its
protected VMs in priority order, reporting one that no host can take (a failed restart operation
naming why, an event), never touching the unprotected one, never restarting one without a disk."""
from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from hvsim.cli import run
from hvsim.control.client import ManagerClient
from hvsim.control.errors import ApiConflictError
from hvsim.control.inventory import Inventory
from hvsim.control.manager import Manager
from hvsim.control.ops import OpKind, OpState
from hvsim.control.schema import HostCreate, RuleCreate, VMDefine
from hvsim.control.state import HostRecord, HostStatus, VMPower, VMRecord
from hvsim.control.store import SQLiteStore

from .manager_proc import manager_process


async def test_reservation_sized_applied_and_enforced(tmp_path: Path) -> None:
    with manager_process(tmp_path / "run", f"sqlite://{tmp_path / 'state.db'}") as m:
        async with ManagerClient(m.address, m.token, timeout=60) as c:
            for name in ("h1", "h2", "h3"):
                await c.add_host(HostCreate(name=name, vcpus=8, memory_mib=4096))
            await c.define_vm(VMDefine(name="db", vcpus=4, memory_mib=2048, host="h1", protected=True, priority=100))
            for i in range(4):
                await c.define_vm(VMDefine(name=f"web{i}", memory_mib=256, host="h1", protected=True, priority=10))
            await c.define_vm(VMDefine(name="scratch", memory_mib=256, host="h1"))      # unprotected: not sized
            rep = await c.reservation(management_vcpus=1, management_memory_mib=512)
            assert rep.candidates == ["h2", "h3"] and rep.candidates_are == "the hosts no protected VM runs on"
            plan = rep.plan
            assert plan["fits"] and sorted(i["name"] for i in plan["items"]) == ["db", "management"] + [
                f"web{i}" for i in range(4)]
            assert plan["reserved"] == {"vcpus": 4 + 4 + 1, "memory_mib": 2048 + 1024 + 512}
            assert plan["slots"]["reserved"] == {"vcpus": 6 * 4, "memory_mib": 6 * 2048}
            assert plan["overhead"]["vcpus"] == 24 - 9 and plan["overhead"]["memory_mib"] == 12288 - 3584
            for r in plan["rules"]:
                spec = {k: v for k, v in r.items() if k != "name"}
                await c.add_rule(RuleCreate(name=r["name"], spec=spec))
            rep2 = await c.reservation()
            assert [h["rule"] for h in rep2.held] == [r["name"] for r in plan["rules"]]
            assert rep2.candidates_are == "the hosts the reserve rules name"
            # best fit, largest memory first: db, the management host and three web VMs fill h2's 8 vCPUs
            assert plan["per_host"] == {"h2": {"vcpus": 8, "memory_mib": 3328}, "h3": {"vcpus": 1, "memory_mib": 256}}
            with pytest.raises(ApiConflictError, match="ha-reserve-h2"):
                await c.define_vm(VMDefine(name="intruder", memory_mib=1100, host="h2"))   # 4096 - 1100 < 3328
            with pytest.raises(ApiConflictError, match="reserve ha-reserve-h"):
                await c.define_vm(VMDefine(name="huge", memory_mib=3900))    # fits only where it is reserved
            ok, _ = await c.define_vm(VMDefine(name="small", memory_mib=256))
            assert ok.host is not None
            assert (await c.ha()).state == "watching"


async def test_ha_tries_protected_vms_in_priority_order_and_reports_what_fits_nowhere(tmp_path: Path) -> None:
    async with SQLiteStore(tmp_path / "state.db") as store:
        seed = Inventory(store)
        # agents that do not answer: the monitor marks every host unreachable on its first pass
        for name in ("h1", "h2", "h3"):
            await seed.add_host(HostRecord(name=name, vcpus=2, memory_mib=1024, agent=f"unix:{tmp_path}/{name}.sock",
                                           status=HostStatus.UP))
        specs = [("low", 10, 16), ("high", 90, 16), ("mid", 50, 16), ("nodisk", 70, 0)]
        for name, prio, disk in specs:
            await seed.define_vm(VMRecord(name=name, vcpus=4, memory_mib=128, disk_mib=disk, host="h1",
                                          protected=True, priority=prio))
            await seed.set_vm_power(name, VMPower.RUNNING)
        await seed.define_vm(VMRecord(name="scratch", memory_mib=128, host="h1"))
        await seed.set_vm_power("scratch", VMPower.RUNNING)
        m = Manager(store, lease_ttl=2, monitor_interval=3600, ha_grace=3600)    # one pass of each loop
        await m.start(timeout=20)
        try:
            for _ in range(200):
                hosts = await m.reader.list_all(HostRecord, "/hvsim/hosts/")
                if all(h.status is HostStatus.UNREACHABLE for h in hosts):
                    break
                await asyncio.sleep(0.05)
            for name in ("h2", "h3"):              # the survivors answer again
                await m.inventory.update_host(name, status=HostStatus.UP)
            assert await m.ha.once() == []          # h1 unreachable, no power evidence: within the grace
            assert m.ha.report()["hosts"]["h1"]["verdict"] == "waiting"
            m.ha.grace = 0.0
            assert await m.ha.once() == []          # 4 vCPUs fit on no 2-vCPU survivor
            rep = m.ha.report()
            assert rep["hosts"]["h1"] == {**rep["hosts"]["h1"], "verdict": "presumed-lost", "power": "unknown"}
            ops = [o for o in (await m.reader.list_ops(limit=100)).items if o.kind is OpKind.RESTART]
            assert [o.vm for o in sorted(ops, key=lambda o: o.created_at)] == ["high", "mid", "low"]
            for o in ops:
                assert o.state is OpState.FAILED and o.params["source"] == "h1"
                assert "cannot be restarted" in (o.error or "") and "vcpus" in (o.error or ""), o.error
            events = {(e["kind"], e["vm"]) for e in rep["events"]}
            assert {("not-restarted", n) for n in ("high", "mid", "low", "nodisk")} <= events
            for name in ("high", "mid", "low", "nodisk", "scratch"):
                vm = await m.reader.get_vm(name)
                assert (vm.host, vm.power) == ("h1", VMPower.RUNNING), vm   # kept, not lost, not moved
            assert await m.ha.once() == []          # within the retry period: no new attempt, no new record
            again = [o for o in (await m.reader.list_ops(limit=100)).items if o.kind is OpKind.RESTART]
            assert len(again) == 3
        finally:
            await m.close()


def test_cli_reservation_show_apply_and_ha_show(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    with manager_process(tmp_path / "run", f"sqlite://{tmp_path / 'state.db'}") as m:
        base = ["--manager", m.address, "--token-file", str(m.token_file)]

        async def seed() -> None:
            async with ManagerClient(m.address, m.token, timeout=60) as c:
                for name, dc in (("h1", "dc1"), ("r1", "dc2")):
                    await c.add_host(HostCreate(name=name, datacenter=dc, vcpus=8, memory_mib=8192))
                await c.define_vm(VMDefine(name="db", vcpus=4, memory_mib=4096, host="h1", protected=True))
                await c.define_vm(VMDefine(name="web", memory_mib=512, host="h1", protected=True))
        asyncio.run(seed())
        assert run([*base, "reservation", "show", "--datacenter", "dc2", "--json"]) == 0
        rep = json.loads(capsys.readouterr().out)
        assert rep["plan"]["reserved"] == {"vcpus": 5, "memory_mib": 4608}
        assert rep["plan"]["slots"]["reserved"] == {"vcpus": 8, "memory_mib": 8192}
        assert run([*base, "reservation", "show", "--datacenter", "dc2"]) == 0
        out = capsys.readouterr().out
        assert "overhead of slots" in out and "r1" in out
        assert run([*base, "reservation", "apply", "--datacenter", "dc2"]) == 0
        assert "rule ha-reserve-r1: added" in capsys.readouterr().out
        rc = run([*base, "vm", "define", "intruder", "--memory", "4000", "--host", "r1"])
        err = capsys.readouterr().err
        assert rc == 1 and "ha-reserve-r1" in err, err
        assert run([*base, "reservation", "apply", "--datacenter", "dc9", "--management-memory-mib", "64"]) == 1
        assert "does not fit" in capsys.readouterr().err
        assert run([*base, "ha", "show", "--json"]) == 0
        assert json.loads(capsys.readouterr().out)["state"] == "watching"


async def test_lower_tiers_wait_for_a_restart_a_previous_manager_left_in_flight(tmp_path: Path) -> None:
    async with SQLiteStore(tmp_path / "state.db") as store:
        seed = Inventory(store)
        for name in ("h1", "h2"):
            await seed.add_host(HostRecord(name=name, vcpus=8, memory_mib=4096, agent=f"unix:{tmp_path}/{name}.sock",
                                           status=HostStatus.UP))
        for name, prio in (("high", 90), ("low", 10)):
            await seed.define_vm(VMRecord(name=name, memory_mib=128, disk_mib=16, host="h1", protected=True,
                                          priority=prio))
            await seed.set_vm_power(name, VMPower.RUNNING)
        left, rev = await seed.begin(OpKind.RESTART, "high", source="h1", destination="h2")   # a dead manager's
        left.start()
        await seed.update(left, rev)            # running: the resolver defers it while h2 does not answer
        m = Manager(store, lease_ttl=2, monitor_interval=3600, ha_grace=0)
        await m.start(timeout=20)
        try:
            for _ in range(200):
                if (await m.reader.get_host("h1")).status is HostStatus.UNREACHABLE:
                    break
                await asyncio.sleep(0.05)
            await m.inventory.update_host("h2", status=HostStatus.UP)
            assert await m.ha.once() == []
            ops = [o for o in (await m.reader.list_ops(limit=100)).items if o.kind is OpKind.RESTART]
            assert [o.id for o in ops] == [left.record.id], "the lower tier went ahead of a restart in flight"
        finally:
            await m.close()
