"""The backing store: a file reached through an emulated slow datastore link.

Every request to the backing file pays a fixed per-request latency and shares a bandwidth limit
(a single link: transfers are serialised on it, latencies overlap), standing in for a networked
datastore. The data path is ``os.pread``/``os.pwrite`` on one file descriptor, run in a small
thread pool when it may block. Reads of up to 1 MiB first try ``preadv(RWF_NOWAIT)`` in the event
loop (after the emulated delay, if any): a page-cache hit is served without a thread hop, anything
else falls back to the pool. Never aiofiles: positional I/O on a shared descriptor is what makes
concurrent requests safe.
"""
from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import errno as _errno
import logging
import os
import stat
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import protocol as P
from .errors import ShimConfigError, StoreError

log = logging.getLogger(__name__)

_FALLOC_FL_KEEP_SIZE = 0x01
_FALLOC_FL_PUNCH_HOLE = 0x02
_ZERO_CHUNK = 1024 * 1024
_NOWAIT = getattr(os, "RWF_NOWAIT", 0)
INLINE_READ_MAX = 1024 * 1024  # longer reads always go to the thread pool (a big copy would stall the loop)

_fallocate: Any
try:
    _libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    _fallocate = _libc.fallocate
    _fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
    _fallocate.restype = ctypes.c_int
except (OSError, AttributeError):  # pragma: no cover - non-glibc platforms
    _fallocate = None


@dataclass(frozen=True)
class LinkSpec:
    """Emulated datastore link: per-request latency (s) and bandwidth (bytes/s, None = unlimited)."""

    latency_s: float = 0.0
    bandwidth_bps: float | None = None

    def __post_init__(self) -> None:
        if self.latency_s < 0:
            raise ShimConfigError(f"latency must be >= 0 s, got {self.latency_s}")
        if self.bandwidth_bps is not None and self.bandwidth_bps <= 0:
            raise ShimConfigError(f"bandwidth must be > 0 bytes/s, got {self.bandwidth_bps}")

    @property
    def emulated(self) -> bool:
        return self.latency_s > 0 or self.bandwidth_bps is not None


def _nbd_errno(exc: OSError) -> int:
    if exc.errno in (_errno.ENOSPC, _errno.EDQUOT, _errno.EFBIG):
        return P.ENOSPC
    if exc.errno == _errno.EROFS or exc.errno == _errno.EPERM or exc.errno == _errno.EACCES:
        return P.EPERM
    return P.EIO


