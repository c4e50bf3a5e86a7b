"""What a provider driver (:mod:`hvsim.crosscloud.manager_provider`) needs of a cloud beyond the
VM lifecycle, added to the manager API and the host agent's RPC without changing either's
existing routes: pause and resume a VM, and a **streamed exec** (a long-running guest command
whose output arrives as it is written; closing the stream kills the command's process group in
the guest).

Manager API (bearer token, like every route)::

    GET  /v1/vms/{name}/runstate                                   -> {"vm", "host", "qemu_status", "state"}
    POST /v1/vms/{name}/pause          {}                          -> {"ok": true}
    POST /v1/vms/{name}/resume         {}                          -> {"ok": true}
    POST /v1/vms/{name}/exec-stream    {"command", "timeout"?}     -> application/x-ndjson lines:
         {"fd": 1|2, "data": "<base64>"} ...  then  {"exit_code", "signal", "timed_out"}  or  {"error"}
         ({"ping": 1} after 2 s without output; a client that left is noticed then, and the command killed)

The host agent has the same three routes (fenced, under its RPC conventions); the manager relays
the stream line by line. Like ``exec``, none of them is a recorded operation: the VM record's power
stays ``running`` while its QEMU is paused (the record tracks whether a QEMU of the VM runs).
"""
from __future__ import annotations

import asyncio
import base64
import json
import logging
from collections.abc import AsyncGenerator, AsyncIterator
from typing import TYPE_CHECKING, Annotated, Any

import httpx
from fastapi import FastAPI, Path as PathParam, Request
from fastapi.responses import StreamingResponse
from pydantic import Field, Strict
from pydantic.dataclasses import dataclass

from .agentrpc import Ok
from hvsim.core.agent import Chunk
from hvsim.core.model import NAME_RE

from .errors import ApiConflictError, ApiError, ApiInputError, ApiNotFoundError, ConflictError, OperationFailedError
from .schema import RunState
from .state import CFG, VMPower

if TYPE_CHECKING:
    from .agent_client import AgentClient
    from .hostagent import HostAgent
    from .manager import Manager

log = logging.getLogger("hvsim.control.guestops")
NDJSON = "application/x-ndjson"
VMName = Annotated[str, PathParam(pattern=NAME_RE.pattern, max_length=32, description="a VM name")]
MAX_LINE = 4 << 20          # one streamed line (a base64 chunk of at most a few hundred KiB)
KEEPALIVE_S = 2.0           # a {"ping": 1} line after this long without output


@dataclass(config=CFG)
class ExecStreamRequest:
    command: Annotated[str, Field(min_length=1, max_length=4096)]
    timeout: Annotated[float | None, Strict(), Field(gt=0, le=86400,
                                                    description="seconds for the whole command; absent: none")] = None


def _line(obj: dict[str, Any]) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode() + b"\n"


# -- host agent ---------------------------------------------------------------------------------------
def add_agent_routes(app: FastAPI, agent: HostAgent, wr: dict[str, Any]) -> None:
    """The host agent's pause and streamed-exec routes (``wr``: its fenced-route settings; resume
    exists already)."""

    @app.post("/v1/vms/{name}/pause", response_model=Ok, **wr)
    async def pause(name: VMName) -> Ok:
        vm = agent.vm(name)
        if vm.state.value != "paused":
            await vm.pause()
        return Ok()

    @app.post("/v1/vms/{name}/exec-stream", response_class=StreamingResponse, **wr)
    async def exec_stream(name: VMName, body: ExecStreamRequest, request: Request) -> StreamingResponse:
        vm = agent.vm(name)                  # 404 before anything is streamed
        stream = vm.agent.exec_stream(body.command, timeout=body.timeout)

        async def gen() -> AsyncIterator[bytes]:
            try:
                async with stream:
                    it = stream.__aiter__()
                    nxt: asyncio.Future[Chunk] = asyncio.ensure_future(it.__anext__())
                    try:
                        while True:
                            done, _ = await asyncio.wait({nxt}, timeout=KEEPALIVE_S)
                            if not done:
                                # a quiet command: look whether the client went away (then the
                                # command is killed: leaving `async with`), and a line now and then
                                if await request.is_disconnected():
                                    return
                                yield _line({"ping": 1})
                                continue
                            try:
                                ch = nxt.result()
                            except StopAsyncIteration:
                                break
                            yield _line({"fd": ch.fd, "data": base64.b64encode(ch.data).decode()})
                            nxt = asyncio.ensure_future(it.__anext__())
                    finally:
                        nxt.cancel()
                        await asyncio.gather(nxt, return_exceptions=True)
                r = stream.result
                yield _line({"exit_code": r.exit_code if r else None, "signal": r.signal if r else 0,
                             "timed_out": bool(r.timed_out) if r else False})
            except Exception as e:  # the guest agent failed mid-stream: the client gets it as the last line
                yield _line({"error": str(e)[:2000]})
        return StreamingResponse(gen(), media_type=NDJSON)


# -- host agent client ---------------------------------------------------------------------------------
async def agent_pause(client: AgentClient, name: str, token: int) -> None:
    await client.post_ok(f"/v1/vms/{name}/pause", token)


