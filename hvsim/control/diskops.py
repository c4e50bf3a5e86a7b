"""Undefining a VM removes its disks: the manager's ``DELETE /v1/vms/{name}`` deletes the VM's
datastore directory through its host's agent before it deletes the record, so a VM defined later
with the same name starts on a fresh disk, never on the deleted VM's data.

Host agent route (fenced, under its RPC conventions)::

    DELETE /v1/vms/{name}/disks      -> {"ok": true, "detail": "removed N file(s): ..."}
         409 while a QEMU of the VM is on that host, or while a clone's overlay stands on its
         frozen image; nothing there is not an error (a retried call succeeds)

The manager's undefine, step by step (each failure leaves a state the same request retries):

1. the record must be shut off and no clone may name the VM (409 naming the clones: a clone's disk
   is a qcow2 overlay on the VM's frozen image, so that image stays while a clone exists; undefine
   the clones first, the way ``virsh undefine --remove-all-storage`` refuses a volume another
   domain's chain uses and vSphere keeps a linked clone's base);
2. a VM on a host without an agent has no disk anywhere: its record goes at once (as before);
3. the host must be up (409 naming the host when it is unreachable: nothing is changed);
4. an ``undefine`` operation is recorded (it takes the VM's operation lock: nothing starts the VM
   meanwhile), the record re-checked under it;
5. the host agent removes the files; a refusal or no answer ends the operation failed and the
   record stays (409/502 naming the host): the files are all there, or (an answer lost after the
   removal) all gone, never half (the agent renames the directory away in one step first); asking
   again finishes it;
6. one transaction deletes the record and its index keys and settles the operation.

A manager that dies between 4 and 6 leaves the operation in flight; the next one's resolver marks it
failed with the record kept (undefine again).
"""
from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Annotated, Any

from fastapi import FastAPI, Path as PathParam

from hvsim.core.model import NAME_RE

from .agentrpc import Ok
from .errors import ApiConflictError, ApiError, ApiInputError, ApiNotFoundError, ConflictError, OperationFailedError
from .ops import Operation, OperationRecord, OpKind
from .state import HostStatus, VMPower

if TYPE_CHECKING:
    from .agent_client import AgentClient
    from .hostagent import HostAgent
    from .manager import Manager

log = logging.getLogger("hvsim.control.diskops")
VMName = Annotated[str, PathParam(pattern=NAME_RE.pattern, max_length=32, description="a VM name")]
STEP_DISKS_REMOVED = "disks-removed"


# -- host agent ---------------------------------------------------------------------------------------
def add_agent_routes(app: FastAPI, agent: HostAgent, wr: dict[str, Any]) -> None:
    """The host agent's disk-removal route (``wr``: its fenced-route settings)."""

    @app.delete("/v1/vms/{name}/disks", response_model=Ok, **wr)
    async def remove_disks(name: VMName) -> Ok:
        removed = await agent.remove_disks(name)
        return Ok(detail=(f"removed {len(removed)} file(s): {', '.join(removed)}" if removed else
                          "nothing to remove")[:4000])


# -- host agent client ---------------------------------------------------------------------------------
async def agent_remove_disks(client: AgentClient, name: str, token: int) -> Ok:
    return await client.call("DELETE", f"/v1/vms/{name}/disks", Ok, token=token)


# -- manager ------------------------------------------------------------------------------------------
async def manager_undefine(manager: Manager, name: str) -> OperationRecord:
    """Undefine ``name``: its disks removed through its host's agent, then its record (see the
    module docstring for the order and what each failure leaves)."""
    inv = manager.inventory
    vm = await manager.reader.get_vm(name)
    if vm.power is not VMPower.SHUTOFF:
        raise ConflictError(f"vm {name!r} is {vm.power.value}: only a shut-off VM can be undefined")
    clones = await inv.clones_of(name)
    if clones:
        raise ConflictError(f"vm {name!r} is the frozen base of clone(s) {', '.join(clones)}: its disk stays "
                            "while they exist; undefine the clone(s) first")
    host = await manager.reader.get_host(vm.host) if vm.host else None
    if host is None or host.agent is None:
        return await inv.undefine_vm(name)          # no agent, no datastore: the record alone
    if host.status is HostStatus.UNREACHABLE:
        raise ConflictError(f"vm {name!r} not undefined: its host {host.name!r} is unreachable, so its disks "
                            "cannot be removed; nothing was changed (try again once the host is back)")
    agent = manager.agent(host)

    async def body(op: Operation, rev: int) -> OperationRecord:
        now = await inv.get_vm(name)                # under the operation lock: nothing changes it now
        if now.power is not VMPower.SHUTOFF or now.host != host.name:
            await manager.end_op(op, rev, ok=False, note=f"vm is {now.power.value} on {now.host}")
            raise ConflictError(f"vm {name!r} changed meanwhile ({now.power.value} on {now.host}): not undefined")
        try:
            ok = await agent_remove_disks(agent, name, manager.token)
        except ApiError as e:
            rec = await manager.end_op(op, rev, ok=False, note=f"host {host.name}: {e.detail}")
            if isinstance(e, ApiInputError | ApiConflictError | ApiNotFoundError):
                raise ConflictError(f"undefine of vm {name!r} refused by host {host.name}: {e.detail} "
                                    f"(operation {rec.id}; the record is kept)") from e
            raise OperationFailedError(f"undefine of vm {name!r}: host {host.name} did not remove its disks "
                                       f"({e.detail}); the record is kept, undefine again", rec.id) from e
        op.step(STEP_DISKS_REMOVED)
        log.info("vm %s: disks removed on %s (%s)", name, host.name, ok.detail)
        return await inv.finish_undefine(op, rev)

    return await manager.run_op(OpKind.UNDEFINE, vm, {"host": host.name}, body)
