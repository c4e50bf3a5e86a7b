"""The manager's HTTP API (FastAPI, served by uvicorn): hosts, VMs, placement groups and rules,
reservations, operations. Bearer-token auth on every ``/v1`` route (the token lives in a 0600
file); served on a unix socket (0600 in a 0700 directory) by default, on a loopback TCP address
when asked. The OpenAPI description is ``/openapi.json`` (public: it holds no state).

Every malformed, out-of-range or conflicting request gets a 4xx whose JSON body names the
field (``{"detail": "...", "field": "body.memory_mib"}``), never a 5xx, and a rejected request
changes nothing (each change is one store transaction that either commits whole or not at all).
``start``, ``stop``, ``destroy``, ``migrate`` and ``exec`` are carried out by the VM's host agent
(:mod:`hvsim.control.manager`): a refusal answers 409, a failure 502 naming the recorded operation.
A store that cannot be reached answers 503 with Retry-After. A manager that is not the leader (a
standby waiting for the lease, or one that lost it) answers every ``/v1`` route but ``/v1/health``
with 503 and Retry-After, its body naming the leader when the store knows one:
``{"detail", "not_leader": true, "leader": {manager, address, token, datacenter} | null,
"applied": false, "operation": null}`` (the check runs before anything is written, so such a request
changed nothing and can be sent to the leader as is; ``applied: null`` with an ``operation`` id when
leadership was lost in the middle of an operation it had recorded: the next leader resolves it).

Run it: ``python -m hvsim.control.api`` (or ``hvsim manager``) ``--store sqlite:///PATH --token-file
PATH [--socket PATH | --tcp IP:PORT [--api-tls CA CERT KEY]] [--advertise ADDRESS] [--datacenter NAME]
[--agent-tls CA CERT KEY --agent-networks CIDR,...]``. It serves at once (a standby answers "not
leader") and campaigns for the manager lease; ``--ready-file`` is written once it leads,
``--serving-file`` once it serves. With ``--api-tls`` the TCP API is HTTPS that requires a client
certificate of that CA (mutual TLS), plus the bearer token.
"""
from __future__ import annotations

import argparse
import asyncio
import ipaddress
import json
import logging
import os
import re
import secrets
import signal
import socket
import ssl
import stat
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Annotated, Any

import uvicorn
import uvloop
from fastapi import Depends, FastAPI, Path as PathParam, Query, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from hvbase.aio import wait_for
from hvsim.core.model import NAME_RE

from .agent_client import ClientTLS
from .errors import (
    ConflictError, ControlError, ControlInputError, FencedError, NotFoundError, NotLeaderError, OperationFailedError,
    StoreUnavailableError,
)
from .diskops import manager_undefine
from .guestops import add_manager_routes
from .wanops import add_manager_routes as add_wan_routes
from .fileops import add_manager_routes as add_file_routes
from hvsim.core.guestfile import MAX_FILE
from .inventory import Listing
from .leader import check_advertise, find_leader
from .manager import LEASE_TTL, Manager
from .ops import OperationRecord
from .schema import (
    Defined, Done, ErrorBody, ExecRequest, ExecResult, GroupPage, HAReport, Health, HostCreate, HostPage,
    MigrateRequest, OperationPage, PlacementCheck, Progress, ReservationPage, ReservationReport, RuleCreate, RulePage,
    StopBody, VMDefine, VMPage,
)
from .state import (
    GROUPS, HOSTS, OPS, RESERVATIONS, RULES, VMS, GroupRecord, HostRecord, ReservationRecord, RuleRecord, VMRecord,
    as_dict, dump, parse,
)
from .store import TLSFiles, make_store

log = logging.getLogger("hvsim.control.api")

