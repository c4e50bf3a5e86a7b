"""A manager driving two host agents on real guests through its API: start, exec, live migration
(the source agent drives it, the destination agent adopts the guest), stop; a manager SIGKILLed in
the middle of a migration and restarted resolves the operation (the VM runs on exactly one host);
a host agent killed makes its host unreachable, and the host comes back when a new agent re-adopts
its guest."""
from __future__ import annotations

import asyncio
import time

import pytest

from hvsim.control.agentrpc import QemuList
from hvsim.control.client import ManagerClient
from hvsim.control.errors import ApiConflictError
from hvsim.control.ops import STEP_DEST_STARTED, STEP_SWITCHED_OVER, OpKind, OpState
from hvsim.control.schema import ExecRequest, HostCreate, MigrateRequest, VMDefine
from hvsim.control.state import HostStatus, VMPower
from hvsim.core.procfs import alive

from .conftest import ControlPlane

pytestmark = pytest.mark.hil


async def two_hosts(cp: ControlPlane) -> ManagerClient:
    """A client of a manager with the hosts h1 and h2 up: the shared plane's when an earlier test of
    the class made them (re-checked by ``shared_cp``: no VM, no QEMU, every agent answering)."""
    if cp.hosts:
        c = cp.client(cp.managers[0])
        for name in ("h1", "h2"):
            rec = await c.get_host(name)
            assert rec.status is HostStatus.UP and (rec.vcpus, rec.memory_mib) == (2, 1024)
        return c
    await asyncio.gather(*(cp.host(name, memory_mib=1024) for name in ("h1", "h2")))
    m = await cp.manager(lease_ttl=3)
    c = cp.client(m)
    for name in ("h1", "h2"):
        rec = await c.add_host(HostCreate(name=name, agent=cp.hosts[name].address))
        assert rec.status is HostStatus.UP and (rec.vcpus, rec.memory_mib) == (2, 1024)   # what the agent says
    return c


async def where(cp: ControlPlane, vm: str) -> dict[str, QemuList]:
    """Every host's QEMUs of ``vm`` (as the agents report them)."""
    out = {}
    for name in cp.hosts:
        ql = await cp.agent(name).qemus()
        out[name] = QemuList(items=[q for q in ql.items if q.vm == vm])
    return {h: q for h, q in out.items() if q.items}


