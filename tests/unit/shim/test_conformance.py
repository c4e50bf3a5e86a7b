"""Conformance with real NBD clients: nbdinfo, qemu-io, qemu-img, nbdcopy (no QEMU guests)."""
from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path

from hvsim.drivers.shim import protocol as P
from hvsim.drivers.shim.daemon import ShimDaemon

from .conftest import SIZE, run, uri
from .nbdraw import RawNbd


async def test_nbdinfo_sees_size_and_block_sizes(shim: ShimDaemon) -> None:
    _, out, _ = await run("nbdinfo", "--json", uri(shim))
    info = json.loads(out)
    exp = info["exports"][0]
    assert exp["export-name"] == "shim"
    assert exp["export-size"] == SIZE
    assert exp["block_size_minimum"] == 4096
    assert exp["block_size_preferred"] == 4096
    assert exp["block_size_maximum"] == 32 * 1024 * 1024
    assert exp["can_flush"] and exp["can_fua"] and exp["can_trim"] and exp["can_zero"]
    assert info["protocol"] == "newstyle-fixed"
    assert not info.get("TLS")


async def test_nbdinfo_lists_several_exports(shim: ShimDaemon) -> None:
    _, out, _ = await run("nbdinfo", "--list", "--json", f"nbd+unix:///?socket={shim.config.socket}")
    names = sorted(e["export-name"] for e in json.loads(out)["exports"])
    assert names == ["second", "shim"]


async def test_qemu_io_patterns_at_odd_offsets(shim: ShimDaemon, backing: Path) -> None:
    cmds = [
        "write -P 0x11 1 511", "write -P 0x22 4095 2", "write -P 0x33 12345 70001",
        "write -f -P 0x44 1048573 8191",  # -f: FUA
        "read -P 0x11 1 511", "read -P 0x22 4095 2", "read -P 0x33 12345 70001", "read -P 0x44 1048573 8191",
        "flush",
    ]
    args = ["qemu-io", "-f", "raw"]
    for c in cmds:
        args += ["-c", c]
    _, out, err = await run(*args, uri(shim))
    assert "Pattern verification failed" not in out + err
    data = backing.read_bytes()
    assert data[1:512] == b"\x11" * 511
    assert data[4095:4097] == b"\x22" * 2
    assert data[12345:12345 + 70001] == b"\x33" * 70001
    assert data[1048573:1048573 + 8191] == b"\x44" * 8191


async def test_qemu_io_trim_and_write_zeroes(shim: ShimDaemon) -> None:
    _, out, err = await run("qemu-io", "-f", "raw", "-c", "write -P 0x55 0 1M", "-c", "write -z 64k 128k",
                            "-c", "read -P 0 64k 128k", "-c", "read -P 0x55 192k 64k",
                            "-c", "discard 512k 256k", "-c", "read -P 0x55 0 64k", uri(shim))
    assert "verification failed" not in out + err


async def test_qemu_img_convert_round_trip(shim: ShimDaemon, backing: Path, sockdir: Path) -> None:
    original = backing.read_bytes()
    copy = sockdir / "copy.img"
    await run("qemu-img", "convert", "-f", "raw", "-O", "raw", uri(shim), str(copy))
    assert copy.read_bytes() == original
    fresh = sockdir / "fresh.img"
    fresh.write_bytes(os.urandom(SIZE))
    await run("qemu-img", "convert", "-n", "-f", "raw", "-O", "raw", str(fresh), uri(shim))
    assert backing.read_bytes() == fresh.read_bytes()


async def test_nbdcopy_both_ways(shim: ShimDaemon, backing: Path, sockdir: Path) -> None:
    out_file = sockdir / "out.img"
    await run("nbdcopy", uri(shim), str(out_file))
    assert out_file.read_bytes() == backing.read_bytes()
    src = sockdir / "src.img"
    src.write_bytes(os.urandom(SIZE))
    await run("nbdcopy", str(src), uri(shim))
    assert backing.read_bytes() == src.read_bytes()