MAX_BODY = 256 * 1024
GRACEFUL_S = 5             # a graceful stop's wait for the requests in flight
FILE_ROUTE = re.compile(r"/v1/vms/[^/]+/files")
NameParam = Annotated[str, PathParam(pattern=NAME_RE.pattern, max_length=32, description="a record name")]
OpIdParam = Annotated[str, PathParam(pattern=r"^[0-9a-f]{16}-[0-9a-f]{8}$", description="an operation id")]
Limit = Annotated[int, Query(ge=1, le=1000, description="page size")]
After = Annotated[str | None, Query(pattern=NAME_RE.pattern, max_length=32,
                                    description="cursor: the last name of the previous page")]
OpAfter = Annotated[str | None, Query(pattern=r"^[0-9a-f]{16}-[0-9a-f]{8}$", description="cursor")]


ERRORS: dict[int | str, dict[str, Any]] = {
    400: {"model": ErrorBody, "description": "a field is malformed or out of range"},
    401: {"model": ErrorBody, "description": "missing or wrong bearer token"},
    404: {"model": ErrorBody, "description": "no such record"},
    409: {"model": ErrorBody, "description": "conflict: exists, still referenced, or in flight"},
    413: {"model": ErrorBody, "description": "request body too large"},
    422: {"model": ErrorBody, "description": "the request does not match the schema"},
    503: {"model": ErrorBody, "description": "the store is unavailable, or this manager is not the leader "
                                             "(the body names the leader)"},
}


def _err(status: int, detail: str, field: str | None = None, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"detail": detail, "field": field}, status_code=status, headers=headers)


def _raw(body: bytes, status: int = 200) -> Response:
    """Stored JSON sent as is: records were validated when written, so no re-encoding."""
    return Response(body, status_code=status, media_type="application/json")


def _page(listing: Listing[bytes]) -> Response:
    return _raw(b'{"items":[' + b",".join(listing.items) + b'],"after":' + json.dumps(listing.after).encode()
                + b',"remaining":' + str(listing.remaining).encode() + b"}")


