"""A provider driver over the hvsim manager's HTTP API: one manager per cloud, reached at its own
address with its own bearer token, the way a migration tool reaches EC2 or vSphere.

Everything goes through :class:`~hvsim.control.client.ManagerClient`: an instance is a VM record
defined with the cloud's instance profile (machine type, CPU model, disk bus, NIC model:
``VMDefine.profile``), a data disk (``disk_mib``, created raw in the cloud's datastore, or filled
from an image: ``data_image``, a path inside the manager's import directory, :mod:`hvsim.control.imports`)
and a NIC on the inter-cloud network (``network: "wan"``, or ``"isolated"``), started by the manager
on the host its placement chooses, the host agent giving the guest its routed /30 on the WAN
(:mod:`hvsim.control.wanops`, over :class:`~hvsim.crosscloud.network.WanNetwork`). Exec, the
streamed exec that runs the migration agents and the writer (``POST /v1/vms/{name}/exec-stream``),
pause and resume (:mod:`hvsim.control.guestops`), the guest's WAN address
(``GET /v1/vms/{name}/address``), the copy-on-write clone of a test cutover
(``POST /v1/vms/{name}/clone``: the running VM's disk snapshotted on its host, the clone defined
there with an isolated NIC and a qcow2 overlay on the frozen image) and the service-address move
(``POST /v1/vms/{name}/service-address``) are API calls too, so a whole
:class:`~hvsim.crosscloud.orchestrator.CrossCloudMigration` runs between two managers
(tests/hil/crosscloud/test_managers.py).

Refusals come before anything is created: bad credentials (401 on the first call:
:class:`CredentialsError`), no host with room for the instance (:class:`NoCapacityError`, from the
manager's host records and the VMs defined on them, the way its placement counts), an instance
whose guest agent does not answer (:class:`NoAgentChannelError`), a data disk outside the import
directory (:class:`~hvsim.crosscloud.errors.CrossCloudInputError`, here; the manager and the host
agent refuse it again). What the manager refuses (a VM without a WAN NIC asked for its address, an
isolated one for the service address) is :class:`ProviderRefusedError` with the manager's reason.
:class:`~hvsim.crosscloud.provider.InProcessProvider` remains the driver of the library mode.
"""
from __future__ import annotations

import base64
import hashlib
import json
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from ..control.client import ManagerClient
from ..control.errors import ApiAuthError, ApiConflictError, ApiError, ApiInputError, ApiNotFoundError
from ..control.schema import ExecRequest, VMDefine
from ..control.state import InstanceProfile, VMPower
from ..core.agent import Chunk, ExecResult, collect_stream
from ..core.errors import AgentError
from ..core.model import DiskSpec, VMSpec
from .errors import CredentialsError, CrossCloudError, CrossCloudInputError, NoAgentChannelError, NoCapacityError
from .network import ISOLATED, WAN
from .profiles import ProviderProfile

log = logging.getLogger("hvsim.crosscloud.manager")
PUSH_CHUNK = 3000            # base64 bytes per command: the manager's exec takes commands of <= 4096 chars
PUSH_PARALLEL = 6           # exec calls of one push in flight at once (each a round trip to the guest)
STATE = {VMPower.RUNNING: "running", VMPower.PAUSED: "paused", VMPower.SHUTOFF: "shutoff",
         VMPower.MIGRATING: "migrating", VMPower.CRASHED: "crashed"}


class ProviderRefusedError(CrossCloudError):
    """The cloud's API refused the request (its reason in the message)."""


