"""The controller's bookkeeping: binding and move states, rollback, revert, journal (pure logic).

The host data plane is replaced by a recorder (the real one is exercised by the HIL tests in
tests/hil/network/test_tenant.py); these tests check what the controller asks for and what state
it ends in when a host refuses or the caller cancels."""
from __future__ import annotations

import asyncio
from typing import Any

import pytest

from hvsim.network.controller import MoveState, NetworkController
from hvsim.network.eni import BindingState, EniSpec, NetworkSpec
from hvsim.network.errors import (BindingStateError, ProgrammingError, TenantInputError, UnknownEniError,
                                  UnknownNetworkError)
from hvsim.network.nft import PortCounters
from hvsim.network.plan import MobilityMode


class FakeHosts:
    hosts = ("a", "b", "c")

    def host_ns(self, h: str) -> str:
        return f"hvs-x-h-{h}"

    def host_ip(self, h: str) -> str:
        return {"a": "198.18.0.1", "b": "198.18.0.2", "c": "198.18.0.3"}[h]


class Recorder:
    """Stands in for HostDataplane: records calls; ``fail`` = {(host, method)}; ``gate`` blocks one."""

    def __init__(self, calls: list[tuple[str, ...]], fail: set[tuple[str, str]],
                 gate: dict[tuple[str, str], asyncio.Event]) -> None:
        self.calls, self.fail, self.gate = calls, fail, gate

    def make(self, host: str, netns: str, vtep: str, mode: MobilityMode) -> Any:
        rec = self

        class DP:
            def __init__(self) -> None:
                self.host = host

            def __getattr__(self, name: str) -> Any:
                async def call(*args: Any, **kw: Any) -> Any:
                    rec.calls.append((host, name, *[str(a) for a in args[:2]]))
                    if (host, name) in rec.gate:
                        await rec.gate[(host, name)].wait()
                    if (host, name) in rec.fail:
                        raise ProgrammingError(host, name, "injected")
                    if name == "counters":
                        return PortCounters()
                    return None
                return call
        return DP()


@pytest.fixture
def rec() -> Recorder:
    return Recorder([], set(), {})


async def make(rec: Recorder, mode: str = "hvsim") -> NetworkController:
    ctl = NetworkController(FakeHosts(), mode=mode, dataplane=rec.make)
    await ctl.start()
    await ctl.add_network(NetworkSpec("blue", 100, "10.77.0.0/24"))
    ctl.define_eni(EniSpec("eni-1", "blue", "52:54:00:00:00:01", ("10.77.0.1",)))
    await ctl.attach("vm1", "a", ["eni-1"])
    rec.calls.clear()
    return ctl


async def test_define_refuses_before_programming(rec: Recorder) -> None:
    ctl = await make(rec)
    with pytest.raises(UnknownNetworkError):
        ctl.define_eni(EniSpec("eni-2", "green", "52:54:00:00:00:02", ("10.77.0.2",)))
    with pytest.raises(TenantInputError, match="MAC"):
        ctl.define_eni(EniSpec("eni-2", "blue", "52:54:00:00:00:01", ("10.77.0.2",)))
    with pytest.raises(UnknownEniError):
        await ctl.attach("vm2", "b", ["eni-9"])
    with pytest.raises(TenantInputError, match="vni 100 is already used"):
        await ctl.add_network(NetworkSpec("red", 100, "10.88.0.0/24"))
    assert rec.calls == []


async def test_full_move_states_and_journal(rec: Recorder) -> None:
    ctl = await make(rec)
    e = ctl.eni("eni-1")
    m = await ctl.stage("vm1", "b", move_id="mig-1")
    assert m.state is MoveState.STAGED
    assert {b.host: b.state for b in e.bindings} == {"a": BindingState.ACTIVE, "b": BindingState.STAGED}
    assert [c[:2] for c in rec.calls] == [("b", "create_port")]
    await ctl.activate(m)
    assert {b.host: b.state for b in e.bindings} == {"a": BindingState.RELEASING, "b": BindingState.ACTIVE}
    await ctl.release(m)
    assert m.state is MoveState.DONE and [b.host for b in e.bindings] == ["b"]
    journal = ctl.journal_of("mig-1")
    assert [(j.phase, j.host, j.op) for j in journal][:2] == [("stage", "b", "create-port"),
                                                              ("activate", "a", "block-port")]
    assert all(j.ok and j.op_id == "mig-1" for j in journal)
    assert ctl.snapshot()["moves"][0]["state"] == "done"


