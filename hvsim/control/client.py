"""Async typed client of the manager API (httpx), raising errors of the hvsim tree::

    async with ManagerClient("unix:/run/hvsim/manager.sock", token) as m:   # or "https://IP:PORT", tls=ClientTLS(..)
        await m.add_host(HostCreate("h1", vcpus=8, memory_mib=16384))
        vm, op = await m.define_vm(VMDefine("web-1", memory_mib=512, host="h1"))
        async for vm in m.iter_vms(): ...

4xx answers raise :class:`ApiInputError` (400/413/422, also an ``InputError``; ``field`` names the
field), :class:`ApiAuthError` (401/403), :class:`ApiNotFoundError`, :class:`ApiConflictError`,
:class:`ApiNotImplementedError` (501), :class:`ApiFailedError` (502: an operation ran and failed; its
``operation`` names it); an unreachable manager or another 5xx raises :class:`ApiUnavailableError`,
one that is not the leader :class:`ApiNotLeaderError` (a subclass, naming the leader) unless the
client followed it to the leader (``follow_leader``). The cause is kept.
"""
from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json as jsonlib
import ssl
import time
from collections.abc import AsyncIterator
from typing import Any, TypeVar

import httpx

from .errors import (
    ApiAuthError, ApiConflictError, ApiError, ApiFailedError, ApiFencedError, ApiInputError, ApiNotFoundError,
    ApiNotImplementedError, ApiNotLeaderError, ApiUnavailableError, ControlInputError,
)
from .leader import find_leader
from .ops import OperationRecord
from .pki import ClientTLS
from .schema import (
    Defined, Done, ExecRequest, ExecResult, GroupPage, GuestAddressInfo, GuestFile, HAReport, HostCreate, HostPage,
    MigrateRequest, OperationPage, PlacementCheck, Progress, ReservationReport, RuleCreate, RulePage, RunState,
    ServiceAddress, VMDefine, VMPage,
)
from .state import GroupRecord, HostRecord, ReservationRecord, RuleRecord, VMRecord, as_dict, parse
from .store import Store

T = TypeVar("T")
_LIMITS = httpx.Limits(max_connections=64, max_keepalive_connections=32, keepalive_expiry=30.0)
#: (items, cursor for the next page or None, records from this page on: all of them on the first page)
Page = tuple[list[T], str | None, int]


def api_error_from_raw(status: int, raw: bytes) -> ApiError:
    """:func:`api_error` for an answer's raw body (JSON when it parses, else its text)."""
    try:
        body: Any = jsonlib.loads(raw)
    except ValueError:
        body = raw.decode(errors="replace")
    return api_error(status, body)


def api_error(status: int, body: Any) -> ApiError:
    """The ApiError subclass for an HTTP error ``status`` with JSON ``body`` (``detail``, ``field``)."""
    detail = body.get("detail") if isinstance(body, dict) else None
    field = body.get("field") if isinstance(body, dict) else None
    msg = str(detail) if detail is not None else str(body)[:200]
    cls: type[ApiError]
    if status in (400, 413, 422):
        cls = ApiInputError
    elif status in (401, 403):
        cls = ApiAuthError
    elif status == 404:
        cls = ApiNotFoundError
    elif status == 409:
        cls = ApiFencedError if isinstance(body, dict) and isinstance(body.get("fenced"), dict) else ApiConflictError
    elif status == 501:
        cls = ApiNotImplementedError
    elif status == 502:
        cls = ApiFailedError
    elif status == 503 and isinstance(body, dict) and body.get("not_leader") is True:
        cls = ApiNotLeaderError
    elif status >= 500:
        cls = ApiUnavailableError
    else:
        cls = ApiError
    return cls(status, msg, field, body)