def create_app(manager: Manager, token: str) -> FastAPI:
    """The API over a started ``manager``; requests must carry ``Authorization: Bearer <token>``."""
    if not token or len(token) < 16:
        raise ControlInputError("token", "must be at least 16 characters")
    store = manager.store
    rd = manager.reader
    bearer = HTTPBearer(auto_error=False, description="the token in the manager's 0600 token file")

    async def auth(cred: HTTPAuthorizationCredentials | None = Depends(bearer)) -> None:
        if cred is None or not secrets.compare_digest(cred.credentials.encode(), token.encode()):
            raise _Unauthorized()

    async def leading() -> None:
        """Before the handler (so before anything is written): only a leader that holds its lease
        for sure answers."""
        if not manager.leading_now():
            raise NotLeaderError(f"manager {manager.name} does not lead ({manager.state.value})")

    async def not_leader(e: ControlError) -> JSONResponse:
        leader = None
        try:
            info = await wait_for(find_leader(store), 2.0)
            if info is not None and (info.manager != manager.name or manager.leading_now()):
                leader = info.brief()
        except (ControlError, TimeoutError) as err:
            log.warning("not leader, and the leader record could not be read: %s", err)
        op = getattr(e, "operation", None)
        return JSONResponse({"detail": f"not leader: {e}", "field": None, "not_leader": True, "leader": leader,
                             "applied": None if op else False, "operation": op},
                            status_code=503, headers={"Retry-After": "1"})

    app = FastAPI(title="hvsim manager", version="1", docs_url=None, redoc_url=None,
                  description=__doc__.split("\n\n")[0] if __doc__ else "")
    app.state.manager = manager

    app.add_middleware(BodyLimit)

    @app.exception_handler(RequestValidationError)
    async def on_invalid(_: Request, e: RequestValidationError) -> JSONResponse:
        err = e.errors()[0] if e.errors() else {}
        loc = ".".join(str(x) for x in err.get("loc", ())) or "body"
        return _err(422, f"{loc}: {err.get('msg', 'invalid')}", loc)

    @app.exception_handler(_Unauthorized)
    async def on_unauth(_: Request, e: _Unauthorized) -> JSONResponse:
        return _err(401, "missing or wrong bearer token", "Authorization", {"WWW-Authenticate": "Bearer"})

    @app.exception_handler(ControlError)
    async def on_control(_: Request, e: ControlError) -> JSONResponse:
        if isinstance(e, ControlInputError):
            return _err(400, str(e), e.field)
        if isinstance(e, NotFoundError):
            return _err(404, str(e))
        if isinstance(e, ConflictError):
            return _err(409, str(e))
        if isinstance(e, OperationFailedError):
            return JSONResponse({"detail": str(e)[:2000], "field": None, "operation": e.operation}, status_code=502)
        if isinstance(e, NotLeaderError | FencedError):
            return await not_leader(e)
        if isinstance(e, StoreUnavailableError):
            return _err(503, f"store unavailable: {e}", headers={"Retry-After": "1"})
        log.exception("internal error", exc_info=e)
        return _err(500, f"internal error: {type(e).__name__}")

    hv1: dict[str, Any] = {"dependencies": [Depends(auth), Depends(no_unknown_query)], "responses": ERRORS}
    v1: dict[str, Any] = {"dependencies": [Depends(auth), Depends(no_unknown_query), Depends(leading)],
                          "responses": ERRORS}
    ops: dict[str, Any] = {**v1, "responses": {**ERRORS, 502: {"model": ErrorBody,
                                                              "description": "the operation ran and failed"}}}

    # -- health ---------------------------------------------------------------------------------
    @app.get("/v1/health", tags=["manager"], response_model=Health, **hv1)
    async def health() -> dict[str, Any]:
        """The manager answers (leader or not); the store's backend and current revision, leadership
        (``leader``: this one leads now; ``token``: the token it holds or last held)."""
        return {"status": "ok", "store": store.backend, "revision": await store.revision(),
                "manager": manager.name, "leader": manager.leading_now(), "token": manager.held_token,
                "resolved": len(manager.resolutions), "state": manager.state.value,
                "datacenter": manager.datacenter}

    # -- hosts ----------------------------------------------------------------------------------
    @app.get("/v1/hosts", tags=["hosts"], response_model=HostPage, **v1)
    async def list_hosts(limit: Limit = 100, after: After = None) -> Response:
        return _page(await rd.raw_page(HOSTS, limit, after))

    @app.post("/v1/hosts", status_code=201, tags=["hosts"], response_model=HostRecord, **v1)
    async def add_host(body: HostCreate) -> Response:
        return _raw(dump(await manager.add_host(body)), 201)

    @app.get("/v1/hosts/{name}", tags=["hosts"], response_model=HostRecord, **v1)
    async def get_host(name: NameParam) -> Response:
        return _raw(await rd.raw(HOSTS, name, "host"))

    @app.delete("/v1/hosts/{name}", status_code=204, tags=["hosts"], **v1)
    async def remove_host(name: NameParam) -> Response:
        await manager.inventory.remove_host(name)
        manager.placement_changed()
        return Response(status_code=204)

    # -- VMs ------------------------------------------------------------------------------------
    @app.get("/v1/vms", tags=["vms"], response_model=VMPage, **v1)
    async def list_vms(limit: Limit = 100, after: After = None) -> Response:
        return _page(await rd.raw_page(VMS, limit, after))

    @app.post("/v1/vms", status_code=201, tags=["vms"], response_model=Defined, **v1)
    async def define_vm(body: VMDefine) -> Response:
        """Define a VM (shut off). Without ``host`` the placement controller chooses one under the
        stored rules (409 naming what eliminated the hosts if none can take it)."""
        vm, op = await manager.define_vm(parse(VMRecord, as_dict(body), "body."))
        return _raw(b'{"vm":' + dump(vm) + b',"operation":' + dump(op) + b"}", 201)

    @app.get("/v1/vms/{name}", tags=["vms"], response_model=VMRecord, **v1)
    async def get_vm(name: NameParam) -> Response:
        return _raw(await rd.raw(VMS, name, "vm"))

    @app.delete("/v1/vms/{name}", tags=["vms"], response_model=Done, **v1)
    async def undefine_vm(name: NameParam) -> Response:
        """Undefine a shut-off VM: its disks removed through its host's agent, then its record
        (409 naming the clones standing on its disk, or its host when that is unreachable: nothing
        changed; see hvsim.control.diskops)."""
        op = await manager_undefine(manager, name)
        manager.placement_changed()
        return _raw(b'{"operation":' + dump(op) + b"}")

    @app.post("/v1/vms/{name}/start", tags=["vms"], response_model=Done, **ops)
    async def start_vm(name: NameParam) -> Response:
        """Start the VM on its host (through its host agent); answers once it runs (its guest agent
        answers) with the succeeded operation, or 409/502 naming the operation."""
        return _raw(b'{"operation":' + dump(await manager.start_vm(name)) + b"}")

    @app.post("/v1/vms/{name}/stop", tags=["vms"], response_model=Done, **ops)
    async def stop_vm(name: NameParam, body: StopBody | None = None) -> Response:
        """ACPI shutdown; answers once the guest powered off."""
        b = body or StopBody()
        return _raw(b'{"operation":' + dump(await manager.stop_vm(name, timeout=b.timeout)) + b"}")

    @app.post("/v1/vms/{name}/destroy", tags=["vms"], response_model=Done, **ops)
    async def destroy_vm(name: NameParam) -> Response:
        """Hard stop."""
        return _raw(b'{"operation":' + dump(await manager.stop_vm(name, hard=True)) + b"}")

    @app.post("/v1/vms/{name}/migrate", status_code=202, tags=["vms"], response_model=Done, **ops)
    async def migrate_vm(name: NameParam, body: MigrateRequest) -> Response:
        """Live-migrate to ``destination``: answers 202 with the running operation at once; follow
        it with ``GET /v1/operations/{id}`` and ``.../progress``."""
        return _raw(b'{"operation":' + dump(await manager.migrate_vm(name, body)) + b"}", 202)

    @app.post("/v1/vms/{name}/exec", tags=["vms"], response_model=ExecResult, **ops)
    async def exec_vm(name: NameParam, body: ExecRequest) -> ExecResult:
        """Run a command in the guest through its agent (not recorded as an operation)."""
        out = await manager.exec_vm(name, body)
        return ExecResult(exit_code=out.exit_code, stdout=out.stdout, stderr=out.stderr, signal=out.signal,
                          timed_out=out.timed_out, truncated=out.truncated)

    add_manager_routes(app, manager, ops)
    add_wan_routes(app, manager, ops)
    add_file_routes(app, manager, ops)

    # -- placement groups, rules, reservations ----------------------------------------------------
    @app.get("/v1/groups", tags=["placement"], response_model=GroupPage, **v1)
    async def list_groups(limit: Limit = 100, after: After = None) -> Response:
        return _page(await rd.raw_page(GROUPS, limit, after))

    @app.post("/v1/groups", status_code=201, tags=["placement"], response_model=GroupRecord, **v1)
    async def add_group(body: GroupRecord) -> Response:
        return _raw(dump(await manager.inventory.add_group(body)), 201)

    @app.get("/v1/groups/{name}", tags=["placement"], response_model=GroupRecord, **v1)
    async def get_group(name: NameParam) -> Response:
        return _raw(await rd.raw(GROUPS, name, "placement group"))

    @app.delete("/v1/groups/{name}", status_code=204, tags=["placement"], **v1)
    async def remove_group(name: NameParam) -> Response:
        await manager.inventory.remove_group(name)
        return Response(status_code=204)

    @app.get("/v1/rules", tags=["placement"], response_model=RulePage, **v1)
    async def list_rules(limit: Limit = 100, after: After = None) -> Response:
        return _page(await rd.raw_page(RULES, limit, after))

    @app.post("/v1/rules", status_code=201, tags=["placement"], response_model=RuleRecord, **v1)
    async def add_rule(body: RuleCreate) -> Response:
        rule = await manager.inventory.add_rule(parse(RuleRecord, as_dict(body), "body."))
        manager.placement_changed()
        return _raw(dump(rule), 201)

    @app.get("/v1/rules/{name}", tags=["placement"], response_model=RuleRecord, **v1)
    async def get_rule(name: NameParam) -> Response:
        return _raw(await rd.raw(RULES, name, "rule"))

    @app.delete("/v1/rules/{name}", status_code=204, tags=["placement"], **v1)
    async def remove_rule(name: NameParam) -> Response:
        await manager.inventory.remove_rule(name)
        manager.placement_changed()
        return Response(status_code=204)

    @app.get("/v1/reservations", tags=["placement"], response_model=ReservationPage, **v1)
    async def list_reservations(limit: Limit = 100, after: After = None) -> Response:
        return _page(await rd.raw_page(RESERVATIONS, limit, after))

    @app.post("/v1/reservations", status_code=201, tags=["placement"], response_model=ReservationRecord, **v1)
    async def add_reservation(body: ReservationRecord) -> Response:
        return _raw(dump(await manager.inventory.add_reservation(body)), 201)

    @app.get("/v1/reservation", tags=["placement"], response_model=ReservationReport, **v1)
    async def reservation(datacenter: Annotated[str | None, Query(pattern=NAME_RE.pattern, max_length=32,
                                                                  description="where the reservation is held")] = None,
                          management_vcpus: Annotated[int, Query(ge=0, le=4096)] = 0,
                          management_memory_mib: Annotated[int, Query(ge=0, le=16 * 1024 * 1024)] = 0
                          ) -> dict[str, Any]:
        """The failover reservation sized for the protected VMs plus the management host (ours: per-host
        reserve rules; against vSphere HA slot sizing), what the reserve rules hold, the HA state."""
        return await manager.reservation_report(datacenter, management_vcpus, management_memory_mib)

    @app.get("/v1/ha", tags=["manager"], response_model=HAReport, **v1)
    async def ha() -> dict[str, Any]:
        """Host verdicts (power evidence, grace) and the HA controller's recent events."""
        return manager.ha.report()

    @app.get("/v1/placement", tags=["placement"], response_model=PlacementCheck, **v1)
    async def check_placement() -> dict[str, Any]:
        """The independent check of every stored VM's host against the hosts' capacity and the
        rules: ``required_violations`` (0 unless something was forced)."""
        return await manager.check_placement()

    # -- operations -----------------------------------------------------------------------------
    @app.get("/v1/operations", tags=["operations"], response_model=OperationPage, **v1)
    async def list_ops(limit: Limit = 100, after: OpAfter = None) -> Response:
        return _page(await rd.raw_page(OPS, limit, after))

    @app.get("/v1/operations/{op_id}", tags=["operations"], response_model=OperationRecord, **v1)
    async def get_op(op_id: OpIdParam) -> Response:
        return _raw(await rd.raw(OPS, op_id, "operation"))

    @app.get("/v1/operations/{op_id}/progress", tags=["operations"], response_model=Progress, **v1)
    async def op_progress(op_id: OpIdParam) -> Progress:
        """A migration's latest progress, as its source agent reports it (404 for other operations
        or once this manager forgot it)."""
        await rd.get_op(op_id)
        mi = manager.migration_progress(op_id)
        if mi is None:
            raise NotFoundError(f"no progress known for operation {op_id}")
        return Progress(state=mi.state, elapsed_s=mi.elapsed_s, passes=mi.passes, transferred=mi.transferred,
                        remaining=mi.remaining, total=mi.total, mbps=mi.mbps, error=mi.error)

    return app


