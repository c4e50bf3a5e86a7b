"""nbdkit as a VM component: a disk of kind "nbdkit" is served by a real nbdkit process (file plugin
with the delay filter, optionally readahead + cache), the peer the swap shim is measured against.

    cluster.add_driver(NbdkitDriver(NbdkitOptions(latency_ms=1.0, readahead_budget=128 << 20)))
    vm = await cluster.define_vm(VMSpec("g", disks=(DiskSpec("swap", 384, kind="nbdkit"),)), "h1")

The backing file lives in the VM's directory; the socket in a private ``<vm dir>/nbdkit`` (0700).
nbdkit runs with ``--exit-with-parent`` and in the host's network namespace; a crash is reported
like any component's.
"""
from __future__ import annotations

import asyncio
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qmp_bridge import Drive

from hvbase.aio import stop_process
from ..core.components import Attachment, Component, ComponentContext
from ..core.errors import ComponentError, SpecError
from ..core.host import Host
from ..core.model import DiskSpec

EXPORT = "swap"


@dataclass(frozen=True)
class NbdkitOptions:
    latency_ms: float = 0.0
    readahead_budget: int | None = None      # bytes: readahead + cache filters with this cache size
    cache_dir: Path | None = None            # where the cache filter keeps its file (default /dev/shm)
    reconnect_delay: int = 10

    def __post_init__(self) -> None:
        if not 0 <= self.latency_ms < 60_000:
            raise SpecError(f"nbdkit latency_ms must be within 0..60000, got {self.latency_ms!r}")
        if self.readahead_budget is not None and self.readahead_budget <= 0:
            raise SpecError(f"nbdkit readahead_budget must be > 0 bytes, got {self.readahead_budget!r}")


class NbdkitDriver:
    kind = "nbdkit"

    def __init__(self, options: NbdkitOptions = NbdkitOptions()) -> None:
        self.options = options

    def create(self, disk: DiskSpec, ctx: ComponentContext) -> NbdkitComponent:
        if disk.format != "raw":
            raise SpecError(f"nbdkit disk {disk.name!r} of vm {ctx.vm!r} must be raw, not {disk.format}")
        return NbdkitComponent(disk, ctx, self.options)


class NbdkitComponent(Component):
    kind = "nbdkit"

    def __init__(self, disk: DiskSpec, ctx: ComponentContext, options: NbdkitOptions) -> None:
        super().__init__(disk.name, ctx)
        self.disk, self.options = disk, options
        self.dir = ctx.vm_dir / "nbdkit"
        self.socket_path = self.dir / f"{disk.name}.sock"
        self.backing = Path(disk.path) if disk.path else ctx.vm_dir / f"{disk.name}.img"
        self.proc: asyncio.subprocess.Process | None = None
        self._watcher: asyncio.Task[None] | None = None

    def argv(self, netns: str | None) -> list[str]:
        o = self.options
        filters = ["--filter=readahead", "--filter=cache"] if o.readahead_budget is not None else []
        filters.append("--filter=delay")
        delay = f"{o.latency_ms:g}ms"
        argv = ["nbdkit", "-f", "--exit-with-parent", "-U", str(self.socket_path), "-e", EXPORT, *filters,
                "file", f"file={self.backing}", f"rdelay={delay}", f"wdelay={delay}"]
        if o.readahead_budget is not None:
            argv += ["cache=writethrough", "cache-on-read=true", f"cache-max-size={o.readahead_budget}"]
        return (["ip", "netns", "exec", netns] if netns else []) + argv

    async def _do_prepare(self, host: Host, timeout: float = 15.0) -> Attachment:
        if shutil.which("nbdkit") is None:
            raise ComponentError("nbdkit is not installed (Debian package nbdkit)")
        self.dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(self.dir, 0o700)
        if not self.backing.exists():
            fd = os.open(self.backing, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            try:
                os.ftruncate(fd, self.disk.size_mib * 1024 * 1024)
            finally:
                os.close(fd)
        self.socket_path.unlink(missing_ok=True)
        cache_dir = self.options.cache_dir or (Path("/dev/shm") if Path("/dev/shm").is_dir() else self.dir)
        env = dict(os.environ, TMPDIR=str(cache_dir))
        proc = await asyncio.create_subprocess_exec(*self.argv(host.netns), env=env, stdin=asyncio.subprocess.DEVNULL,
                                                    stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE)
        self.proc = proc
        self.ctx.track_process(proc.pid, f"nbdkit {self.ctx.vm}/{self.name}")
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if proc.returncode is not None:
                err = await proc.stderr.read() if proc.stderr else b""
                raise ComponentError(f"nbdkit exited {proc.returncode}: {err.decode(errors='replace').strip()}")
            if self.socket_path.exists():
                try:
                    _, w = await asyncio.open_unix_connection(str(self.socket_path))
                    w.close()
                    break
                except OSError:
                    pass
            await asyncio.sleep(0.05)
        else:
            raise ComponentError(f"nbdkit did not listen on {self.socket_path} within {timeout}s")
        self._watcher = asyncio.create_task(self._watch(proc), name=f"nbdkit-watch-{self.ctx.vm}-{self.name}")
        return Attachment(drives=(Drive(id=f"disk-{self.name}", path=str(self.socket_path), kind="nbd",
                                        export=EXPORT, reconnect_delay=self.options.reconnect_delay),))

    async def _watch(self, proc: asyncio.subprocess.Process) -> None:
        code = await proc.wait()
        self.report_failure(f"nbdkit pid {proc.pid} exited with {code}")

    async def _do_stop(self) -> None:
        if self._watcher is not None:
            self._watcher.cancel()
            await asyncio.gather(self._watcher, return_exceptions=True)
            self._watcher = None
        proc, self.proc = self.proc, None
        if proc is not None:
            await stop_process(proc)

    def pids(self) -> list[int]:
        return [self.proc.pid] if self.proc is not None and self.proc.returncode is None else []

    def files(self) -> list[Path]:
        return [] if self.disk.path else [self.backing]

    async def _do_remove(self) -> None:
        await super()._do_remove()
        self.socket_path.unlink(missing_ok=True)
        if self.dir.exists() and not any(self.dir.iterdir()):
            self.dir.rmdir()

    def to_dict(self) -> dict[str, Any]:
        return super().to_dict() | {"latency_ms": self.options.latency_ms,
                                    "readahead_budget": self.options.readahead_budget}
