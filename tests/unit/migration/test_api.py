"""Input validation of start_migration: refused synchronously, before any process starts."""
from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from hvsim.core.cluster import Cluster
from hvsim.core.errors import CapacityError
from hvsim.core.host import HostNetwork
from hvsim.core.lifecycle import VMState
from hvsim.migration import (MigrationInputError, MigrationRefusedError, MigrationStateError,
                             start_migration)
from hvsim.core.model import HostSpec, VMSpec


@pytest.fixture
async def cl() -> AsyncIterator[Cluster]:
    c = Cluster("unit")
    c.add_host(HostSpec("a", memory_mib=1024), network=HostNetwork("ns-a", "198.18.0.1"))
    c.add_host(HostSpec("b", memory_mib=1024), network=HostNetwork("ns-b", "198.18.0.2"))
    c.add_host(HostSpec("tiny", memory_mib=128), network=HostNetwork("ns-t", "198.18.0.3"))
    c.add_host(HostSpec("flat", memory_mib=1024))
    try:
        yield c
    finally:
        c.vms.clear()          # nothing was started
        await c.close()


async def running_vm(cl: Cluster, memory_mib: int = 256):  # type: ignore[no-untyped-def]
    vm = await cl.define_vm(VMSpec("g", memory_mib=memory_mib), "a")
    vm.fsm.set(VMState.STARTING, "pretend")  # pretend: these checks all happen before any QMP traffic
    vm.fsm.set(VMState.RUNNING, "pretend")
    cl.hosts["a"].reserve(vm.spec)
    return vm


@pytest.mark.parametrize("kwargs,match", [
    ({"policy": "yolo"}, "unknown migration policy 'yolo'"),
    ({"timeout": -1}, "timeout must be a positive"),
    ({"timeout": float("nan")}, "timeout must be a positive"),
    ({"colour": "red"}, "unknown migration option"),
    ({"port": 80}, "port must be"),
    ({"policy_params": {"budget_ms": -5}}, "budget_ms"),
    ({"downtime_budget_ms": 20}, "downtime_budget_ms must be >= 100 ms"),
    ({"time_budget_s": -3}, "time_budget_s must be a positive"),
    ({"postcopy_window_s": "long"}, "postcopy_window_s must be a number"),
    ({"if_infeasible": "shrug"}, "if_infeasible must be one of"),
    ({"contract": {"downtime_budget_ms": 300}}, "contract must be a hvsim.migration.Contract"),
    ({"recover_within_s": 0}, "recover_within_s must be a number"),
    ({"policy_params": {"strategy": "teleport"}}, "strategy must be one of"),
])
async def test_bad_input_is_refused_with_a_clear_error(cl: Cluster, kwargs: dict, match: str) -> None:
    vm = await running_vm(cl)
    with pytest.raises(MigrationInputError, match=match):
        start_migration(vm, "b", **kwargs)
    assert vm.state is VMState.RUNNING and "g" not in cl.hosts["b"].allocations


async def test_same_unknown_or_unreachable_destination(cl: Cluster) -> None:
    vm = await running_vm(cl)
    with pytest.raises(MigrationInputError, match="same host 'a'"):
        start_migration(vm, "a")
    with pytest.raises(MigrationInputError, match="unknown host 'zz'"):
        start_migration(vm, "zz")
    with pytest.raises(MigrationInputError, match="not on one network"):
        start_migration(vm, "flat")


async def test_vm_that_is_not_running_cannot_migrate(cl: Cluster) -> None:
    vm = await cl.define_vm(VMSpec("off"), "a")
    with pytest.raises(MigrationStateError, match="cannot migrate vm 'off': it is shutoff"):
        start_migration(vm, "b")


async def test_no_capacity_is_refused_before_anything_starts(cl: Cluster) -> None:
    vm = await running_vm(cl)
    with pytest.raises(MigrationRefusedError, match="host 'tiny' cannot take vm 'g'") as ei:
        start_migration(vm, "tiny")
    assert isinstance(ei.value, CapacityError)
    assert vm.state is VMState.RUNNING and cl.hosts["tiny"].allocations == {}
    assert not list(vm.run_dir.glob("mig*"))


async def test_a_vm_lent_to_one_migration_refuses_another_and_is_given_back(cl: Cluster) -> None:
    vm = await running_vm(cl)
    lease = vm.begin_migration(cl.hosts["b"])
    assert vm.state is VMState.MIGRATING and vm.busy_with == "migration to b" and "g" in cl.hosts["b"].allocations
    with pytest.raises(MigrationStateError, match="busy: migration to b in progress"):
        start_migration(vm, "tiny")
    lease.abort("test")
    assert vm.state is VMState.RUNNING and vm.busy_with is None and cl.hosts["b"].allocations == {}
    lease.abort("twice")      # idempotent
    assert vm.state is VMState.RUNNING
