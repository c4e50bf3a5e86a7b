"""Hostile input over a raw socket: each case gets the spec's error or a clean close, and the
server keeps serving other clients with their data intact."""
from __future__ import annotations

import asyncio
import struct
from pathlib import Path

import pytest

from hvbase.aio import wait_for
from hvsim.drivers.shim import protocol as P
from hvsim.drivers.shim.daemon import ShimDaemon

from .conftest import SIZE
from .nbdraw import RawNbd


async def assert_still_serving(d: ShimDaemon, backing: Path) -> None:
    """A fresh client reads intact data and can write/read back."""
    c = await RawNbd.open(str(d.config.socket), "shim")
    try:
        expect = backing.read_bytes()
        for off in (0, 4096 * 7, SIZE - 8192):
            err, data = await c.read(off, 8192)
            assert err == 0 and data == expect[off:off + 8192]
    finally:
        await c.disconnect()


# transmission phase -------------------------------------------------------------------------
async def test_bad_request_magic_closes_that_connection_only(shim: ShimDaemon, backing: Path) -> None:
    bystander = await RawNbd.open(str(shim.config.socket))
    c = await RawNbd.open(str(shim.config.socket))
    c.request(P.Cmd.READ, 1, 0, 4096, magic=0xDEADBEEF)
    assert await c.closed_by_server()
    err, data = await bystander.read(0, 4096)
    assert err == 0 and data == backing.read_bytes()[:4096]
    await bystander.disconnect()
    await assert_still_serving(shim, backing)


@pytest.mark.parametrize("cmd", [P.Cmd.CACHE, P.Cmd.BLOCK_STATUS, P.Cmd.RESIZE, 9, 0xFFFF])
async def test_unknown_or_unnegotiated_command_is_einval(shim: ShimDaemon, backing: Path, cmd: int) -> None:
    c = await RawNbd.open(str(shim.config.socket))
    c.request(cmd, 7, 0, 4096)
    assert await c.reply() == (7, P.EINVAL, b"")
    err, _ = await c.read(0, 4096)  # connection still usable
    assert err == 0
    await c.disconnect()
    await assert_still_serving(shim, backing)


@pytest.mark.parametrize("flags", [P.CMD_FLAG_DF, P.CMD_FLAG_REQ_ONE, P.CMD_FLAG_FAST_ZERO, 1 << 9])
async def test_unknown_or_unnegotiated_flag_is_einval(shim: ShimDaemon, flags: int) -> None:
    c = await RawNbd.open(str(shim.config.socket))
    c.request(P.Cmd.READ, 3, 0, 4096, flags=flags)
    assert await c.reply() == (3, P.EINVAL, b"")
    await c.disconnect()


async def test_read_longer_than_max_block_is_eoverflow(shim: ShimDaemon, backing: Path) -> None:
    c = await RawNbd.open(str(shim.config.socket))
    c.request(P.Cmd.READ, 5, 0, P.MAX_BLOCK + 4096)
    assert await c.reply() == (5, P.EOVERFLOW, b"")
    await c.disconnect()
    await assert_still_serving(shim, backing)


async def test_write_longer_than_max_block_is_eoverflow_and_stream_stays_in_sync(
        shim: ShimDaemon, backing: Path) -> None:
    before = backing.read_bytes()
    c = await RawNbd.open(str(shim.config.socket))
    length = P.MAX_BLOCK + 1
    c.request(P.Cmd.WRITE, 9, 0, length, payload=b"\xee" * length)
    assert await c.reply() == (9, P.EOVERFLOW, b"")
    err, data = await c.read(0, 4096, cookie=10)  # the next request parses correctly
    assert err == 0 and data == before[:4096]
    await c.disconnect()
    assert backing.read_bytes() == before


@pytest.mark.parametrize("cmd,expect", [(P.Cmd.READ, P.EINVAL), (P.Cmd.WRITE, P.ENOSPC),
                                        (P.Cmd.WRITE_ZEROES, P.ENOSPC), (P.Cmd.TRIM, P.EINVAL)])
async def test_offset_past_end(shim: ShimDaemon, backing: Path, cmd: int, expect: int) -> None:
    before = backing.read_bytes()
    c = await RawNbd.open(str(shim.config.socket))
    for cookie, (off, ln) in enumerate([(SIZE, 4096), (SIZE - 4096, 8192), (2**64 - 4096, 8192)]):
        payload = b"\x01" * ln if cmd == P.Cmd.WRITE else b""
        c.request(cmd, cookie, off, ln, payload=payload)
        got = await c.reply()
        want = P.EINVAL if off + ln >= 2**64 else expect
        assert got == (cookie, want, b""), (off, ln)
    await c.disconnect()
    assert backing.read_bytes() == before


