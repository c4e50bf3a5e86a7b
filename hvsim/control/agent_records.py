"""What a host agent keeps on its own disk, so that a restarted agent re-adopts its guests and still
refuses stale managers: the newest fencing token seen, one record per VM it runs (its spec, the
instance directory holding the QEMU's QMP, agent and heartbeat sockets, pid and start time, the
components' re-attach records) and one per incoming migration. Like libvirtd's status XML under
``/run/libvirt/qemu``: the host's own truth, nothing shared with the manager.

Layout (``state_dir``, 0700; every file 0600, written atomically: temp file, fsync, rename, fsync
of the directory)::

    fence.json            {"token": N}
    vms/<vm>.json         LocalVM
    incoming/<vm>.json    LocalIncoming
    service.json          {"vm": NAME}: the VM this host routed the inter-cloud service address to

A VM on the inter-cloud network has its /30 in its record (``wan_subnet``, written with the record
before its QEMU starts): the guest was configured with that address, so a restarted agent gives it
exactly that one again rather than derive addresses anew.
"""
from __future__ import annotations

import json
import logging
import os
import threading
from pathlib import Path
from typing import Any, TypeVar

from pydantic import Field
from pydantic.dataclasses import dataclass

from hvsim.core.model import NAME_RE

from .agentrpc import GuestSpec
from .errors import ControlError
from .state import CFG, dump, parse

log = logging.getLogger("hvsim.control.agent")
R = TypeVar("R")


class RecordError(ControlError):
    """The agent's state directory cannot be read or written."""


@dataclass(config=CFG)
class LocalVM:
    spec: GuestSpec
    instance_dir: str
    pid: int | None = None
    start_time: str = ""
    generation: int = 0
    components: dict[str, dict[str, Any]] = Field(default_factory=dict)
    wan_subnet: str | None = None         # its /30 on the inter-cloud network (hvsim.crosscloud.network)


@dataclass(config=CFG)
class LocalIncoming:
    migration_id: str
    spec: GuestSpec
    source: str
    instance_dir: str
    pid: int | None = None
    start_time: str = ""
    wan_subnet: str | None = None


def write_atomic(path: Path, data: bytes) -> None:
    # a name of its own per writer: two threads writing one record (the agent's fenced calls run in
    # its RPC's thread pool) must not rename each other's temporary file away
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    dfd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


class AgentRecords:
    def __init__(self, state_dir: Path) -> None:
        self.dir = Path(state_dir)
        try:
            for d in (self.dir, self.dir / "vms", self.dir / "incoming"):
                d.mkdir(mode=0o700, parents=True, exist_ok=True)
                os.chmod(d, 0o700)
        except OSError as e:
            raise RecordError(f"cannot use state directory {self.dir}: {e}") from e
        self._token = self._read_token()
        self._token_lock = threading.Lock()

    # -- fencing ---------------------------------------------------------------------------------
    def _read_token(self) -> int:
        p = self.dir / "fence.json"
        try:
            data = json.loads(p.read_bytes())
            token = data["token"]
        except FileNotFoundError:
            return 0
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise RecordError(f"{p} is unreadable ({e}); refusing to guess the newest fencing token") from e
        if not isinstance(token, int) or isinstance(token, bool) or token < 0:
            raise RecordError(f"{p}: token {token!r} is not a non-negative integer")
        return token

    @property
    def token(self) -> int:
        return self._token

    def set_token(self, token: int) -> None:
        """Remember ``token`` as the newest (on disk before it is used); never goes back (calls
        racing from several threads keep the largest)."""
        with self._token_lock:
            if token <= self._token:
                return
            write_atomic(self.dir / "fence.json", json.dumps({"token": token}).encode())
            self._token = token

    # -- VMs and incoming migrations -------------------------------------------------------------
    def _path(self, kind: str, name: str) -> Path:
        if not NAME_RE.match(name):
            raise RecordError(f"bad record name {name!r}")
        return self.dir / kind / f"{name}.json"

    def _all(self, kind: str, cls: type[R]) -> dict[str, R]:
        out: dict[str, R] = {}
        for p in sorted((self.dir / kind).glob("*.json")):
            try:
                out[p.stem] = parse(cls, p.read_bytes())
            except (OSError, ControlError) as e:
                log.error("ignoring unreadable record %s: %s", p, e)
        return out

    def vms(self) -> dict[str, LocalVM]:
        return self._all("vms", LocalVM)

    def put_vm(self, rec: LocalVM) -> None:
        write_atomic(self._path("vms", rec.spec.name), dump(rec))

    def delete_vm(self, name: str) -> None:
        self._path("vms", name).unlink(missing_ok=True)

    def incoming(self) -> dict[str, LocalIncoming]:
        return self._all("incoming", LocalIncoming)

    def put_incoming(self, rec: LocalIncoming) -> None:
        write_atomic(self._path("incoming", rec.spec.name), dump(rec))

    def delete_incoming(self, name: str) -> None:
        self._path("incoming", name).unlink(missing_ok=True)

    # -- the inter-cloud service address ---------------------------------------------------------
    def service(self) -> str | None:
        """The VM this host routed the service address to (None: none, or an unreadable record)."""
        p = self.dir / "service.json"
        try:
            vm = json.loads(p.read_bytes()).get("vm")
        except FileNotFoundError:
            return None
        except (OSError, ValueError, AttributeError) as e:
            log.error("ignoring unreadable record %s: %s", p, e)
            return None
        return vm if isinstance(vm, str) and NAME_RE.match(vm) else None

    def set_service(self, vm: str | None) -> None:
        p = self.dir / "service.json"
        if vm is None:
            p.unlink(missing_ok=True)
            return
        if not NAME_RE.match(vm):
            raise RecordError(f"bad record name {vm!r}")
        write_atomic(p, json.dumps({"vm": vm}).encode())
