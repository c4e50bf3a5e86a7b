"""Provider drivers: how the orchestrator reaches a cloud, only through its API (as a migration tool
reaches EC2 or vSphere). :class:`ProviderDriver` is the interface; :class:`InProcessProvider` is
the implementation over an in-process :class:`~hvsim.core.cluster.Cluster` (one per cloud, with its
own credentials and API address ``inproc://<cloud>``). A driver over the hvsim manager's HTTP API
(one manager per cloud) is :class:`~hvsim.crosscloud.manager_provider.ManagerProvider`.

Every refusal comes before anything is created: an unknown cloud (:class:`UnknownProviderError`),
bad credentials (:class:`CredentialsError`), no capacity for the profile's instance
(:class:`NoCapacityError`), a guest whose agent channel does not answer (:class:`NoAgentChannelError`).
"""
from __future__ import annotations

import asyncio
import dataclasses
import hmac
import logging
import subprocess
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from ..core.agent import Chunk, ExecResult, ExecStream
from ..core.cluster import Cluster
from ..core.errors import AgentError, CapacityError, NotFoundError
from ..core.guestfile import write_guest_file
from ..core.model import DiskSpec, NicSpec, VMSpec
from ..core.vm import VM
from .errors import CredentialsError, NoAgentChannelError, NoCapacityError, UnknownProviderError
from .network import ISOLATED, WAN, WanNetwork
from .profiles import ProviderProfile

log = logging.getLogger("hvsim.crosscloud.provider")


class GuestStream(Protocol):
    """A streamed guest command (:class:`hvsim.core.agent.ExecStream`, or a cloud API's stream)."""
    result: ExecResult | None

    async def __aenter__(self) -> Any: ...
    async def __aexit__(self, *exc: Any) -> Any: ...
    def __aiter__(self) -> AsyncIterator[Chunk]: ...
    async def collect(self, limit: int | None = None) -> tuple[bytes, bytes]: ...


class ProviderDriver(Protocol):
    """What the cross-cloud orchestrator needs from a cloud."""
    cloud: str
    profile: ProviderProfile

    @property
    def api(self) -> str: ...
    async def authenticate(self, credentials: str) -> None: ...
    async def describe(self, name: str) -> VMSpec: ...
    async def check_capacity(self, spec: VMSpec) -> None: ...
    async def create_instance(self, spec: VMSpec, *, data_disk: Path | None = None, isolated: bool = False,
                              data_size_mib: int = 256) -> str: ...
    async def start(self, name: str) -> None: ...
    async def pause(self, name: str) -> None: ...
    async def resume(self, name: str) -> None: ...
    async def delete(self, name: str) -> None: ...
    async def exec(self, name: str, command: str, timeout: float = 60.0, check: bool = False) -> ExecResult: ...
    def exec_stream(self, name: str, command: str, timeout: float | None = None) -> GuestStream: ...
    async def push_file(self, name: str, local: Path, remote: str, mode: int = 0o600) -> None: ...
    async def probe_agent(self, name: str) -> None: ...
    async def clone_for_test(self, name: str, clone: str) -> str: ...
    async def route_service(self, name: str) -> None: ...
    async def vm_state(self, name: str) -> str | None: ...      # None: no such instance
    async def guest_address(self, name: str) -> str: ...


