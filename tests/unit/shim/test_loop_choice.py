"""The shim process's event loop: uvloop by default, asyncio's own as the fallback, a bad choice refused."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import uvloop

from hvsim.drivers.shim.daemon import LOOP_ENV, loop_factory
from hvsim.drivers.shim.errors import ShimConfigError, ShimCrashed
from hvsim.drivers.shim.process import ShimProcess

from .conftest import run


def test_loop_factory_choices(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(LOOP_ENV, raising=False)
    assert loop_factory() == ("uvloop", uvloop.new_event_loop)
    assert loop_factory("uvloop") == ("uvloop", uvloop.new_event_loop)
    assert loop_factory("asyncio") == ("asyncio", None)
    monkeypatch.setenv(LOOP_ENV, "asyncio")
    assert loop_factory() == ("asyncio", None)
    with pytest.raises(ShimConfigError, match=f"{LOOP_ENV} must be one of auto, uvloop, asyncio, got 'trio'"):
        loop_factory("trio")


def test_without_uvloop_auto_falls_back_and_uvloop_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "uvloop", None)  # import uvloop -> ImportError
    assert loop_factory("auto") == ("asyncio", None)
    with pytest.raises(ShimConfigError, match="uvloop is not installed"):
        loop_factory("uvloop")


@pytest.mark.parametrize("choice,expect", [(None, "uvloop"), ("asyncio", "asyncio"), ("uvloop", "uvloop")])
async def test_process_serves_on_the_chosen_loop(sockdir: Path, backing: Path, monkeypatch: pytest.MonkeyPatch,
                                                 choice: str | None, expect: str) -> None:
    if choice is None:
        monkeypatch.delenv(LOOP_ENV, raising=False)
    else:
        monkeypatch.setenv(LOOP_ENV, choice)
    async with ShimProcess(sockdir / "s.sock", backing, log_path=sockdir / "shim.log") as shim:
        await run("qemu-io", "-f", "raw", "-c", "write -P 0x3c 12288 40960", shim.nbd_uri())
        _, out, err = await run("qemu-io", "-f", "raw", "-c", "read -P 0x3c 12288 40960", "-c", "read 0 12288",
                                shim.nbd_uri())
        assert "verification failed" not in out + err
    assert f"event loop: {expect}" in (sockdir / "shim.log").read_text()
    assert backing.read_bytes()[12288:12288 + 40960] == b"\x3c" * 40960


async def test_process_refuses_an_unknown_loop(sockdir: Path, backing: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(LOOP_ENV, "trio")
    before = backing.read_bytes()
    shim = ShimProcess(sockdir / "s.sock", backing, log_path=sockdir / "shim.log")
    with pytest.raises(ShimCrashed) as info:
        await shim.start()
    assert info.value.returncode == 2
    assert f"{LOOP_ENV} must be one of auto, uvloop, asyncio, got 'trio'" in info.value.log_tail
    assert not (sockdir / "s.sock").exists() and backing.read_bytes() == before