async def test_zero_length_and_flush_with_offset_are_einval(shim: ShimDaemon) -> None:
    c = await RawNbd.open(str(shim.config.socket))
    c.request(P.Cmd.READ, 1, 0, 0)
    assert await c.reply() == (1, P.EINVAL, b"")
    c.request(P.Cmd.FLUSH, 2, 4096, 0)
    assert await c.reply() == (2, P.EINVAL, b"")
    c.request(P.Cmd.FLUSH, 3)
    assert await c.reply() == (3, 0, b"")
    await c.disconnect()


async def test_truncated_request_then_close(shim: ShimDaemon, backing: Path) -> None:
    c = await RawNbd.open(str(shim.config.socket))
    c.writer.write(P.REQUEST.pack(P.REQUEST_MAGIC, 0, P.Cmd.READ, 1, 0, 4096)[:17])
    await c.writer.drain()
    c.writer.close()
    await assert_still_serving(shim, backing)


async def test_disconnect_mid_write_applies_nothing(shim: ShimDaemon, backing: Path) -> None:
    before = backing.read_bytes()
    c = await RawNbd.open(str(shim.config.socket))
    c.writer.write(P.REQUEST.pack(P.REQUEST_MAGIC, 0, P.Cmd.WRITE, 1, 65536, 65536) + b"\xcc" * 30000)
    await c.writer.drain()
    c.writer.close()
    await asyncio.sleep(0.1)
    await assert_still_serving(shim, backing)
    assert backing.read_bytes() == before


async def test_disc_answers_outstanding_requests_first(shim: ShimDaemon, backing: Path) -> None:
    c = await RawNbd.open(str(shim.config.socket))
    c.request(P.Cmd.WRITE, 1, 4096, 4096, payload=b"\xab" * 4096)
    c.request(P.Cmd.DISC, 2)
    assert await c.reply() == (1, 0, b"")
    assert await c.closed_by_server()
    assert backing.read_bytes()[4096:8192] == b"\xab" * 4096


async def test_shutdown_answers_eshutdown(shim: ShimDaemon, backing: Path) -> None:
    c = await RawNbd.open(str(shim.config.socket))
    err, _ = await c.read(0, 4096)
    assert err == 0
    closing = asyncio.ensure_future(shim.server.shutdown(grace=5.0))
    await asyncio.sleep(0.05)
    c.request(P.Cmd.READ, 42, 0, 4096)
    assert await c.reply() == (42, P.ESHUTDOWN, b"")
    await c.disconnect()  # the client reacts to ESHUTDOWN with a soft disconnect
    await wait_for(closing, 5.0)
    assert not shim.config.socket.exists()


# negotiation phase --------------------------------------------------------------------------
async def test_bad_option_magic_closes(shim: ShimDaemon, backing: Path) -> None:
    c = await RawNbd.connect(str(shim.config.socket))
    await c.greet()
    c.send_option(P.Opt.LIST, magic=b"IHAVEOPX")
    assert await c.closed_by_server()
    await assert_still_serving(shim, backing)


async def test_unknown_client_flags_close(shim: ShimDaemon) -> None:
    c = await RawNbd.connect(str(shim.config.socket))
    await c.greet(cflags=1 << 5)
    assert await c.closed_by_server()


async def test_option_with_lying_inner_length_is_invalid_and_session_continues(
        shim: ShimDaemon, backing: Path) -> None:
    c = await RawNbd.connect(str(shim.config.socket))
    await c.greet()
    name = b"shim"
    lying = P.U32.pack(1000) + name + P.U16.pack(0)  # name length claims far more than the option holds
    c.send_option(P.Opt.GO, lying)
    rep = await c.read_opt_reply()
    assert rep.reply == P.Rep.ERR_INVALID
    # 3 requests announced, 1 sent
    c.send_option(P.Opt.INFO, P.U32.pack(4) + name + P.U16.pack(3) + P.U16.pack(P.Info.BLOCK_SIZE))
    assert (await c.read_opt_reply()).reply == P.Rep.ERR_INVALID
    replies = await c.go("shim")
    assert replies[-1].reply == P.Rep.ACK
    err, data = await c.read(0, 4096)
    assert err == 0 and data == backing.read_bytes()[:4096]
    await c.disconnect()