async def test_failed_stage_rolls_back_the_destination_only(rec: Recorder) -> None:
    ctl = await make(rec)
    rec.fail.add(("b", "create_port"))
    with pytest.raises(ProgrammingError, match="injected"):
        await ctl.stage("vm1", "b", move_id="mig-1")
    m = ctl.moves["mig-1"]
    assert m.state is MoveState.ROLLED_BACK
    assert [c[:2] for c in rec.calls] == [("b", "create_port"), ("b", "delete_port")]
    e = ctl.eni("eni-1")
    assert [(b.host, b.state) for b in e.bindings] == [("a", BindingState.ACTIVE)]
    assert [j.ok for j in ctl.journal_of("mig-1")] == [False, True]


async def test_cancelled_stage_is_rolled_back_and_the_cancellation_propagates(rec: Recorder) -> None:
    ctl = await make(rec)
    gate = rec.gate[("b", "create_port")] = asyncio.Event()
    task = asyncio.create_task(ctl.stage("vm1", "b", move_id="mig-1"))
    while not rec.calls:
        await asyncio.sleep(0)
    task.cancel()
    gate.set()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert ctl.moves["mig-1"].state is MoveState.ROLLED_BACK
    assert ("b", "delete_port") in [c[:2] for c in rec.calls]
    assert [b.host for b in ctl.eni("eni-1").bindings] == ["a"]


async def test_failed_activation_reverts_to_the_source(rec: Recorder) -> None:
    ctl = await make(rec)
    m = await ctl.stage("vm1", "b", move_id="mig-1")
    rec.calls.clear()
    rec.fail.add(("c", "fdb_remote"))           # the third wave of the activation fails on host c
    with pytest.raises(ProgrammingError):
        await ctl.activate(m)
    assert m.state is MoveState.FAILED            # c refuses the revert's fdb_remote too
    e = ctl.eni("eni-1")
    assert [(b.host, b.state) for b in e.bindings] == [("a", BindingState.ACTIVE)]
    ops = [c[:2] for c in rec.calls]
    assert ops.index(("a", "set_blocked")) < ops.index(("b", "set_blocked"))
    assert ops[-1] == ("b", "delete_port")        # the destination goes last, after the revert

    rec.fail.clear()
    m2 = await ctl.stage("vm1", "b", move_id="mig-2")   # the ENI is usable again
    await ctl.rollback(m2)
    assert m2.state is MoveState.ROLLED_BACK


async def test_rollback_after_switchover_reverts(rec: Recorder) -> None:
    ctl = await make(rec)
    m = await ctl.stage("vm1", "b", move_id="mig-1")
    await ctl.activate(m)
    rec.calls.clear()
    await ctl.rollback(m)
    assert m.state is MoveState.ROLLED_BACK
    assert [(b.host, b.state) for b in ctl.eni("eni-1").bindings] == [("a", BindingState.ACTIVE)]
    assert rec.calls[0][:2] == ("b", "set_blocked") and rec.calls[-1][:2] == ("b", "delete_port")
    await ctl.rollback(m)                          # idempotent
    with pytest.raises(BindingStateError, match="cannot release move mig-1: it is rolled-back"):
        await ctl.release(m)


async def test_misuse_is_refused(rec: Recorder) -> None:
    ctl = await make(rec)
    m = await ctl.stage("vm1", "b", move_id="mig-1")
    with pytest.raises(TenantInputError, match="already used"):
        await ctl.stage("vm1", "c", move_id="mig-1")
    with pytest.raises(BindingStateError, match="not all active and idle"):
        await ctl.stage("vm1", "c", move_id="mig-2")
    with pytest.raises(BindingStateError, match="a move is in progress"):
        await ctl.detach("vm1")
    with pytest.raises(BindingStateError, match="cannot release"):
        await ctl.release(m)
    await ctl.rollback(m)
    with pytest.raises(TenantInputError, match="already on host 'a'"):
        await ctl.stage("vm1", "a", move_id="mig-3")
    empty = await ctl.stage("vm-without-enis", "b", move_id="mig-4")      # a VM with no ENI: a no-op move
    await ctl.activate(empty)
    await ctl.release(empty)
    assert empty.state is MoveState.DONE


