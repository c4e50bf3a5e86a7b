"""HA on real guests: a manager (SQLite) and three host agents sharing one datastore, a reservation
on h3 sized by ``GET /v1/reservation`` and applied as placement rules.

- **split brain** (h2's agent SIGKILLed, its QEMU still running): the manager sees h2 unreachable
  but powered on and restarts **nothing**, well past the grace period; a start of the same guest
  on h3 (same disk image on the shared datastore) is refused by QEMU's image lock; a new agent
  re-adopts the guest with its pid unchanged.
- **host powered off** (h1: every process of it killed; the manager SIGKILLed while an agent
  restarts the first VM, and started again): its protected VMs run again on a surviving host, the
  higher priority one first (its restart settled by the next manager's resolver), each with a
  block written (and flushed) before the loss intact; the unprotected one is marked crashed and
  not restarted; the guest on h2 keeps its QEMU pid. Ordinary defines never got the reserved
  capacity; the restarts may use it.

The guests are shared by the two tests (one boot each); the split-brain test runs first."""
from __future__ import annotations

import asyncio
import secrets
import shutil
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import pytest
import pytest_asyncio

from hvsim.control.agentrpc import GuestSpec, StartRequest
from hvsim.control.client import ManagerClient
from hvsim.control.errors import ApiConflictError
from hvsim.control.launch import short_dir
from hvsim.control.ops import OperationRecord, OpKind, OpState
from hvsim.control.schema import ExecRequest, HostCreate, RuleCreate, VMDefine
from hvsim.control.state import HostStatus, VMPower
from hvsim.core.procfs import alive
from hvsim.testing.plugin import Artifacts

from .conftest import ControlPlane

pytestmark = [pytest.mark.hil, pytest.mark.asyncio(loop_scope="module"), pytest.mark.timeout(900)]
GRACE = 4.0
# name, host, protected, priority, disk MiB
GUESTS = [("db", "h1", True, 100, 16), ("app", "h1", True, 10, 16), ("scratch", "h1", False, 0, 0),
          ("solo", "h2", True, 50, 16)]
READ = "dd if=/dev/vda bs=4096 skip=3 count=1 2>/dev/null | head -c 64 | tr -d '\\000'"   # the block written


@dataclass
class Scene:
    cp: ControlPlane
    c: ManagerClient
    marks: dict[str, str] = field(default_factory=dict)     # vm -> what it wrote to its disk
    failed: bool = False


async def _wait(what: str, check: object, timeout: float, poll: float = 0.3) -> None:
    deadline = time.monotonic() + timeout
    while not await check():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout:g} s")
        await asyncio.sleep(poll)


async def _ops(c: ManagerClient, vm: str, kind: OpKind) -> list[OperationRecord]:
    items, _, _ = await c.list_ops(limit=1000)
    return sorted([o for o in items if o.vm == vm and o.kind is kind], key=lambda o: o.created_at)


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def scene() -> AsyncIterator[Scene]:
    cp = ControlPlane(short_dir("hvsim-hil-ha-"))
    sc: Scene | None = None
    try:
        for name in ("h1", "h2", "h3"):
            await cp.host(name, vcpus=4, memory_mib=1024)
        m = await cp.manager(lease_ttl=3, ha_grace=GRACE)
        c = cp.client(m)
        for name, h in cp.hosts.items():
            await c.add_host(HostCreate(name=name, agent=h.address))
        for name, host, prot, prio, disk in GUESTS:
            await c.define_vm(VMDefine(name=name, memory_mib=192, host=host, protected=prot, priority=prio,
                                       disk_mib=disk))
        sc = Scene(cp, c)
        yield sc
    finally:
        survivors = await cp.close()
        shutil.rmtree(cp.base, ignore_errors=True)
        assert not survivors, f"processes of the emulated hosts survived their power-off: {survivors}"


