"""The shim process body: exports + NBD server + control socket, until SIGTERM/SIGINT.

The process runs on uvloop (libuv's event loop: epoll, reads and writes in C) when it is installed,
which cuts the loop's share of each request; ``HVSIM_SHIM_LOOP=asyncio`` forces the standard loop
(the fallback when uvloop is missing), ``HVSIM_SHIM_LOOP=uvloop`` makes a missing uvloop an error.
"""
from __future__ import annotations

import asyncio
import errno
import logging
import math
import os
import signal
import stat
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from . import protocol as P
from .control import ControlServer
from .devstate import DeviceState, StateFile
from .errors import ShimConfigError
from .export import Export
from .server import NbdServer
from .sockets import check_socket_path
from .store import BackingStore, LinkSpec

log = logging.getLogger(__name__)

READY_LINE = "HVSIM-SHIM-READY"
LOOP_ENV = "HVSIM_SHIM_LOOP"
LOOPS = ("auto", "uvloop", "asyncio")
DEFAULT_EXPORT = "shim"


# Limits of the shim's options (checked by ShimConfig.validate before anything is created).
SIZE_ALIGN = P.MIN_BLOCK                 # sizes are whole minimum blocks: QEMU's NBD client asserts on less
MAX_SIZE = (2**63 - 1) // SIZE_ALIGN * SIZE_ALIGN   # QEMU refuses NBD exports above INT64_MAX
MAX_LATENCY_MS = 60_000.0
MIN_BANDWIDTH_MIB_S = 0.01               # 10 KiB/s: a 32 MiB request then takes under an hour
MAX_BANDWIDTH_MIB_S = 1024.0 * 1024.0    # 1 TiB/s
MAX_PREFETCH_CONCURRENCY = 64
MAX_EXTRA_EXPORTS = 16


