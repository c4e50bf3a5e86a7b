"""Fixtures for the shim tests: short private socket dirs, backing files, an in-process shim."""
from __future__ import annotations

import asyncio
import os
import shutil
import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from hvbase.aio import wait_for
from hvsim.drivers.shim.daemon import ShimConfig, ShimDaemon

SIZE = 8 * 1024 * 1024


@pytest.fixture
def sockdir() -> Iterator[Path]:
    """A private (0700) directory with a short path (unix socket paths are limited to 107 bytes)."""
    d = Path(tempfile.mkdtemp(prefix="hvs-", dir="/tmp"))
    os.chmod(d, 0o700)
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def backing(sockdir: Path) -> Path:
    path = sockdir / "backing.img"
    path.write_bytes(os.urandom(SIZE))
    return path


@pytest.fixture
async def shim(sockdir: Path, backing: Path) -> AsyncIterator[ShimDaemon]:
    """A shim served from this test's event loop: export 'shim' (default) plus export 'second'."""
    second = sockdir / "second.img"
    second.write_bytes(b"\x5a" * SIZE)
    cfg = ShimConfig(socket=sockdir / "nbd.sock", backing=backing, control=sockdir / "ctl.sock",
                     extra_exports=[("second", second)])
    d = ShimDaemon(cfg)
    await d.start()
    try:
        yield d
    finally:
        await d.close(grace=1.0)


def uri(d: ShimDaemon, export: str = "shim") -> str:
    return f"nbd+unix:///{export}?socket={d.config.socket}"


async def run(*argv: str, timeout: float = 60.0, check: bool = True) -> tuple[int, str, str]:
    """Run an external client without blocking the loop that serves the in-process shim."""
    proc = await asyncio.create_subprocess_exec(*argv, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    try:
        out, err = await wait_for(proc.communicate(), timeout)
    except BaseException:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        raise
    if check and proc.returncode != 0:
        raise AssertionError(f"{argv} exited {proc.returncode}\nstdout: {out.decode()}\nstderr: {err.decode()}")
    return proc.returncode or 0, out.decode(), err.decode()
