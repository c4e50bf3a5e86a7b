"""QMP error mapping, exercised through the real qemu.qmp client against a scripted QMP peer."""
import asyncio
import json
import socket

import pytest

from qmp_bridge.client import QMPSession
from qmp_bridge.errors import (CommandNotFoundError, DeviceNotFoundError, GenericError, QEMUExitedError,
                               QMPCommandError, QMPTimeoutError, command_error)


@pytest.mark.parametrize("cls,typ", [("GenericError", GenericError), ("CommandNotFound", CommandNotFoundError),
                                     ("DeviceNotFound", DeviceNotFoundError), ("SomethingNew", QMPCommandError)])
def test_command_error_mapping(cls, typ):
    err = command_error("device_del", cls, "boom", {"id": "x"})
    assert type(err) is typ
    assert err.error_class == cls and err.command == "device_del" and "boom" in str(err)


async def fake_qemu(sock: socket.socket, replies: dict):
    """A tiny QMP server: greeting, capabilities, then scripted replies per command."""
    reader, writer = await asyncio.open_unix_connection(sock=sock)
    writer.write(b'{"QMP": {"version": {"qemu": {"micro": 0, "minor": 2, "major": 7}, "package": ""}, '
                 b'"capabilities": []}}\n')
    await writer.drain()
    decoder, buf = json.JSONDecoder(), ""
    while chunk := await reader.read(4096):   # QMP is a JSON stream, not line-framed
        buf += chunk.decode()
        buf = buf.lstrip()
        if not buf:
            continue
        try:
            msg, end = decoder.raw_decode(buf)
        except ValueError:
            continue
        buf = buf[end:]
        cmd, rid = msg["execute"], msg.get("id")
        reply = replies.get(cmd, {"return": {}})
        if reply == "hang":
            continue
        if rid is not None:
            reply = dict(reply, id=rid)
        writer.write(json.dumps(reply).encode() + b"\n")
        try:
            await writer.drain()
        except ConnectionError:
            return


@pytest.fixture
async def session():
    a, b = socket.socketpair()
    replies = {
        "device_del": {"error": {"class": "DeviceNotFound", "desc": "Device 'x' not found"}},
        "nope": {"error": {"class": "CommandNotFound", "desc": "The command nope has not been found"}},
        "slow": "hang",
    }
    server = asyncio.create_task(fake_qemu(b, replies))
    exited = asyncio.get_running_loop().create_future()
    s = QMPSession("fake", exited=exited, console_tail=lambda: "last console line")
    await s.connect(a)
    yield s, exited
    await s.close()
    server.cancel()
    await asyncio.gather(server, return_exceptions=True)
    b.close()


async def test_execute_maps_error_classes(session):
    s, _ = session
    with pytest.raises(DeviceNotFoundError, match="Device 'x' not found") as ei:
        await s.execute("device_del", {"id": "x"})
    assert ei.value.__cause__ is not None   # root cause kept
    with pytest.raises(CommandNotFoundError):
        await s.execute("nope")
    assert await s.execute("query-status") == {}


async def test_execute_timeout_is_typed(session):
    s, _ = session
    with pytest.raises(QMPTimeoutError, match="QMP slow"):
        await s.execute("slow", timeout=0.2)


async def test_waits_end_when_qemu_dies(session):
    s, exited = session
    asyncio.get_running_loop().call_later(0.1, exited.set_result, -9)
    with pytest.raises(QEMUExitedError, match="code -9") as ei:
        await s.wait_event("NEVER", timeout=30)
    assert "last console line" in str(ei.value)
