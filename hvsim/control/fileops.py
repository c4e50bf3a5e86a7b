"""A file written into a running guest through the API (what vSphere's
InitiateFileTransferToGuest and qemu-ga's guest-file-write give a tool that installs software in
a VM, e.g. the cross-cloud migration agents): one request carries the file's bytes, instead of
thousands of ``exec`` calls under its 4096-character command limit. Added to the manager API and
the host agent's RPC without changing their other routes. Manager API (bearer token)::

    PUT /v1/vms/{name}/files?path=/ABS/PATH&mode=0700&sha256=HEX
        body: the file's bytes (application/octet-stream, at most 64 MiB)
        -> {"vm", "path", "size", "sha256"}   (the SHA-256 the guest computed of what it wrote)

``path``: absolute, plain components (letters, digits, ``._+@-``; no ``.`` or ``..``); ``mode``:
octal, at most 07777 (default 0600); ``sha256`` (optional): the body is refused unless its digest
is this one (a body cut or changed on the way). The file appears at ``path`` only once whole
and checked (:func:`hvsim.core.guestfile.write_guest_file`). The host agent has the same route
(fenced); the manager checks the VM's state and relays the body. Like ``exec``, not a recorded
operation.
"""
from __future__ import annotations

import hashlib
from typing import TYPE_CHECKING, Annotated, Any

from fastapi import FastAPI, Path as PathParam, Query, Request

from hvsim.core.errors import InputError
from hvsim.core.guestfile import MAX_FILE, check_guest_path, write_guest_file
from hvsim.core.model import NAME_RE

from .errors import ApiConflictError, ApiError, ApiInputError, ApiNotFoundError, ConflictError, ControlInputError
from .errors import OperationFailedError
from .schema import GuestFile
from .state import VMPower

if TYPE_CHECKING:
    from .agent_client import AgentClient
    from .hostagent import HostAgent
    from .manager import Manager

VMName = Annotated[str, PathParam(pattern=NAME_RE.pattern, max_length=32, description="a VM name")]
GuestPath = Annotated[str, Query(min_length=2, max_length=1024, description="absolute path in the guest")]
Mode = Annotated[str, Query(pattern=r"^0?[0-7]{3,4}$", description="octal file mode, e.g. 0700")]
Digest = Annotated[str | None, Query(pattern=r"^[0-9a-f]{64}$", description="the body's SHA-256, lower-case hex")]


async def read_body(request: Request, expect_sha256: str | None) -> tuple[bytes, str]:
    """The request's body and its SHA-256: at most :data:`MAX_FILE` bytes (a longer declared
    Content-Length is answered 413 by :class:`~.api.BodyLimit` before any route; an undeclared
    one is refused as soon as it is longer), matching ``expect_sha256`` when given."""
    buf = bytearray()
    async for chunk in request.stream():
        buf += chunk
        if len(buf) > MAX_FILE:
            raise ControlInputError("body", f"more than {MAX_FILE} bytes: a file is at most {MAX_FILE} bytes")
    data = bytes(buf)
    digest = hashlib.sha256(data).hexdigest()
    if expect_sha256 is not None and digest != expect_sha256:
        raise ControlInputError("sha256", f"the body ({len(data)} bytes) does not have SHA-256 {expect_sha256}")
    return data, digest


def _checked(path: str, mode: str) -> tuple[str, int]:
    try:
        return check_guest_path(path), int(mode, 8)
    except InputError as e:
        raise ControlInputError("path", str(e)) from e


# -- host agent ---------------------------------------------------------------------------------------
def add_agent_routes(app: FastAPI, agent: HostAgent, wr: dict[str, Any]) -> None:
    """The host agent's file route (``wr``: its fenced-route settings)."""

    @app.put("/v1/vms/{name}/files", response_model=GuestFile, **wr)
    async def write_file(name: VMName, request: Request, path: GuestPath, mode: Mode = "0600",
                         sha256: Digest = None) -> GuestFile:
        p, m = _checked(path, mode)
        vm = agent.vm(name)                 # 404 before the body is read
        data, _ = await read_body(request, sha256)
        w = await write_guest_file(vm.exec, p, data, m, what=f"vm {name!r}")
        return GuestFile(vm=name, path=w.path, size=w.size, sha256=w.sha256)


# -- host agent client ---------------------------------------------------------------------------------
async def agent_write_file(client: AgentClient, name: str, path: str, mode: int, data: bytes, sha256: str,
                           token: int) -> GuestFile:
    return await client.call("PUT", f"/v1/vms/{name}/files", GuestFile, token=token, content=data,
                             params={"path": path, "mode": f"{mode:04o}", "sha256": sha256}, timeout=300)


# -- manager ------------------------------------------------------------------------------------------
async def manager_write_file(manager: Manager, name: str, path: str, mode: int, request: Request,
                             sha256: str | None) -> GuestFile:
    """The VM's state checked first (an answer before the body is read), then the body relayed."""
    manager.inventory      # noqa: B018 (only the leader sends commands)
    vm, host = await manager.home(name, VMPower.RUNNING, VMPower.PAUSED, VMPower.MIGRATING)
    data, digest = await read_body(request, sha256)
    try:
        out = await agent_write_file(manager.agent(host), name, path, mode, data, digest, manager.token)
    except ApiError as e:
        if isinstance(e, ApiInputError | ApiConflictError | ApiNotFoundError):
            raise ConflictError(f"file {path} into vm {name!r} refused by {host.name}: {e.detail}") from e
        raise OperationFailedError(f"file {path} into vm {name!r} on {host.name} failed: {e.detail}") from e
    if out.size != len(data) or out.sha256 != digest:
        raise OperationFailedError(f"file {path} into vm {name!r}: host {host.name} wrote {out.size} bytes with "
                                   f"SHA-256 {out.sha256[:64]!r}, not the {len(data)} bytes sent")
    return out


def add_manager_routes(app: FastAPI, manager: Manager, ops: dict[str, Any]) -> None:
    """The manager API's file route (``ops``: its route settings)."""

    @app.put("/v1/vms/{name}/files", tags=["vms"], response_model=GuestFile, **ops,
             openapi_extra={"requestBody": {"required": True, "content": {
                 "application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}}})
    async def write_vm_file(name: VMName, request: Request, path: GuestPath, mode: Mode = "0600",
                            sha256: Digest = None) -> GuestFile:
        """Write the request's body (at most 64 MiB) to ``path`` in the running guest, with
        ``mode``; the file appears only once whole and checked by SHA-256 in the guest."""
        p, m = _checked(path, mode)
        return await manager_write_file(manager, name, p, m, request, sha256)