class ManagerClient:
    """A connection pool to one manager. ``address``: ``unix:/PATH`` or ``http(s)://HOST:PORT``;
    ``tls`` (:class:`~hvsim.control.pki.ClientTLS`: CA, our certificate and key) for ``https://``
    (mutual TLS: the manager requires a client certificate of its CA).

    ``follow_leader`` (default on): a manager that does not lead answers 503 naming the leader
    (``{manager, address, token}``) and saying whether the request changed nothing; then the client
    reconnects to the leader (same bearer token, same TLS files) and sends the request there once.
    A 503 whose request was partly carried out (an operation it had recorded) is raised as is
    (:class:`ApiNotLeaderError` with ``operation``). With a ``store``
    (:meth:`from_store`), a manager that cannot be connected to at all is looked up again in the
    store's leader record (only when the connection failed before anything was sent)."""

    def __init__(self, address: str, token: str, *, timeout: float = 30.0,
                 ssl_context: ssl.SSLContext | None = None, tls: ClientTLS | None = None,
                 follow_leader: bool = True, store: Store | None = None) -> None:
        if tls is not None and ssl_context is None:
            ssl_context = tls.context()
        self._token = token
        self._timeout = timeout
        self._ssl = ssl_context
        self.follow_leader = follow_leader
        self.store = store
        self.followed = 0                      # how many times it moved to another manager
        self._switch = asyncio.Lock()
        self.address = address
        self._http = self._connect(address)
        # idle connections are dropped after 30 s, before the manager's 75 s keep-alive timeout

    def _connect(self, address: str) -> httpx.AsyncClient:
        if not isinstance(address, str) or not address:
            raise ControlInputError("address", "give unix:/PATH or http(s)://HOST:PORT")
        if address.startswith("unix:"):
            path = address[len("unix:"):]
            if not path.startswith("/"):
                raise ControlInputError("address", f"{address!r}: the socket path must be absolute")
            transport = httpx.AsyncHTTPTransport(uds=path, limits=_LIMITS)
            base = "http://manager"
        elif address.startswith(("http://", "https://")):
            if address.startswith("https://") and self._ssl is None:
                raise ControlInputError("address", f"{address!r}: an https manager needs client TLS files (tls=)")
            transport = httpx.AsyncHTTPTransport(verify=self._ssl if self._ssl is not None else True,
                                                 limits=_LIMITS)
            base = address.rstrip("/")
        else:
            raise ControlInputError("address", f"{address!r}: give unix:/PATH or http(s)://HOST:PORT")
        return httpx.AsyncClient(transport=transport, base_url=base, timeout=self._timeout,
                                 headers={"Authorization": f"Bearer {self._token}"})

    @classmethod
    async def from_store(cls, store: Store, *, token: str, tls: ClientTLS | None = None, timeout: float = 30.0,
                         follow_leader: bool = True) -> ManagerClient:
        """A client of the manager that leads now, found in the store's leader record (raises
        :class:`ApiUnavailableError` when none leads). It keeps ``store`` to find the next one."""
        info = await find_leader(store)
        if info is None:
            raise ApiUnavailableError(0, "no manager leads (no leader record in the store)")
        return cls(info.address, token, timeout=timeout, tls=tls, follow_leader=follow_leader, store=store)

    async def __aenter__(self) -> ManagerClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        await self._http.aclose()

    async def _move(self, seen: str, address: str) -> bool:
        """Point the client at ``address`` (if it still points at ``seen``); whether it moved."""
        async with self._switch:
            if self.address != seen:
                return True                    # another request moved it already
            if address == seen:
                return False
            new = self._connect(address)
            old, self._http, self.address = self._http, new, address
            self.followed += 1
        await old.aclose()
        return True

    async def _send(self, method: str, path: str, json: Any, params: dict[str, Any] | None,
                    content: bytes | None = None) -> httpx.Response:
        http, address = self._http, self.address
        try:
            return await http.request(method, path, json=json, params=params, content=content)
        except httpx.HTTPError as e:
            if isinstance(e, httpx.ConnectError) and self.store is not None:
                info = await find_leader(self.store)
                if info is not None and await self._move(address, info.address):
                    try:
                        return await self._http.request(method, path, json=json, params=params, content=content)
                    except httpx.HTTPError as e2:
                        raise ApiUnavailableError(0, f"manager at {self.address} unreachable: {e2!r}") from e2
            raise ApiUnavailableError(0, f"manager at {address} unreachable: {e!r}") from e

    async def raw(self, method: str, path: str, *, json: Any = None, params: dict[str, Any] | None = None,
                  content: bytes | None = None) -> bytes:
        """The answer's body (bytes); an error status raises the matching ApiError. ``content``: a
        raw request body (instead of ``json``)."""
        for attempt in (0, 1):
            address = self.address
            r = await self._send(method, path, json, params, content)
            if r.status_code < 400:
                return r.content
            try:
                body: Any = r.json()
            except ValueError:
                body = r.text
            err = api_error(r.status_code, body)
            if (attempt == 0 and self.follow_leader and isinstance(err, ApiNotLeaderError) and err.retry_safe
                    and err.leader is not None and isinstance(err.leader.get("address"), str)):
                try:
                    moved = await self._move(address, err.leader["address"])
                except ControlInputError as e:
                    raise err from e
                if moved:
                    continue
            raise err
        raise AssertionError("unreachable")

    async def request(self, method: str, path: str, *, json: Any = None,
                      params: dict[str, Any] | None = None) -> Any:
        """The answer's JSON (``None`` for 204); an error status raises the matching ApiError."""
        content = await self.raw(method, path, json=json, params=params)
        return jsonlib.loads(content) if content else None

    async def _page(self, path: str, cls: type[Any], limit: int, after: str | None) -> Any:
        params: dict[str, Any] = {"limit": limit}
        if after is not None:
            params["after"] = after
        page = parse(cls, await self.raw("GET", path, params=params))    # one validation for the whole page
        return page.items, page.after, page.remaining

    async def _iter(self, path: str, cls: type[Any], page: int) -> AsyncIterator[Any]:
        after: str | None = None
        while True:
            items, after, _ = await self._page(path, cls, page, after)
            for x in items:
                yield x
            if after is None:
                return

    # -- manager ------------------------------------------------------------------------------
    async def health(self) -> dict[str, Any]:
        out: dict[str, Any] = await self.request("GET", "/v1/health")
        return out

    # -- hosts --------------------------------------------------------------------------------
    async def add_host(self, host: HostCreate) -> HostRecord:
        return parse(HostRecord, await self.request("POST", "/v1/hosts", json=as_dict(host)))

    async def get_host(self, name: str) -> HostRecord:
        return parse(HostRecord, await self.raw("GET", f"/v1/hosts/{name}"))

    async def list_hosts(self, limit: int = 100, after: str | None = None) -> Page[HostRecord]:
        return await self._page("/v1/hosts", HostPage, limit, after)

    def iter_hosts(self, page: int = 500) -> AsyncIterator[HostRecord]:
        return self._iter("/v1/hosts", HostPage, page)

    async def remove_host(self, name: str) -> None:
        await self.request("DELETE", f"/v1/hosts/{name}")

    # -- VMs ----------------------------------------------------------------------------------
    async def define_vm(self, vm: VMDefine) -> tuple[VMRecord, OperationRecord]:
        d = parse(Defined, await self.raw("POST", "/v1/vms", json=as_dict(vm)))
        return d.vm, d.operation

    async def get_vm(self, name: str) -> VMRecord:
        return parse(VMRecord, await self.raw("GET", f"/v1/vms/{name}"))

    async def list_vms(self, limit: int = 100, after: str | None = None) -> Page[VMRecord]:
        return await self._page("/v1/vms", VMPage, limit, after)

    def iter_vms(self, page: int = 500) -> AsyncIterator[VMRecord]:
        return self._iter("/v1/vms", VMPage, page)

    async def undefine_vm(self, name: str) -> OperationRecord:
        return parse(Done, await self.raw("DELETE", f"/v1/vms/{name}")).operation

    async def start_vm(self, name: str) -> OperationRecord:
        """Start the VM on its host; returns the succeeded operation (ApiConflictError when refused,
        ApiFailedError naming the operation when it failed)."""
        return parse(Done, await self.raw("POST", f"/v1/vms/{name}/start")).operation

    async def stop_vm(self, name: str, timeout: float = 60.0) -> OperationRecord:
        return parse(Done, await self.raw("POST", f"/v1/vms/{name}/stop", json={"timeout": timeout})).operation

    async def destroy_vm(self, name: str) -> OperationRecord:
        return parse(Done, await self.raw("POST", f"/v1/vms/{name}/destroy")).operation

    async def migrate_vm(self, name: str, req: MigrateRequest) -> OperationRecord:
        """Start a live migration; returns the running operation (follow it with get_op/progress)."""
        return parse(Done, await self.raw("POST", f"/v1/vms/{name}/migrate", json=as_dict(req))).operation

    async def exec_vm(self, name: str, req: ExecRequest) -> ExecResult:
        return parse(ExecResult, await self.raw("POST", f"/v1/vms/{name}/exec", json=as_dict(req)))

    async def progress(self, op_id: str) -> Progress:
        return parse(Progress, await self.raw("GET", f"/v1/operations/{op_id}/progress"))

    async def wait_op(self, op_id: str, timeout: float = 600.0, poll: float = 0.25) -> OperationRecord:
        """Poll an operation until it is terminal (TimeoutError after ``timeout``)."""
        deadline = time.monotonic() + timeout
        while True:
            op = await self.get_op(op_id)
            if op.terminal:
                return op
            if time.monotonic() > deadline:
                raise TimeoutError(f"operation {op_id} still {op.state.value} after {timeout:g} s")
            await asyncio.sleep(poll)

    async def placement(self) -> PlacementCheck:
        return parse(PlacementCheck, await self.raw("GET", "/v1/placement"))

    # -- placement ----------------------------------------------------------------------------
    async def add_group(self, g: GroupRecord) -> GroupRecord:
        return parse(GroupRecord, await self.request("POST", "/v1/groups", json=as_dict(g)))

    async def get_group(self, name: str) -> GroupRecord:
        return parse(GroupRecord, await self.request("GET", f"/v1/groups/{name}"))

    async def list_groups(self, limit: int = 100, after: str | None = None) -> Page[GroupRecord]:
        return await self._page("/v1/groups", GroupPage, limit, after)

    async def remove_group(self, name: str) -> None:
        await self.request("DELETE", f"/v1/groups/{name}")

    async def add_rule(self, r: RuleCreate) -> RuleRecord:
        return parse(RuleRecord, await self.request("POST", "/v1/rules", json=as_dict(r)))

    async def get_rule(self, name: str) -> RuleRecord:
        return parse(RuleRecord, await self.request("GET", f"/v1/rules/{name}"))

    async def list_rules(self, limit: int = 100, after: str | None = None) -> Page[RuleRecord]:
        return await self._page("/v1/rules", RulePage, limit, after)

    async def remove_rule(self, name: str) -> None:
        await self.request("DELETE", f"/v1/rules/{name}")

    async def add_reservation(self, r: ReservationRecord) -> ReservationRecord:
        return parse(ReservationRecord, await self.request("POST", "/v1/reservations", json=as_dict(r)))

    async def reservation(self, datacenter: str | None = None, management_vcpus: int = 0,
                          management_memory_mib: int = 0) -> ReservationReport:
        """The failover reservation sized for the protected VMs (``GET /v1/reservation``)."""
        params: dict[str, Any] = {"management_vcpus": management_vcpus, "management_memory_mib": management_memory_mib}
        if datacenter is not None:
            params["datacenter"] = datacenter
        return parse(ReservationReport, await self.request("GET", "/v1/reservation", params=params))

    async def ha(self) -> HAReport:
        """The HA controller's host verdicts and events (``GET /v1/ha``)."""
        return parse(HAReport, await self.request("GET", "/v1/ha"))

    # -- operations ---------------------------------------------------------------------------
    async def list_ops(self, limit: int = 100, after: str | None = None) -> Page[OperationRecord]:
        return await self._page("/v1/operations", OperationPage, limit, after)

    async def get_op(self, op_id: str) -> OperationRecord:
        return parse(OperationRecord, await self.raw("GET", f"/v1/operations/{op_id}"))

    # -- guest operations of provider drivers (hvsim.control.guestops) ---------------------------------
    async def pause_vm(self, name: str) -> None:
        """Pause the VM's QEMU (not a recorded operation)."""
        await self.raw("POST", f"/v1/vms/{name}/pause")

    async def resume_vm(self, name: str) -> None:
        """Resume the VM's paused QEMU (not a recorded operation)."""
        await self.raw("POST", f"/v1/vms/{name}/resume")

    # -- the inter-cloud network and clones (hvsim.control.wanops) --------------------------------------
    async def vm_address(self, name: str) -> GuestAddressInfo:
        """The VM's address on the inter-cloud network."""
        return parse(GuestAddressInfo, await self.raw("GET", f"/v1/vms/{name}/address"))

    async def clone_vm(self, name: str, clone: str) -> tuple[VMRecord, OperationRecord]:
        """A copy-on-write clone of running VM ``name``, defined shut off on an isolated network."""
        d = parse(Defined, await self.raw("POST", f"/v1/vms/{name}/clone", json={"name": clone}))
        return d.vm, d.operation

    async def runstate(self, name: str) -> RunState:
        """The VM's QEMU runstate (``paused`` while paused: the record's power stays ``running``)."""
        return parse(RunState, await self.raw("GET", f"/v1/vms/{name}/runstate"))

    async def write_file(self, name: str, path: str, data: bytes, mode: int = 0o600,
                         sha256: str | None = None) -> GuestFile:
        """Write ``data`` to ``path`` in the running VM's guest (checked by SHA-256 there;
        ``sha256``: the data's, if the caller has it already)."""
        digest = sha256 if sha256 is not None else hashlib.sha256(data).hexdigest()
        return parse(GuestFile, await self.raw("PUT", f"/v1/vms/{name}/files", content=data,
                                               params={"path": path, "mode": f"{mode:04o}", "sha256": digest}))

    async def route_service(self, name: str) -> ServiceAddress:
        """Route the inter-cloud network's service address to the VM."""
        return parse(ServiceAddress, await self.raw("POST", f"/v1/vms/{name}/service-address"))

    @contextlib.asynccontextmanager
    async def stream_post(self, path: str, body: Any) -> AsyncIterator[httpx.Response]:
        """POST ``body`` and hand over the answer unread (no read timeout), for a streamed route;
        an error status raises the matching ApiError. Leaving the block closes the connection."""
        req = self._http.build_request("POST", path, json=body,
                                       timeout=httpx.Timeout(self._http.timeout.connect or 30.0, read=None))
        try:
            r = await self._http.send(req, stream=True)
        except httpx.HTTPError as e:
            raise ApiUnavailableError(0, f"manager at {self.address} unreachable: {e!r}") from e
        try:
            if r.status_code >= 400:
                raise api_error_from_raw(r.status_code, await r.aread())
            yield r
        finally:
            await r.aclose()