async def test_option_length_longer_than_data_sent_then_hangup(shim: ShimDaemon, backing: Path) -> None:
    c = await RawNbd.connect(str(shim.config.socket))
    await c.greet()
    c.send_option(P.Opt.GO, b"\x00\x00", length=500)
    await c.writer.drain()
    c.writer.close()
    await assert_still_serving(shim, backing)


async def test_huge_option_length_closes(shim: ShimDaemon) -> None:
    c = await RawNbd.connect(str(shim.config.socket))
    await c.greet()
    c.send_option(P.Opt.GO, b"", length=0xFFFFFFF0)
    assert await c.closed_by_server()


@pytest.mark.parametrize("opt", [P.Opt.STRUCTURED_REPLY, P.Opt.STARTTLS, P.Opt.LIST_META_CONTEXT,
                                 P.Opt.SET_META_CONTEXT, P.Opt.EXTENDED_HEADERS, 4242])
async def test_unsupported_options_answer_unsup(shim: ShimDaemon, opt: int) -> None:
    c = await RawNbd.connect(str(shim.config.socket))
    await c.greet()
    c.send_option(opt, b"xyz")
    rep = await c.read_opt_reply()
    assert (rep.option, rep.reply) == (opt, P.Rep.ERR_UNSUP)
    assert (await c.go("shim"))[-1].reply == P.Rep.ACK
    await c.disconnect()


async def test_list_abort_info_and_unknown_export(shim: ShimDaemon) -> None:
    c = await RawNbd.connect(str(shim.config.socket))
    flags = await c.greet()
    assert flags == P.FLAG_FIXED_NEWSTYLE | P.FLAG_NO_ZEROES
    c.send_option(P.Opt.LIST, b"junk")
    assert (await c.read_opt_reply()).reply == P.Rep.ERR_INVALID
    c.send_option(P.Opt.LIST)
    names = []
    while (rep := await c.read_opt_reply()).reply == P.Rep.SERVER:
        (n,) = struct.unpack(">I", rep.data[:4])
        names.append(rep.data[4:4 + n].decode())
    assert rep.reply == P.Rep.ACK and sorted(names) == ["second", "shim"]
    c.send_option(P.Opt.INFO, RawNbd.go_data("nope"))
    assert (await c.read_opt_reply()).reply == P.Rep.ERR_UNKNOWN
    c.send_option(P.Opt.INFO, RawNbd.go_data("second", (P.Info.NAME, P.Info.BLOCK_SIZE)))
    infos = {}
    while (rep := await c.read_opt_reply()).reply == P.Rep.INFO:
        infos[struct.unpack(">H", rep.data[:2])[0]] = rep.data
    assert rep.reply == P.Rep.ACK
    assert struct.unpack(">HQH", infos[P.Info.EXPORT])[1] == SIZE
    assert infos[P.Info.NAME][2:] == b"second"
    assert struct.unpack(">HIII", infos[P.Info.BLOCK_SIZE])[1:] == (4096, 4096, 32 * 1024 * 1024)
    c.send_option(P.Opt.ABORT)
    assert (await c.read_opt_reply()).reply == P.Rep.ACK
    assert await c.closed_by_server()


async def test_export_name_fallback(shim: ShimDaemon, backing: Path) -> None:
    c = await RawNbd.connect(str(shim.config.socket))
    await c.greet(cflags=P.FLAG_C_FIXED_NEWSTYLE)  # zeroes wanted
    c.send_option(P.Opt.EXPORT_NAME, b"shim")
    size, tflags = struct.unpack(">QH", await c.reader.readexactly(10))
    assert size == SIZE and tflags & P.FLAG_HAS_FLAGS and tflags & P.FLAG_SEND_FLUSH
    assert await c.reader.readexactly(124) == bytes(124)
    err, data = await c.read(8192, 4096)
    assert err == 0 and data == backing.read_bytes()[8192:12288]
    await c.disconnect()


async def test_export_name_unknown_closes(shim: ShimDaemon) -> None:
    c = await RawNbd.connect(str(shim.config.socket))
    await c.greet()
    c.send_option(P.Opt.EXPORT_NAME, b"missing")
    assert await c.closed_by_server()


async def test_socket_is_private(shim: ShimDaemon) -> None:
    import os
    import stat

    assert stat.S_IMODE(os.stat(shim.config.socket).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(shim.config.socket.parent).st_mode) == 0o700
    assert stat.S_IMODE(os.stat(shim.config.control).st_mode) == 0o600
