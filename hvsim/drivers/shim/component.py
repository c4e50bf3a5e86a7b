"""The swap shim as a VM component: one shim process per ``DiskSpec(kind="shim")``.

Register the driver on the cluster; every shim disk of every VM defined afterwards gets a
:class:`ShimComponent`, prepared when the VM starts::

    from hvsim.drivers.shim import ShimDriver, ShimOptions
    drv = ShimDriver(ShimOptions(latency_ms=1.0))               # the emulated datastore, cluster default
    drv.set_options(ShimOptions(latency_ms=2.0), vm="web1")     # all shim disks of web1
    drv.set_options(ShimOptions(latency_ms=0.5), vm="web1", disk="swap")   # one disk (most specific wins)
    cluster.add_driver(drv)

Preparing the component creates the (sparse) backing file in the VM's directory, starts a
:class:`~hvsim.drivers.shim.process.ShimProcess` (in the host's network namespace) with its NBD and
control sockets in a private directory ``<vm dir>/shim`` (0700) and returns the NBD drive QEMU
attaches (``reconnect-delay`` so a shim restart stalls guest I/O instead of failing it; the guest
sees a virtio-blk disk whose serial is ``disk-<name>``). A shim that dies on its own is reported to
the VM (``ComponentFailed`` on the cluster bus; the component is FAILED) and can be restarted with
:meth:`ShimComponent.restart`. Stopping the VM stops the shim; undefining it deletes the backing file.

The component implements the core's :class:`~hvsim.core.components.SwapBackend` (prefetch for memory
restore) and :class:`~hvsim.core.components.MigratableComponent`: checkpoints in the shim's format
version 2 (:mod:`hvsim.drivers.shim.checkpoint`: swap map, cache index and cached pages, counters,
in-flight prefetch; full or the delta since an earlier one), quiesce (writes held, flushed) and
resume, a peer in another run directory sharing the backing file, retire. With
``ShimOptions(restart=RestartPolicy(...))`` the component is supervised: a shim that dies is
restarted on the same sockets (QEMU reconnects within ``reconnect_delay``) from the backing file and
its state file (an index-only checkpoint the shim saves every second: the cache is refetched from
the backing file, so it never serves stale data).
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qmp_bridge import Drive

from ...core.components import Attachment, Checkpoint, Component, ComponentContext, ComponentState, RestartPolicy
from ...core.errors import CheckpointError, ComponentError
from ...core.host import Host
from ...core.model import DiskSpec
from .control import ShimControlClient
from .errors import ShimConfigError, ShimError
from .process import ShimProcess

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
    restart: RestartPolicy | None = None       # supervision (with a state file) when set

    def __post_init__(self) -> None:
        if self.latency_ms < 0:
            raise ShimConfigError(f"latency_ms must be >= 0, got {self.latency_ms}")
        if self.bandwidth_mib_s is not None and self.bandwidth_mib_s <= 0:
            raise ShimConfigError(f"bandwidth_mib_s must be > 0, got {self.bandwidth_mib_s}")
        if self.prefetch_concurrency < 1:
            raise ShimConfigError(f"prefetch_concurrency must be >= 1, got {self.prefetch_concurrency}")
        if not isinstance(self.reconnect_delay, int) or self.reconnect_delay < 0:
            raise ShimConfigError(f"reconnect_delay must be an integer >= 0 s, got {self.reconnect_delay!r}")
        if self.restart is not None and not isinstance(self.restart, RestartPolicy):
            raise ShimConfigError(f"restart must be a RestartPolicy, got {type(self.restart).__name__}")


DEFAULT_OPTIONS = ShimOptions()


class ShimDriver:
    """Creates a :class:`ShimComponent` for every disk of kind "shim"; holds the per-VM/per-disk
    options (per-cluster state: the driver belongs to one cluster)."""

    kind = "shim"

    def __init__(self, options: ShimOptions = DEFAULT_OPTIONS) -> None:
        if not isinstance(options, ShimOptions):
            raise ShimConfigError(f"options must be ShimOptions, got {type(options).__name__}")
        self._options: dict[tuple[str | None, str | None], ShimOptions] = {(None, None): options}

    def set_options(self, options: ShimOptions, *, vm: str | None = None, disk: str | None = None) -> None:
        """Options for shims created later (for one disk, one VM, or all)."""
        if disk is not None and vm is None:
            raise ShimConfigError("set_options: a disk name needs its vm name too")
        if not isinstance(options, ShimOptions):
            raise ShimConfigError(f"options must be ShimOptions, got {type(options).__name__}")
        self._options[(vm, disk)] = options

    def options_for(self, vm: str, disk: str) -> ShimOptions:
        for key in ((vm, disk), (vm, None), (None, None)):
            if key in self._options:
                return self._options[key]
        return DEFAULT_OPTIONS

    def create(self, disk: DiskSpec, ctx: ComponentContext) -> ShimComponent:
        if disk.kind != "shim":
            raise ShimConfigError(f"disk {disk.name!r} of vm {ctx.vm!r} is kind {disk.kind!r}, not 'shim'")
        if disk.format != "raw":
            raise ShimConfigError(f"shim disk {disk.name!r} of vm {ctx.vm!r} must be raw, not {disk.format}")
        comp = ShimComponent(disk, ctx, self.options_for(ctx.vm, disk.name))
        if comp.options.restart is not None:
            comp.supervise(comp.options.restart)
        return comp


def _private_dir(path: Path) -> Path:
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(path, 0o700)
    return path


def _make_sparse(path: Path, size: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        if os.fstat(fd).st_size < size:
            os.ftruncate(fd, size)
    finally:
        os.close(fd)


class ShimComponent(Component):
    """One shim process serving one swap disk of one VM."""

    kind = "shim"
    CHECKPOINT_VERSIONS = frozenset({2})

    def __init__(self, disk: DiskSpec, ctx: ComponentContext, options: ShimOptions,
                 run_dir: Path | None = None) -> None:
        super().__init__(disk.name, ctx)
        self.disk = disk
        self.options = options
        self.size = disk.size_mib * 1024 * 1024
        self.backing = Path(disk.path) if disk.path else ctx.vm_dir / f"{disk.name}.img"
        self.dir = (run_dir or ctx.vm_dir) / "shim"
        self.socket_path = self.dir / f"{disk.name}.sock"
        self.control_path = self.dir / f"{disk.name}.ctl"
        self.log_path = self.dir / f"{disk.name}.shim.log"
        self.state_path = self.dir / f"{disk.name}.state"
        self.process: ShimProcess | None = None
        self._watcher: asyncio.Task[None] | None = None

    @property
    def control(self) -> ShimControlClient:
        if self.process is None:
            raise ComponentError(f"{self.fsm.obj}: no shim process (state {self.state.value})")
        return self.process.control

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process is not None else None

    def nbd_uri(self) -> str:
        return f"nbd+unix:///{SHIM_EXPORT}?socket={self.socket_path}"

    # -- component hooks ----------------------------------------------------------------------------
    async def _do_prepare(self, host: Host) -> Attachment:
        _private_dir(self.dir)
        _make_sparse(self.backing, self.size)
        o = self.options
        if self.process is None or self.process.netns != host.netns:
            self.process = ShimProcess(self.socket_path, self.backing, size=self.size, latency_ms=o.latency_ms,
                                       bandwidth_mib_s=o.bandwidth_mib_s, control_path=self.control_path,
                                       export_name=SHIM_EXPORT, log_path=self.log_path,
                                       prefetch_concurrency=o.prefetch_concurrency, verbose=o.verbose,
                                       netns=host.netns, extra_args=self._state_args())
        await self.process.start()
        if self.process.pid is not None:
            self.ctx.track_process(self.process.pid, f"shim {self.ctx.vm}/{self.name}")
        self._watcher = asyncio.create_task(self._watch(self.process), name=f"shim-watch-{self.ctx.vm}-{self.name}")
        log.info("vm %s disk %s: shim pid %s on %s (latency %.3g ms)", self.ctx.vm, self.name, self.process.pid,
                 self.socket_path, o.latency_ms)
        return Attachment(drives=(Drive(id=f"disk-{self.name}", path=str(self.socket_path), kind="nbd",
                                        export=SHIM_EXPORT, reconnect_delay=o.reconnect_delay),))

    def _state_args(self) -> tuple[str, ...]:
        return ("--state-file", str(self.state_path)) if self.restart_policy is not None else ()

    async def _watch(self, proc: ShimProcess) -> None:
        err = await proc.wait_crash()
        self.report_failure(err)

    async def _do_stop(self) -> None:
        if self._watcher is not None:
            self._watcher.cancel()
            await asyncio.gather(self._watcher, return_exceptions=True)
            self._watcher = None
        if self.process is not None:
            await self.process.stop()

    async def restart(self) -> None:
        """Start the shim again after it failed (same sockets: QEMU reconnects within its
        reconnect-delay, the guest's I/O continues)."""
        if self.host is None:
            raise ComponentError(f"{self.fsm.obj}: never prepared, nothing to restart")
        self.fsm.require("restart", ComponentState.FAILED)
        if self._watcher is not None:
            await asyncio.gather(self._watcher, return_exceptions=True)
        await self.prepare(self.host)

    async def _do_checkpoint(self, since: int | None) -> Checkpoint:
        try:
            info, data = await self.control.call_bin("checkpoint_bin", since=since)
        except ShimError as exc:
            raise ComponentError(f"{self.fsm.obj}: checkpoint failed: {exc}") from exc
        assert data is not None
        return Checkpoint(component=self.id, kind=self.kind, version=2, seq=int(info["seq"]), payload=data,
                          base_seq=info["base_seq"],
                          meta={k: info[k] for k in ("quiesced", "tracker", "tracker_del", "cache_pages", "cache_del",
                                                     "planned")})

    async def _do_restore(self, checkpoint: Checkpoint) -> None:
        try:
            await self.control.call_bin("restore_bin", checkpoint.payload, final=bool(checkpoint.meta.get("quiesced")))
        except ShimError as exc:
            why = str(exc).split("refused 'restore_bin': ", 1)[-1]
            raise CheckpointError(f"{self.fsm.obj}: checkpoint {checkpoint.seq} refused: {why}") from exc

    async def _do_quiesce(self) -> None:
        try:
            await self.control.call("quiesce")
        except ShimError as exc:
            raise ComponentError(f"{self.fsm.obj}: quiesce failed: {exc}") from exc

    async def _do_resume(self) -> None:
        try:
            await self.control.call("resume")
        except ShimError as exc:
            raise ComponentError(f"{self.fsm.obj}: resume failed: {exc}") from exc

    # -- MigratableComponent ----------------------------------------------------------------------
    def migration_peer(self, run_dir: Path) -> ShimComponent:
        """A shim for the same disk with its sockets and logs under ``run_dir``, on the same
        backing file (the shared datastore); supervised like this one."""
        peer = ShimComponent(self.disk, self.ctx, self.options, run_dir=run_dir)
        peer.backing = self.backing
        peer.supervise(self.restart_policy)
        return peer

    async def state_size(self, since: int | None = None) -> int:
        try:
            return int((await self.control.call("state_size", since=since))["bytes"])
        except ShimError as exc:
            raise ComponentError(f"{self.fsm.obj}: state_size failed: {exc}") from exc

    async def _do_retire(self) -> None:
        for p in (self.log_path, self.socket_path, self.control_path, self.state_path):
            with contextlib.suppress(FileNotFoundError, NotADirectoryError):
                p.unlink()
        if self.dir.is_dir() and not any(self.dir.iterdir()):
            self.dir.rmdir()

    def pids(self) -> list[int]:
        p = self.process
        return [p.pid] if p is not None and p.pid is not None and p.returncode is None else []

    def files(self) -> list[Path]:
        own = [] if self.disk.path else [self.backing]
        return own + [self.log_path]

    async def _do_remove(self) -> None:
        await super()._do_remove()
        for p in (self.socket_path, self.control_path, self.state_path):
            p.unlink(missing_ok=True)
        if self.dir.exists() and not any(self.dir.iterdir()):
            self.dir.rmdir()

    async def stats(self) -> dict[str, Any]:
        if self.process is None or self.state not in (ComponentState.READY, ComponentState.QUIESCED):
            return {}
        try:
            result: dict[str, Any] = await self.control.stats()
            return result
        except ShimError as exc:
            return {"error": str(exc)}

    # -- SwapBackend ----------------------------------------------------------------------------------
    async def prefetch(self, budget_bytes: int, skip_recent_pages: int = 0) -> dict[str, Any]:
        result: dict[str, Any] = await self.control.prefetch(budget_bytes, skip_recent_pages=skip_recent_pages or None)
        return result

    def to_dict(self) -> dict[str, Any]:
        return super().to_dict() | {"disk": self.disk.to_dict(), "backing": str(self.backing),
                                    "options": {"latency_ms": self.options.latency_ms,
                                                "bandwidth_mib_s": self.options.bandwidth_mib_s,
                                                "prefetch_concurrency": self.options.prefetch_concurrency,
                                                "reconnect_delay": self.options.reconnect_delay}}