@pytest.fixture(autouse=True)
def _keep_logs(request: pytest.FixtureRequest, scene: Scene) -> object:
    art = Artifacts(request)
    yield
    if art.failed:
        scene.cp.keep(art.dir)


async def test_reservation_is_sized_applied_and_refused_to_ordinary_defines(scene: Scene) -> None:
    c = scene.c
    rep = await c.reservation()
    assert rep.candidates == ["h3"]                                  # the only host no protected VM runs on
    plan = rep.plan
    assert plan["fits"] and plan["reserved"] == {"vcpus": 3, "memory_mib": 3 * 192}
    assert plan["slots"]["reserved"] == {"vcpus": 3, "memory_mib": 3 * 192}     # a homogeneous set: no overhead
    for r in plan["rules"]:
        await c.add_rule(RuleCreate(name=r["name"], spec={k: v for k, v in r.items() if k != "name"}))
    with pytest.raises(ApiConflictError, match="ha-reserve-h3"):
        await c.define_vm(VMDefine(name="intruder", memory_mib=512, host="h3"))
    with pytest.raises(ApiConflictError, match="ha-reserve-h3"):
        await c.define_vm(VMDefine(name="big", memory_mib=900))           # fits only in the reservation
    # boot every guest (concurrently) and write a block to each disk, flushed
    ops = await asyncio.gather(*(c.start_vm(n) for n, *_ in GUESTS))
    assert all(o.state is OpState.SUCCEEDED for o in ops), ops
    for name, _h, _p, _prio, disk in GUESTS:
        if not disk:
            continue
        mark = f"HVSIM-HA-{name}-{secrets.token_hex(8)}"
        out = await c.exec_vm(name, ExecRequest(
            command=f"printf '%s' {mark} | dd of=/dev/vda bs=4096 seek=3 conv=fsync 2>/dev/null && echo WROTE",
            timeout=60))
        assert "WROTE" in out.stdout, out
        scene.marks[name] = mark


async def test_split_brain_agent_dead_guest_alive_nothing_is_restarted(scene: Scene) -> None:
    cp, c = scene.cp, scene.c
    h2 = cp.hosts["h2"]
    pid = (await cp.agent("h2").vm("solo")).pid
    assert pid and alive(pid)
    await h2.kill_agent()                                      # the host and its guest live on
    await _wait("h2 unreachable", lambda: _status(c, "h2", HostStatus.UNREACHABLE), 30)
    await _wait("h2 judged alive", lambda: _verdict(c, "h2", "alive"), 30)
    await asyncio.sleep(GRACE * 3)                             # well past the grace period
    assert (await _verdict(c, "h2", "alive"))
    assert await _ops(c, "solo", OpKind.RESTART) == [], "a restart was attempted while the guest ran"
    for other in ("h1", "h3"):
        assert not [q for q in (await cp.agent(other).qemus()).items if q.vm == "solo"]
    assert alive(pid)
    vm = await c.get_vm("solo")
    assert (vm.host, vm.power) == ("h2", VMPower.RUNNING)
    # the datastore lock: the same guest (same image) started on h3 by its agent directly is refused
    with pytest.raises(ApiConflictError) as err:
        await cp.agent("h3").start(StartRequest(vm=GuestSpec(name="solo", memory_mib=192, disk_mib=16)),
                                   token=(await cp.agent("h3").info()).token)
    assert err.value.field == "datastore-lock" and "locked" in err.value.detail
    assert not [q for q in (await cp.agent("h3").qemus()).items if q.vm == "solo"]
    assert alive(pid)
    await h2.start_agent()                                     # a new agent re-adopts the guest
    await _wait("h2 up", lambda: _status(c, "h2", HostStatus.UP), 60)
    assert (await cp.agent("h2").vm("solo")).pid == pid
    out = await c.exec_vm("solo", ExecRequest(command=READ, timeout=60))
    assert scene.marks["solo"] in out.stdout


