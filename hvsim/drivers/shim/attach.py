"""Attach shim-backed disks to hvsim VMs: one shim process per ``DiskSpec(kind="shim")``.

``Cluster.prepare_disks(vm)`` calls :func:`start_shim_for_disk` once per shim disk before QEMU
starts. It creates the (sparse) backing file, starts a :class:`ShimProcess` with its NBD and
control sockets in a private directory ``<cluster.run_dir>/shims/<vm>`` (0700; not the VM's
instance dir, which changes with every QEMU instance, e.g. after a migration), records the process
in ``vm.shims[disk]``, registers its stop with ``cluster.on_close`` and returns the NBD
:class:`~qmp_bridge.Drive` QEMU attaches (``reconnect-delay`` so a shim restart stalls guest I/O
instead of failing it). The guest sees a virtio-blk disk whose serial is ``disk-<name>``.

Per-disk options (emulated datastore latency/bandwidth, prefetch concurrency, reconnect delay):
``DiskSpec`` carries no such fields, so they are set per cluster before the VM starts::

    from hvsim.drivers.shim.attach import ShimOptions, set_shim_options
    set_shim_options(cluster, ShimOptions(latency_ms=1.0), vm="web1", disk="swap")  # one disk
    set_shim_options(cluster, ShimOptions(latency_ms=1.0), vm="web1")               # all of web1
    set_shim_options(cluster, ShimOptions(latency_ms=1.0))                          # cluster default

The most specific entry wins; without any, :data:`DEFAULT_OPTIONS` (no emulated latency).
"""
from __future__ import annotations

import asyncio

import logging
import os
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from qmp_bridge import Drive

from .errors import ShimConfigError
from .process import ShimProcess

if TYPE_CHECKING:
    from ...core.cluster import Cluster
    from ...core.model import DiskSpec
    from ...core.vm import VM

log = logging.getLogger(__name__)

SHIM_EXPORT = "swap"


@dataclass(frozen=True)
class ShimOptions:
    """How the shim of one disk emulates its datastore and how QEMU attaches it."""

    latency_ms: float = 0.0
    bandwidth_mib_s: float | None = None
    prefetch_concurrency: int = 4
    reconnect_delay: int = 10
    verbose: bool = False

    def __post_init__(self) -> None:
        if self.latency_ms < 0:
            raise ShimConfigError(f"latency_ms must be >= 0, got {self.latency_ms}")
        if self.bandwidth_mib_s is not None and self.bandwidth_mib_s <= 0:
            raise ShimConfigError(f"bandwidth_mib_s must be > 0, got {self.bandwidth_mib_s}")
        if self.prefetch_concurrency < 1:
            raise ShimConfigError(f"prefetch_concurrency must be >= 1, got {self.prefetch_concurrency}")
        if not isinstance(self.reconnect_delay, int) or self.reconnect_delay < 0:
            raise ShimConfigError(f"reconnect_delay must be an integer >= 0 s, got {self.reconnect_delay!r}")


DEFAULT_OPTIONS = ShimOptions()

# cluster -> {(vm or None, disk or None): options}
_OPTIONS: "weakref.WeakKeyDictionary[Any, dict[tuple[str | None, str | None], ShimOptions]]" = \
    weakref.WeakKeyDictionary()


def set_shim_options(cluster: "Cluster", options: ShimOptions, *, vm: str | None = None,
                     disk: str | None = None) -> None:
    """Options for the shims started later in ``cluster`` (for one disk, one VM, or all)."""
    if disk is not None and vm is None:
        raise ShimConfigError("set_shim_options: a disk name needs its vm name too")
    if not isinstance(options, ShimOptions):
        raise ShimConfigError(f"options must be ShimOptions, got {type(options).__name__}")
    _OPTIONS.setdefault(cluster, {})[(vm, disk)] = options


def shim_options_for(cluster: "Cluster", vm: str, disk: str) -> ShimOptions:
    table = _OPTIONS.get(cluster, {})
    for key in ((vm, disk), (vm, None), (None, None)):
        if key in table:
            return table[key]
    return DEFAULT_OPTIONS


def shim_dir(cluster: "Cluster", vm: "VM") -> Path:
    """Private (0700) directory of the VM's shim sockets and logs."""
    base = cluster.run_dir / "shims"
    base.mkdir(mode=0o700, exist_ok=True)
    os.chmod(base, 0o700)
    d = base / vm.name
    d.mkdir(mode=0o700, exist_ok=True)
    os.chmod(d, 0o700)
    return d


def _make_sparse(path: Path, size: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        if os.fstat(fd).st_size < size:
            os.ftruncate(fd, size)
    finally:
        os.close(fd)


async def start_shim_for_disk(cluster: "Cluster", vm: "VM", disk: "DiskSpec") -> Drive:
    """Start the shim process serving ``disk`` of ``vm``; return the NBD drive QEMU attaches."""
    if disk.kind != "shim":
        raise ShimConfigError(f"disk {disk.name!r} of vm {vm.name!r} is kind {disk.kind!r}, not 'shim'")
    if disk.format != "raw":
        raise ShimConfigError(f"shim disk {disk.name!r} must be raw, not {disk.format}")
    old = vm.shims.get(disk.name)
    if old is not None:  # a previous start failed after its shim came up: reuse it
        await old.stop()
    opts = shim_options_for(cluster, vm.name, disk.name)
    size = disk.size_mib * 1024 * 1024
    backing = cluster.disk_path(vm, disk)
    _make_sparse(backing, size)
    d = shim_dir(cluster, vm)
    shim = ShimProcess(d / f"{disk.name}.sock", backing, size=size, latency_ms=opts.latency_ms,
                       bandwidth_mib_s=opts.bandwidth_mib_s, control_path=d / f"{disk.name}.ctl",
                       export_name=SHIM_EXPORT, log_path=d / f"{disk.name}.shim.log",
                       prefetch_concurrency=opts.prefetch_concurrency, verbose=opts.verbose)
    await shim.start()
    vm.shims[disk.name] = shim

    async def watch() -> None:
        """Report every unexpected exit of this shim to the VM (it may be restarted and crash again)."""
        while True:
            err = await shim.wait_crash()
            vm.report_helper_failure(f"shim:{disk.name}", err)
            while shim.crashed.is_set():     # wait for a restart (start() clears it) before re-arming
                await asyncio.sleep(0.1)

    watcher = asyncio.create_task(watch(), name=f"shim-watch-{vm.name}-{disk.name}")

    async def stop() -> None:
        watcher.cancel()
        await asyncio.gather(watcher, return_exceptions=True)
        await shim.stop()
    cluster.on_close(stop)
    log.info("vm %s disk %s: shim pid %s on %s (latency %.3g ms)", vm.name, disk.name, shim.pid,
             shim.socket_path, opts.latency_ms)
    return Drive(id=f"disk-{disk.name}", path=str(shim.socket_path), kind="nbd", export=SHIM_EXPORT,
                 reconnect_delay=opts.reconnect_delay)

