"""The emulated inventory: clouds, datacenters, hosts and VMs, torn down as one unit.

    async with Cluster() as cl:
        cl.add_host(HostSpec("h1", vcpus=4, memory_mib=2048))
        vm = await cl.define_vm(VMSpec("web1"), host="h1")
        await vm.start(wait_ready=True)
        print((await vm.exec("uname -r")).stdout)

Leaving the ``async with`` block (normally, by exception or by cancellation) destroys every VM,
stops every helper process and removes the private run directory.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import tempfile
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from qmp_bridge.accel import choose_accel

from .aio import run_to_completion
from .errors import NotFoundError, SpecError
from .host import Host
from .model import CloudSpec, DatacenterSpec, DiskSpec, HostSpec, VMSpec, check_name
from .vm import VM, make_raw_disk

log = logging.getLogger("hvsim.core.cluster")

REPO = Path(__file__).resolve().parents[2]


OWNER_FILE = "owner"


def _proc_start_time(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return ""


def remove_stale_run_dirs(base: Path | None = None) -> list[Path]:
    """Remove run dirs of earlier hvsim processes that died without cleaning up (e.g. SIGKILL).

    Only directories we made (hvsim-* with an owner file) whose owner process is gone (or whose
    pid was reused by another process) are removed; their QEMUs died with them (PDEATHSIG)."""
    base = base or Path(tempfile.gettempdir())
    removed = []
    for d in base.glob("hvsim-*"):
        owner = d / OWNER_FILE
        try:
            pid_s, _, start = owner.read_text().strip().partition(" ")
            pid = int(pid_s)
        except (OSError, ValueError):
            continue
        if os.path.exists(f"/proc/{pid}") and _proc_start_time(pid) == start:
            continue
        shutil.rmtree(d, ignore_errors=True)
        removed.append(d)
    return removed


def images_dir() -> Path:
    return Path(os.environ.get("HVSIM_IMAGES", REPO / "images" / "out"))


class Cluster:
    def __init__(self, name: str = "lab", run_dir: Path | None = None, images: Path | None = None,
                 keep_run_dir: bool = False) -> None:
        self.name = check_name("cluster", name)
        imgs = Path(images) if images else images_dir()
        self.kernel = imgs / "vmlinuz"
        self.initrd = imgs / "initrd.img"
        self._own_run_dir = run_dir is None
        if self._own_run_dir:
            remove_stale_run_dirs()
        self.run_dir = Path(run_dir) if run_dir else Path(tempfile.mkdtemp(prefix=f"hvsim-{name}-"))
        self.run_dir.mkdir(parents=True, exist_ok=True)
        os.chmod(self.run_dir, 0o700)
        (self.run_dir / OWNER_FILE).write_text(f"{os.getpid()} {_proc_start_time(os.getpid())}\n")
        self.keep_run_dir = keep_run_dir
        self.clouds: dict[str, CloudSpec] = {}
        self.datacenters: dict[str, DatacenterSpec] = {}
        self.hosts: dict[str, Host] = {}
        self.vms: dict[str, VM] = {}
        self._accel: str | None = None
        self._closers: list[Callable[[], Awaitable[Any]]] = []
        self.closed = False

    # -- context management -------------------------------------------------------------------
    async def __aenter__(self) -> "Cluster":
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def on_close(self, closer: Callable[[], Awaitable[Any]]) -> None:
        """Register an async cleanup (run in reverse order before the run dir is removed)."""
        self._closers.append(closer)

    async def close(self) -> None:
        """Destroy every VM, run registered cleanups, remove the run directory. Idempotent.

        Runs to completion even if the surrounding task is being cancelled."""
        if self.closed:
            return
        self.closed = True
        await run_to_completion(self._close())

    async def _close(self) -> None:
        results = await asyncio.gather(*(vm.destroy() for vm in self.vms.values()), return_exceptions=True)
        for vm, r in zip(list(self.vms.values()), results):
            if isinstance(r, BaseException):
                log.error("destroy of %s during teardown failed: %r", vm.name, r)
                if vm.process is not None:
                    with contextlib.suppress(Exception):
                        await vm.process.kill()
        for closer in reversed(self._closers):
            try:
                await closer()
            except Exception as exc:  # keep tearing down the rest
                log.error("cleanup %r failed: %r", closer, exc)
        if self._own_run_dir and not self.keep_run_dir:
            shutil.rmtree(self.run_dir, ignore_errors=True)

    def keep_logs(self, dest: Path) -> None:
        """Copy every VM's console, QEMU and QMP logs into ``dest`` (for failed tests)."""
        dest.mkdir(parents=True, exist_ok=True)
        for p in self.run_dir.rglob("*.log"):
            target = dest / p.relative_to(self.run_dir)
            target.parent.mkdir(parents=True, exist_ok=True)
            with contextlib.suppress(OSError):
                shutil.copy2(p, target)

    # -- inventory --------------------------------------------------------------------------------
    def accel(self) -> str:
        if self._accel is None:
            self._accel = choose_accel(str(self.kernel), str(self.initrd))
            log.info("accelerator: %s", self._accel)
        return self._accel

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

    def add_host(self, spec: HostSpec | None = None, netns: str | None = None, **kwargs: Any) -> Host:
        spec = spec or HostSpec(**kwargs)
        if spec.name in self.hosts:
            raise SpecError(f"duplicate host name {spec.name!r}")
        if spec.datacenter not in self.datacenters:
            self.add_datacenter(spec.datacenter)
        host = Host(spec, netns=netns)
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
        """Define a VM on a host (libvirt: virDomainDefineXML). Capacity is checked at start."""
        if spec.name in self.vms:
            raise SpecError(f"duplicate vm name {spec.name!r}")
        h = host if isinstance(host, Host) else self.host(host)
        vm = VM(spec, h, self)
        self.vms[spec.name] = vm
        return vm

    async def undefine_vm(self, name: str) -> None:
        from .lifecycle import check_action
        vm = self.vm(name)
        check_action(name, vm.state, "undefine")
        del self.vms[name]
        shutil.rmtree(vm.run_dir, ignore_errors=True)

    def disk_path(self, vm: VM, disk: DiskSpec) -> Path:
        if disk.path:
            return Path(disk.path)
        return vm.run_dir / f"{disk.name}.{'img' if disk.format == 'raw' else 'qcow2'}"

    async def prepare_disks(self, vm: VM) -> None:
        """Create file disks; start the NBD shim process of every "shim" disk (once per VM)."""
        for d in vm.spec.disks:
            if d.kind == "file":
                make_raw_disk(self.disk_path(vm, d), d.size_mib, d.format)
            elif d.name not in vm.shim_drives:
                from ..drivers.shim.attach import start_shim_for_disk  # the shim subsystem owns this
                vm.shim_drives[d.name] = await start_shim_for_disk(self, vm, d)

    def status_rows(self) -> list[dict[str, Any]]:
        return [vm.status_row() for vm in self.vms.values()]
