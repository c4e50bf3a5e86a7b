"""The shim process body: exports + NBD server + control socket, until SIGTERM/SIGINT."""
from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
from dataclasses import dataclass, field
from pathlib import Path

from .control import ControlServer
from .errors import ShimConfigError
from .export import Export
from .server import NbdServer
from .store import BackingStore, LinkSpec

log = logging.getLogger(__name__)

READY_LINE = "HVSIM-SHIM-READY"
DEFAULT_EXPORT = "shim"


@dataclass
class ShimConfig:
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

    def link(self) -> LinkSpec:
        if self.latency_ms < 0:
            raise ShimConfigError(f"--latency-ms must be >= 0, got {self.latency_ms}")
        bw = None if self.bandwidth_mib_s is None else self.bandwidth_mib_s * 1024 * 1024
        return LinkSpec(latency_s=self.latency_ms / 1000.0, bandwidth_bps=bw)


class ShimDaemon:
    """Everything one shim process serves; usable in-process too (tests, embedding)."""

    def __init__(self, config: ShimConfig) -> None:
        self.config = config
        link = config.link()
        self.exports = [Export(config.export_name, BackingStore(config.backing, config.size, link=link),
                               description=config.description, prefetch_concurrency=config.prefetch_concurrency)]
        for name, path in config.extra_exports:
            self.exports.append(Export(name, BackingStore(path, config.size, link=link),
                                       prefetch_concurrency=config.prefetch_concurrency))
        self.server = NbdServer(config.socket, self.exports, default_export=config.export_name)
        self.control = ControlServer(config.control, self) if config.control else None
        self._stop = asyncio.Event()

    async def start(self) -> None:
        try:
            for e in self.exports:
                e.open()
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
        for e in self.exports:
            await e.close()

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


def main(config: ShimConfig, verbose: bool = False) -> int:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    return asyncio.run(run(config))
