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
ENI stays the VM's); undefining it detaches the ENI. A live migration moves it as a migratable
component without state (see :class:`EniComponent`): stage when its peer is prepared on the
destination, activate at ``pause-before-switchover``, release or roll back at the end.
"""
from __future__ import annotations

import asyncio
import itertools
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..core.components import NIC_DRIVER, Attachment, Component, ComponentContext
from ..core.errors import ComponentError, SpecError
from ..core.host import Host
from ..core.model import DiskSpec, NicSpec
from .controller import Move, MoveState
from .errors import NetworkError, TenantInputError

if TYPE_CHECKING:
    from .controller import NetworkController

log = logging.getLogger("hvsim.network.component")


class EniComponent(Component):
    """The ENI behind one NIC of a VM; a migratable component without device state.

    A live migration (:mod:`hvsim.migration.components`, through the core's MigratableComponent
    protocol: the network package knows nothing of the migration) moves it like a user-level
    driver: its *peer* is the staged binding on the destination (``prepare`` of the peer:
    ``ctl.stage``, the port created blocked in ``hvsim`` mode, before the destination QEMU opens
    it); its final step, at ``pause-before-switchover`` with the vCPUs stopped, is the activation
    (``quiesce`` of the source: ``ctl.activate``: source blocked, destination unblocked, every
    host's FDB). After success the source instance is retired (``ctl.release``: in
    ``after-completion`` mode that is when the network is reprogrammed); on failure or cancel the
    source is resumed (an activation is reverted) and the peer retired (``ctl.rollback``: nothing
    left on the destination). The controller's mode decides what each call changes."""

    kind = NIC_DRIVER
    migrates_state = False
    host_bound = True

    def __init__(self, nic: NicSpec, ctx: ComponentContext, controller: NetworkController,
                 seq: itertools.count[int], moves: _MoveBook | None = None) -> None:
        super().__init__(nic.name, ctx)
        self.nic = nic
        self.controller = controller
        self.eni_id = nic.name
        self._seq = seq
        self._moves = moves if moves is not None else _MoveBook()
        self.incoming: str | None = None   # as a migration peer: the id of the move that stages it
        self.outgoing: str | None = None   # as a migration source: the id of the move taking it away

    async def _do_prepare(self, host: Host) -> Attachment:
        ctl, vm = self.controller, self.ctx.vm
        if self.incoming is not None:       # a migration peer: stage on the destination
            await self._moves.stage(ctl, vm, host.name, self.incoming)
            return Attachment(nics=(ctl.nic(self.eni_id),))
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

    # -- MigratableComponent ---------------------------------------------------------------------
    def migration_peer(self, run_dir: Path) -> Component:
        """The destination side: an unprepared component for the same NIC whose ``prepare`` stages
        the VM's ENIs on the destination (one move per migration, shared by the VM's ENIs; its id
        names the migration's run directory, so the controller's journal says which migration)."""
        move_id = f"migration:{self.ctx.vm}/{run_dir.name}"
        peer = EniComponent(self.nic, self.ctx, self.controller, self._seq, self._moves)
        peer.incoming = move_id
        self.outgoing = move_id
        return peer

    async def state_size(self, since: int | None = None) -> int:
        return 0

    async def _do_quiesce(self) -> None:
        """The switch-over (the source's vCPUs are stopped): activate the destination binding."""
        await self._moves.activate(self.controller, self._outgoing_id("activate"))

    async def _do_resume(self) -> None:
        """The migration failed after the switch-over began: the source binding is the active one again."""
        await self._moves.rollback(self.controller, self._outgoing_id("roll back"))

    async def _do_retire(self) -> None:
        """Source instance after success: the source binding is released. Peer after a failure or
        cancel: the staged destination binding is rolled back."""
        try:
            if self.outgoing is not None and self._moves.is_active(self.outgoing):
                await self._moves.release(self.controller, self.outgoing)
            elif self.incoming is not None:
                await self._moves.rollback(self.controller, self.incoming)
        except NetworkError as exc:      # the VM's lease logs a component that cannot be retired
            raise ComponentError(f"{self.fsm.obj}: retire: {exc}") from exc

    def _outgoing_id(self, what: str) -> str:
        if self.outgoing is None:
            raise ComponentError(f"{self.fsm.obj}: cannot {what}: this ENI is not being migrated")
        return self.outgoing

    async def stats(self) -> dict[str, Any]:
        b = self.controller.eni(self.eni_id).binding_on(self.host.name) if self.host is not None else None
        return {"eni": self.eni_id, "binding": b.state.value if b is not None else None,
                "incoming": self.incoming, "outgoing": self.outgoing}