class ManagerExecStream:
    """The manager's streamed exec seen as :class:`hvsim.core.agent.ExecStream` (what
    :class:`~hvsim.crosscloud.guestproc.GuestProcess` and ``verify_records`` use): ``async with``,
    ``async for chunk``, ``result`` after the last chunk, ``collect()``. Leaving the block closes
    the connection: the manager and the host agent close theirs, the guest kills the command."""

    def __init__(self, client: ManagerClient, vm: str, command: str, timeout: float | None) -> None:
        self.client = client
        self.vm = vm
        self.command = command
        self.timeout = timeout
        self.result: ExecResult | None = None
        self._cm: Any = None
        self._resp: httpx.Response | None = None

    async def __aenter__(self) -> ManagerExecStream:
        body = {"command": self.command, "timeout": self.timeout}
        self._cm = self.client.stream_post(f"/v1/vms/{self.vm}/exec-stream", body)
        try:
            self._resp = await self._cm.__aenter__()
        except ApiError as e:
            raise AgentError(f"vm {self.vm!r}: streamed exec refused: {e.detail}") from e
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._cm is not None:
            cm, self._cm = self._cm, None
            await cm.__aexit__(None, None, None)

    def __aiter__(self) -> AsyncIterator[Chunk]:
        return self._chunks()

    async def _chunks(self) -> AsyncIterator[Chunk]:
        assert self._resp is not None, "use `async with` first"
        try:
            async for line in self._resp.aiter_lines():
                if not line:
                    continue
                d = json.loads(line)
                if "data" in d:
                    fd = d.get("fd")
                    if fd not in (1, 2):
                        raise AgentError(f"vm {self.vm!r}: streamed exec sent fd {fd!r}")
                    yield Chunk(fd, base64.b64decode(d["data"], validate=True))
                elif "error" in d:
                    raise AgentError(f"vm {self.vm!r}: streamed exec failed: {d['error']}")
                elif "exit_code" in d:
                    code = d["exit_code"]
                    self.result = ExecResult(self.command, code if isinstance(code, int) else -1, "", "",
                                             int(d.get("signal") or 0), bool(d.get("timed_out")))
                    return
        except (httpx.HTTPError, ValueError) as e:
            raise AgentError(f"vm {self.vm!r}: streamed exec broke: {e!r}") from e
        raise AgentError(f"vm {self.vm!r}: streamed exec ended without an exit status")

    async def collect(self, limit: int | None = None) -> tuple[bytes, bytes]:
        return await collect_stream(self, self.command, limit)