@pytest.mark.asyncio(loop_scope="class")
class TestManagerOnSharedPlane:
    """One plane for the class (``shared_cp``: two hosts with their agents, a manager), reset and
    re-checked between the tests."""

    async def test_manager_with_two_agents_starts_migrates_and_stops_a_real_guest(
            self, shared_cp: ControlPlane) -> None:
        cp = shared_cp
        c = await two_hosts(cp)
        vm, _ = await c.define_vm(VMDefine(name="web", memory_mib=256))
        src = vm.host
        assert src in ("h1", "h2")                                      # placed by the placement controller
        dst = "h2" if src == "h1" else "h1"
        op = await c.start_vm("web")
        assert (op.kind, op.state) == (OpKind.START, OpState.SUCCEEDED)
        assert (await c.get_vm("web")).power is VMPower.RUNNING
        assert (await cp.agent(src).info()).used_memory_mib == 256
        with pytest.raises(ApiConflictError, match="running"):
            await c.start_vm("web")                                     # twice-started is refused
        filled = await c.exec_vm("web", ExecRequest(command="memfill 24 --seed 3 --sock /run/mf.sock", timeout=90))
        assert "FILLED" in filled.stdout
        await c.exec_vm("web", ExecRequest(command="dirty 8 2 >/dev/null 2>&1 &"))
        before = await cp.agent(src).vm("web")
        assert before.heartbeat_socket
        hb = await cp.heartbeat(before.heartbeat_socket)
        await hb.wait_beats(20, timeout=30)

        op = await c.migrate_vm("web", MigrateRequest(destination=dst, policy="hvsim-predictive"))
        assert (op.kind, op.state, op.params["source"], op.params["destination"]) == (OpKind.MIGRATE, OpState.RUNNING,
                                                                                        src, dst)
        seen = set()
        deadline = time.monotonic() + 240
        while not (cur := await c.get_op(op.id)).terminal:
            assert time.monotonic() < deadline
            try:
                seen.add((await c.progress(op.id)).state)
            except Exception:
                pass
            await asyncio.sleep(0.2)
        assert cur.state is OpState.SUCCEEDED, cur
        assert STEP_DEST_STARTED in cur.steps and STEP_SWITCHED_OVER in cur.steps
        assert seen & {"preparing", "active", "switching-over", "postcopy", "completed"}
        rec = await c.get_vm("web")
        assert (rec.host, rec.power) == (dst, VMPower.RUNNING)
        on = await where(cp, "web")
        assert list(on) == [dst] and on[dst].items[0].qemu_status == "running"
        assert not alive(before.pid or 0), "the source QEMU still runs"
        assert (await cp.agent(src).info()).used_memory_mib == 0
        assert (await cp.agent(dst).info()).used_memory_mib == 256
        # the same guest, its memory intact, its heartbeat going on from the destination
        after = on[dst].items[0]
        assert after.heartbeat_socket
        hb2 = await cp.heartbeat(after.heartbeat_socket)
        await hb2.wait_beats(20, timeout=30)
        assert hb2.beats[0].seq > hb.beats[-1].seq
        chk = await c.exec_vm("web", ExecRequest(command="retouch seq --sock /run/mf.sock", timeout=90))
        assert chk.exit_code == 0 and "bad=0" in chk.stdout, chk

        op = await c.stop_vm("web")
        assert (op.kind, op.state) == (OpKind.STOP, OpState.SUCCEEDED)
        assert (await c.get_vm("web")).power is VMPower.SHUTOFF
        assert await where(cp, "web") == {}
        assert (await c.placement()).required_violations == 0

    async def test_manager_killed_mid_migration_is_resolved_by_the_next_one(self, shared_cp: ControlPlane) -> None:
        cp = shared_cp
        c = await two_hosts(cp)
        await c.define_vm(VMDefine(name="busy", memory_mib=256, host="h1"))
        await c.start_vm("busy")
        await c.exec_vm("busy", ExecRequest(command="dirty 64 16 >/dev/null 2>&1 &"))
        m = cp.managers[0]
        op = await c.migrate_vm("busy", MigrateRequest(destination="h2", policy="stepwise"))
        await m.kill()                                 # SIGKILL: the operation is in flight in the store
        await c.close()
        await m.start()                                # waits for the dead manager's lease to expire
        c = cp.client(m)
        done = await c.wait_op(op.id, timeout=300)
        rec = await c.get_vm("busy")
        on = await where(cp, "busy")
        # exactly one copy runs, on the host the record names, whatever the outcome was
        assert rec.host is not None
        assert list(on) == [rec.host] and len(on[rec.host].items) == 1, (done, on)
        assert on[rec.host].items[0].qemu_status == "running" and on[rec.host].items[0].role == "vm"
        assert rec.power is VMPower.RUNNING
        assert (done.state is OpState.SUCCEEDED) == (rec.host == "h2"), done
        assert (await c.exec_vm("busy", ExecRequest(command="echo alive"))).stdout == "alive\n"
        assert (await c.health())["token"] > 0
        await c.destroy_vm("busy")
        assert await where(cp, "busy") == {}

    async def test_a_killed_agent_makes_its_host_unreachable_until_a_new_one_readopts(
            self, shared_cp: ControlPlane) -> None:
        cp = shared_cp
        c = await two_hosts(cp)
        await c.define_vm(VMDefine(name="db", memory_mib=128, host="h1"))
        await c.start_vm("db")
        pid = (await cp.agent("h1").vm("db")).pid
        await cp.hosts["h1"].kill_agent()
        deadline = time.monotonic() + 30
        while (await c.get_host("h1")).status is not HostStatus.UNREACHABLE:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.2)
        with pytest.raises(ApiConflictError, match="unreachable"):
            await c.stop_vm("db")
        assert alive(pid or 0)
        await cp.hosts["h1"].start_agent()
        while (await c.get_host("h1")).status is not HostStatus.UP:
            assert time.monotonic() < deadline + 30
            await asyncio.sleep(0.2)
        assert (await cp.agent("h1").vm("db")).pid == pid
        assert (await c.get_vm("db")).power is VMPower.RUNNING
        assert (await c.stop_vm("db")).state is OpState.SUCCEEDED
