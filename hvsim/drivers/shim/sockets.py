"""Unix socket paths: private directory (0700), socket mode 0600, stale-socket cleanup."""
from __future__ import annotations

import os
import socket
import stat
from pathlib import Path

from .errors import ShimConfigError

MAX_UNIX_PATH = 107  # sun_path is 108 bytes including the NUL


def check_socket_path(path: str | os.PathLike[str], what: str = "unix socket") -> Path:
    """Everything :func:`prepare_socket_path` checks that needs no change on disk: the length, the
    parent (if it exists: a private directory of ours) and what is at the path (nothing or a socket).
    Raises ShimConfigError naming ``what``; creates nothing."""
    p = Path(path).absolute()
    n = len(os.fsencode(p))
    if n > MAX_UNIX_PATH:
        raise ShimConfigError(f"{what} path is {n} bytes, over the {MAX_UNIX_PATH}-byte limit: {p}")
    parent = p.parent
    if parent.exists():
        st = parent.stat()
        if not stat.S_ISDIR(st.st_mode):
            raise ShimConfigError(f"{what} directory {parent} is not a directory")
        if st.st_mode & 0o077:
            raise ShimConfigError(
                f"{what} directory {parent} has mode {stat.S_IMODE(st.st_mode):#o}; it must be private (0700)")
        if st.st_uid != os.getuid():
            raise ShimConfigError(f"{what} directory {parent} is owned by uid {st.st_uid}, not by us ({os.getuid()})")
    if p.exists() or p.is_symlink():
        if not stat.S_ISSOCK(p.lstat().st_mode):
            raise ShimConfigError(f"{what} {p} exists and is not a socket; refusing to replace it")
        if _listening(p):
            raise ShimConfigError(f"a server is already listening on {what} {p}")
    return p


def _listening(p: Path) -> bool:
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.settimeout(0.5)
        probe.connect(str(p))
    except OSError:
        return False
    finally:
        probe.close()
    return True


def prepare_socket_path(path: str | os.PathLike[str]) -> Path:
    """Check ``path`` can be bound: short enough, parent private (created 0700 if missing),
    no live server already on it (a stale socket file left by a dead process is removed)."""
    p = check_socket_path(path)
    parent = p.parent
    if not parent.exists():
        parent.mkdir(mode=0o700, parents=True)
        check_socket_path(p)
    if p.exists() or p.is_symlink():
        p.unlink()  # stale (check_socket_path found nobody listening)
    return p


def secure_socket(path: Path) -> None:
    os.chmod(path, 0o600)