class _Unauthorized(Exception):
    pass


class BodyLimit:
    """Pure ASGI middleware (no per-request task like BaseHTTPMiddleware): a declared body
    larger than MAX_BODY (MAX_FILE for a file written into a guest: :mod:`.fileops`, which also
    counts an undeclared one) is answered 413 before it is read."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            limit = MAX_FILE if scope.get("method") == "PUT" and FILE_ROUTE.fullmatch(scope.get("path", "")) \
                else MAX_BODY
            for k, v in scope.get("headers", ()):
                if k == b"content-length" and (not v.isdigit() or int(v) > limit):
                    await _err(413, f"request body larger than {limit} bytes", "body")(scope, receive, send)
                    return
        await self.app(scope, receive, send)


async def no_unknown_query(request: Request) -> None:
    """A query parameter the route does not take is a malformed request, not something to ignore."""
    route = request.scope.get("route")
    dependant = getattr(route, "dependant", None)
    known = {p.alias for p in getattr(dependant, "query_params", [])}
    for name in request.query_params:
        if name not in known:
            raise RequestValidationError([{"loc": ("query", name), "msg": "unknown query parameter",
                                           "type": "extra_forbidden"}])


# -- serving -----------------------------------------------------------------------------------
def ensure_token(path: Path) -> str:
    """The token in ``path``; created (32 random bytes, urlsafe) with mode 0600 in a 0700
    directory if missing. An existing file readable by group or others is refused."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        mode = stat.S_IMODE(os.stat(path).st_mode)
        if mode & 0o077:
            raise ControlInputError("token_file", f"{path} has mode {mode:o}: it must be 0600") from None
        token = path.read_text().strip()
        if len(token) < 16:
            raise ControlInputError("token_file", f"{path} holds no token (at least 16 characters)") from None
        return token
    token = secrets.token_urlsafe(32)
    with os.fdopen(fd, "w") as f:
        f.write(token + "\n")
    return token