async def test_qemu_blockdev_forms_with_reconnect_delay(shim: ShimDaemon, backing: Path) -> None:
    """The exact option shapes QEMU will use to attach the shim: image-opts and json: pseudo-protocol."""
    sock = shim.config.socket
    opts = f"driver=nbd,server.type=unix,server.path={sock},export=shim,reconnect-delay=2"
    await run("qemu-io", "--image-opts", "-c", "write -P 0x66 8192 4096", "-c", "read -P 0x66 8192 4096", opts)
    js = json.dumps({"driver": "nbd", "server": {"type": "unix", "path": str(sock)}, "export": "shim",
                     "reconnect-delay": 2})
    _, out, err = await run("qemu-io", "-c", "read -P 0x66 8192 4096", f"json:{js}")
    assert "verification failed" not in out + err
    assert backing.read_bytes()[8192:12288] == b"\x66" * 4096


async def test_second_export_is_independent(shim: ShimDaemon, backing: Path) -> None:
    before = backing.read_bytes()
    await run("qemu-io", "-f", "raw", "-c", "write -P 0x77 0 64k", uri(shim, "second"))
    _, out, err = await run("qemu-io", "-f", "raw", "-c", "read -P 0x77 0 64k", uri(shim, "second"))
    assert "verification failed" not in out + err
    assert backing.read_bytes() == before


async def test_out_of_order_replies(sockdir: Path) -> None:
    """A slow large read issued first is answered after a small read issued second."""
    from hvsim.drivers.shim.daemon import ShimConfig

    img = sockdir / "slow.img"
    img.write_bytes(os.urandom(SIZE))
    d = ShimDaemon(ShimConfig(socket=sockdir / "slow.sock", backing=img, bandwidth_mib_s=8.0))
    await d.start()
    try:
        c = await RawNbd.open(str(d.config.socket))
        big = 4 * 1024 * 1024  # ~0.5 s on an 8 MiB/s link
        c.request(P.Cmd.READ, 100, 0, big)
        c.request(P.Cmd.FLUSH, 200)
        first = await c.reply()
        assert first[0] == 200 and first[1] == 0
        cookie, err, data = await c.reply(big)
        assert (cookie, err) == (100, 0) and data == img.read_bytes()[:big]
        await c.disconnect()
    finally:
        await d.close(grace=1.0)


async def test_many_concurrent_clients(shim: ShimDaemon, backing: Path) -> None:
    data = backing.read_bytes()
    clients = [await RawNbd.open(str(shim.config.socket)) for _ in range(6)]

    async def worker(i: int, c: RawNbd) -> None:
        for k in range(50):
            off = ((i * 50 + k) * 4096 * 3) % (SIZE - 8192)
            err, got = await c.read(off, 8192, cookie=k)
            assert err == 0 and got == data[off:off + 8192]
        await c.disconnect()

    await asyncio.gather(*(worker(i, c) for i, c in enumerate(clients)))


async def test_pipelined_requests_beyond_inflight_limit(sockdir: Path) -> None:
    """400 pipelined requests on a slow store: back-pressure kicks in, every reply arrives, right data."""
    from hvsim.drivers.shim.daemon import ShimConfig

    img = sockdir / "lat.img"
    img.write_bytes(os.urandom(SIZE))
    d = ShimDaemon(ShimConfig(socket=sockdir / "lat.sock", backing=img, latency_ms=2.0))
    await d.start()
    try:
        c = await RawNbd.open(str(d.config.socket))
        n = 400
        for i in range(n):
            if i % 4 == 3:
                c.request(P.Cmd.WRITE, i, i * 8192, 4096, payload=bytes([i % 256]) * 4096)
            else:
                c.request(P.Cmd.READ, i, i * 8192 + 4096, 4096)
        data = img.read_bytes()
        seen = set()
        for _ in range(n):
            magic, err, cookie = P.SIMPLE_REPLY.unpack(await c.reader.readexactly(16))
            assert err == 0
            if cookie % 4 != 3:
                off = cookie * 8192 + 4096
                assert await c.reader.readexactly(4096) == data[off:off + 4096]
            seen.add(cookie)
        assert seen == set(range(n))
        assert all(img.read_bytes()[i * 8192:i * 8192 + 4096] == bytes([i % 256]) * 4096 for i in range(3, n, 4))
        await c.disconnect()
    finally:
        await d.close(grace=1.0)
