"""Placement on real guests: the solver's answer is where the QEMU processes actually run."""
import asyncio

import pytest

from hvsim.core.model import HostSpec, VMSpec
from hvsim.placement.check import check
from hvsim.placement.cluster_bridge import ClusterScheduler, GroupPlacementError

pytestmark = pytest.mark.hil

SPREAD = {"kind": "anti_affinity", "level": "host"}


async def test_host_anti_affinity_lands_guests_on_different_hosts(cluster):
    for h in ("h1", "h2"):
        cluster.add_host(HostSpec(h, vcpus=2, memory_mib=1024))
    sched = ClusterScheduler(cluster)
    grp = await sched.create_group("web", 2, VMSpec("web", memory_mib=128),
                                   rules=[dict(SPREAD, name="web-apart", groups=["web"])])
    assert sorted(grp.hosts.values()) == ["h1", "h2"]
    for vm in grp.vms:   # the guests really run, each where the solver put it
        assert (await vm.exec("hostname")).stdout.strip() == vm.name
        assert vm.name in vm.host.allocations
    # a third member cannot be added apart from the other two on 2 hosts: refused, explained, nothing started
    with pytest.raises(GroupPlacementError, match="anti-affinity") as ei:
        await sched.create_group("db", 3, VMSpec("db", memory_mib=128),
                                 rules=[dict(SPREAD, name="db-apart", groups=["db"])])
    assert ei.value.result.explanation is not None
    assert not any(n.startswith("db-") for n in cluster.vms)


async def test_concurrent_group_creations_never_break_a_required_rule(cluster):
    for h in ("h1", "h2", "h3"):
        cluster.add_host(HostSpec(h, vcpus=2, memory_mib=1024))
    sched = ClusterScheduler(cluster)
    names = ["a", "b", "c"]
    results = await asyncio.gather(*(
        sched.create_group(n, 2, VMSpec(n, memory_mib=128), rules=[dict(SPREAD, name=f"{n}-apart", groups=[n])])
        for n in names), return_exceptions=True)
    placed = [r for r in results if not isinstance(r, BaseException)]
    assert len(placed) == 3, results
    # where the guests actually run (the cluster's own inventory) satisfies every rule
    actual = {vm.name: vm.host.name for vm in cluster.vms.values()}
    report = check(sched.controller.problem(), actual)
    assert report.required_violations == 0, report.violated()
    for grp in placed:
        assert len(set(grp.hosts.values())) == 2
    await sched.delete_group("a")
    assert not any(n.startswith("a-") for n in cluster.vms)


async def test_the_scheduler_follows_a_vm_that_migrated(cluster):
    """Placement learns about moves through the cluster's events (VMMoved): after a migration its
    inventory says where the VM really runs, and a new group is placed against that."""
    from hvsim.migration import migrate
    for h in ("h1", "h2", "h3"):
        cluster.add_host(HostSpec(h, vcpus=2, memory_mib=1024))
    sched = ClusterScheduler(cluster)
    grp = await sched.create_group("db", 1, VMSpec("db", memory_mib=128))
    vm = grp.vms[0]
    src = vm.host.name
    dest = next(h for h in ("h1", "h2", "h3") if h != src)
    await migrate(vm, dest, policy="qemu-default", timeout=120)
    assert vm.host.name == dest
    assert sched.controller.host_of("db-0") == dest
    assert sched.controller.check().ok
    # a group that must avoid the database's host now avoids the host it moved to
    web = await sched.create_group("web", 2, VMSpec("web", memory_mib=128), rules=[
        {"name": "web-not-with-db", "kind": "anti_affinity", "groups": ["web", "db"], "level": "host"}])
    assert dest not in web.hosts.values(), web.hosts
    sched.close()