def unix_listener(path: Path) -> socket.socket:
    """A listening unix socket at ``path``: its directory 0700, the socket 0600."""
    try:
        path.parent.mkdir(mode=0o700, parents=True)
    except FileExistsError:
        st = os.stat(path.parent)
        if stat.S_IMODE(st.st_mode) & 0o077 or st.st_uid != os.getuid():
            raise ControlInputError("socket", f"directory {path.parent} must be ours and 0700 "
                                              f"(it is {stat.S_IMODE(st.st_mode):o})") from None
    if path.exists() or path.is_symlink():
        if not stat.S_ISSOCK(os.lstat(path).st_mode):
            raise ControlInputError("socket", f"{path} exists and is not a socket")
        path.unlink()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o177)
    try:
        sock.bind(str(path))
    finally:
        os.umask(old)
    os.chmod(path, 0o600)
    sock.listen(512)
    return sock


def tcp_listener_check(addr: str, allow_any: bool = False) -> tuple[ipaddress.IPv4Address | ipaddress.IPv6Address, int]:
    """``IP:PORT`` parsed; a non-loopback address is refused unless ``allow_any``."""
    host, _, port_s = addr.rpartition(":")
    try:
        ip = ipaddress.ip_address(host.strip("[]"))
        port = int(port_s)
    except ValueError as e:
        raise ControlInputError("tcp", f"{addr!r} is not IP:PORT") from e
    if not 0 < port < 65536:
        raise ControlInputError("tcp", f"port {port} is out of range")
    if not ip.is_loopback and not allow_any:
        raise ControlInputError("tcp", f"{ip} is not a loopback address (pass --allow-non-loopback inside "
                                       "a test namespace)")
    return ip, port