@dataclass
class ManagerProvider:
    """A cloud run by an hvsim manager at ``address`` (``unix:/PATH`` or ``https://...``)."""
    cloud: str
    address: str
    profile: ProviderProfile
    timeout: float = 300.0
    import_dir: Path | None = None          # the manager's --import-dir: data disks are imported from in here
    network: str | None = WAN               # instances' NIC: on the inter-cloud network (None: no NIC)
    client: ManagerClient | None = field(default=None, repr=False)
    _credentials: str | None = field(default=None, repr=False)
    _retired: list[ManagerClient] = field(default_factory=list, repr=False)

    @property
    def api(self) -> str:
        return self.address

    async def authenticate(self, credentials: str) -> None:
        """Check ``credentials`` (any authenticated call: 401 if the token is wrong) and use them from
        now on. Streams opened before (a writer's, an agent's) keep their connection: a client that
        is replaced is closed only by :meth:`close`, and the same credentials keep the same client."""
        if self.client is not None and self._credentials == credentials:
            c = self.client
        else:
            c = ManagerClient(self.address, credentials, timeout=self.timeout)
        try:
            await c.list_hosts(limit=1)
        except ApiAuthError as e:
            if c is not self.client:
                await c.close()
            raise CredentialsError(f"cloud {self.cloud!r} ({self.address}) refused the credentials") from e
        except BaseException:
            if c is not self.client:
                await c.close()
            raise
        if c is not self.client:
            if self.client is not None:
                self._retired.append(self.client)
            self.client, self._credentials = c, credentials

    async def close(self) -> None:
        for c in [*self._retired, *([self.client] if self.client is not None else [])]:
            await c.close()
        self._retired.clear()
        self.client = None
        self._credentials = None

    def _c(self) -> ManagerClient:
        if self.client is None:
            raise CredentialsError(f"cloud {self.cloud!r}: not authenticated")
        return self.client

    def instance_profile(self) -> InstanceProfile:
        p = self.profile
        return InstanceProfile(machine=p.machine, cpu_model=p.cpu_model, disk_bus=p.disk_bus, nic_model=p.nic_model)

    async def describe(self, name: str) -> VMSpec:
        rec = await self._c().get_vm(name)
        p = rec.profile or InstanceProfile()
        disks = (DiskSpec("data", rec.disk_mib, bus=p.disk_bus),) if rec.disk_mib else ()
        return VMSpec(rec.name, vcpus=rec.vcpus, memory_mib=rec.memory_mib, disks=disks, machine=p.machine,
                      cpu_model=p.cpu_model)

    async def check_capacity(self, spec: VMSpec) -> None:
        """Some host of the cloud has room for ``spec`` (capacity x overcommit minus what the VMs
        defined there hold, as the manager's placement counts); NoCapacityError otherwise."""
        c = self._c()
        hosts = [h async for h in c.iter_hosts()]
        used: dict[str, tuple[int, int]] = {}
        async for v in c.iter_vms():
            if v.host is not None:
                cpu, mem = used.get(v.host, (0, 0))
                used[v.host] = (cpu + v.vcpus, mem + v.memory_mib)
        why = []
        for h in hosts:
            cpu, mem = used.get(h.name, (0, 0))
            free_cpu = int(h.vcpus * h.cpu_overcommit) - cpu
            free_mem = int(h.memory_mib * h.memory_overcommit) - mem
            if h.status.value == "up" and spec.vcpus <= free_cpu and spec.memory_mib <= free_mem:
                return
            why.append(f"{h.name} ({h.status.value}): {free_cpu} vCPUs, {free_mem} MiB free")
        raise NoCapacityError(f"cloud {self.cloud!r} has no capacity for a profile-{self.profile.name} instance of vm "
                              f"{spec.name!r} ({spec.vcpus} vCPUs, {spec.memory_mib} MiB): "
                              + ("; ".join(why) or "no hosts"))

    def image_path(self, data_disk: Path) -> str:
        """``data_disk`` as the API names it: relative to the manager's import directory."""
        if self.import_dir is None:
            raise CrossCloudInputError(f"cloud {self.cloud!r}: no import directory is known for this manager "
                                       f"(ManagerProvider.import_dir): {data_disk} cannot be imported")
        p = Path(data_disk)
        if p.is_absolute():
            try:
                p = p.resolve().relative_to(self.import_dir.resolve())
            except ValueError as e:
                raise CrossCloudInputError(f"cloud {self.cloud!r}: {data_disk} is not inside the import directory "
                                           f"{self.import_dir}") from e
        return p.as_posix()

    async def create_instance(self, spec: VMSpec, *, data_disk: Path | None = None, isolated: bool = False,
                              data_size_mib: int = 256) -> str:
        image = self.image_path(data_disk) if data_disk is not None else None
        await self.check_capacity(spec)
        network = ISOLATED if isolated else self.network
        try:
            await self._c().define_vm(VMDefine(name=spec.name, vcpus=spec.vcpus, memory_mib=spec.memory_mib,
                                               disk_mib=data_size_mib, profile=self.instance_profile(),
                                               network=network, data_image=image))
        except (ApiInputError, ApiConflictError) as e:
            raise ProviderRefusedError(f"cloud {self.cloud!r}: instance {spec.name!r} refused: {e.detail}") from e
        return spec.name

    async def start(self, name: str) -> None:
        await self._c().start_vm(name)

    async def pause(self, name: str) -> None:
        await self._c().pause_vm(name)

    async def resume(self, name: str) -> None:
        await self._c().resume_vm(name)

    async def delete(self, name: str) -> None:
        c = self._c()
        try:
            rec = await c.get_vm(name)
        except ApiNotFoundError:
            return
        if rec.power is not VMPower.SHUTOFF:
            await c.destroy_vm(name)
        await c.undefine_vm(name)

    async def exec(self, name: str, command: str, timeout: float = 60.0, check: bool = False) -> ExecResult:
        try:
            r = await self._c().exec_vm(name, ExecRequest(command=command, timeout=float(timeout)))
        except ApiError as e:
            raise AgentError(f"cloud {self.cloud!r}: exec in vm {name!r}: {e.detail}") from e
        res = ExecResult(command, r.exit_code, r.stdout, r.stderr, r.signal, r.timed_out, r.truncated)
        if check and res.exit_code != 0:
            raise AgentError(f"vm {name!r}: {command[:200]!r} exited {res.exit_code}: {res.stderr[-500:]}")
        return res

    def exec_stream(self, name: str, command: str, timeout: float | None = None) -> ManagerExecStream:
        return ManagerExecStream(self._c(), name, command, timeout)

    async def push_file(self, name: str, local: Path, remote: str, mode: int = 0o600) -> None:
        """``local`` into the guest at ``remote`` in one request (the manager's file route; the
        guest checks it by SHA-256 before it is moved into place)."""
        data = Path(local).read_bytes()
        digest = hashlib.sha256(data).hexdigest()
        try:
            w = await self._c().write_file(name, remote, data, mode, sha256=digest)
        except (ApiInputError, ApiConflictError, ApiNotFoundError) as e:
            raise ProviderRefusedError(f"cloud {self.cloud!r}: writing {remote} into vm {name!r} refused: "
                                       f"{e.detail}") from e
        if w.sha256 != digest or w.size != len(data):
            raise AgentError(f"vm {name!r}: pushed {remote} has SHA-256 {w.sha256[:64]!r} ({w.size} bytes), "
                             f"expected {digest} ({len(data)} bytes)")

    async def probe_agent(self, name: str) -> None:
        try:
            r = await self.exec(name, "echo hvsim-probe", timeout=5)
        except (AgentError, ApiConflictError) as exc:
            raise NoAgentChannelError(f"cloud {self.cloud!r}: vm {name!r} has no working guest-agent channel "
                                      f"({exc}); the migration agents cannot be installed") from exc
        if r.timed_out or "hvsim-probe" not in r.stdout:
            raise NoAgentChannelError(f"cloud {self.cloud!r}: vm {name!r}: the guest agent did not answer a probe "
                                      f"(exit {r.exit_code}, timed out {r.timed_out})")

    async def clone_for_test(self, name: str, clone: str) -> str:
        """A throw-away copy-on-write clone of running instance ``name`` on an isolated network
        (defined shut off; :meth:`start` boots it, :meth:`delete` discards it)."""
        try:
            rec, _ = await self._c().clone_vm(name, clone)
        except (ApiInputError, ApiConflictError, ApiNotFoundError) as e:
            raise ProviderRefusedError(f"cloud {self.cloud!r}: clone of vm {name!r} refused: {e.detail}") from e
        return rec.name

    async def route_service(self, name: str) -> None:
        """Route the service address to instance ``name`` (the cloud's elastic-IP move)."""
        try:
            await self._c().route_service(name)
        except (ApiInputError, ApiConflictError, ApiNotFoundError) as e:
            raise ProviderRefusedError(f"cloud {self.cloud!r}: service address to vm {name!r} refused: "
                                       f"{e.detail}") from e

    async def vm_state(self, name: str) -> str | None:
        """The record's power, except that a running record whose QEMU is paused is ``paused``
        (pause is not a recorded operation: asked of the manager's runstate route)."""
        try:
            rec = await self._c().get_vm(name)
        except ApiNotFoundError:
            return None
        if rec.power is VMPower.RUNNING:
            try:
                if (await self._c().runstate(name)).qemu_status == "paused":
                    return "paused"
            except (ApiConflictError, ApiNotFoundError):
                pass            # it stopped or went meanwhile: the record says what it was
        return STATE.get(rec.power, rec.power.value)

    async def guest_address(self, name: str) -> str:
        try:
            return (await self._c().vm_address(name)).ip
        except (ApiInputError, ApiConflictError, ApiNotFoundError) as e:
            raise ProviderRefusedError(f"cloud {self.cloud!r}: vm {name!r} has no address on the inter-cloud "
                                       f"network: {e.detail}") from e
