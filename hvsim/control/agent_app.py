"""The host agent's process: its RPC (FastAPI, served by uvicorn) over a :class:`HostAgent`.

    python -m hvsim.control.agent_app --host h1 --vcpus 2 --memory-mib 2048 --state-dir DIR \\
        --datastore DIR (--socket PATH | --tcp IP:PORT --tls CA CERT KEY) [--power-domain CGROUP] ...
    hvsim host-agent ...            (the same)

On a unix socket (0600 in a 0700 directory: only our user can connect) or on TCP with mutual TLS
(a client certificate signed by the deployment's CA is required; the address must be loopback unless
``--allow-non-loopback``, meant for a host's namespace address). Run it inside the host's network
namespace. SIGTERM/SIGINT stop it gracefully: every guest keeps running (the next agent re-adopts
it). Errors answer with the manager API's conventions (``{"detail", "field"}``): 400/422 bad input,
404 unknown VM, 409 refused (state, capacity, busy, a stale fencing token or a passed lease
deadline: then the body has ``"fenced": {"token", "newest"}``), 502 the operation ran and failed, 503
not serving (starting or stopping). Every mutating call, accepted or refused, is appended to the
agent's history (``STATE_DIR/history.jsonl``, ``GET /v1/history?since=SEQ``); ``POST /v1/fence``
is a manager announcing its (newer) token.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
import sys
from pathlib import Path
from typing import Annotated, Any

from fastapi import Depends, FastAPI, Header, Path as PathParam, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from hvbase.errors import HvsimError, InputError, StateError
from hvsim.core.errors import BusyError, CapacityError
from hvsim.core.errors import NotFoundError as CoreNotFound
from hvsim.core.model import NAME_RE
from hvsim.crosscloud.network import WanConfig
from hvsim.migration import MigrationInputError, MigrationRefusedError, MigrationStateError

from .agent_client import ClientTLS
from .agentrpc import (
    FENCE_HEADER, FENCE_UNTIL_HEADER, AgentInfo, ExecBody, ExecOutput, HistoryItem, HistoryPage, IncomingRequest,
    ListenRequest, Listening, MigrateOut, MigrationInfo, Ok, QemuInfo, QemuList, StartRequest, StopRequest,
)
from .api import ERRORS, BodyLimit, no_unknown_query, serving, tcp_listener, tcp_listener_check, unix_listener
from .errors import ConflictError, ControlInputError, NotFoundError, StaleTokenError
from .diskops import add_agent_routes as add_disk_routes
from .guestops import add_agent_routes
from .hostagent import AgentConfig, AgentNotServingError, HostAgent, host_spec
from .store import TLSFiles
from .wanops import add_agent_routes as add_wan_routes
from .fileops import add_agent_routes as add_file_routes

log = logging.getLogger("hvsim.control.agent")
NameParam = Annotated[str, PathParam(pattern=NAME_RE.pattern, max_length=32, description="a VM name")]
Token = Annotated[int, Header(alias=FENCE_HEADER, ge=0, le=2**63 - 1,
                              description="the caller's fencing token (the manager lease's revision)")]
Until = Annotated[float | None, Header(alias=FENCE_UNTIL_HEADER, ge=0, le=1e11,
                                       description="the caller's lease deadline (wall clock, seconds): "
                                                   "a call arriving later is refused")]
AGENT_ERRORS: dict[int | str, dict[str, Any]] = {**ERRORS, 502: {"description": "the operation ran and failed"}}


def _err(status: int, detail: str, field: str | None = None) -> JSONResponse:
    return JSONResponse({"detail": detail, "field": field}, status_code=status)


def status_of(e: HvsimError) -> int:
    """The HTTP status of an hvsim error raised by the agent."""
    if isinstance(e, InputError | MigrationInputError):
        return 400
    if isinstance(e, NotFoundError | CoreNotFound):
        return 404
    if isinstance(e, ConflictError | StateError | CapacityError | BusyError | MigrationRefusedError |
                  MigrationStateError):
        return 409
    if isinstance(e, AgentNotServingError):
        return 503
    return 502


def create_agent_app(agent: HostAgent) -> FastAPI:
    app = FastAPI(title="hvsim host agent", version="1", docs_url=None, redoc_url=None,
                  description="the RPC of one host agent (see hvsim.control.agentrpc)")
    app.add_middleware(BodyLimit)

    @app.exception_handler(RequestValidationError)
    async def on_invalid(_: Request, e: RequestValidationError) -> JSONResponse:
        err = e.errors()[0] if e.errors() else {}
        loc = ".".join(str(x) for x in err.get("loc", ())) or "body"
        return _err(422, f"{loc}: {err.get('msg', 'invalid')}", loc)

    @app.exception_handler(HvsimError)
    async def on_hvsim(_: Request, e: HvsimError) -> JSONResponse:
        if isinstance(e, StaleTokenError):
            return JSONResponse({"detail": str(e), "field": FENCE_HEADER,
                                 "fenced": {"token": e.token, "newest": e.newest}}, status_code=409)
        status = status_of(e)
        if status == 502:
            log.warning("operation failed: %s", str(e).splitlines()[0])
        return _err(status, str(e)[:2000], getattr(e, "field", None))

    rd: dict[str, Any] = {"dependencies": [Depends(no_unknown_query)], "responses": AGENT_ERRORS}

    async def fenced(request: Request, token: Token, until: Until = None) -> None:
        # async on purpose: on the event loop, check, remember and record are one step no other
        # request interleaves with (a plain def would run in a worker thread, concurrently)
        route = request.scope.get("route")
        name = request.path_params.get("name")
        agent.fence(token, verb=str(getattr(route, "name", "call")), vm=name if isinstance(name, str) else None,
                    until=until)

    wr: dict[str, Any] = {"dependencies": [Depends(no_unknown_query), Depends(fenced)], "responses": AGENT_ERRORS}

    @app.get("/v1/agent", response_model=AgentInfo, **rd)
    async def info() -> AgentInfo:
        return agent.info()

    @app.get("/v1/qemus", response_model=QemuList, **rd)
    async def qemus() -> QemuList:
        return await agent.qemus()

    @app.get("/v1/vms/{name}", response_model=QemuInfo, **rd)
    async def vm(name: NameParam) -> QemuInfo:
        return await agent.qemu_info(name)

    @app.get("/v1/vms/{name}/stats", **rd)
    async def stats(name: NameParam) -> dict[str, Any]:
        return await agent.stats(name)

    @app.get("/v1/history", response_model=HistoryPage, **rd)
    async def history(since: Annotated[int, Query(ge=0, le=2**63 - 1)] = 0,
                      limit: Annotated[int, Query(ge=1, le=1000)] = 1000) -> HistoryPage:
        """Every mutating command this agent received after ``since`` (accepted or refused, with
        its fencing token), oldest first, at most ``limit``."""
        items = [HistoryItem(**e.to_dict()) for e in agent.history.since(since, limit)]
        return HistoryPage(items=items, last=agent.history.seq)

    @app.post("/v1/fence", response_model=Ok, **wr)
    async def fence() -> Ok:
        """A manager announcing its fencing token (it leads now): older tokens are refused from now on."""
        return Ok(detail=f"newest token {agent.records.token}")

    @app.get("/v1/vms/{name}/migration", response_model=MigrationInfo, **rd)
    async def migration(name: NameParam) -> MigrationInfo:
        return agent.migration_info(name)

    @app.post("/v1/vms", response_model=QemuInfo, **wr)
    async def start(body: StartRequest) -> QemuInfo:
        return await agent.start(body.vm, wait_ready=body.wait_ready, ready_timeout=body.ready_timeout)

    @app.post("/v1/vms/{name}/stop", response_model=Ok, **wr)
    async def stop(name: NameParam, body: StopRequest) -> Ok:
        await agent.stop(name, body.timeout)
        return Ok()

    @app.post("/v1/vms/{name}/destroy", response_model=Ok, **wr)
    async def destroy(name: NameParam) -> Ok:
        await agent.destroy(name)
        return Ok()

    @app.post("/v1/vms/{name}/resume", response_model=Ok, **wr)
    async def resume(name: NameParam) -> Ok:
        await agent.resume(name)
        return Ok()

    @app.post("/v1/vms/{name}/exec", response_model=ExecOutput, **wr)
    async def exec_(name: NameParam, body: ExecBody) -> ExecOutput:
        return await agent.exec(name, body.command, body.timeout)

    @app.post("/v1/vms/{name}/migrate", response_model=MigrationInfo, **wr)
    async def migrate(name: NameParam, body: MigrateOut, token: Token) -> MigrationInfo:
        return await agent.migrate_out(name, body, token)

    @app.post("/v1/vms/{name}/migration/cancel", response_model=Ok, **wr)
    async def cancel(name: NameParam) -> Ok:
        await agent.cancel_migration(name)
        return Ok()

    add_agent_routes(app, agent, wr)
    add_wan_routes(app, agent, rd, wr)
    add_file_routes(app, agent, wr)
    add_disk_routes(app, agent, wr)

    @app.post("/v1/incoming", response_model=QemuInfo, **wr)
    async def incoming(body: IncomingRequest) -> QemuInfo:
        return await agent.incoming_prepare(body)

    @app.post("/v1/incoming/{name}/listen", response_model=Listening, **wr)
    async def listen(name: NameParam, body: ListenRequest) -> Listening:
        return Listening(uri=await agent.incoming_listen(name, body.capabilities))

    @app.post("/v1/incoming/{name}/finish", response_model=QemuInfo, **wr)
    async def finish(name: NameParam, paused_ok: Annotated[bool, Query()] = False) -> QemuInfo:
        return await agent.incoming_finish(name, paused_ok)

    @app.delete("/v1/incoming/{name}", response_model=Ok, **wr)
    async def discard(name: NameParam) -> Ok:
        await agent.incoming_discard(name)
        return Ok()

    return app


async def run(cfg: AgentConfig, sock: Any, tls: TLSFiles | None, ready: Path | None) -> None:
    agent = HostAgent(cfg)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await agent.open()
    try:
        async with serving(create_agent_app(agent), sock, tls=tls):
            if ready is not None:
                ready.write_text(f"{os.getpid()}\n")  # noqa: ASYNC240 (once, tiny)
            await stop.wait()
    finally:
        await agent.close()


def parser(prog: str = "python -m hvsim.control.agent_app") -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog=prog, description="the hvsim host agent of one emulated host")
    ap.add_argument("--host", required=True, help="this host's name")
    ap.add_argument("--datacenter", default="dc1")
    ap.add_argument("--vcpus", type=int, default=4)
    ap.add_argument("--memory-mib", type=int, default=4096)
    ap.add_argument("--cpu-overcommit", type=float, default=1.0)
    ap.add_argument("--memory-overcommit", type=float, default=1.0)
    ap.add_argument("--state-dir", required=True, type=Path, help="the agent's records and the guests' run files")
    ap.add_argument("--datastore", required=True, type=Path, help="the shared datastore directory (disks)")
    where = ap.add_mutually_exclusive_group(required=True)
    where.add_argument("--socket", type=Path, help="serve on this unix socket (0600 in a 0700 directory)")
    where.add_argument("--tcp", help="serve HTTPS with mutual TLS on IP:PORT (needs --tls)")
    ap.add_argument("--tls", nargs=3, type=Path, metavar=("CA", "CERT", "KEY"), help="server PEM files for --tcp")
    ap.add_argument("--client-tls", nargs=3, type=Path, metavar=("CA", "CERT", "KEY"),
                    help="client PEM files to reach other agents over https (migrations)")
    ap.add_argument("--allow-non-loopback", action="store_true", help="for this host's namespace address")
    ap.add_argument("--address", default="127.0.0.1", help="this host's address (incoming migrations listen here)")
    ap.add_argument("--power-domain", type=Path, help="the host's cgroup v2 directory (its power domain)")
    ap.add_argument("--images", type=Path, help="guest kernel + initrd directory (default: HVSIM_IMAGES)")
    ap.add_argument("--accel", choices=("tcg", "kvm"), help="default: probe")
    ap.add_argument("--ready-file", type=Path, help="written (with the pid) once serving")
    ap.add_argument("--wan", type=Path, help="JSON file: the inter-cloud network this host is on "
                                             "(hvsim.crosscloud.network.WanConfig); VMs with a 'network' need it")
    ap.add_argument("--import-dir", type=Path, help="data disks may be imported from raw images in this directory")
    ap.add_argument("--log-level", default="WARNING")
    return ap


def main(argv: list[str] | None = None, prog: str = "python -m hvsim.control.agent_app") -> int:
    args = parser(prog).parse_args(argv)
    logging.basicConfig(level=getattr(logging, str(args.log_level).upper(), logging.WARNING),
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        spec = host_spec(args.host, vcpus=args.vcpus, memory_mib=args.memory_mib, datacenter=args.datacenter,
                         cpu_overcommit=args.cpu_overcommit, memory_overcommit=args.memory_overcommit)
        tls = TLSFiles(*args.tls) if args.tls else None
        if args.tcp:
            if tls is None:
                raise ControlInputError("tls", "--tcp serves HTTPS with mutual TLS only: give --tls CA CERT KEY")
            tcp_listener_check(args.tcp, args.allow_non_loopback)
        if args.power_domain is not None and not (args.power_domain / "cgroup.procs").exists():
            raise ControlInputError("power_domain", f"{args.power_domain} is not a cgroup v2 directory")
        wan = None
        if args.wan is not None:
            try:
                wan = WanConfig.from_json(json.loads(args.wan.read_text()))
            except ValueError as e:
                raise ControlInputError("wan", f"{args.wan}: not JSON: {e}") from e
        if args.import_dir is not None and not args.import_dir.is_dir():
            raise ControlInputError("import_dir", f"{args.import_dir} is not a directory")
        cfg = AgentConfig(host=spec, state_dir=args.state_dir, datastore=args.datastore, address=args.address,
                          power_domain=args.power_domain, images=args.images, accel=args.accel,
                          client_tls=ClientTLS(*args.client_tls) if args.client_tls else None, wan=wan,
                          import_dir=args.import_dir)
        sock = unix_listener(args.socket) if args.socket else tcp_listener(args.tcp, args.allow_non_loopback)
        asyncio.run(run(cfg, sock, tls, args.ready_file))   # the default loop: QEMU children, pidfds
    except InputError as e:
        print(f"hvsim host-agent: {e}", file=sys.stderr)
        return 2
    except (HvsimError, OSError) as e:
        print(f"hvsim host-agent: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