def tcp_listener(addr: str, allow_any: bool = False) -> socket.socket:
    ip, port = tcp_listener_check(addr, allow_any)
    sock = socket.socket(socket.AF_INET6 if ip.version == 6 else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((str(ip), port))
    sock.listen(512)
    return sock


@asynccontextmanager
async def serving(app: FastAPI, sock: socket.socket, tls: TLSFiles | None = None) -> AsyncIterator[uvicorn.Server]:
    """Serve ``app`` on ``sock`` in this event loop until the block ends; with ``tls`` (CA, server
    certificate, key) as HTTPS that requires a client certificate signed by that CA (mutual TLS)."""
    # idle keep-alive connections live 75 s here, longer than the client keeps them (30 s): a
    # client never reuses a connection the server is closing at that moment (a ReadError on a POST)
    extra: dict[str, Any] = {}
    if tls is not None:
        extra = {"ssl_certfile": str(tls.cert), "ssl_keyfile": str(tls.key), "ssl_ca_certs": str(tls.ca),
                 "ssl_cert_reqs": ssl.CERT_REQUIRED}
    # a graceful stop waits at most GRACEFUL_S for the requests in flight: an open exec stream (a
    # guest command that runs for hours) must not hold a SIGTERM'd manager or agent up
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off", access_log=False,
                                           http="httptools", timeout_keep_alive=75,
                                           timeout_graceful_shutdown=GRACEFUL_S, **extra))
    task = asyncio.create_task(server.serve(sockets=[sock]), name="uvicorn")
    try:
        while not server.started:
            if task.done():
                task.result()
                raise ControlError("uvicorn stopped before it started")
            await asyncio.sleep(0.01)
        yield server
    finally:
        server.should_exit = True
        await task
        sock.close()