@pytest.mark.parametrize("mode", ["learning", "after-completion"])
async def test_other_modes_use_the_same_calls(rec: Recorder, mode: str) -> None:
    ctl = await make(rec, mode)
    m = await ctl.stage("vm1", "b", move_id="mig-1")
    await ctl.activate(m)
    act_calls = list(rec.calls[1:])
    await ctl.release(m)
    assert act_calls == []                         # nothing happens at switchover in these modes
    assert m.state is MoveState.DONE and [b.host for b in ctl.eni("eni-1").bindings] == ["b"]


async def test_detach_and_close(rec: Recorder) -> None:
    ctl = await make(rec)
    await ctl.detach("vm1")
    assert ctl.eni("eni-1").bindings == []
    ctl.remove_eni("eni-1")
    await ctl.close()
    assert ctl.state.value == "closed"
    with pytest.raises(BindingStateError, match="cannot attach ENIs"):
        await ctl.attach("vm1", "a", ["eni-1"])
    await ctl.close()



# ---- the ENI component (a VM's NIC on a tenant network) ------------------------------------------------
def _ctx(vm: str, tmp_path: Any) -> Any:
    from hvsim.core.components import ComponentContext
    return ComponentContext(vm=vm, vm_dir=tmp_path, publish=lambda e: None, track_process=lambda pid, what: None)


async def test_eni_driver_refuses_a_nic_that_does_not_match_its_eni(rec: Recorder, tmp_path: Any) -> None:
    from hvsim.core.model import NicSpec
    from hvsim.network.component import EniDriver
    ctl = await make(rec)
    drv = EniDriver(ctl)
    with pytest.raises(UnknownEniError):
        drv.create_nic(NicSpec("eni-9", network="blue"), _ctx("vm1", tmp_path))
    with pytest.raises(TenantInputError, match="belongs to network 'blue'"):
        drv.create_nic(NicSpec("eni-1", network="red"), _ctx("vm1", tmp_path))
    with pytest.raises(TenantInputError, match="has MAC"):
        drv.create_nic(NicSpec("eni-1", network="blue", mac="52:54:00:00:00:99"), _ctx("vm1", tmp_path))
    with pytest.raises(TenantInputError, match="bound to vm 'vm1'"):
        drv.create_nic(NicSpec("eni-1", network="blue"), _ctx("vm2", tmp_path))


async def test_eni_component_binds_on_first_start_and_moves_on_a_restart_elsewhere(
        rec: Recorder, tmp_path: Any) -> None:
    from hvsim.core.host import Host
    from hvsim.core.model import HostSpec, NicSpec
    from hvsim.network.component import EniDriver
    ctl = await make(rec)
    ctl.define_eni(EniSpec("eni-2", "blue", "52:54:00:00:00:02", ("10.77.0.2",)))
    comp = EniDriver(ctl).create_nic(NicSpec("eni-2", network="blue"), _ctx("vm2", tmp_path))
    att = await comp.prepare(Host(HostSpec("b")))
    assert [(n.backend, n.ifname, n.mac) for n in att.nics] == [("tap", ctl.eni("eni-2").spec.port_name,
                                                                "52:54:00:00:00:02")]
    assert [(b.host, b.state) for b in ctl.eni("eni-2").bindings] == [("b", BindingState.ACTIVE)]
    await comp.stop()                                         # the VM stopped: the ENI stays its own
    assert ctl.eni("eni-2").active is not None
    await comp.prepare(Host(HostSpec("c")))                   # restarted on another host: moved there
    assert [(b.host, b.state) for b in ctl.eni("eni-2").bindings] == [("c", BindingState.ACTIVE)]
    assert any(m.id.startswith("restart:vm2") and m.state is MoveState.DONE for m in ctl.moves.values())
    await comp.stop()
    await comp.remove()                                       # undefined: detached everywhere
    assert ctl.eni("eni-2").bindings == []
