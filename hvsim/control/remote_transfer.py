"""A migration to a host that another host agent owns: QEMU's live migration as always (the
migration engine, its policies and rollback run unchanged in the source agent), but the destination
QEMU is started, configured, watched and adopted by the destination's agent over its RPC.

Why the source agent drives it (libvirt's peer-to-peer migration): the policy loop polls the source
QEMU every 200 ms and decides the destination's capabilities (postcopy, ...) from the guest, so it
belongs next to the source QMP; the manager only records the operation and follows its progress.

    prepare   -> destination agent: POST /v1/incoming (QEMU -incoming defer in its power domain)
    configure -> destination agent: POST /v1/incoming/VM/listen (capabilities, migrate-incoming)
    finish    -> destination agent: POST /v1/incoming/VM/finish (running, adopted as its VM),
                 then the lease hands the VM off (the source QEMU stops)
    discard   -> destination agent: DELETE /v1/incoming/VM (its QEMU and files removed)
"""
from __future__ import annotations

import logging
import shutil
from pathlib import Path

from hvsim.core.lifecycle import VMState
from hvsim.core.vm import MigrationLease
from hvsim.migration import DestinationStartError, MigrationFailedError, MigrationInputError, QemuLiveTransfer
from hvsim.migration.components import ComponentMigration
from hvsim.migration.transfer import TransferOptions

from .agent_client import AgentClient
from .agentrpc import GuestSpec, IncomingRequest, ListenRequest
from .errors import ApiError

log = logging.getLogger("hvsim.control.agent")


class RemoteTransfer(QemuLiveTransfer):
    name = "qemu-live-remote"

    def __init__(self, migration_id: str, options: TransferOptions, uses_postcopy: bool, *, peer: AgentClient,
                 token: int, spec: GuestSpec, source: str, components: ComponentMigration | None = None) -> None:
        if components is not None:
            # the destination's user-level drivers would have to be started by the destination agent
            raise MigrationInputError(f"migration {migration_id}: a VM with user-level drivers cannot migrate "
                                      "between host agents yet")
        super().__init__(migration_id, options, uses_postcopy)
        self.peer = peer
        self.token = token
        self.spec = spec
        self.source_host = source
        self.prepared = False
        self.adopted = False
        self.outcome_unknown = False

    @property
    def destination_heartbeat_socket(self) -> Path | None:
        return None            # the destination guest's sockets are the other agent's

    async def prepare(self, lease: MigrationLease) -> None:
        self.lease = lease
        if lease.components:
            raise DestinationStartError(f"migration {self.id}: vm {lease.vm_name!r} has components "
                                        f"({[c.id for c in lease.components]}): they cannot follow it to another "
                                        "host agent")
        try:
            await self.peer.incoming(IncomingRequest(migration_id=self.id, vm=self.spec, source=self.source_host),
                                     self.token)
        except ApiError as e:
            raise DestinationStartError(f"migration {self.id}: the agent of {lease.destination.name} could not start "
                                        f"the destination: {e}") from e
        self.prepared = True

    async def listen_destination(self, capabilities: list[str]) -> None:
        assert self.lease is not None
        try:
            r = await self.peer.incoming_listen(self.lease.vm_name, ListenRequest(capabilities=capabilities),
                                                self.token)
        except ApiError as e:
            raise DestinationStartError(f"migration {self.id}: the destination could not listen: {e}") from e
        self.uri = r.uri

    async def finish(self) -> None:
        """The source sent everything: the destination agent waits until its QEMU runs and adopts
        it. If that call fails, never risk two running copies: a destination that did adopt it is
        a success; one that did not is destroyed before the source is resumed; one that cannot be
        asked leaves the source stopped (post-migrate) for the manager's resolution to decide."""
        assert self.lease is not None
        vm = self.lease.vm_name
        try:
            await self.peer.incoming_finish(vm, self.token, paused_ok=self.lease.prior_state is VMState.PAUSED)
        except ApiError as e:
            try:
                there = await self.peer.vm(vm)
                if there.role == "vm" and there.incoming_id is None and there.state in ("running", "paused"):
                    log.warning("migration %s: finish failed (%s) but the destination adopted the VM", self.id, e)
                    self.adopted = True
                    self._close_events()
                    return None
                await self.peer.incoming_discard(vm, self.token)
                self.prepared = False
            except ApiError as e2:
                self.outcome_unknown = True
                log.critical("migration %s: the destination agent cannot say whether it runs vm %s (%s): the source "
                             "stays stopped for the manager to resolve", self.id, vm, e2)
            raise MigrationFailedError(f"migration {self.id}: the destination agent did not take the VM over: "
                                       f"{e}") from e
        self.adopted = True
        self._close_events()
        return None

    async def settle(self) -> None:
        if self.outcome_unknown:
            return             # a destination we cannot reach may run the guest: do not resume the source
        await super().settle()

    async def discard(self) -> None:
        self._close_events()
        if self.prepared and self.lease is not None:
            try:
                await self.peer.incoming_discard(self.lease.vm_name, self.token)
            except ApiError as e:
                log.error("migration %s: discarding the destination failed: %s", self.id, e)
        if self.lease is not None:
            shutil.rmtree(self.lease.dir, ignore_errors=True)