async def agent_exec_stream(client: AgentClient, name: str, req: ExecStreamRequest,
                            token: int) -> AsyncGenerator[bytes, None]:
    """The agent's stream, line by line (each a complete NDJSON line)."""
    async with client.stream_lines(f"/v1/vms/{name}/exec-stream", {"command": req.command, "timeout": req.timeout},
                                   token) as lines:
        async for line in lines:
            if len(line) > MAX_LINE:
                raise OperationFailedError(f"exec stream of vm {name!r}: a line of {len(line)} bytes")
            if line:
                yield line.encode() + b"\n"


# -- manager ------------------------------------------------------------------------------------------
def _refused(what: str, host: str, e: ApiError) -> Exception:
    if isinstance(e, ApiInputError | ApiConflictError | ApiNotFoundError):
        return ConflictError(f"{what} refused by {host}: {e.detail}")
    return OperationFailedError(f"{what} on {host} failed: {e.detail}")


async def manager_runstate(manager: Manager, name: str) -> RunState:
    manager.inventory      # noqa: B018 (only the leader asks its agents)
    vm, host = await manager.home(name, VMPower.RUNNING, VMPower.PAUSED, VMPower.MIGRATING)
    try:
        q = await manager.agent(host).vm(name)
    except ApiError as e:
        raise _refused(f"runstate of vm {name!r}", host.name, e) from e
    return RunState(vm=name, host=host.name, qemu_status=q.qemu_status, state=q.state)


async def manager_pause(manager: Manager, name: str) -> None:
    manager.inventory      # noqa: B018 (only the leader sends commands)
    vm, host = await manager.home(name, VMPower.RUNNING, VMPower.PAUSED)
    try:
        await agent_pause(manager.agent(host), name, manager.token)
    except ApiError as e:
        raise _refused(f"pause of vm {name!r}", host.name, e) from e


async def manager_resume(manager: Manager, name: str) -> None:
    manager.inventory      # noqa: B018
    vm, host = await manager.home(name, VMPower.RUNNING, VMPower.PAUSED)
    try:
        await manager.agent(host).resume(name, manager.token)
    except ApiError as e:
        raise _refused(f"resume of vm {name!r}", host.name, e) from e


async def manager_exec_stream(manager: Manager, name: str, req: ExecStreamRequest,
                              request: Request | None = None) -> AsyncIterator[bytes]:
    """Checks first (an error answer, not a stream), then the agent's stream relayed."""
    manager.inventory      # noqa: B018
    vm, host = await manager.home(name, VMPower.RUNNING, VMPower.PAUSED, VMPower.MIGRATING)
    agent = manager.agent(host)
    lines = agent_exec_stream(agent, name, req, manager.token)
    try:
        first = await lines.__anext__()
    except StopAsyncIteration:
        first = _line({"error": "the host agent closed the stream"})
    except ApiError as e:
        raise _refused(f"exec stream in vm {name!r}", host.name, e) from e

    async def relay() -> AsyncIterator[bytes]:
        try:
            yield first
            async for ln in lines:
                if request is not None and await request.is_disconnected():
                    return           # the client went away: closing the agent's stream kills the command
                yield ln
        except (ApiError, httpx.HTTPError) as e:
            yield _line({"error": f"host {host.name}: {e}"[:2000]})
        finally:
            await lines.aclose()
    return relay()


def add_manager_routes(app: FastAPI, manager: Manager, ops: dict[str, Any]) -> None:
    """The manager API's runstate, pause, resume and exec-stream routes (``ops``: its route settings)."""
    @app.get("/v1/vms/{name}/runstate", tags=["vms"], response_model=RunState, **ops)
    async def vm_runstate(name: VMName) -> RunState:
        """The VM's QEMU runstate, asked of its host agent (the record's power stays ``running``
        while QEMU is paused)."""
        return await manager_runstate(manager, name)

    @app.post("/v1/vms/{name}/pause", tags=["vms"], response_model=Ok, **ops)
    async def pause_vm(name: VMName) -> Ok:
        """Pause the VM's QEMU (QMP stop); not a recorded operation (like exec)."""
        await manager_pause(manager, name)
        return Ok()

    @app.post("/v1/vms/{name}/resume", tags=["vms"], response_model=Ok, **ops)
    async def resume_vm(name: VMName) -> Ok:
        """Resume a paused VM's QEMU (QMP cont); not a recorded operation."""
        await manager_resume(manager, name)
        return Ok()

    @app.post("/v1/vms/{name}/exec-stream", tags=["vms"], response_class=StreamingResponse, **ops)
    async def exec_stream_vm(name: VMName, body: ExecStreamRequest, request: Request) -> StreamingResponse:
        """Run a command in the guest and stream its output as NDJSON lines (``{"fd", "data"}``
        base64 chunks, then ``{"exit_code", "signal", "timed_out"}`` or ``{"error"}``); closing
        the connection kills the command in the guest."""
        return StreamingResponse(await manager_exec_stream(manager, name, body, request), media_type=NDJSON)


