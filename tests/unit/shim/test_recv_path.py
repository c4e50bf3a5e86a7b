"""The receive path: requests split at every byte boundary, write payloads larger than the receive
buffer and received into their own buffer, the buffer's compaction and growth."""
from __future__ import annotations

import asyncio
import os
from pathlib import Path

from hvsim.drivers.shim import protocol as P
from hvsim.drivers.shim.daemon import ShimDaemon
from hvsim.drivers.shim.server import RECV_BUFFER, RECV_MIN_FREE, RecvBuffer

from .conftest import SIZE
from .nbdraw import RawNbd


def test_recv_buffer_compacts_grows_and_shrinks_back() -> None:
    rb = RecvBuffer()
    free = rb.free()
    assert len(free) == RECV_BUFFER
    free[:10] = b"0123456789"
    rb.end = RECV_BUFFER - RECV_MIN_FREE + 10   # almost full, 10 unparsed bytes at the end
    rb.view[rb.end - 10:rb.end] = b"abcdefghij"
    rb.start = rb.end - 10
    free = rb.free()                             # compacted: the 10 bytes move to the front
    assert (rb.start, rb.end) == (0, 10) and bytes(rb.view[:10]) == b"abcdefghij"
    assert len(free) == RECV_BUFFER - 10
    rb.end = RECV_BUFFER - 1000                  # a backlog bigger than the buffer can keep free
    rb.view[:5] = b"HEADS"
    free = rb.free()
    assert len(rb.data) == 2 * RECV_BUFFER and len(free) >= RECV_MIN_FREE
    assert rb.take(5) == b"HEADS" and len(rb) == RECV_BUFFER - 1005
    rb.start = rb.end                            # all parsed: back to the normal size
    assert len(rb.free()) == RECV_BUFFER and len(rb.data) == RECV_BUFFER and len(rb) == 0


async def test_requests_split_at_every_boundary(shim: ShimDaemon, backing: Path) -> None:
    """A write, then a read of it, dribbled 1, 3, 29 and 1000 bytes at a time: same replies, same data."""
    c = await RawNbd.open(str(shim.config.socket))

    async def dribble(stream: bytes, step: int) -> None:
        for i in range(0, len(stream), step):
            c.writer.write(stream[i:i + step])
            await c.writer.drain()
            if i < 64 or i > len(stream) - 64:
                await asyncio.sleep(0)  # let the server see the header and the payload's tail apart

    for n, step in enumerate((1, 3, 29, 1000)):
        data = os.urandom(4096)
        off = 8192 * (n + 1)
        await dribble(P.REQUEST.pack(P.REQUEST_MAGIC, 0, P.Cmd.WRITE, 1, off, 4096) + data, step)
        assert await c.reply() == (1, 0, b"")
        await dribble(P.REQUEST.pack(P.REQUEST_MAGIC, 0, P.Cmd.READ, 2, off, 4096), step)
        assert await c.reply(4096) == (2, 0, data)
        assert backing.read_bytes()[off:off + 4096] == data
    await c.disconnect()


async def test_large_writes_pipelined_with_reads(shim: ShimDaemon, backing: Path) -> None:
    """Writes several times the receive buffer, pipelined with reads: every reply, every byte right."""
    c = await RawNbd.open(str(shim.config.socket))
    big = 3 * RECV_BUFFER + 12345
    chunks = [os.urandom(big) for _ in range(3)]
    for i, chunk in enumerate(chunks):
        c.request(P.Cmd.WRITE, 10 + i, i * 2 * big, big, payload=chunk)
        c.request(P.Cmd.READ, 20 + i, SIZE - 4096 * (i + 1), 4096)
    expect = backing.read_bytes()
    got: dict[int, tuple[int, bytes]] = {}
    for _ in range(6):
        magic, err, cookie = P.SIMPLE_REPLY.unpack(await c.reader.readexactly(16))
        assert magic == P.SIMPLE_REPLY_MAGIC
        got[cookie] = (err, await c.reader.readexactly(4096) if cookie >= 20 else b"")
    assert set(got) == {10, 11, 12, 20, 21, 22}
    for i in range(3):
        assert got[10 + i] == (0, b"")
        assert got[20 + i] == (0, expect[SIZE - 4096 * (i + 1):SIZE - 4096 * i])
        err, data = await c.read(i * 2 * big, big, cookie=30 + i)
        assert err == 0 and data == chunks[i]
    await c.disconnect()
    after = backing.read_bytes()
    for i, chunk in enumerate(chunks):
        assert after[i * 2 * big:i * 2 * big + big] == chunk