class _MoveBook:
    """The moves of one driver's migrations, by id: a VM's ENIs move together in one controller move
    (``stage`` takes all of them), so the first of its components to act on a move does it and the
    others find it done."""

    def __init__(self) -> None:
        self.moves: dict[str, Move] = {}
        self._lock = asyncio.Lock()

    def is_active(self, move_id: str) -> bool:
        m = self.moves.get(move_id)
        return m is not None and m.state is MoveState.ACTIVE

    async def stage(self, ctl: NetworkController, vm: str, host: str, move_id: str) -> Move:
        async with self._lock:
            m = self.moves.get(move_id)
            if m is None:
                m = await ctl.stage(vm, host, move_id=move_id)
                self.moves[move_id] = m
            return m

    async def activate(self, ctl: NetworkController, move_id: str) -> None:
        async with self._lock:
            m = self.moves.get(move_id)
            if m is None:
                raise ComponentError(f"ENI move {move_id!r}: nothing was staged")
            if m.state is MoveState.STAGED:
                await ctl.activate(m)

    async def release(self, ctl: NetworkController, move_id: str) -> None:
        async with self._lock:
            m = self.moves.get(move_id)
            if m is not None and m.state is MoveState.ACTIVE:
                await ctl.release(m)
            self._forget(move_id)

    async def rollback(self, ctl: NetworkController, move_id: str) -> None:
        async with self._lock:
            m = self.moves.get(move_id)
            if m is not None and m.state in (MoveState.PLANNED, MoveState.STAGED, MoveState.ACTIVE):
                await ctl.rollback(m)
            if m is None or m.state is not MoveState.ACTIVE:
                self._forget(move_id)

    def _forget(self, move_id: str) -> None:
        m = self.moves.get(move_id)
        if m is not None and m.state in (MoveState.DONE, MoveState.ROLLED_BACK, MoveState.FAILED):
            del self.moves[move_id]


class EniDriver:
    """Creates an :class:`EniComponent` for every NIC on a tenant network (kind ``"eni"``)."""

    kind = NIC_DRIVER

    def __init__(self, controller: NetworkController) -> None:
        self.controller = controller
        self._seq = itertools.count(1)
        self._moves = _MoveBook()

    def create_nic(self, nic: NicSpec, ctx: ComponentContext) -> Component:
        eni = self.controller.eni(nic.name)          # UnknownEniError (an InputError) names the defined ones
        if eni.spec.network != nic.network:
            raise TenantInputError(f"vm {ctx.vm!r}: nic {nic.name!r} is on network {nic.network!r}, but ENI "
                                   f"{eni.id!r} belongs to network {eni.spec.network!r}")
        if nic.mac and nic.mac != eni.spec.mac:
            raise TenantInputError(f"vm {ctx.vm!r}: nic {nic.name!r} has MAC {nic.mac}, its ENI has {eni.spec.mac}")
        if eni.vm is not None and eni.vm != ctx.vm:
            raise TenantInputError(f"vm {ctx.vm!r}: ENI {eni.id!r} is bound to vm {eni.vm!r}")
        return EniComponent(nic, ctx, self.controller, self._seq, self._moves)

    def create(self, disk: DiskSpec, ctx: ComponentContext) -> Component:
        raise SpecError(f"vm {ctx.vm!r}: disk {disk.name!r}: the {NIC_DRIVER!r} driver serves NICs, not disks")