async def run(store_url: str, token: str, sock: socket.socket, ready: Path | None = None,
              tls: TLSFiles | None = None, *, lease_ttl: float = LEASE_TTL, agent_tls: ClientTLS | None = None,
              agent_networks: tuple[str, ...] = ("127.0.0.0/8", "::1/128"), name: str | None = None,
              advertise: str | None = None, datacenter: str = "", api_tls: TLSFiles | None = None,
              serving_file: Path | None = None, ha_grace: float = 15.0, import_dir: Path | None = None) -> None:
    """Serve the API on ``sock`` at once (not leader until the lease is ours) and campaign."""
    async with make_store(store_url, tls=tls) as store:
        manager = Manager(store, name=name, lease_ttl=lease_ttl, agent_tls=agent_tls, agent_networks=agent_networks,
                          advertise=advertise, datacenter=datacenter, ha_grace=ha_grace, import_dir=import_dir)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        waiter = asyncio.ensure_future(stop.wait())
        campaign: asyncio.Future[None] | None = None
        try:
            async with serving(create_app(manager, token), sock, tls=api_tls):
                if serving_file is not None:
                    serving_file.write_text(f"{os.getpid()}\n")  # noqa: ASYNC240 (once, tiny)
                campaign = asyncio.ensure_future(manager.start())
                await asyncio.wait({campaign, waiter}, return_when=asyncio.FIRST_COMPLETED)
                if campaign.done():
                    campaign.result()
                    if ready is not None:
                        ready.write_text(f"{os.getpid()}\n")  # noqa: ASYNC240 (once, tiny)
                await waiter
        finally:
            waiter.cancel()
            if campaign is not None and not campaign.done():   # stopped while waiting for the lease
                campaign.cancel()
                await asyncio.gather(campaign, return_exceptions=True)
            await manager.close()


