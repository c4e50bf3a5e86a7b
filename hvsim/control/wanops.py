"""What a cross-cloud migration needs of a cloud beyond its VMs' lifecycle and guest commands
(:mod:`.guestops`), added to the manager API and the host agent's RPC without changing their
existing routes: the guest's address on the inter-cloud network, a copy-on-write clone for a test
cutover, and moving the service address.

A VM defined with ``"network": "wan"`` gets a NIC on the inter-cloud network its host agent was
started on (``--wan FILE``: :class:`hvsim.crosscloud.network.WanConfig`; a routed /30 from the
host's slice of the guest network), ``"isolated"`` a NIC that reaches nobody; ``"data_image"``
fills its disk from a raw image inside the import directory (:mod:`.imports`). Manager API
(bearer token, like every route)::

    GET  /v1/vms/{name}/address          -> {"vm", "host", "network", "ip", "gateway", "prefixlen"}
    POST /v1/vms/{name}/clone            {"name": CLONE}   -> 201 {"vm": <the clone's record>, "operation"}
         the VM (running) is snapshotted on its host and CLONE defined there, shut off, on the
         isolated network, its disk a qcow2 overlay of the VM's at that instant; start it, delete it
         like any VM
    POST /v1/vms/{name}/service-address  {}                -> {"service_ip", "vm", "host"}
         the inter-cloud network's service address is routed to the VM (its NIC must be on "wan")

The host agent has ``GET /v1/vms/{name}/address``, ``POST /v1/vms/{name}/clone-disk {"clone"}`` and
``POST /v1/vms/{name}/service-address`` (fenced, under its RPC conventions). Refusals name the
problem: a VM without a NIC there, an isolated one carrying the service address, a host agent
without ``--wan``, a clone of a VM that does not run or has no disk, a clone name in use.

The host agent keeps each VM's /30 and the VM it routed the service address to in its own records
(:mod:`.agent_records`): a restarted agent gives every running VM exactly its address again and
routes the service address back to the VM that held it.
"""
from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Annotated, Any

from fastapi import FastAPI, Path as PathParam
from fastapi.responses import Response

from hvsim.core.model import NAME_RE

from .agentrpc import Ok
from .errors import ApiConflictError, ApiError, ApiInputError, ApiNotFoundError, ConflictError, OperationFailedError
from .schema import CloneDiskRequest, CloneRequest, Defined, GuestAddressInfo, ServiceAddress
from .state import VMPower, VMRecord, dump

if TYPE_CHECKING:
    from .agent_client import AgentClient
    from .hostagent import HostAgent
    from .manager import Manager

log = logging.getLogger("hvsim.control.wanops")
VMName = Annotated[str, PathParam(pattern=NAME_RE.pattern, max_length=32, description="a VM name")]


# -- host agent ---------------------------------------------------------------------------------------
def add_agent_routes(app: FastAPI, agent: HostAgent, rd: dict[str, Any], wr: dict[str, Any]) -> None:
    """The host agent's address, clone-disk and service-address routes (``rd``/``wr``: its read and
    fenced-route settings)."""

    @app.get("/v1/vms/{name}/address", response_model=GuestAddressInfo, **rd)
    async def address(name: VMName) -> GuestAddressInfo:
        a = agent.address(name)
        return GuestAddressInfo(vm=name, host=a.host, network="isolated" if a.isolated else "wan", ip=a.ip,
                                gateway=a.gateway if not a.isolated else "", prefixlen=a.subnet.prefixlen)

    @app.post("/v1/vms/{name}/clone-disk", response_model=Ok, **wr)
    async def clone_disk(name: VMName, body: CloneDiskRequest) -> Ok:
        return Ok(detail=str(await agent.clone_disk(name, body.clone)))

    @app.post("/v1/vms/{name}/service-address", response_model=ServiceAddress, **wr)
    async def service(name: VMName) -> ServiceAddress:
        ip = await agent.route_service(name)
        return ServiceAddress(service_ip=ip, vm=name, host=agent.host.name)


# -- host agent client ---------------------------------------------------------------------------------
async def agent_address(client: AgentClient, name: str) -> GuestAddressInfo:
    return await client.call("GET", f"/v1/vms/{name}/address", GuestAddressInfo)


async def agent_clone_disk(client: AgentClient, name: str, clone: str, token: int) -> None:
    await client.call("POST", f"/v1/vms/{name}/clone-disk", Ok, json={"clone": clone}, token=token)