async def test_host_powered_off_its_protected_vms_restart_in_priority_order(scene: Scene) -> None:
    cp, c = scene.cp, scene.c
    if cp.hosts["h2"].agent_pid is None:
        await cp.hosts["h2"].start_agent()
    await _wait("h2 up", lambda: _status(c, "h2", HostStatus.UP), 60)
    solo_pid = (await cp.agent("h2").vm("solo")).pid
    killed = await cp.hosts["h1"].power_off()
    t0 = time.monotonic()
    assert killed
    cp.note_pids()

    # the manager SIGKILLed while a surviving agent is starting db: the next manager resolves that
    # restart (and its lower priority restarts wait for it)
    async def db_starting() -> bool:
        for h in ("h2", "h3"):
            if any(q.vm == "db" for q in (await cp.agent(h).qemus()).items):
                return True
        return False
    await _wait("db being restarted", db_starting, 120, poll=0.1)
    m = cp.managers[0]
    await m.kill()
    await m.start()
    c = scene.c = cp.client(m)

    async def restarted() -> bool:
        for n in ("db", "app"):
            vm = await c.get_vm(n)
            if vm.power is not VMPower.RUNNING or vm.host not in ("h2", "h3"):
                return False
        return True
    await _wait("protected VMs running again", restarted, 300, poll=0.5)
    took = time.monotonic() - t0
    db_ops, app_ops = await _ops(c, "db", OpKind.RESTART), await _ops(c, "app", OpKind.RESTART)
    assert [o.state for o in app_ops] == [OpState.SUCCEEDED]
    app_op = app_ops[0]
    # the restart the killed manager began was resolved by the next one: finished (the agent brought
    # the guest up) or failed (it did not) and then done again; either way exactly one succeeded
    first, db_op = db_ops[0], db_ops[-1]
    assert first.token < app_op.token, (first, app_op)
    assert not first.history[-1].note.startswith("HA restart"), first      # settled by the resolver
    assert [o.state for o in db_ops][-1] is OpState.SUCCEEDED
    assert all(o.state is OpState.FAILED for o in db_ops[:-1]), db_ops
    assert db_op.params["source"] == "h1" and db_op.params["evidence"] == "off"
    # priority order: the higher priority VM was running before the lower one's restart began
    assert db_op.updated_at <= app_op.created_at, (db_op, app_op)
    print(f"db's first restart ({first.id}) was settled by the next manager: {first.state.value}, "
          f"{first.history[-1].note!r}")
    for name in ("db", "app"):
        vm = await c.get_vm(name)
        on = [h for h in cp.hosts if h != "h1" and any(q.vm == name for q in (await cp.agent(h).qemus()).items)]
        assert on == [vm.host], (name, on, vm)
        out = await c.exec_vm(name, ExecRequest(
            command=READ, timeout=60))
        assert scene.marks[name] in out.stdout, (name, out)        # data written before the loss is there
    # the unprotected VM: marked crashed, recorded where it was lost, never restarted
    scratch = await c.get_vm("scratch")
    assert (scratch.host, scratch.power) == ("h1", VMPower.CRASHED)
    assert await _ops(c, "scratch", OpKind.RESTART) == []
    for h in ("h2", "h3"):
        assert not [q for q in (await cp.agent(h).qemus()).items if q.vm == "scratch"]
    # the guest on the surviving host was not touched
    assert (await cp.agent("h2").vm("solo")).pid == solo_pid and alive(solo_pid or 0)
    ha = await c.ha()
    assert ha.hosts["h1"]["verdict"] == "lost" and ha.hosts["h1"]["power"] == "off"
    assert ("restarted", "app") in {(e["kind"], e["vm"]) for e in ha.events}
    print(f"protected VMs of h1 running again {took:.1f} s after its power-off")


async def _status(c: ManagerClient, host: str, status: HostStatus) -> bool:
    return (await c.get_host(host)).status is status


async def _verdict(c: ManagerClient, host: str, verdict: str) -> bool:
    return (await c.ha()).hosts.get(host, {}).get("verdict") == verdict
