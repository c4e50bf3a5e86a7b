"""ENIs as VM components: a VM's NIC on a tenant network is attached through the controller.

Register the driver on the cluster; every NIC of a VM whose ``network`` is not "default" then gets
an :class:`EniComponent`. The NIC's name is the ENI's id (defined in the controller first)::

    ctl.define_eni(EniSpec("eni-web", "blue", "52:54:00:77:00:01", ("10.77.0.1",)))
    cluster.add_driver(EniDriver(ctl))
    vm = await cluster.define_vm(VMSpec("web", nics=(NicSpec("eni-web", network="blue"),),
                                        kernel_args=ctl.kernel_args(["eni-web"])), "a")
    await vm.start()          # prepare: the ENI is bound on host a (tap created, FDB/ARP everywhere)

Preparing the component on a host binds the ENI there: a first start attaches it; a start on
another host than the one it is active on (a VM restarted elsewhere) moves it (stage, activate,
release, journaled as ``restart:<vm>#n``). It returns the tap NIC QEMU opens
(``-netdev tap,ifname=hvp...``); the tap has the same name on every host, so a migration's
destination QEMU opens the one ``ctl.stage`` created there. Stopping the VM keeps the binding (the
ENI stays the VM's); undefining it detaches the ENI. A live migration calls the controller itself
(stage before the destination starts, activate at switchover, release or rollback at the end):
the component protocol has no per-destination hook yet.
"""
from __future__ import annotations

import itertools
import logging
from typing import TYPE_CHECKING

from ..core.components import NIC_DRIVER, Attachment, Component, ComponentContext
from ..core.errors import SpecError
from ..core.host import Host
from ..core.model import DiskSpec, NicSpec
from .errors import TenantInputError

if TYPE_CHECKING:
    from .controller import NetworkController

log = logging.getLogger("hvsim.network.component")


class EniComponent(Component):
    """The ENI behind one NIC of a VM."""

    kind = NIC_DRIVER

    def __init__(self, nic: NicSpec, ctx: ComponentContext, controller: NetworkController,
                 seq: itertools.count[int]) -> None:
        super().__init__(nic.name, ctx)
        self.controller = controller
        self.eni_id = nic.name
        self._seq = seq

    async def _do_prepare(self, host: Host) -> Attachment:
        ctl, vm = self.controller, self.ctx.vm
        eni = ctl.eni(self.eni_id)
        active = eni.active
        if active is None:
            await ctl.attach(vm, host.name, [self.eni_id])
        elif active.host != host.name:      # restarted elsewhere (failover): the same path as a migration
            await ctl.move(vm, host.name, move_id=f"restart:{vm}#{next(self._seq)}")
        return Attachment(nics=(ctl.nic(self.eni_id),))

    async def _do_stop(self) -> None:
        """The VM stopped: its ENI stays bound (a later start on the same host reuses the tap)."""

    async def _do_remove(self) -> None:
        """The VM is undefined: the ENI is detached everywhere (and stays defined)."""
        if self.controller.eni(self.eni_id).bindings:
            await self.controller.detach(self.ctx.vm)


class EniDriver:
    """Creates an :class:`EniComponent` for every NIC on a tenant network (kind ``"eni"``)."""

    kind = NIC_DRIVER

    def __init__(self, controller: NetworkController) -> None:
        self.controller = controller
        self._seq = itertools.count(1)

    def create_nic(self, nic: NicSpec, ctx: ComponentContext) -> Component:
        eni = self.controller.eni(nic.name)          # UnknownEniError (an InputError) names the defined ones
        if eni.spec.network != nic.network:
            raise TenantInputError(f"vm {ctx.vm!r}: nic {nic.name!r} is on network {nic.network!r}, but ENI "
                                   f"{eni.id!r} belongs to network {eni.spec.network!r}")
        if nic.mac and nic.mac != eni.spec.mac:
            raise TenantInputError(f"vm {ctx.vm!r}: nic {nic.name!r} has MAC {nic.mac}, its ENI has {eni.spec.mac}")
        if eni.vm is not None and eni.vm != ctx.vm:
            raise TenantInputError(f"vm {ctx.vm!r}: ENI {eni.id!r} is bound to vm {eni.vm!r}")
        return EniComponent(nic, ctx, self.controller, self._seq)

    def create(self, disk: DiskSpec, ctx: ComponentContext) -> Component:
        raise SpecError(f"vm {ctx.vm!r}: disk {disk.name!r}: the {NIC_DRIVER!r} driver serves NICs, not disks")