@dataclass
class InProcessProvider:
    """A cloud run by an in-process cluster: instances of ``profile`` on ``host``, NICs on the WAN."""
    cloud: str
    cluster: Cluster
    host: str
    profile: ProviderProfile
    wan: WanNetwork
    credentials: str
    authenticated: bool = False

    @property
    def api(self) -> str:
        return f"inproc://{self.cloud}"

    async def authenticate(self, credentials: str) -> None:
        if not isinstance(credentials, str) or not hmac.compare_digest(credentials.encode(), self.credentials.encode()):
            raise CredentialsError(f"cloud {self.cloud!r} ({self.api}) refused the credentials")
        self.authenticated = True

    def _require_auth(self) -> None:
        if not self.authenticated:
            raise CredentialsError(f"cloud {self.cloud!r}: not authenticated")

    def _vm(self, name: str) -> VM:
        self._require_auth()
        return self.cluster.vm(name)

    async def describe(self, name: str) -> VMSpec:
        return self._vm(name).spec

    async def vm_state(self, name: str) -> str | None:
        self._require_auth()
        return self.state(name) if self.exists(name) else None

    async def guest_address(self, name: str) -> str:
        self._require_auth()
        return self.guest_ip(name)

    async def check_capacity(self, spec: VMSpec) -> None:
        self._require_auth()
        try:
            self.cluster.host(self.host).check_fit(spec)
        except CapacityError as exc:
            raise NoCapacityError(f"cloud {self.cloud!r} has no capacity for a profile-{self.profile.name} instance "
                                  f"of vm {spec.name!r}: {exc}") from exc

    def instance_spec(self, spec: VMSpec, name: str | None = None, isolated: bool = False,
                      data_disk: Path | None = None, data_size_mib: int = 256) -> VMSpec:
        name = name or spec.name
        disk = DiskSpec("data", size_mib=data_size_mib, path=str(data_disk) if data_disk else "",
                        format="qcow2" if data_disk and data_disk.suffix == ".qcow2" else "raw")
        nic = NicSpec("wan0", network=ISOLATED if isolated else WAN)
        base = dataclasses.replace(spec, name=name, disks=(disk,), nics=(nic,),
                                   kernel_args=self.wan.kernel_args(name, self.host, isolated=isolated))
        return self.profile.apply(base)

    async def create_instance(self, spec: VMSpec, *, data_disk: Path | None = None, isolated: bool = False,
                              data_size_mib: int = 256) -> str:
        await self.check_capacity(spec)
        s = self.instance_spec(spec, isolated=isolated, data_disk=data_disk, data_size_mib=data_size_mib)
        await self.cluster.define_vm(s, self.host)
        return s.name

    async def start(self, name: str) -> None:
        vm = self._vm(name)
        await vm.start(wait_ready=True, ready_timeout=180)

    async def pause(self, name: str) -> None:
        await self._vm(name).pause()

    async def resume(self, name: str) -> None:
        await self._vm(name).resume()

    async def delete(self, name: str) -> None:
        try:
            vm = self._vm(name)
        except NotFoundError:
            return
        await vm.destroy()
        await self.cluster.undefine_vm(name)

    async def exec(self, name: str, command: str, timeout: float = 60.0, check: bool = False) -> ExecResult:
        return await self._vm(name).exec(command, timeout=timeout, check=check)

    def exec_stream(self, name: str, command: str, timeout: float | None = None) -> ExecStream:
        return self._vm(name).agent.exec_stream(command, timeout=timeout)

    async def probe_agent(self, name: str) -> None:
        vm = self._vm(name)
        try:
            if not vm.agent.connected:
                await vm.agent.connect()
            await vm.agent.ping(timeout=5)
        except (AgentError, OSError) as exc:
            raise NoAgentChannelError(f"cloud {self.cloud!r}: vm {name!r} has no working guest-agent channel "
                                      f"({exc}); the migration agents cannot be installed") from exc

    async def push_file(self, name: str, local: Path, remote: str, mode: int = 0o600) -> None:
        """Copy ``local`` into the guest at ``remote`` through the guest agent
        (:func:`hvsim.core.guestfile.write_guest_file`: checked by SHA-256 before it is moved into place)."""
        await write_guest_file(self._vm(name).exec, remote, Path(local).read_bytes(), mode, what=f"vm {name!r}")

    async def clone_for_test(self, name: str, clone: str) -> str:
        """A throw-away clone of instance ``name`` on an isolated network: the instance's data disk is
        snapshotted (QMP blockdev-snapshot-sync: the instance writes into a new qcow2 overlay from now
        on, the image under it stops changing) and the clone boots from its own qcow2 overlay on that
        frozen image (copy-on-write: nothing the clone writes reaches the instance)."""
        vm = self._vm(name)
        base = vm.disk_path(vm.spec.disks[0])
        top = base.with_name(f"{base.stem}-top{len(vm.spec.disks[0].name)}-{vm.generation}.qcow2")
        await vm.qmp.execute("blockdev-snapshot-sync", {"node-name": "disk-data", "snapshot-file": str(top),
                                                        "snapshot-node-name": "disk-data-top", "format": "qcow2"})
        overlay = self.cluster.run_dir / f"{clone}-overlay.qcow2"
        await asyncio.to_thread(subprocess.run, ["qemu-img", "create", "-q", "-f", "qcow2", "-b", str(base),
                                                 "-F", "raw", str(overlay)], check=True)
        s = self.instance_spec(vm.spec, name=clone, isolated=True, data_disk=overlay,
                               data_size_mib=vm.spec.disks[0].size_mib)
        s = dataclasses.replace(s, memory_mib=vm.spec.memory_mib)
        await self.check_capacity(s)
        await self.cluster.define_vm(s, self.host)
        return clone

    async def route_service(self, name: str) -> None:
        """Route the service address to instance ``name`` (the cloud's elastic-IP move)."""
        self._vm(name)
        await self.wan.move_service(name, self.host)

    def state(self, name: str) -> str:
        return self._vm(name).state.value

    def exists(self, name: str) -> bool:
        return name in self.cluster.vms

    def guest_ip(self, name: str) -> str:
        return self.wan.address(name, self.host).ip

    def disk_path(self, name: str) -> Path:
        vm = self._vm(name)
        return vm.disk_path(vm.spec.disks[0])


@dataclass
class CloudRegistry:
    """The clouds an orchestrator may use, by name."""
    providers: Mapping[str, ProviderDriver]

    async def connect(self, cloud: str, credentials: str) -> ProviderDriver:
        p = self.providers.get(cloud)
        if p is None:
            raise UnknownProviderError(f"unknown cloud {cloud!r}; registered: {sorted(self.providers)}")
        await p.authenticate(credentials)
        return p

    def to_dict(self) -> dict[str, Any]:
        return {k: {"api": p.api, "profile": p.profile.to_dict()} for k, p in self.providers.items()}
