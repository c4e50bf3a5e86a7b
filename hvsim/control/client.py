"""Async typed client of the manager API (httpx), raising errors of the hvsim tree::

    async with ManagerClient("unix:/run/hvsim/manager.sock", token) as m:   # or "http://127.0.0.1:8080"
        await m.add_host(HostCreate("h1", vcpus=8, memory_mib=16384))
        vm, op = await m.define_vm(VMDefine("web-1", memory_mib=512, host="h1"))
        async for vm in m.iter_vms(): ...

4xx answers raise :class:`ApiInputError` (400/413/422, also an ``InputError``; ``field`` names the
field), :class:`ApiAuthError` (401/403), :class:`ApiNotFoundError`, :class:`ApiConflictError`,
:class:`ApiNotImplementedError` (501), :class:`ApiFailedError` (502: an operation ran and failed; its
``operation`` names it); an unreachable manager, one that is not the leader, or another 5xx raises
:class:`ApiUnavailableError`. The cause is kept.
"""
from __future__ import annotations

import asyncio
import contextlib
import json as jsonlib
import ssl
import time
from collections.abc import AsyncIterator
from typing import Any, TypeVar

import httpx

from .errors import (
    ApiAuthError, ApiConflictError, ApiError, ApiFailedError, ApiInputError, ApiNotFoundError,
    ApiNotImplementedError, ApiUnavailableError, ControlInputError,
)
from .ops import OperationRecord
from .schema import (
    Defined, Done, ExecRequest, ExecResult, GroupPage, HostCreate, HostPage, MigrateRequest, OperationPage,
    PlacementCheck, Progress, RuleCreate, RulePage, VMDefine, VMPage,
)
from .state import GroupRecord, HostRecord, ReservationRecord, RuleRecord, VMRecord, as_dict, parse

T = TypeVar("T")
_LIMITS = httpx.Limits(max_connections=64, max_keepalive_connections=32, keepalive_expiry=30.0)
#: (items, cursor for the next page or None, records from this page on: all of them on the first page)
Page = tuple[list[T], str | None, int]


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
        cls = ApiConflictError
    elif status == 501:
        cls = ApiNotImplementedError
    elif status == 502:
        cls = ApiFailedError
    elif status >= 500:
        cls = ApiUnavailableError
    else:
        cls = ApiError
    return cls(status, msg, field, body)


class ManagerClient:
    """A connection pool to one manager. ``address``: ``unix:/PATH`` or ``http(s)://HOST:PORT``."""

    def __init__(self, address: str, token: str, *, timeout: float = 30.0,
                 ssl_context: ssl.SSLContext | None = None) -> None:
        if not isinstance(address, str) or not address:
            raise ControlInputError("address", "give unix:/PATH or http(s)://HOST:PORT")
        if address.startswith("unix:"):
            path = address[len("unix:"):]
            if not path.startswith("/"):
                raise ControlInputError("address", f"{address!r}: the socket path must be absolute")
            transport = httpx.AsyncHTTPTransport(uds=path, limits=_LIMITS)
            base = "http://manager"
        elif address.startswith(("http://", "https://")):
            transport = httpx.AsyncHTTPTransport(verify=ssl_context if ssl_context is not None else True,
                                                 limits=_LIMITS)
            base = address.rstrip("/")
        else:
            raise ControlInputError("address", f"{address!r}: give unix:/PATH or http(s)://HOST:PORT")
        self.address = address
        self._http = httpx.AsyncClient(transport=transport, base_url=base, timeout=timeout,
                                       headers={"Authorization": f"Bearer {token}"})
        # idle connections are dropped after 30 s, before the manager's 75 s keep-alive timeout

    async def __aenter__(self) -> ManagerClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        await self._http.aclose()

    async def raw(self, method: str, path: str, *, json: Any = None, params: dict[str, Any] | None = None) -> bytes:
        """The answer's body (bytes); an error status raises the matching ApiError."""
        try:
            r = await self._http.request(method, path, json=json, params=params)
        except httpx.HTTPError as e:
            raise ApiUnavailableError(0, f"manager at {self.address} unreachable: {e!r}") from e
        if r.status_code >= 400:
            try:
                body: Any = r.json()
            except ValueError:
                body = r.text
            raise api_error(r.status_code, body)
        return r.content

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
                raw = await r.aread()
                try:
                    err: Any = jsonlib.loads(raw)
                except ValueError:
                    err = raw.decode(errors="replace")
                raise api_error(r.status_code, err)
            yield r
        finally:
            await r.aclose()
