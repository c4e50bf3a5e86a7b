"""Async client of a host agent's RPC (httpx), used by the manager and by a source agent driving a
migration to another agent. ``unix:/PATH`` on the same machine (the socket must be ours and 0600),
``https://IP:PORT`` across machines with mutual TLS (our client certificate; the agent's server
certificate must be signed by the same CA and name that IP). Errors are the API's tree
(:func:`hvsim.control.client.api_error`): 400/422 :class:`ApiInputError`, 404, 409
:class:`ApiConflictError` (refused: state, capacity, busy, a stale fencing token), 502
:class:`ApiFailedError` (the operation ran and failed), unreachable or 5xx
:class:`ApiUnavailableError`."""
from __future__ import annotations

import contextlib
import os
import stat
from collections.abc import AsyncIterator, Callable
from typing import Any, TypeVar

import httpx

from .agentrpc import (
    FENCE_HEADER, FENCE_UNTIL_HEADER, AgentInfo, ExecBody, ExecOutput, HistoryPage, IncomingRequest, ListenRequest,
    Listening, MigrateOut, MigrationInfo, Ok, QemuInfo, QemuList, StartRequest, StopRequest,
)
from .client import api_error, api_error_from_raw
from .errors import ApiFencedError, ApiUnavailableError, ControlInputError
from .pki import ClientTLS
from .state import as_dict, parse

T = TypeVar("T")
_LIMITS = httpx.Limits(max_connections=16, max_keepalive_connections=8, keepalive_expiry=30.0)


def check_agent_socket(path: str) -> None:
    """A unix socket we may talk to: absolute, a socket, owned by us, 0600 (not group/world)."""
    if not path.startswith("/"):
        raise ControlInputError("agent", f"{path!r}: the socket path must be absolute")
    try:
        st = os.stat(path)
    except OSError as e:
        raise ApiUnavailableError(0, f"host agent socket {path}: {e.strerror}") from e
    if not stat.S_ISSOCK(st.st_mode) or st.st_uid != os.getuid() or stat.S_IMODE(st.st_mode) & 0o077:
        raise ControlInputError("agent", f"{path} is not a 0600 socket of ours: refusing to talk to it")


