"""Data disks imported from existing images: where an image may come from, and the copy.

A VM defined with ``data_image`` (a path *relative to the import directory* the manager and the
host agents are configured with, ``--import-dir``) gets its disk filled from that image on its
first start. Both the manager (at define) and the host agent (before it copies) resolve the path
with :func:`resolve_import`, which refuses, naming the problem: no import directory configured, an
absolute path or one with ``..``, a path that leaves the directory through a symlink, anything but
a regular file, an empty image, an image larger than the VM's disk. Raw images only (the bytes are
the disk); the copy is sparse-aware and the disk is then extended to ``disk_mib``.
"""
from __future__ import annotations

import os
import re
import stat
from pathlib import Path, PurePosixPath

from .errors import ControlInputError

IMAGE_PATH_RE = r"^[A-Za-z0-9._-]+(/[A-Za-z0-9._-]+){0,7}$"
_PART = re.compile(IMAGE_PATH_RE)
COPY_CHUNK = 1 << 20


def check_image_path(rel: str) -> PurePosixPath:
    """The shape of ``rel`` (no file system access): relative, no ``..`` or ``.`` parts."""
    if not isinstance(rel, str) or not _PART.match(rel):
        raise ControlInputError("data_image", f"{rel!r} is not a relative path of up to 8 parts "
                                              "(letters, digits, '.', '_', '-')")
    if any(part in ("..", ".") for part in rel.split("/")):
        raise ControlInputError("data_image", f"{rel!r}: '..' and '.' are not allowed in an image path")
    return PurePosixPath(rel)


def resolve_import(root: Path | None, rel: str, disk_mib: int) -> Path:
    """The image ``rel`` inside ``root``, checked: a regular file (after symlinks, which must stay
    inside ``root``), not empty, at most ``disk_mib`` MiB."""
    p = check_image_path(rel)
    if root is None:
        raise ControlInputError("data_image", "this deployment has no import directory configured "
                                              "(--import-dir): data disks cannot be imported")
    if disk_mib <= 0:
        raise ControlInputError("disk_mib", f"importing {rel!r} needs a disk size (disk_mib > 0)")
    try:
        base = root.resolve(strict=True)
        target = (base / p).resolve(strict=True)
    except (OSError, RuntimeError) as e:
        raise ControlInputError("data_image", f"image {rel!r} not found in the import directory: {e}") from e
    if not target.is_relative_to(base):
        raise ControlInputError("data_image", f"image {rel!r} leaves the import directory (a symlink to {target})")
    st = target.stat()
    if not stat.S_ISREG(st.st_mode):
        raise ControlInputError("data_image", f"image {rel!r} is not a regular file")
    if st.st_size == 0:
        raise ControlInputError("data_image", f"image {rel!r} is empty")
    if st.st_size > disk_mib << 20:
        raise ControlInputError("disk_mib", f"image {rel!r} has {st.st_size} bytes: more than the disk's "
                                            f"{disk_mib} MiB")
    return target


def copy_image(src: Path, dst: Path, disk_mib: int) -> None:
    """``src`` into a new ``dst`` (0600; holes kept), extended to ``disk_mib`` MiB; the partial
    file is removed if the copy fails."""
    dst.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    part = dst.with_name(dst.name + ".part")
    fd_in = os.open(src, os.O_RDONLY | os.O_NOFOLLOW)
    try:
        fd_out = os.open(part, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            off = 0
            while chunk := os.pread(fd_in, COPY_CHUNK, off):
                if chunk.count(0) != len(chunk):
                    os.pwrite(fd_out, chunk, off)
                off += len(chunk)
            os.ftruncate(fd_out, max(off, disk_mib << 20))
            os.fsync(fd_out)
        finally:
            os.close(fd_out)
        os.replace(part, dst)
    except BaseException:
        part.unlink(missing_ok=True)
        raise
    finally:
        os.close(fd_in)
