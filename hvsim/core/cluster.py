"""The emulated inventory: clouds, datacenters, hosts and VMs, torn down as one unit.

    async with Cluster() as cl:
        cl.add_host(HostSpec("h1", vcpus=4, memory_mib=2048))
        vm = await cl.define_vm(VMSpec("web1"), host="h1")
        await vm.start(wait_ready=True)
        print((await vm.exec("uname -r")).stdout)

Leaving the ``async with`` block (normally, by exception or by cancellation) destroys every VM (a
migration in flight is rolled back first), stops every component, runs the registered cleanups and
removes the private run directory. The cluster owns its per-cluster state: the event bus
(``cluster.events``), the component drivers (``add_driver``), subsystem state (``extension``, e.g. the
learned migration costs) and the record of every process it started (``survivors()`` after close
lists any that outlived it).
"""
from __future__ import annotations

import asyncio
import logging
import os
import shutil
import tempfile
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from hvbase.events import EventBus
from qmp_bridge import QemuProcess
from qmp_bridge.accel import choose_accel

from . import procfs
from hvbase.aio import run_to_completion
from .components import ComponentDriver
from .errors import NotFoundError, SpecError
from .events import ClusterEvent, VMDefined, VMUndefined
from .host import Host, HostNetwork
from .model import CloudSpec, DatacenterSpec, HostSpec, VMSpec, check_name
from .power import PowerDomain
from .vm import VM

log = logging.getLogger("hvsim.core.cluster")

REPO = Path(__file__).resolve().parents[2]
OWNER_FILE = "owner"
T = TypeVar("T")


@dataclass(frozen=True)
class StaleRunDir:
    """A run dir whose owner died without removing it, and what was done about it."""
    path: Path
    owner_pid: int
    killed: tuple[int, ...] = ()       # orphaned helpers (that escaped PDEATHSIG) found using it
    removed: bool = True
    users: tuple[int, ...] = ()        # other live processes using it: the directory was left alone


def reclaim_stale_run_dirs(base: Path | None = None) -> list[StaleRunDir]:
    """Reclaim run dirs of earlier hvsim processes that died without cleaning up (e.g. SIGKILL).

    Only directories we made (hvsim-* with an owner file) whose owner process is gone (or whose pid
    was reused by another process) are touched: orphaned helpers still using one (reparented to init;
    their QEMUs normally died with the owner, PDEATHSIG) are terminated, then the directory is
    removed. A directory another live process still uses, and a live owner's, are left alone."""
    base = base or Path(tempfile.gettempdir())
    found = []
    for d in sorted(base.glob("hvsim-*")):
        owner = d / OWNER_FILE
        try:
            pid_s, _, start = owner.read_text().strip().partition(" ")
            pid = int(pid_s)
        except (OSError, ValueError):
            continue
        if procfs.alive(pid, start):
            continue
        using = procfs.users(d)
        orphans = [p for p in using if procfs.ppid(p) == 1]    # reparented to init: the dead run's helpers
        users = [p for p in using if p not in orphans]
        if users:                                              # someone else still uses it: not ours to pull
            log.warning("run dir %s of dead pid %d is still used by %s; left alone", d, pid, users)
            found.append(StaleRunDir(d, pid, removed=False, users=tuple(users)))
            continue
        killed = procfs.terminate(orphans)
        if killed:
            log.warning("run dir %s of dead pid %d: terminated leftover processes %s", d, pid, killed)
        shutil.rmtree(d, ignore_errors=True)
        found.append(StaleRunDir(d, pid, tuple(killed), removed=not d.exists()))
    return found


def remove_stale_run_dirs(base: Path | None = None) -> list[Path]:
    """:func:`reclaim_stale_run_dirs`, returning the directories removed."""
    return [s.path for s in reclaim_stale_run_dirs(base) if s.removed]


# what QEMU boots (images/Makefile): the uncompressed kernel through its PVH entry point, and an
# uncompressed initramfs (a TCG boot takes 3.3 s this way, 7.4 s from the bzImage and a gzip'd one)
KERNEL_FILE = "vmlinux"
INITRD_FILE = "initrd.img"


def images_dir() -> Path:
    return Path(os.environ.get("HVSIM_IMAGES", REPO / "images" / "out"))