class AgentClient:
    """Connections to one host agent. ``address``: ``unix:/PATH`` or ``https://IP:PORT``.

    ``fence_until``: called right before each fenced call is sent, the caller's lease deadline
    (wall clock) for ``X-Fencing-Until``, or raises if the caller must not act any more (then
    nothing is sent). ``on_fenced``: called when the agent refused our token (a newer manager)."""

    def __init__(self, address: str, *, tls: ClientTLS | None = None, timeout: float = 30.0,
                 fence_until: Callable[[], float | None] | None = None,
                 on_fenced: Callable[[ApiFencedError], None] | None = None) -> None:
        self.fence_until = fence_until
        self.on_fenced = on_fenced
        if not isinstance(address, str):
            raise ControlInputError("agent", "give unix:/PATH or https://IP:PORT")
        self._socket: str | None = None
        if address.startswith("unix:"):
            self._socket = address[len("unix:"):]
            if not self._socket.startswith("/"):
                raise ControlInputError("agent", f"{address!r}: the socket path must be absolute")
            transport = httpx.AsyncHTTPTransport(uds=self._socket, limits=_LIMITS)
            base = "http://agent"
        elif address.startswith("https://"):
            if tls is None:
                raise ControlInputError("agent", f"{address!r}: an https agent needs client TLS files (CA, cert, key)")
            transport = httpx.AsyncHTTPTransport(verify=tls.context(), limits=_LIMITS)
            base = address.rstrip("/")
        else:
            raise ControlInputError("agent", f"{address!r}: give unix:/PATH or https://IP:PORT")
        self.address = address
        self.timeout = timeout
        self._http = httpx.AsyncClient(transport=transport, base_url=base, timeout=timeout)

    async def __aenter__(self) -> AgentClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        await self._http.aclose()

    async def _call(self, method: str, path: str, cls: type[T], *, json: Any = None, token: int | None = None,
                    timeout: float | None = None, params: dict[str, Any] | None = None,
                    content: bytes | None = None) -> T:
        if self._socket is not None:
            check_agent_socket(self._socket)
        headers = None
        if token is not None:
            headers = {FENCE_HEADER: str(token)}
            until = self.fence_until() if self.fence_until is not None else None
            if until is not None:
                headers[FENCE_UNTIL_HEADER] = f"{until:.6f}"
        try:
            r = await self._http.request(method, path, json=json, headers=headers, params=params, content=content,
                                         timeout=timeout if timeout is not None else self.timeout)
        except httpx.HTTPError as e:
            raise ApiUnavailableError(0, f"host agent at {self.address} unreachable: {e!r}") from e
        if r.status_code >= 400:
            try:
                body: Any = r.json()
            except ValueError:
                body = r.text
            err = api_error(r.status_code, body)
            if isinstance(err, ApiFencedError) and self.on_fenced is not None:
                self.on_fenced(err)
            raise err
        return parse(cls, r.content)

    # -- reads ------------------------------------------------------------------------------------
    async def info(self, timeout: float | None = None) -> AgentInfo:
        return await self._call("GET", "/v1/agent", AgentInfo, timeout=timeout)

    async def qemus(self, timeout: float | None = None) -> QemuList:
        return await self._call("GET", "/v1/qemus", QemuList, timeout=timeout)

    async def vm(self, name: str) -> QemuInfo:
        return await self._call("GET", f"/v1/vms/{name}", QemuInfo)

    async def migration(self, name: str) -> MigrationInfo:
        return await self._call("GET", f"/v1/vms/{name}/migration", MigrationInfo)

    async def history(self, since: int = 0, limit: int = 1000, timeout: float | None = None) -> HistoryPage:
        """Mutating commands the agent received after ``since`` (accepted or refused)."""
        return await self._call("GET", "/v1/history", HistoryPage, params={"since": since, "limit": limit},
                                timeout=timeout)

    async def stats(self, name: str) -> dict[str, Any]:
        out: dict[str, Any] = await self._call("GET", f"/v1/vms/{name}/stats", dict)
        return out

    # -- lifecycle (fenced) -------------------------------------------------------------------------
    async def announce(self, token: int, timeout: float | None = None) -> Ok:
        """Tell the agent our token is the newest (a manager that took the lease): older ones are refused."""
        return await self._call("POST", "/v1/fence", Ok, token=token, timeout=timeout)

    async def start(self, req: StartRequest, token: int) -> QemuInfo:
        return await self._call("POST", "/v1/vms", QemuInfo, json=as_dict(req), token=token,
                                timeout=req.ready_timeout + 60)

    async def stop(self, name: str, req: StopRequest, token: int) -> Ok:
        return await self._call("POST", f"/v1/vms/{name}/stop", Ok, json=as_dict(req), token=token,
                                timeout=req.timeout + 30)

    async def destroy(self, name: str, token: int) -> Ok:
        return await self._call("POST", f"/v1/vms/{name}/destroy", Ok, token=token, timeout=60)

    async def resume(self, name: str, token: int) -> Ok:
        return await self._call("POST", f"/v1/vms/{name}/resume", Ok, token=token)

    async def exec(self, name: str, req: ExecBody, token: int) -> ExecOutput:
        return await self._call("POST", f"/v1/vms/{name}/exec", ExecOutput, json=as_dict(req), token=token,
                                timeout=req.timeout + 30)

    async def migrate(self, name: str, req: MigrateOut, token: int) -> MigrationInfo:
        return await self._call("POST", f"/v1/vms/{name}/migrate", MigrationInfo, json=as_dict(req), token=token)

    async def cancel_migration(self, name: str, token: int) -> Ok:
        return await self._call("POST", f"/v1/vms/{name}/migration/cancel", Ok, token=token)

    # -- incoming migrations (called by the source agent, fenced with the manager's token) ------------
    async def incoming(self, req: IncomingRequest, token: int) -> QemuInfo:
        return await self._call("POST", "/v1/incoming", QemuInfo, json=as_dict(req), token=token, timeout=90)

    async def incoming_listen(self, vm: str, req: ListenRequest, token: int) -> Listening:
        return await self._call("POST", f"/v1/incoming/{vm}/listen", Listening, json=as_dict(req), token=token)

    async def incoming_finish(self, vm: str, token: int, *, paused_ok: bool = False) -> QemuInfo:
        return await self._call("POST", f"/v1/incoming/{vm}/finish", QemuInfo, token=token, timeout=90,
                                params={"paused_ok": "true" if paused_ok else "false"})

    async def incoming_discard(self, vm: str, token: int) -> Ok:
        return await self._call("DELETE", f"/v1/incoming/{vm}", Ok, token=token, timeout=60)

    # -- used by hvsim.control.guestops (pause, streamed exec) -------------------------------------
    async def post_ok(self, path: str, token: int) -> Ok:
        return await self._call("POST", path, Ok, token=token)

    async def call(self, method: str, path: str, cls: type[T], *, json: Any = None, token: int | None = None,
                   params: dict[str, Any] | None = None, content: bytes | None = None,
                   timeout: float | None = None) -> T:
        """Any route of the agent's RPC (routes added beside the core ones: :mod:`.wanops`,
        :mod:`.fileops`); ``content``: a raw request body instead of ``json``."""
        return await self._call(method, path, cls, json=json, token=token, params=params, content=content,
                                timeout=timeout)

    @contextlib.asynccontextmanager
    async def stream_lines(self, path: str, body: Any, token: int) -> AsyncIterator[AsyncIterator[str]]:
        """POST ``body`` and iterate the answer's lines as they arrive (no read timeout: a guest
        command may be quiet for long); an error status raises the matching ApiError."""
        if self._socket is not None:
            check_agent_socket(self._socket)
        req = self._http.build_request("POST", path, json=body, headers={FENCE_HEADER: str(token)},
                                       timeout=httpx.Timeout(self.timeout, read=None))
        try:
            r = await self._http.send(req, stream=True)
        except httpx.HTTPError as e:
            raise ApiUnavailableError(0, f"host agent at {self.address} unreachable: {e!r}") from e
        try:
            if r.status_code >= 400:
                raise api_error_from_raw(r.status_code, await r.aread())
            yield r.aiter_lines()
        finally:
            await r.aclose()