async def agent_service(client: AgentClient, name: str, token: int) -> ServiceAddress:
    return await client.call("POST", f"/v1/vms/{name}/service-address", ServiceAddress, token=token)


# -- manager ------------------------------------------------------------------------------------------
def _refused(what: str, host: str, e: ApiError) -> Exception:
    if isinstance(e, ApiInputError | ApiConflictError | ApiNotFoundError):
        return ConflictError(f"{what} refused by {host}: {e.detail}")
    return OperationFailedError(f"{what} on {host} failed: {e.detail}")


async def manager_address(manager: Manager, name: str) -> GuestAddressInfo:
    manager.inventory      # noqa: B018 (only the leader asks its agents)
    vm = await manager.reader.get_vm(name)
    if vm.network is None:
        raise ConflictError(f"vm {name!r} has no NIC on the inter-cloud network (defined without 'network')")
    if vm.power not in (VMPower.RUNNING, VMPower.PAUSED, VMPower.MIGRATING):
        raise ConflictError(f"vm {name!r} is {vm.power.value}: its address is given once it runs")
    vm, host = await manager.home(name, VMPower.RUNNING, VMPower.PAUSED, VMPower.MIGRATING)
    try:
        return await agent_address(manager.agent(host), name)
    except ApiError as e:
        raise _refused(f"address of vm {name!r}", host.name, e) from e


async def manager_clone(manager: Manager, name: str, clone: str) -> tuple[VMRecord, Any]:
    inv = manager.inventory
    vm, host = await manager.home(name, VMPower.RUNNING, VMPower.PAUSED)
    if not vm.disk_mib:
        raise ConflictError(f"vm {name!r} has no disk to clone")
    if vm.clone_of is not None:
        raise ConflictError(f"vm {name!r} is a clone itself (of {vm.clone_of!r})")
    rec = VMRecord(name=clone, vcpus=vm.vcpus, memory_mib=vm.memory_mib, disk_mib=vm.disk_mib, host=host.name,
                   profile=vm.profile, network="isolated" if vm.network is not None else None, clone_of=name)
    defined, op = await manager.define_vm(rec)       # capacity and placement rules first; 409 if the name is used
    try:
        await agent_clone_disk(manager.agent(host), name, clone, manager.token)
    except BaseException as e:
        try:
            await inv.undefine_vm(clone)
            manager.placement_changed()
        except Exception as ue:  # noqa: BLE001 (the clone's own error is what is raised)
            log.warning("clone %s of %s: not undefined after the failed snapshot: %s", clone, name, ue)
        if isinstance(e, ApiError):
            raise _refused(f"clone of vm {name!r}", host.name, e) from e
        raise
    return defined, op


async def manager_service(manager: Manager, name: str) -> ServiceAddress:
    manager.inventory      # noqa: B018
    vm, host = await manager.home(name, VMPower.RUNNING, VMPower.PAUSED)
    if vm.network != "wan":
        raise ConflictError(f"vm {name!r} has no NIC on the inter-cloud network's routed side "
                            f"(network {vm.network!r}): it cannot carry the service address")
    try:
        return await agent_service(manager.agent(host), name, manager.token)
    except ApiError as e:
        raise _refused(f"service address to vm {name!r}", host.name, e) from e


def add_manager_routes(app: FastAPI, manager: Manager, ops: dict[str, Any]) -> None:
    """The manager API's address, clone and service-address routes (``ops``: its route settings)."""

    @app.get("/v1/vms/{name}/address", tags=["vms"], response_model=GuestAddressInfo, **ops)
    async def vm_address(name: VMName) -> GuestAddressInfo:
        """The VM's address on the inter-cloud network (it runs, defined with ``network``)."""
        return await manager_address(manager, name)

    @app.post("/v1/vms/{name}/clone", status_code=201, tags=["vms"], response_model=Defined, **ops)
    async def clone_vm(name: VMName, body: CloneRequest) -> Response:
        """A copy-on-write clone of the running VM's disk at this instant, defined (shut off) on
        the same host with an isolated NIC; start it and delete it like any VM."""
        vm, op = await manager_clone(manager, name, body.name)
        return Response(b'{"vm":' + dump(vm) + b',"operation":' + dump(op) + b"}", status_code=201,
                        media_type="application/json")

    @app.post("/v1/vms/{name}/service-address", tags=["vms"], response_model=ServiceAddress, **ops)
    async def service_address(name: VMName) -> ServiceAddress:
        """Route the inter-cloud network's service address to the VM (the elastic-IP move)."""
        return await manager_service(manager, name)