def main(argv: list[str] | None = None, prog: str = "python -m hvsim.control.api") -> int:
    ap = argparse.ArgumentParser(prog=prog, description="the hvsim manager: its API, driving host agents")
    ap.add_argument("--store", required=True, help="sqlite:///PATH or etcd://HOST:PORT[,HOST:PORT...]")
    ap.add_argument("--token-file", required=True, type=Path, help="bearer token (created 0600 if missing)")
    where = ap.add_mutually_exclusive_group(required=True)
    where.add_argument("--socket", type=Path, help="serve on this unix socket (0600 in a 0700 directory)")
    where.add_argument("--tcp", help="serve on IP:PORT (loopback only unless --allow-non-loopback)")
    ap.add_argument("--allow-non-loopback", action="store_true", help="for a test namespace's address")
    ap.add_argument("--ready-file", type=Path, help="written (with the pid) once serving")
    ap.add_argument("--store-tls", nargs=3, type=Path, metavar=("CA", "CERT", "KEY"),
                    help="PEM files for an etcds:// store (mutual TLS)")
    ap.add_argument("--agent-tls", nargs=3, type=Path, metavar=("CA", "CERT", "KEY"),
                    help="PEM files to reach host agents over https (mutual TLS)")
    ap.add_argument("--agent-networks", default="127.0.0.0/8,::1/128",
                    help="comma-separated networks https agents may be on (nothing else is dialed)")
    ap.add_argument("--lease-ttl", type=float, default=LEASE_TTL,
                    help=f"the manager lease's TTL in seconds (1-600, default {LEASE_TTL:g}: see README)")
    ap.add_argument("--api-tls", nargs=3, type=Path, metavar=("CA", "CERT", "KEY"),
                    help="serve the --tcp API as HTTPS requiring a client certificate of CA (mutual TLS)")
    ap.add_argument("--advertise", help="the address clients dial, in the leader record (unix:PATH or "
                                        "https://IP:PORT; default: the socket, or the --tcp address)")
    ap.add_argument("--datacenter", default="", help="this manager's datacenter (in the leader record)")
    ap.add_argument("--serving-file", type=Path, help="written (with the pid) once the API serves (leader or not)")
    ap.add_argument("--name", help="this manager's identity in the lease (default manager@HOST:PID)")
    ap.add_argument("--ha-grace", type=float, default=15.0,
                    help="seconds a host without power evidence stays unreachable before HA restarts its protected "
                         "VMs (0-3600; a powered-off host needs none)")
    ap.add_argument("--import-dir", type=Path, help="data disks may be imported from raw images in this directory "
                                                    "(VMDefine.data_image: a path relative to it)")
    ap.add_argument("--log-level", default="WARNING")
    args = ap.parse_args(argv)
    logging.basicConfig(level=getattr(logging, str(args.log_level).upper(), logging.WARNING),
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        tls = TLSFiles(*args.store_tls) if args.store_tls else None
        make_store(args.store, tls=tls)         # a bad store URL is refused before anything is made
        if args.tcp:
            tcp_listener_check(args.tcp, args.allow_non_loopback)
        if not 0 <= args.ha_grace <= 3600:
            raise ControlInputError("ha_grace", f"must be 0..3600 seconds, got {args.ha_grace}")
        if not 1 <= args.lease_ttl <= 600:
            raise ControlInputError("lease_ttl", f"must be 1..600 seconds, got {args.lease_ttl}")
        nets = tuple(n.strip() for n in args.agent_networks.split(",") if n.strip())
        for n in nets:
            try:
                ipaddress.ip_network(n, strict=False)
            except ValueError as e:
                raise ControlInputError("agent_networks", str(e)) from e
        agent_tls = ClientTLS(*args.agent_tls) if args.agent_tls else None
        api_tls = TLSFiles(*args.api_tls) if args.api_tls else None
        if api_tls is not None and not args.tcp:
            raise ControlInputError("api_tls", "--api-tls is for --tcp (a unix socket is protected by its mode)")
        for f in (api_tls.ca, api_tls.cert, api_tls.key) if api_tls is not None else ():
            if not f.is_file():
                raise ControlInputError("api_tls", f"{f} is not a file")
        if args.advertise is not None:
            advertise = check_advertise(args.advertise)
        elif args.socket:
            advertise = f"unix:{args.socket.absolute()}"
        else:
            advertise = f"{'https' if api_tls else 'http'}://{args.tcp}"
        if len(args.datacenter) > 64:
            raise ControlInputError("datacenter", "at most 64 characters")
        if args.import_dir is not None and not args.import_dir.is_dir():
            raise ControlInputError("import_dir", f"{args.import_dir} is not a directory")
        token = ensure_token(args.token_file)
        sock = unix_listener(args.socket) if args.socket else tcp_listener(args.tcp, args.allow_non_loopback)
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            runner.run(run(args.store, token, sock, args.ready_file, tls, lease_ttl=args.lease_ttl,
                           agent_tls=agent_tls, agent_networks=nets, name=args.name, advertise=advertise,
                           datacenter=args.datacenter, api_tls=api_tls, serving_file=args.serving_file,
                           ha_grace=args.ha_grace, import_dir=args.import_dir))
    except ControlInputError as e:
        print(f"hvsim manager: {e}", file=sys.stderr)
        return 2
    except (ControlError, OSError) as e:
        print(f"hvsim manager: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
