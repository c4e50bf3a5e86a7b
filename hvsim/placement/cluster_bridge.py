"""Wire the placement controller into a Cluster: create a whole group of real guests at once.

    sched = ClusterScheduler(cluster)                     # hosts and their domains from the cluster
    grp = await sched.create_group("web", 3, VMSpec("web", memory_mib=256),
                                   rules=[{"name": "web-spread", "kind": "anti_affinity",
                                           "groups": ["web"], "level": "host"}])
    grp.vms            # started VMs, each on the host the solver chose
    await sched.delete_group("web")

The controller serialises concurrent requests, so groups created at the same time never break a
required rule. The scheduler follows the cluster's events: a VM that moves host (a migration, a
restart elsewhere) is moved in the controller's inventory too (``VMMoved``), and an undefined VM is
released (``VMUndefined``). A refusal raises GroupPlacementError carrying the solver's explanation; nothing is
started. If a guest of a placed group fails to start, the group's other guests are destroyed and
the placement released, so a group is all or nothing.
"""
from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..core.errors import HvsimError
from ..core.events import ClusterEvent, VMMoved, VMUndefined
from ..core.model import VMSpec
from .controller import PlacementController
from .result import PlacementResult

if TYPE_CHECKING:
    from ..core.cluster import Cluster
    from ..core.host import Host as ClusterHost
    from ..core.vm import VM


class GroupPlacementError(HvsimError):
    """No placement satisfies the group's rules; ``result.explanation`` says why."""

    def __init__(self, group: str, result: PlacementResult) -> None:
        self.group = group
        self.result = result
        why = result.explanation.text() if result.explanation else result.message
        super().__init__(f"group {group!r} cannot be placed ({result.status}): {why}")


@dataclass
class PlacedGroup:
    name: str
    result: PlacementResult
    vms: list[VM]

    @property
    def hosts(self) -> dict[str, str]:
        return {vm.name: vm.host.name for vm in self.vms}


def host_entry(h: ClusterHost) -> dict[str, Any]:
    return {"name": h.name,
            "capacity": {"vcpus": h.spec.vcpus, "memory_mib": h.spec.memory_mib},
            "overcommit": {"vcpus": h.spec.cpu_overcommit, "memory_mib": h.spec.mem_overcommit},
            "domain": {"datacenter": h.spec.datacenter, **h.spec.labels}}


class ClusterScheduler:
    def __init__(self, cluster: Cluster, levels: Iterable[str] | None = None, solver: str = "cpsat",
                 **controller_options: Any) -> None:
        self.cluster = cluster
        hosts = [host_entry(h) for h in cluster.hosts.values()]
        if not hosts:
            raise HvsimError("ClusterScheduler needs a cluster with at least one host")
        if levels is None:
            label_keys = sorted({k for h in cluster.hosts.values() for k in h.spec.labels})
            levels = ["datacenter", *label_keys, "host"]
        self.controller = PlacementController(hosts, levels=list(levels), solver=solver, **controller_options)
        self.groups: dict[str, list[str]] = {}
        self._events = cluster.events.subscribe("placement inventory", kinds=(VMMoved, VMUndefined),
                                                callback=self._follow)

    def _follow(self, event: ClusterEvent) -> None:
        if isinstance(event, VMMoved):
            self.controller.note_moved(event.vm, event.destination)
        elif isinstance(event, VMUndefined) and event.vm in self.controller.placement:
            self.controller.release(event.vm)
            for name, vms in list(self.groups.items()):
                if event.vm in vms:
                    vms.remove(event.vm)
                    if not vms:
                        del self.groups[name]

    def close(self) -> None:
        """Stop following the cluster's events."""
        self._events.close()

    async def create_group(self, name: str, count: int, template: VMSpec,
                           rules: Iterable[Mapping[str, Any]] = (), *, start: bool = True,
                           ready_timeout: float = 180.0) -> PlacedGroup:
        """Place ``count`` VMs like ``template`` (named NAME-0..N-1) under ``rules``; define them
        on the chosen hosts and (by default) start them and wait until their agents answer."""
        if count < 1:
            raise HvsimError(f"group {name!r}: count must be >= 1, got {count}")
        names = [f"{name}-{i}" for i in range(count)]
        clash = [n for n in names if n in self.cluster.vms]
        if clash:
            raise HvsimError(f"group {name!r}: VM names already defined: {clash}")
        demand = {"vcpus": template.vcpus, "memory_mib": template.memory_mib}
        result = await self.controller.place_group(
            {"name": name, "vms": [{"name": n, "demand": dict(demand)} for n in names]}, list(rules))
        if not result.ok:
            raise GroupPlacementError(name, result)
        self.groups[name] = names
        vms: list[VM] = []
        try:
            for n in names:
                spec = dataclasses.replace(template, name=n)
                vms.append(await self.cluster.define_vm(spec, result.assignment[n]))
            if start:
                await asyncio.gather(*(vm.start(wait_ready=True, ready_timeout=ready_timeout) for vm in vms))
        except BaseException:
            await self._undo(name, vms)
            raise
        return PlacedGroup(name, result, vms)

    async def _undo(self, name: str, vms: list[VM]) -> None:
        await asyncio.gather(*(vm.destroy() for vm in vms), return_exceptions=True)
        self.groups.pop(name, None)
        if name in self.controller.groups:
            self.controller.release_group(name)
        for vm in vms:
            if vm.name in self.cluster.vms:
                await self.cluster.undefine_vm(vm.name)

    async def delete_group(self, name: str) -> None:
        """Destroy and undefine the group's VMs and release their placement."""
        if name not in self.groups:
            raise HvsimError(f"unknown group {name!r}; known: {sorted(self.groups)}")
        await self._undo(name, [self.cluster.vm(n) for n in self.groups[name] if n in self.cluster.vms])