class Cluster:
    def __init__(self, name: str = "lab", run_dir: Path | None = None, images: Path | None = None,
                 keep_run_dir: bool = False, drivers: tuple[ComponentDriver, ...] = (),
                 accel: str | None = None) -> None:
        self.name = check_name("cluster", name)
        imgs = Path(images) if images else images_dir()
        self.kernel = imgs / KERNEL_FILE
        self.initrd = imgs / INITRD_FILE
        self._own_run_dir = run_dir is None
        if self._own_run_dir:
            remove_stale_run_dirs()
        self.run_dir = Path(run_dir) if run_dir else Path(tempfile.mkdtemp(prefix=f"hvsim-{name}-"))
        self.run_dir.mkdir(parents=True, exist_ok=True)
        os.chmod(self.run_dir, 0o700)
        (self.run_dir / OWNER_FILE).write_text(f"{os.getpid()} {procfs.start_time(os.getpid())}\n")
        self.keep_run_dir = keep_run_dir
        self.events: EventBus[ClusterEvent] = EventBus(f"cluster {name}", history=2000)
        self.clouds: dict[str, CloudSpec] = {}
        self.datacenters: dict[str, DatacenterSpec] = {}
        self.hosts: dict[str, Host] = {}
        self.vms: dict[str, VM] = {}
        self.drivers: dict[str, ComponentDriver] = {}
        self.extensions: dict[str, Any] = {}
        self.processes: list[tuple[int, str, str]] = []     # (pid, start time, what) of everything started
        if accel not in (None, "tcg", "kvm"):
            raise SpecError(f"accel must be 'tcg', 'kvm' or None (probe), got {accel!r}")
        self._accel: str | None = accel
        self._closers: list[Callable[[], Awaitable[Any]]] = []
        self.closed = False
        for d in drivers:
            self.add_driver(d)

    # -- context management -------------------------------------------------------------------
    async def __aenter__(self) -> Cluster:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def on_close(self, closer: Callable[[], Awaitable[Any]]) -> None:
        """Register an async cleanup (run in reverse order after the VMs are destroyed, before the run
        dir is removed)."""
        self._closers.append(closer)

    async def close(self) -> None:
        """Destroy every VM, run registered cleanups, remove the run directory. Idempotent.

        Runs to completion even if the surrounding task is being cancelled."""
        if self.closed:
            return
        self.closed = True
        await run_to_completion(self._close())

    async def _close(self) -> None:
        vms = list(self.vms.values())
        results = await asyncio.gather(*(vm.destroy() for vm in vms), return_exceptions=True)
        for vm, r in zip(vms, results, strict=True):
            if isinstance(r, BaseException):
                log.error("destroy of %s during teardown failed: %r", vm.name, r)
                if vm.process is not None:
                    await asyncio.gather(vm.process.kill(), return_exceptions=True)
        for closer in reversed(self._closers):
            try:
                await closer()
            except Exception as exc:  # keep tearing down the rest
                log.error("cleanup %r failed: %r", closer, exc)
        self.events.close()
        if self._own_run_dir and not self.keep_run_dir:
            shutil.rmtree(self.run_dir, ignore_errors=True)
        left = self.survivors()
        if left:
            log.error("cluster %s: processes survived its teardown: %s", self.name, ", ".join(left))

    def track_process(self, pid: int, what: str) -> None:
        """Record a process started for this cluster (QEMU, a component's driver) by pid and start time."""
        self.processes.append((pid, procfs.start_time(pid), what))

    def survivors(self) -> list[str]:
        """Processes this cluster started that are still alive (after close(): a leak)."""
        return [f"{what} (pid {pid})" for pid, start, what in self.processes if procfs.alive(pid, start or None)]

    def keep_logs(self, dest: Path) -> None:
        """Copy every VM's console, QEMU, QMP and component logs into ``dest`` (for failed tests)."""
        dest.mkdir(parents=True, exist_ok=True)
        for p in self.run_dir.rglob("*.log"):
            target = dest / p.relative_to(self.run_dir)
            target.parent.mkdir(parents=True, exist_ok=True)
            try:
                shutil.copy2(p, target)
            except OSError as exc:
                log.warning("could not keep %s: %s", p, exc)

    # -- per-cluster state ---------------------------------------------------------------------------
    def accel(self) -> str:
        if self._accel is None:
            self._accel = choose_accel(str(self.kernel), str(self.initrd))
            log.info("accelerator: %s", self._accel)
        return self._accel

    def add_driver(self, driver: ComponentDriver) -> None:
        """Serve disks of ``driver.kind`` (e.g. "shim") with components ``driver`` creates."""
        if driver.kind in self.drivers:
            raise SpecError(f"cluster {self.name!r} already has a driver for {driver.kind!r} devices")
        self.drivers[driver.kind] = driver

    def driver(self, kind: str) -> ComponentDriver:
        try:
            return self.drivers[kind]
        except KeyError:
            raise SpecError(f"no driver for {kind!r} devices in cluster {self.name!r} (registered: "
                            f"{sorted(self.drivers) or 'none'}); add one with cluster.add_driver(...), e.g. "
                            "hvsim.drivers.shim.ShimDriver() for kind 'shim'") from None

    def extension(self, key: str, factory: Callable[[Cluster], T]) -> T:
        """Per-cluster state of a subsystem (e.g. learned migration costs), created on first use."""
        if key not in self.extensions:
            self.extensions[key] = factory(self)
        return self.extensions[key]

    # -- inventory --------------------------------------------------------------------------------
    def add_cloud(self, name: str, provider: str = "hvsim") -> CloudSpec:
        if name in self.clouds:
            raise SpecError(f"duplicate cloud name {name!r}")
        spec = CloudSpec(name, provider)
        self.clouds[name] = spec
        return spec

    def add_datacenter(self, name: str, cloud: str = "default") -> DatacenterSpec:
        if name in self.datacenters:
            raise SpecError(f"duplicate datacenter name {name!r}")
        if cloud not in self.clouds:
            self.add_cloud(cloud)
        spec = DatacenterSpec(name, cloud)
        self.datacenters[name] = spec
        return spec

    def add_host(self, spec: HostSpec | None = None, network: HostNetwork | None = None,
                 power: PowerDomain | None = None, **kwargs: Any) -> Host:
        """Add an emulated host; ``network`` puts its processes in a namespace with an address (e.g.
        ``underlay.host_network("a")``), None keeps them in ours, on loopback. ``power``: the host's
        power domain; its QEMUs then run detached in it and outlive this process (a host agent)."""
        spec = spec or HostSpec(**kwargs)
        if spec.name in self.hosts:
            raise SpecError(f"duplicate host name {spec.name!r}")
        if network is not None and not isinstance(network, HostNetwork):
            raise SpecError(f"host {spec.name!r}: network must be a HostNetwork, got {type(network).__name__}")
        if spec.datacenter not in self.datacenters:
            self.add_datacenter(spec.datacenter)
        if power is not None and not isinstance(power, PowerDomain):
            raise SpecError(f"host {spec.name!r}: power must be a PowerDomain, got {type(power).__name__}")
        host = Host(spec, network=network, power=power)
        self.hosts[spec.name] = host
        return host

    def host(self, name: str) -> Host:
        try:
            return self.hosts[name]
        except KeyError:
            raise NotFoundError(f"unknown host {name!r}; known: {sorted(self.hosts)}") from None

    def vm(self, name: str) -> VM:
        try:
            return self.vms[name]
        except KeyError:
            raise NotFoundError(f"unknown vm {name!r}; known: {sorted(self.vms)}") from None

    async def define_vm(self, spec: VMSpec, host: str | Host) -> VM:
        """Define a VM on a host (libvirt: virDomainDefineXML). Capacity is checked at start; every
        non-file disk needs a registered driver (SpecError here otherwise)."""
        if spec.name in self.vms:
            raise SpecError(f"duplicate vm name {spec.name!r}")
        h = host if isinstance(host, Host) else self.host(host)
        if self.hosts.get(h.name) is not h:
            raise SpecError(f"host {h.name!r} is not part of cluster {self.name!r}")
        for d in spec.disks:
            if d.kind != "file":
                self.driver(d.kind)
        vm = VM(spec, h, self)
        self.vms[spec.name] = vm
        self.events.publish(VMDefined(vm=spec.name, host=h.name))
        return vm

    async def adopt_vm(self, spec: VMSpec, host: str | Host, process: QemuProcess, *,
                       instance_dir: Path | None = None, paused: bool = False, generation: int | None = None,
                       components: dict[str, dict[str, Any]] | None = None) -> VM:
        """Define ``spec`` on ``host`` and adopt its QEMU that runs already (see
        :meth:`VM.attach_running`): a host agent re-adopting its guests after a restart, or taking
        over the destination of a migration. If adopting fails, the VM is not defined (the QEMU is
        left as it was)."""
        vm = await self.define_vm(spec, host)
        try:
            await vm.attach_running(process, instance_dir=instance_dir, paused=paused, generation=generation,
                                    components=components)
        except BaseException:
            self.vms.pop(spec.name, None)
            vm.close_subscriptions()
            raise
        return vm

    async def detach_vm(self, name: str) -> dict[str, dict[str, Any]]:
        """Let go of a VM's QEMU and components without stopping them and forget the VM (its
        files stay: a later owner adopts it with :meth:`adopt_vm`). Returns its components'
        records for re-attaching."""
        vm = self.vm(name)
        pids = {vm.pid, *(p for c in vm.components.values() for p in c.pids())}
        records = await vm.detach()
        self.processes = [p for p in self.processes if p[0] not in pids]   # they are meant to outlive us
        del self.vms[name]
        vm.close_subscriptions()
        return records

    async def undefine_vm(self, name: str) -> None:
        """Remove a shut-off VM and its files; refused while a process holds any of them."""
        vm = self.vm(name)
        await vm.remove()
        del self.vms[name]
        self.events.publish(VMUndefined(vm=name, host=vm.host.name))

    def to_dict(self) -> dict[str, Any]:
        """The inventory as data (what a manager persists)."""
        return {"name": self.name, "clouds": {k: v.to_dict() for k, v in self.clouds.items()},
                "datacenters": {k: v.to_dict() for k, v in self.datacenters.items()},
                "hosts": {k: h.to_dict() for k, h in self.hosts.items()},
                "vms": {k: vm.to_dict() for k, vm in self.vms.items()},
                "extensions": {k: v.to_dict() for k, v in self.extensions.items() if hasattr(v, "to_dict")}}
