"""The migration agents' wire format (images/src/migrate.c), in Python: for tests that talk to a
real agent and for the checks the destination agent makes, stated once more where they can be
unit-tested.

A message is a 40-byte little-endian header and ``length`` payload bytes::

    u32 magic "HVMG" | u8 type | u8 version | u16 flags | u32 length | u32 reserved
    u64 seq | u64 offset | u64 check = xxh64(payload, seed = seq ^ offset)

Binding the checksum's seed to the sequence number and the offset makes a block that arrives for
the wrong place, or replayed under another number, fail the check like a flipped bit does.
"""
from __future__ import annotations

import enum
import struct
from dataclasses import dataclass

import xxhash

from .errors import CrossCloudInputError

MAGIC = 0x474D5648
VERSION = 1
HEADER = struct.Struct("<IBBHII QQQ".replace(" ", ""))
BLOCK = 4096
MAX_PAYLOAD = 1 << 20
MAX_ZERO = 64 << 20


class MsgType(enum.IntEnum):
    HELLO = 1
    WELCOME = 2
    DATA = 3
    ZERO = 4
    ROUND = 5
    ACK = 6
    REFUSE = 7
    PING = 8
    BYE = 9


class WireError(CrossCloudInputError):
    """A message that breaks the format (the destination agent closes the connection on it)."""


@dataclass(frozen=True)
class Message:
    type: MsgType
    seq: int = 0
    offset: int = 0
    payload: bytes = b""
    check: int | None = None          # None: computed

    def encode(self) -> bytes:
        check = checksum(self.payload, self.seq, self.offset) if self.check is None else self.check
        return HEADER.pack(MAGIC, int(self.type), VERSION, 0, len(self.payload), 0, self.seq, self.offset,
                           check) + self.payload


def checksum(payload: bytes, seq: int, offset: int) -> int:
    return xxhash.xxh64_intdigest(payload, seed=(seq ^ offset) & 0xFFFFFFFFFFFFFFFF)


def hello(disk_size: int, session: bytes) -> Message:
    if len(session) != 16:
        raise WireError(f"session must be 16 bytes, got {len(session)}")
    return Message(MsgType.HELLO, payload=struct.pack("<QII", disk_size, BLOCK, 0) + session)


def data(seq: int, offset: int, payload: bytes) -> Message:
    return Message(MsgType.DATA, seq, offset, payload)


def zero(seq: int, offset: int, length: int) -> Message:
    return Message(MsgType.ZERO, seq, offset, struct.pack("<Q", length))


def round_end(seq: int, rnd: int, final: bool = False) -> Message:
    return Message(MsgType.ROUND, seq, 0, struct.pack("<QQ", rnd, int(final)))


@dataclass(frozen=True)
class Header:
    magic: int
    type: int
    version: int
    flags: int
    length: int
    reserved: int
    seq: int
    offset: int
    check: int


def parse_header(raw: bytes) -> Header:
    if len(raw) != HEADER.size:
        raise WireError(f"header must be {HEADER.size} bytes, got {len(raw)}")
    return Header(*HEADER.unpack(raw))


def validate(h: Header, disk_size: int) -> None:
    """The destination agent's checks of a header (migrate.c check_msg, plus ZERO's extent check
    once its payload is read): WireError naming the problem."""
    if h.magic != MAGIC:
        raise WireError(f"bad magic {h.magic:#x}")
    if h.version != VERSION:
        raise WireError(f"unsupported version {h.version}")
    if h.flags or h.reserved:
        raise WireError("nonzero flags/reserved")
    if h.length > MAX_PAYLOAD:
        raise WireError(f"length {h.length} over 1 MiB")
    try:
        t = MsgType(h.type)
    except ValueError:
        raise WireError(f"unknown message type {h.type}") from None
    if t is MsgType.DATA:
        if h.length == 0 or h.length % BLOCK or h.offset % BLOCK:
            raise WireError(f"DATA {h.offset}+{h.length} is not block aligned")
        if h.offset > disk_size or h.length > disk_size - h.offset:
            raise WireError(f"DATA {h.offset}+{h.length} goes beyond the {disk_size}-byte disk")
    elif t is MsgType.ZERO and h.length != 8:
        raise WireError("ZERO payload must be 8 bytes")
    elif t is MsgType.ROUND and h.length != 16:
        raise WireError("ROUND payload must be 16 bytes")
    elif t in (MsgType.PING, MsgType.BYE) and h.length:
        raise WireError("PING/BYE carry no payload")
    elif t is MsgType.HELLO and h.length != 32:
        raise WireError("HELLO payload must be 32 bytes")
    elif t in (MsgType.WELCOME, MsgType.ACK, MsgType.REFUSE):
        raise WireError(f"{t.name} is not sent to the destination")


def validate_zero(offset: int, length: int, disk_size: int) -> None:
    if length == 0 or length % BLOCK or offset % BLOCK or length > MAX_ZERO or offset > disk_size \
            or length > disk_size - offset:
        raise WireError(f"bad ZERO extent {offset}+{length}")


def verify_payload(h: Header, payload: bytes) -> bool:
    """False for a corrupted message (the destination refuses it and writes nothing)."""
    return len(payload) == h.length and checksum(payload, h.seq, h.offset) == h.check
