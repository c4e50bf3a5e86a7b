"""The host side of the guest agent against a scripted (hostile) guest on a real unix socket.

The guest is untrusted: a malformed header, a length over its limit, more data than granted or a
wrong protocol version drops the channel with AgentProtocolError (nothing over the limit is
buffered); truncation flags and byte totals reach ExecResult; a streamed command is flow
controlled by the host's grants."""
from __future__ import annotations

import asyncio
import contextlib
import os
import tempfile
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest

from hvsim.core.agent import (DEFAULT_WINDOW, MAX_CHUNK, MAX_LINE, MAX_OUTPUT, AgentProtocolError, GuestAgent)
from hvsim.core.errors import AgentDisconnectedError, AgentError, AgentTimeoutError

Script = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


async def read_request(reader: asyncio.StreamReader) -> list[str]:
    """One host request: its header fields (an EXEC/STREAM payload is consumed)."""
    parts = (await reader.readline()).decode().split()
    if parts and parts[0] in ("EXEC", "STREAM"):
        await reader.readexactly(int(parts[-1]))
    return parts


@contextlib.asynccontextmanager
async def guest(script: Script) -> AsyncIterator[GuestAgent]:
    d = Path(tempfile.mkdtemp(prefix="hvs-agent-", dir="/tmp"))
    os.chmod(d, 0o700)
    sock = d / "agent.sock"
    done: list[BaseException] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await script(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass                                     # the host dropped the channel
        except Exception as exc:
            done.append(exc)
        finally:
            writer.close()

    server = await asyncio.start_unix_server(handle, str(sock))
    agent = GuestAgent("fake", sock)
    try:
        await agent.connect()
        yield agent
    finally:
        await agent.close()
        server.close()
        await server.wait_closed()
        sock.unlink(missing_ok=True)
        d.rmdir()
    assert not done, done


async def hold(reader: asyncio.StreamReader) -> None:
    """Keep the channel open until the host closes it (reading whatever it still sends)."""
    while await reader.read(65536):
        pass


async def test_truncation_flags_and_totals_reach_the_result() -> None:
    async def script(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        rid = (await read_request(r))[1]
        w.write(b"HELLO 2\n")
        w.write(f"DONE {rid} 0 0 0 5 3 1 9000000 3\n".encode() + b"hello" + b"err")
        await w.drain()
        await hold(r)

    async with guest(script) as agent:
        res = await agent.exec("make output", timeout=5)
    assert res.stdout == "hello" and res.stderr == "err"
    assert res.truncated and res.stdout_truncated and not res.stderr_truncated
    assert res.stdout_bytes == 9_000_000 and res.stderr_bytes == 3


@pytest.mark.parametrize("header", [
    "DONE {rid} 0 0 0 {big} 0 0 {big} 0",          # more output than the guest may keep
    "DONE {rid} 0 0 0 0 {big} 0 0 {big}",
    "DONE {rid} 0 0 0 -5 0 0 0 0",                 # negative length
    "DONE {rid} x 0 0 0 0 0 0 0",                  # not a number
    "DONE {rid} 300 0 0 0 0 0 0 0",                # exit code out of range
    "DONE {rid} 0 0 7 0 0 0 0 0",                  # timed-out flag not 0/1
    "DONE {rid} 0 0 0 10 0 0 5 0",                 # total below the length sent
    "DONE {rid} 0 0 0 0 0 0",                      # version 1 layout
    "DATA {rid} 1 10",                             # DATA for a buffered command: nothing granted
    "FROB {rid}",                                  # unknown message: framing lost
    "HELLO 1",                                     # an old guest image
])
async def test_malformed_header_drops_the_channel(header: str) -> None:
    async def script(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        rid = (await read_request(r))[1]
        w.write(header.format(rid=rid, big=MAX_OUTPUT + 1).encode() + b"\n")
        await w.drain()
        await hold(r)

    async with guest(script) as agent:
        with pytest.raises(AgentProtocolError):
            await agent.exec("x", timeout=5)
        await asyncio.sleep(0)
        assert not agent.connected and isinstance(agent.protocol_error, AgentProtocolError)


@pytest.mark.parametrize("length", [MAX_LINE + 1, 1 << 20])
async def test_over_long_header_line_is_refused(length: int) -> None:
    async def script(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await read_request(r)
        w.write(b"P" * length + b"\n")
        await w.drain()
        await hold(r)

    async with guest(script) as agent:
        with pytest.raises(AgentProtocolError, match="header line"):
            await agent.ping(timeout=5)


async def test_reply_for_an_unknown_command_is_skipped_without_losing_framing() -> None:
    async def script(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        rid = (await read_request(r))[1]
        w.write(b"DONE 999 0 0 0 100000 0 0 100000 0\n" + b"z" * 100000)   # nobody asked for 999
        w.write(b"DATA 998 1 100\n" + b"y" * 100)
        w.write(f"PONG {rid} 42\n".encode())
        await w.drain()
        await hold(r)

    async with guest(script) as agent:
        assert await agent.ping(timeout=5) == 42


async def test_stream_is_flow_controlled_and_intact() -> None:
    total = 5 * DEFAULT_WINDOW + 12345
    payload = bytes(range(256)) * (total // 256 + 1)
    payload = payload[:total]
    max_ahead: list[int] = []

    async def script(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        head = await read_request(r)
        assert head[0] == "STREAM" and int(head[3]) == DEFAULT_WINDOW
        rid, credit, sent, acked = head[1], int(head[3]), 0, 0
        while sent < total:
            while credit == 0:                       # like agent.c: wait for the host's grant
                ack = (await r.readline()).decode().split()
                assert ack[0] == "ACK" and ack[1] == rid
                credit += int(ack[2])
                acked += int(ack[2])
            n = min(MAX_CHUNK, credit, total - sent)
            w.write(f"DATA {rid} 1 {n}\n".encode() + payload[sent:sent + n])
            sent += n
            credit -= n
            max_ahead.append(sent - acked)
            await w.drain()
        w.write(f"DATA {rid} 2 3\nerr".encode())     # granted? only if credit remains
        w.write(f"DONE {rid} 3 0 0 0 0 0 {total} 3\n".encode())
        await w.drain()
        await hold(r)

    async with guest(script) as agent:
        got, err = bytearray(), bytearray()
        stream = agent.exec_stream("big", timeout=10)
        async with stream:
            async for chunk in stream:
                (got if chunk.fd == 1 else err).extend(chunk.data)
        assert bytes(got) == payload and bytes(err) == b"err"
        assert stream.result is not None and stream.result.exit_code == 3
        assert stream.result.stdout_bytes == total and not stream.result.truncated
        assert max(max_ahead) <= DEFAULT_WINDOW


async def test_stream_data_beyond_the_grant_is_a_protocol_error() -> None:
    async def script(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        head = await read_request(r)
        rid, window = head[1], int(head[3])
        for _ in range(2 * window // MAX_CHUNK):     # twice the window, without waiting for grants
            w.write(f"DATA {rid} 1 {MAX_CHUNK}\n".encode() + b"\0" * MAX_CHUNK)
        await w.drain()
        await hold(r)

    async with guest(script) as agent:
        with pytest.raises(AgentProtocolError, match="granted"):
            async for _ in agent.exec_stream("x", timeout=10, window=4 * MAX_CHUNK):
                await asyncio.sleep(0.5)             # a slow reader: it grants one chunk back at most


@pytest.mark.parametrize("header", ["DATA {rid} 3 10", f"DATA {{rid}} 1 {MAX_CHUNK + 1}", "DATA {rid} 1 0"])
async def test_bad_data_chunk_is_a_protocol_error(header: str) -> None:
    async def script(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        rid = (await read_request(r))[1]
        w.write(header.format(rid=rid).encode() + b"\n")
        await w.drain()
        await hold(r)

    async with guest(script) as agent:
        with pytest.raises(AgentProtocolError):
            async for _ in agent.exec_stream("x", timeout=10):
                pass


async def test_stream_totals_that_disagree_with_what_arrived_fail_the_command() -> None:
    async def script(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        rid = (await read_request(r))[1]
        w.write(f"DATA {rid} 1 4\nabcd".encode() + f"DONE {rid} 0 0 0 0 0 0 10 0\n".encode())
        w.write(b"PONG 424242 1\n")
        await w.drain()
        await hold(r)

    async with guest(script) as agent:
        with pytest.raises(AgentError, match="10\\+0 bytes but 4\\+0 arrived"):
            async for _ in agent.exec_stream("x", timeout=10):
                pass
        assert agent.connected                       # the framing was fine: only that command failed


async def test_abandoned_stream_is_killed_and_times_out_cleanly() -> None:
    kills: list[str] = []

    async def script(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        rid = (await read_request(r))[1]
        w.write(f"DATA {rid} 1 5\nhello".encode())
        await w.drain()
        while True:
            parts = await read_request(r)
            if not parts:
                return
            if parts[0] == "KILL":
                kills.append(parts[1])
                w.write(f"DONE {parts[1]} 137 9 0 0 0 0 5 0\n".encode())   # late: must be skipped
                await w.drain()
            elif parts[0] == "STREAM":                     # the second command never answers
                pass

    async with guest(script) as agent:
        async for chunk in agent.exec_stream("first", timeout=10):
            assert chunk.data == b"hello"
            break                                          # abandoned: asyncio closes the iterator
        for _ in range(50):
            if kills:
                break
            await asyncio.sleep(0.01)
        assert kills == ["1"] and agent._pending == {}
        with pytest.raises(AgentTimeoutError):
            async for _ in agent.exec_stream("second", timeout=0.3):
                pass
        for _ in range(50):
            if len(kills) == 2:
                break
            await asyncio.sleep(0.01)
        assert kills == ["1", "2"] and agent.connected


async def test_disconnect_fails_a_waiting_stream() -> None:
    async def script(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await read_request(r)

    async with guest(script) as agent:
        with pytest.raises(AgentDisconnectedError):
            async for _ in agent.exec_stream("x", timeout=10):
                pass


async def test_stream_arguments_are_checked() -> None:
    agent = GuestAgent("fake", Path("/nonexistent"))
    with pytest.raises(AgentError, match="empty command"):
        agent.exec_stream("")
    with pytest.raises(AgentError, match="window"):
        agent.exec_stream("x", window=10)
    with pytest.raises(AgentError, match="1 MiB"):
        await agent.exec("x" * ((1 << 20) + 1))
