"""A file written into a guest through its agent's exec channel (what qemu-ga's guest-file-write
and vSphere's InitiateFileTransferToGuest give a management tool): the bytes are gzipped and
base64-coded into ``printf`` commands under sh's argument limit, a few parts at a time (the guest
agent runs up to 64 commands at once), joined and decoded in the guest, checked by SHA-256 and
only then moved into place with the asked mode. A failed write leaves nothing at ``path``.

Used by the in-process provider, the host agent's file route and hence the manager's."""
from __future__ import annotations

import asyncio
import base64
import gzip
import hashlib
import re
import shlex
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from hvbase.aio import all_or_first_error

from .agent import ExecResult
from .errors import AgentError, InputError

PART = 96 * 1024                 # base64 bytes per command: sh -c's argument must stay under 128 KiB
PARALLEL = 4                     # part commands in flight at once
MAX_FILE = 64 << 20              # the most one write takes
_COMPONENT = re.compile(r"[A-Za-z0-9._+@-]{1,255}")

ExecFn = Callable[..., Awaitable[ExecResult]]


@dataclass(frozen=True)
class WrittenFile:
    path: str
    size: int
    sha256: str


def check_guest_path(path: object) -> str:
    """An absolute guest path of plain components (letters, digits, ``._+@-``; no ``.`` or
    ``..``), at most 1024 characters; raises :class:`InputError` naming what is wrong."""
    if not isinstance(path, str) or not path:
        raise InputError(f"guest path must be a non-empty string, got {path!r}")
    if len(path) > 1024:
        raise InputError(f"guest path is {len(path)} characters long (at most 1024)")
    if not path.startswith("/") or path.endswith("/"):
        raise InputError(f"guest path {path!r} must be absolute and name a file (no trailing /)")
    for comp in path[1:].split("/"):
        if comp in ("", ".", "..") or not _COMPONENT.fullmatch(comp):
            raise InputError(f"guest path {path!r}: component {comp!r} is not allowed "
                                  f"(letters, digits and ._+@- only; no empty, . or .. components)")
    return path


def check_mode(mode: object) -> int:
    if isinstance(mode, bool) or not isinstance(mode, int) or not 0 <= mode <= 0o7777:
        raise InputError(f"file mode must be 0..0o7777, got {mode!r}")
    return mode


async def write_guest_file(exec_fn: ExecFn, path: str, data: bytes, mode: int = 0o600,
                           what: str = "guest") -> WrittenFile:
    """Write ``data`` to ``path`` in the guest whose exec is ``exec_fn(command, timeout=, check=)``."""
    check_guest_path(path)
    check_mode(mode)
    if len(data) > MAX_FILE:
        raise InputError(f"file for {path!r} is {len(data)} bytes (at most {MAX_FILE})")
    b64 = base64.b64encode(gzip.compress(data, 6)).decode()
    digest = hashlib.sha256(data).hexdigest()
    tmp = shlex.quote(path + ".part")
    parts = shlex.quote(path + ".parts")
    await exec_fn(f"rm -rf {tmp} {parts} && mkdir -m 700 {parts}", timeout=30, check=True)
    try:
        sem = asyncio.Semaphore(PARALLEL)

        async def one(i: int) -> None:
            async with sem:
                await exec_fn(f"printf %s {b64[i:i + PART]} > {parts}/{i // PART:05d}", timeout=60, check=True)
        await all_or_first_error(*(one(i) for i in range(0, len(b64), PART)))
        r = await exec_fn(f"cat {parts}/* | base64 -d | gunzip > {tmp} && sha256sum {tmp}", timeout=120, check=True)
        if r.stdout.split()[:1] != [digest]:
            raise AgentError(f"{what}: the file written to {path} has SHA-256 {r.stdout[:64]!r}, expected {digest}")
        await exec_fn(f"chmod {mode:o} {tmp} && mv {tmp} {shlex.quote(path)}", timeout=30, check=True)
    finally:
        # never leaves its parts behind; on failure the half-written file goes too
        await asyncio.shield(_cleanup(exec_fn, tmp, parts))
    return WrittenFile(path, len(data), digest)


async def _cleanup(exec_fn: ExecFn, tmp: str, parts: str) -> None:
    try:
        await exec_fn(f"rm -rf {tmp} {parts}", timeout=30)
    except AgentError:
        pass
