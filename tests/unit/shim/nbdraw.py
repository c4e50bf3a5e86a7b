"""A deliberately small raw NBD client for hostile-input tests (speaks exactly what the test says)."""
from __future__ import annotations

import asyncio
import struct
from dataclasses import dataclass

from hvbase.aio import wait_for
from hvsim.drivers.shim import protocol as P


@dataclass
class OptReply:
    option: int
    reply: int
    data: bytes


class RawNbd:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.size = 0
        self.tflags = 0

    @classmethod
    async def connect(cls, path: str) -> RawNbd:
        r, w = await asyncio.open_unix_connection(path, limit=64 * 1024 * 1024)
        return cls(r, w)

    async def greet(self, cflags: int = P.FLAG_C_FIXED_NEWSTYLE | P.FLAG_C_NO_ZEROES) -> int:
        hello = await self.reader.readexactly(18)
        assert hello[:16] == P.NBDMAGIC + P.IHAVEOPT
        self.writer.write(P.U32.pack(cflags))
        return P.U16.unpack(hello[16:])[0]

    def send_option(self, opt: int, data: bytes = b"", *, length: int | None = None, magic: bytes = P.IHAVEOPT) -> None:
        self.writer.write(P.OPTION_HEADER.pack(magic, opt, len(data) if length is None else length) + data)

    async def read_opt_reply(self) -> OptReply:
        magic, opt, rep, length = P.OPTION_REPLY.unpack(await self.reader.readexactly(P.OPTION_REPLY.size))
        assert magic == P.OPT_REPLY_MAGIC
        return OptReply(opt, rep, await self.reader.readexactly(length))

    @staticmethod
    def go_data(name: str, infos: tuple[int, ...] = ()) -> bytes:
        raw = name.encode()
        return P.U32.pack(len(raw)) + raw + P.U16.pack(len(infos)) + b"".join(P.U16.pack(i) for i in infos)

    async def go(self, name: str = "", infos: tuple[int, ...] = (P.Info.BLOCK_SIZE,)) -> list[OptReply]:
        self.send_option(P.Opt.GO, self.go_data(name, infos))
        replies = []
        while True:
            rep = await self.read_opt_reply()
            replies.append(rep)
            if rep.reply == P.Rep.INFO and struct.unpack(">H", rep.data[:2])[0] == P.Info.EXPORT:
                _, self.size, self.tflags = struct.unpack(">HQH", rep.data)
            if rep.reply != P.Rep.INFO:
                return replies

    @classmethod
    async def open(cls, path: str, name: str = "") -> RawNbd:
        c = await cls.connect(path)
        await c.greet()
        replies = await c.go(name)
        assert replies[-1].reply == P.Rep.ACK, replies[-1]
        return c

    def request(self, cmd: int, cookie: int, offset: int = 0, length: int = 0, flags: int = 0,
                payload: bytes = b"", magic: int = P.REQUEST_MAGIC) -> None:
        self.writer.write(P.REQUEST.pack(magic, flags, cmd, cookie, offset, length) + payload)

    async def reply(self, read_len: int = 0) -> tuple[int, int, bytes]:
        """(cookie, error, data); data is read only for a successful read of read_len bytes."""
        magic, err, cookie = P.SIMPLE_REPLY.unpack(await self.reader.readexactly(P.SIMPLE_REPLY.size))
        assert magic == P.SIMPLE_REPLY_MAGIC, hex(magic)
        data = await self.reader.readexactly(read_len) if (read_len and not err) else b""
        return cookie, err, data

    async def read(self, offset: int, length: int, cookie: int = 1) -> tuple[int, bytes]:
        self.request(P.Cmd.READ, cookie, offset, length)
        c, err, data = await self.reply(length)
        assert c == cookie
        return err, data

    async def write(self, offset: int, data: bytes, cookie: int = 2, flags: int = 0) -> int:
        self.request(P.Cmd.WRITE, cookie, offset, len(data), flags, data)
        c, err, _ = await self.reply()
        assert c == cookie
        return err

    async def closed_by_server(self, timeout: float = 5.0) -> bool:
        """True when the server closed the connection (EOF or reset) without sending more bytes."""
        try:
            data = await wait_for(self.reader.read(1), timeout)
        except (ConnectionError, OSError):
            return True
        return data == b""

    async def disconnect(self) -> None:
        try:
            self.request(P.Cmd.DISC, 0)
            await self.writer.drain()
        except (ConnectionError, OSError):
            pass
        self.writer.close()