class BackingStore:
    """A file of ``size`` bytes behind an emulated link. Open with :meth:`open`, close with :meth:`close`."""

    def __init__(self, path: str | os.PathLike[str], size: int | None = None, *, link: LinkSpec | None = None,
                 read_only: bool = False, threads: int = 8) -> None:
        self.path = Path(path)
        self._want_size = size
        self.link = link or LinkSpec()
        self.read_only = read_only
        self._threads = threads
        self._fd = -1
        self.size = 0
        self._pool: ThreadPoolExecutor | None = None
        self._link_free = 0.0
        self.nowait_ok = bool(_NOWAIT)
        # counters of requests that reached the backing file
        self.backing_reads = 0
        self.backing_read_bytes = 0
        self.backing_writes = 0
        self.backing_write_bytes = 0

    # lifecycle -----------------------------------------------------------------------------
    def open(self) -> None:
        if self._fd >= 0:
            return
        if self._want_size is not None and self._want_size <= 0:
            raise ShimConfigError(f"export size must be > 0 bytes, got {self._want_size}")
        flags = (os.O_RDONLY if self.read_only else os.O_RDWR) | os.O_CLOEXEC
        if self._want_size is not None and not self.read_only:
            flags |= os.O_CREAT
        existed = os.path.lexists(self.path)
        try:
            fd = os.open(self.path, flags, 0o600)
        except OSError as exc:
            raise ShimConfigError(f"cannot open backing file {self.path}: {exc.strerror}") from exc
        try:
            st = os.fstat(fd)
            if stat.S_ISBLK(st.st_mode):
                cur = os.lseek(fd, 0, os.SEEK_END)
            elif stat.S_ISREG(st.st_mode):
                cur = st.st_size
            else:
                raise ShimConfigError(f"backing {self.path} is neither a regular file nor a block device")
            size = cur if self._want_size is None else self._want_size
            if size <= 0:
                raise ShimConfigError(f"backing file {self.path} is empty; pass a size to create it")
            if size > cur:
                if self.read_only or not stat.S_ISREG(st.st_mode):
                    raise ShimConfigError(f"backing {self.path} has {cur} bytes, less than the requested {size}")
                try:
                    os.ftruncate(fd, size)
                except (OSError, OverflowError) as exc:
                    raise ShimConfigError(f"cannot make backing {self.path} {size} bytes: {exc}") from exc
        except BaseException:
            os.close(fd)
            if not existed:  # refused: leave nothing behind
                self.path.unlink(missing_ok=True)
            raise
        self._fd = fd
        self.size = size
        self._pool = ThreadPoolExecutor(max_workers=self._threads, thread_name_prefix="shim-io")

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    @property
    def fd(self) -> int:
        if self._fd < 0:
            raise StoreError(f"backing store {self.path} is not open", P.EIO)
        return self._fd

    # emulated link ---------------------------------------------------------------------------
    async def _link_delay(self, nbytes: int) -> None:
        link = self.link
        if not link.emulated:
            return
        loop = asyncio.get_running_loop()
        now = loop.time()
        done = now
        if link.bandwidth_bps is not None and nbytes:
            start = max(now, self._link_free)
            self._link_free = start + nbytes / link.bandwidth_bps
            done = self._link_free
        done += link.latency_s
        if done > now:
            await asyncio.sleep(done - now)

    async def _run(self, fn, *args):  # type: ignore[no-untyped-def]
        if self._pool is None:
            raise StoreError(f"backing store {self.path} is not open", P.EIO)
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(self._pool, fn, *args)
        except OSError as exc:
            raise StoreError(f"backing I/O on {self.path} failed: {exc}", _nbd_errno(exc)) from exc

    # data path ------------------------------------------------------------------------------
    def try_read_nowait(self, offset: int, length: int) -> bytes | None:
        """Read from the OS page cache without blocking, or None (data not resident / emulated link)."""
        buf = bytearray(length)
        return bytes(buf) if self.try_read_into_nowait(memoryview(buf), offset, length) else None

    def try_read_into_nowait(self, view: memoryview, offset: int, length: int) -> bool:
        """Fill ``view`` from the OS page cache without blocking (``preadv(RWF_NOWAIT)`` straight into
        the caller's buffer). False when the data is not all resident, or an emulated link must be paid."""
        if length > INLINE_READ_MAX or self.link.emulated or not self._preadv_nowait(view, offset, length):
            return False
        self.backing_reads += 1
        self.backing_read_bytes += length
        return True

    def _preadv_nowait(self, view: memoryview, offset: int, length: int) -> bool:
        if not self.nowait_ok:
            return False
        try:
            n = os.preadv(self.fd, [view[:length]], offset, _NOWAIT)
        except BlockingIOError:
            return False
        except OSError as exc:
            if exc.errno in (_errno.EOPNOTSUPP, _errno.EINVAL):
                self.nowait_ok = False
            return False
        return n == length

    def _pread_full(self, offset: int, length: int) -> bytes:
        fd = self.fd
        chunks = []
        got = 0
        while got < length:
            data = os.pread(fd, length - got, offset + got)
            if not data:  # past EOF of a short device: reads as zeroes
                chunks.append(bytes(length - got))
                break
            chunks.append(data)
            got += len(data)
        return chunks[0] if len(chunks) == 1 else b"".join(chunks)

    def _pwrite_full(self, offset: int, data: bytes | bytearray | memoryview, fua: bool) -> None:
        fd = self.fd
        view = memoryview(data)
        done = 0
        while done < len(view):
            done += os.pwrite(fd, view[done:], offset + done)
        if fua:
            os.fdatasync(fd)

    async def read(self, offset: int, length: int) -> bytes | bytearray:
        """Pay the emulated link, then read: inline when the OS page cache holds it all (no thread
        hop), else in the thread pool."""
        await self._link_delay(length)
        if length <= INLINE_READ_MAX and self.nowait_ok:
            buf = bytearray(length)
            if self._preadv_nowait(memoryview(buf), offset, length):
                self.backing_reads += 1
                self.backing_read_bytes += length
                return buf
        data = await self._run(self._pread_full, offset, length)
        self.backing_reads += 1
        self.backing_read_bytes += length
        return data

    async def write(self, offset: int, data: bytes | bytearray | memoryview, fua: bool = False) -> None:
        if self.read_only:
            raise StoreError(f"backing {self.path} is read-only", P.EPERM)
        await self._link_delay(len(data))
        await self._run(self._pwrite_full, offset, data, fua)
        self.backing_writes += 1
        self.backing_write_bytes += len(data)

    async def flush(self) -> None:
        await self._link_delay(0)
        await self._run(os.fdatasync, self.fd)

    def _zero_sync(self, offset: int, length: int, punch: bool, fua: bool) -> None:
        fd = self.fd
        if punch and _fallocate is not None:
            if _fallocate(fd, _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE, offset, length) == 0:
                if fua:
                    os.fdatasync(fd)
                return
        zeros = bytes(min(length, _ZERO_CHUNK))
        pos, end = offset, offset + length
        while pos < end:
            n = min(len(zeros), end - pos)
            self._pwrite_full(pos, memoryview(zeros)[:n], False)
            pos += n
        if fua:
            os.fdatasync(fd)

    async def write_zeroes(self, offset: int, length: int, *, may_punch: bool, fua: bool = False) -> None:
        if self.read_only:
            raise StoreError(f"backing {self.path} is read-only", P.EPERM)
        await self._link_delay(0)
        await self._run(self._zero_sync, offset, length, may_punch, fua)

    async def trim(self, offset: int, length: int, fua: bool = False) -> None:
        """Discard: punch a hole where the filesystem can (content is undefined afterwards)."""
        if self.read_only:
            raise StoreError(f"backing {self.path} is read-only", P.EPERM)
        if _fallocate is None:
            return
        await self._link_delay(0)

        def punch() -> None:
            if _fallocate(self.fd, _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE, offset, length) != 0:
                log.debug("trim: fallocate punch failed errno=%d (ignored: trim is a hint)", ctypes.get_errno())
            if fua:
                os.fdatasync(self.fd)

        await self._run(punch)
