"""The inventory's transactions on both stores: operations recorded before they start and
updated as they progress, one operation per VM at a time, a restarted manager resolving what
it finds in flight, and fencing: a manager that lost its lease changes nothing."""
from __future__ import annotations

import asyncio

import pytest

from hvsim.control.errors import ConflictError, FencedError, NotFoundError
from hvsim.control.inventory import Inventory
from hvsim.control.ops import STEP_DEST_STARTED, OpKind, OpState, QemuState, VMFacts, resolve
from hvsim.control.state import HOST_VMS, GroupRecord, HostRecord, VMPower, VMRecord
from hvsim.control.store import Store

pytestmark = pytest.mark.asyncio(loop_scope="module")


async def setup(inv: Inventory) -> None:
    await inv.add_host(HostRecord(name="a"))
    await inv.add_host(HostRecord(name="b"))
    await inv.define_vm(VMRecord(name="web", host="a"))


async def test_operation_lifecycle_and_one_per_vm(store: Store) -> None:
    inv = Inventory(store, manager="m1")
    await setup(inv)
    op, rev = await inv.begin(OpKind.START, "web")
    assert [r.id for r, _ in await inv.in_flight()] == [op.record.id]
    with pytest.raises(ConflictError, match="in flight"):
        await inv.begin(OpKind.STOP, "web")
    with pytest.raises(ConflictError):
        await inv.undefine_vm("web")
    with pytest.raises(NotFoundError):
        await inv.begin(OpKind.START, "nope")
    op.start()
    rev = await inv.update(op, rev)
    op.step("qemu-started")
    rev = await inv.update(op, rev)
    with pytest.raises(ConflictError, match="someone else"):
        await inv.update(op, rev - 1)          # a stale writer of this operation
    vm = await inv.get_vm("web")
    op.succeed()
    await inv.update(op, rev, VMRecord(**{**_d(vm), "power": VMPower.RUNNING}))
    rec, _ = await inv.get_op(op.record.id)
    assert rec.state is OpState.SUCCEEDED and rec.steps == ("qemu-started",)
    assert [h.state for h in rec.history] == [OpState.PENDING, OpState.RUNNING, OpState.SUCCEEDED]
    assert (await inv.get_vm("web")).power is VMPower.RUNNING
    assert await inv.in_flight() == []
    op2, _ = await inv.begin(OpKind.STOP, "web")       # the lock was released
    assert op2.record.state is OpState.PENDING


async def test_restarted_manager_resolves_a_half_done_migration(store: Store) -> None:
    inv = Inventory(store, manager="m1")
    await setup(inv)
    op, rev = await inv.begin(OpKind.MIGRATE, "web", source="a", destination="b")
    op.start()
    rev = await inv.update(op, rev)
    op.step(STEP_DEST_STARTED)
    await inv.update(op, rev)
    # m1 dies here. m2 starts, finds the operation, asks the host agents: the migration completed
    m2 = Inventory(store, manager="m2")
    [(rec, rev2)] = await m2.in_flight()
    assert rec.steps == (STEP_DEST_STARTED,)
    vm = await m2.get_vm("web")
    res = resolve(rec, VMFacts(vm="web", qemus={"a": QemuState.POSTMIGRATE, "b": QemuState.RUNNING}), vm.host)
    assert res.final is OpState.SUCCEEDED
    done = await m2.settle(rec, rev2, res)
    assert done.state is OpState.SUCCEEDED and done.terminal
    vm = await m2.get_vm("web")
    assert (vm.host, vm.power) == ("b", VMPower.RUNNING)
    assert [kv.key for kv in (await store.list(HOST_VMS, limit=10)).items] == [f"{HOST_VMS}b/web"]
    assert await m2.in_flight() == []
    with pytest.raises(ConflictError):          # resolving twice is refused
        await m2.settle(rec, rev2, res)


async def test_fenced_manager_that_lost_its_lease_changes_nothing(store: Store) -> None:
    lease = await store.grant(30)
    fence = await store.acquire("manager", "m1", lease)
    assert fence is not None
    m1 = Inventory(store, fence=fence, manager="m1")
    await setup(m1)
    op, rev = await m1.begin(OpKind.START, "web")
    assert op.record.token == fence.token
    await store.revoke(lease)                    # m1's lease is gone (expired while it was stopped)
    fence2 = await store.acquire("manager", "m2", await store.grant(30))
    assert fence2 is not None and fence2.token > fence.token
    before = await store.revision()
    op.start()
    with pytest.raises(FencedError):
        await m1.update(op, rev)
    with pytest.raises(FencedError):
        await m1.define_vm(VMRecord(name="other"))
    with pytest.raises(FencedError):
        await m1.add_host(HostRecord(name="c"))
    assert await store.revision() == before
    m2 = Inventory(store, fence=fence2, manager="m2")
    [(rec, rev2)] = await m2.in_flight()
    res = resolve(rec, VMFacts(vm="web"), "a")
    assert res.final is OpState.FAILED           # it never started
    await m2.settle(rec, rev2, res)
    assert (await m2.get_vm("web")).power is VMPower.SHUTOFF


async def test_remove_group_races_defines_without_orphans(store: Store) -> None:
    inv = Inventory(store)
    await inv.add_group(GroupRecord(name="g"))
    results = await asyncio.gather(inv.remove_group("g"),
                                   *(inv.define_vm(VMRecord(name=f"v{i}", group="g")) for i in range(5)),
                                   return_exceptions=True)
    vms = (await inv.list_vms()).items
    groups = (await inv.list_groups()).items
    if groups:       # the removal lost to a define: it said so
        assert isinstance(results[0], ConflictError), results[0]
        assert vms
    else:            # the group is gone: no VM may name it, every define after it was refused
        assert results[0] is None
        assert all(vm.group != "g" for vm in vms), (results, vms)
    for r, i in zip(results[1:], range(5), strict=True):
        assert isinstance(r, tuple) == any(vm.name == f"v{i}" for vm in vms), r
        assert isinstance(r, tuple | ConflictError | NotFoundError), r


def _d(vm: VMRecord) -> dict[str, object]:
    return {k: getattr(vm, k) for k in vm.__dataclass_fields__}
