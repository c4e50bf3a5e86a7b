"""The shim as a separate process: launcher, control socket, crash detection, restart."""
from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest

from hvbase.aio import wait_for
from hvsim.drivers.shim.cache import PAGE, SWAP_MAGIC
from hvsim.drivers.shim.control import ShimControlClient
from hvsim.drivers.shim.errors import ControlError, ShimCrashed, ShimStateError
from hvsim.drivers.shim.process import ProcState, ShimProcess

from .conftest import SIZE, run


def swap_page0() -> bytes:
    page = bytearray(PAGE)
    page[PAGE - 10:] = SWAP_MAGIC
    return bytes(page)


async def test_process_control_prefetch_and_stats(sockdir: Path, backing: Path) -> None:
    header = sockdir / "hdr.bin"
    header.write_bytes(swap_page0())
    async with ShimProcess(sockdir / "s.sock", backing, latency_ms=1.0) as shim:
        assert shim.state is ProcState.RUNNING
        ctl = shim.control
        assert (await ctl.ping())["exports"] == ["shim"]
        # the "guest" writes a swap header and 64 swap pages, then reads them back
        await run("qemu-io", "-f", "raw", "-c", f"write -s {header} 0 {PAGE}",
                  "-c", f"write -P 0x5a {PAGE} {64 * PAGE}", shim.nbd_uri())
        st = await ctl.stats()
        assert st["swap_header"] is True
        assert st["tracked_pages"] == 64 and st["latency_ms"] == 1.0
        info = await ctl.prefetch(32 * PAGE, wait=True)
        assert info["planned_pages"] == 32
        st = await ctl.wait_prefetch()
        assert st["cache_bytes"] == 32 * PAGE and st["prefetched_pages"] == 32
        await ctl.reset_stats()
        _, out, err = await run("qemu-io", "-f", "raw", "-c", f"read -P 0x5a {PAGE} {64 * PAGE}", shim.nbd_uri())
        assert "verification failed" not in out + err
        st = await ctl.stats()
        assert st["hits"] == 32 and st["misses"] == 32 and st["cache_bytes"] <= 32 * PAGE
        state = await ctl.checkpoint()
        assert state["version"] == 1 and len(state["tracker"]["pages"]) == 64
        await ctl.restore(state)
        with pytest.raises(ControlError, match="unknown control command"):
            await ctl.call("frobnicate")
        with pytest.raises(ControlError, match="budget_bytes"):
            await ctl.call("prefetch")
    assert shim.state is ProcState.STOPPED and shim.returncode == 0
    assert not shim.socket_path.exists() and not shim.control_path.exists()


async def test_crash_is_detected_and_restart_on_same_socket_keeps_data(sockdir: Path, backing: Path) -> None:
    sock = sockdir / "s.sock"
    shim = ShimProcess(sock, backing)
    await shim.start()
    try:
        await run("qemu-io", "-f", "raw", "-c", "write -P 0x3c 1M 256k", shim.nbd_uri())
        assert shim.pid is not None
        os.kill(shim.pid, signal.SIGKILL)  # the driver dies under us
        crash = await wait_for(shim.wait_crash(), 10)
        assert isinstance(crash, ShimCrashed) and crash.returncode == -signal.SIGKILL
        with pytest.raises(ShimCrashed):
            shim.check()
        assert sock.exists()  # stale socket left behind by the dead process
        await shim.start()  # same socket: the stale file is replaced
        _, out, err = await run("qemu-io", "-f", "raw", "-c", "read -P 0x3c 1M 256k", shim.nbd_uri())
        assert "verification failed" not in out + err
        assert backing.read_bytes()[1 << 20:(1 << 20) + (256 << 10)] == b"\x3c" * (256 << 10)
    finally:
        await shim.stop()


async def test_start_failure_reports_log(sockdir: Path, backing: Path) -> None:
    public = sockdir / "pub"
    public.mkdir(mode=0o755)
    os.chmod(public, 0o755)
    shim = ShimProcess(public / "s.sock", backing, log_path=sockdir / "shim.log")
    with pytest.raises(ShimCrashed, match="must be private"):
        await shim.start()
    assert shim.state is ProcState.CRASHED


async def test_second_server_on_live_socket_is_refused(sockdir: Path, backing: Path) -> None:
    async with ShimProcess(sockdir / "s.sock", backing) as first:
        other = ShimProcess(sockdir / "s.sock", backing, control_path=sockdir / "c2.sock",
                            log_path=sockdir / "o.log")
        with pytest.raises(ShimCrashed, match="already listening"):
            await other.start()
        assert (await first.control.ping())["pid"] == first.pid


async def test_double_start_is_refused(sockdir: Path, backing: Path) -> None:
    async with ShimProcess(sockdir / "s.sock", backing) as shim:
        with pytest.raises(ShimStateError):
            await shim.start()


async def test_control_client_reports_missing_shim(sockdir: Path) -> None:
    with pytest.raises(ControlError):
        await ShimControlClient(sockdir / "nobody.sock", timeout=1.0).stats()


async def test_hvsim_cli_has_shim_serve() -> None:
    from typer.testing import CliRunner

    from hvsim.cli import _load, app

    _load()
    result = CliRunner().invoke(app, ["shim", "serve", "--help"])
    assert result.exit_code == 0, result.output
    for opt in ("--socket", "--backing", "--size", "--latency-ms", "--bandwidth-mib-s", "--control"):
        assert opt in result.output


async def test_blockdev_options_shape(sockdir: Path, backing: Path) -> None:
    shim = ShimProcess(sockdir / "s.sock", backing, export_name="swap0")
    opts = shim.blockdev_options("swap0", reconnect_delay=5)
    assert opts == {"driver": "nbd", "node-name": "swap0", "server": {"type": "unix", "path": str(sockdir / "s.sock")},
                    "export": "swap0", "reconnect-delay": 5}
    assert shim.blockdev_arg("swap0", 5).startswith("driver=nbd,node-name=swap0,server.type=unix,")
    assert shim.nbd_uri() == f"nbd+unix:///swap0?socket={sockdir / 's.sock'}"
    assert SIZE > 0