def _finite(name: str, value: object, lo: float, hi: float, lo_open: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ShimConfigError(f"{name} must be a number, got {value!r}")
    v = float(value)
    if not math.isfinite(v):
        raise ShimConfigError(f"{name} must be a finite number, got {value!r}")
    if v < lo or (lo_open and v == lo) or v > hi:
        low = f"> {lo:.10g}" if lo_open else f">= {lo:.10g}"
        raise ShimConfigError(f"{name} must be {low} and <= {hi:.10g}, got {value!r}")
    return v


def _check_size(name: str, size: object) -> int:
    if isinstance(size, bool) or not isinstance(size, int):
        raise ShimConfigError(f"{name} must be an integer number of bytes, got {size!r}")
    if size <= 0 or size % SIZE_ALIGN:
        raise ShimConfigError(f"{name} must be a positive multiple of {SIZE_ALIGN} bytes (the NBD minimum block "
                              f"size), got {size}")
    if size > MAX_SIZE:
        raise ShimConfigError(f"{name} must be at most {MAX_SIZE} bytes (QEMU's NBD limit), got {size}")
    return size


def _fits_file_system(name: str, directory: Path, size: int) -> None:
    """Refuse ``size`` if the file system holding ``directory`` cannot hold a (sparse) file that large.
    Probed on an anonymous O_TMPFILE file, so nothing appears on disk (and it is freed on close)."""
    flag = getattr(os, "O_TMPFILE", 0)
    if not flag:  # pragma: no cover - non-Linux
        return
    try:
        fd = os.open(directory, flag | os.O_RDWR | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        if exc.errno in (errno.EOPNOTSUPP, errno.EISDIR, errno.EINVAL):
            return  # this file system has no O_TMPFILE: BackingStore.open still refuses cleanly
        raise ShimConfigError(f"cannot create the backing file in {directory}: {exc.strerror}") from exc
    try:
        os.ftruncate(fd, size)
    except OSError as exc:
        if exc.errno == errno.EFBIG:
            raise ShimConfigError(f"{name}: {size} bytes is more than the file system holding {directory} allows "
                                  "for one file") from exc
        raise ShimConfigError(f"cannot make a {size}-byte backing file in {directory}: {exc.strerror}") from exc
    finally:
        os.close(fd)


def _check_backing(name: str, path: Path, size: int | None) -> None:
    """The backing file: an existing regular file or block device whose size (or the requested one)
    is valid, or a new file (``size`` given) in a writable directory that can hold it."""
    try:
        st: os.stat_result | None = os.stat(path)
    except FileNotFoundError:
        st = None
    except OSError as exc:
        raise ShimConfigError(f"{name} {path}: {exc.strerror}") from exc
    if st is None:
        if size is None:
            raise ShimConfigError(f"{name} {path} does not exist; pass --size to create it")
        parent = path.absolute().parent
        if not parent.is_dir():
            raise ShimConfigError(f"{name} {path}: directory {parent} does not exist")
        if not os.access(parent, os.W_OK | os.X_OK):
            raise ShimConfigError(f"{name} {path}: directory {parent} is not writable")
        _fits_file_system(name, parent, size)
        return
    if stat.S_ISBLK(st.st_mode):
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            try:
                cur = os.lseek(fd, 0, os.SEEK_END)
            finally:
                os.close(fd)
        except OSError as exc:
            raise ShimConfigError(f"{name} {path}: {exc.strerror}") from exc
        if size is not None and size > cur:
            raise ShimConfigError(f"{name} {path} is a {cur}-byte device, smaller than the requested {size}")
    elif stat.S_ISREG(st.st_mode):
        cur = st.st_size
        if size is not None and size > cur:
            if not os.access(path, os.W_OK):
                raise ShimConfigError(f"{name} {path} is not writable, cannot grow it to {size} bytes")
            _fits_file_system(name, path.absolute().parent, size)
    else:
        raise ShimConfigError(f"{name} {path} is neither a regular file nor a block device")
    if size is None:
        if cur == 0:
            raise ShimConfigError(f"{name} {path} is empty; pass --size to give the export a size")
        _check_size(f"the size of {name} {path}", cur)


@dataclass
class ShimConfig:
    """Options of one shim process. :meth:`validate` checks every field (and what is on disk) before
    anything is created; :class:`ShimDaemon` calls it first."""
    socket: Path
    backing: Path
    size: int | None = None
    latency_ms: float = 0.0
    bandwidth_mib_s: float | None = None
    control: Path | None = None
    export_name: str = DEFAULT_EXPORT
    description: str = "hvsim swap shim"
    prefetch_concurrency: int = 4
    extra_exports: list[tuple[str, Path]] = field(default_factory=list)
    state_file: Path | None = None          # periodic index-only checkpoint of the first export
    state_interval: float = 1.0

    def validate(self) -> ShimConfig:
        """Raise ShimConfigError naming the first bad option; touches nothing on disk."""
        if self.size is not None:
            _check_size("--size", self.size)
        _finite("--latency-ms", self.latency_ms, 0.0, MAX_LATENCY_MS)
        if self.bandwidth_mib_s is not None:
            _finite("--bandwidth-mib-s", self.bandwidth_mib_s, MIN_BANDWIDTH_MIB_S, MAX_BANDWIDTH_MIB_S)
        pc = self.prefetch_concurrency
        if isinstance(pc, bool) or not isinstance(pc, int) or not 1 <= pc <= MAX_PREFETCH_CONCURRENCY:
            raise ShimConfigError(f"--prefetch-concurrency must be an integer in 1..{MAX_PREFETCH_CONCURRENCY}, "
                                  f"got {pc!r}")
        if len(self.extra_exports) > MAX_EXTRA_EXPORTS:
            raise ShimConfigError(f"at most {MAX_EXTRA_EXPORTS} extra exports, got {len(self.extra_exports)}")
        names = [self.export_name, *(n for n, _ in self.extra_exports)]
        for n in names:
            if not isinstance(n, str) or not n or len(n.encode()) > P.MAX_STRING or not n.isprintable():
                raise ShimConfigError(f"export name must be 1..{P.MAX_STRING} bytes of printable text, got {n!r}")
        if len(set(names)) != len(names):
            raise ShimConfigError(f"export names must be distinct, got {names}")
        if len(self.description.encode()) > P.MAX_STRING:
            raise ShimConfigError(f"export description is longer than {P.MAX_STRING} bytes")
        _finite("--state-interval", self.state_interval, 0.05, 3600.0)
        if self.state_file is not None and not Path(self.state_file).parent.is_dir():
            raise ShimConfigError(f"--state-file {self.state_file}: its directory does not exist")
        sockets = [check_socket_path(self.socket, "--socket")]
        if self.control is not None:
            sockets.append(check_socket_path(self.control, "--control"))
        backings = [Path(self.backing).absolute(), *(Path(p).absolute() for _, p in self.extra_exports)]
        paths = sockets + backings
        if len(set(paths)) != len(paths):
            raise ShimConfigError("--socket, --control and the backing files must be different paths")
        _check_backing("--backing", Path(self.backing), self.size)
        for n, p in self.extra_exports:
            _check_backing(f"backing of export {n!r}", Path(p), self.size)
        return self

    def link(self) -> LinkSpec:
        bw = None if self.bandwidth_mib_s is None else self.bandwidth_mib_s * 1024 * 1024
        return LinkSpec(latency_s=self.latency_ms / 1000.0, bandwidth_bps=bw)


class ShimDaemon:
    """Everything one shim process serves; usable in-process too (tests, embedding)."""

    def __init__(self, config: ShimConfig) -> None:
        self.config = config.validate()
        link = config.link()
        self.exports = [Export(config.export_name, BackingStore(config.backing, config.size, link=link),
                               description=config.description, prefetch_concurrency=config.prefetch_concurrency)]
        for name, path in config.extra_exports:
            self.exports.append(Export(name, BackingStore(path, config.size, link=link),
                                       prefetch_concurrency=config.prefetch_concurrency))
        self.devices = {e.name: DeviceState(e) for e in self.exports}
        self.state_file = StateFile(config.state_file, self.devices[config.export_name], config.state_interval) \
            if config.state_file else None
        self.server = NbdServer(config.socket, self.exports, default_export=config.export_name)
        self.control = ControlServer(config.control, self) if config.control else None
        self._stop = asyncio.Event()

    async def start(self) -> None:
        try:
            for e in self.exports:
                e.open()
            if self.state_file is not None:
                loaded = self.state_file.load()
                if loaded is not None:
                    result = await self.state_file.device.apply(loaded["checkpoint"], refill=True)
                    log.info("restored from state file %s: %s", self.state_file.path, result)
                self.state_file.start()
            await self.server.start()
            if self.control is not None:
                await self.control.start()
        except BaseException:
            await self.close()
            raise

    def request_stop(self) -> None:
        self._stop.set()

    async def wait_stopped(self) -> None:
        await self._stop.wait()

    async def close(self, grace: float = 5.0) -> None:
        if self.control is not None:
            await self.control.close()
        await self.server.shutdown(grace)
        if self.state_file is not None:
            await self.state_file.close()
        for e in self.exports:
            await e.close()

    def device(self, name: str | None) -> DeviceState:
        return self.devices[self.export(name).name]

    def export(self, name: str | None) -> Export:
        if name is None:
            return self.exports[0]
        for e in self.exports:
            if e.name == name:
                return e
        raise ShimConfigError(f"no export named {name!r}; have {[e.name for e in self.exports]}")


async def run(config: ShimConfig) -> int:
    daemon = ShimDaemon(config)
    await daemon.start()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, daemon.request_stop)
    print(f"{READY_LINE} pid={os.getpid()} socket={config.socket}", flush=True)
    try:
        await daemon.wait_stopped()
    finally:
        log.info("stopping")
        await daemon.close()
    return 0


def loop_factory(choice: str | None = None) -> tuple[str, Callable[[], asyncio.AbstractEventLoop] | None]:
    """The event loop the shim process runs on: ``(name, factory)``, factory None = asyncio's own.

    ``choice`` (default: ``$HVSIM_SHIM_LOOP``, else ``auto``): ``auto`` = uvloop if importable,
    ``uvloop`` = uvloop or ShimConfigError, ``asyncio`` = the standard loop."""
    choice = (os.environ.get(LOOP_ENV) or "auto") if choice is None else choice
    if choice not in LOOPS:
        raise ShimConfigError(f"{LOOP_ENV} must be one of {', '.join(LOOPS)}, got {choice!r}")
    if choice == "asyncio":
        return "asyncio", None
    try:
        import uvloop
    except ImportError as exc:
        if choice == "uvloop":
            raise ShimConfigError(f"{LOOP_ENV}=uvloop but uvloop is not installed") from exc
        return "asyncio", None
    return "uvloop", uvloop.new_event_loop


def main(config: ShimConfig, verbose: bool = False) -> int:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, stream=sys.stderr, force=True,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    name, factory = loop_factory()
    log.info("event loop: %s", name)
    with asyncio.Runner(loop_factory=factory) as runner:
        return runner.run(run(config))
