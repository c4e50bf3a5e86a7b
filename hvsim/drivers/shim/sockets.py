"""Unix socket paths: private directory (0700), socket mode 0600, stale-socket cleanup."""
from __future__ import annotations

import os
import socket
import stat
from pathlib import Path

from .errors import ShimConfigError

MAX_UNIX_PATH = 107  # sun_path is 108 bytes including the NUL


def prepare_socket_path(path: str | os.PathLike[str]) -> Path:
    """Check ``path`` can be bound: short enough, parent private (created 0700 if missing),
    no live server already on it (a stale socket file left by a dead process is removed)."""
    p = Path(path).absolute()
    if len(os.fsencode(p)) > MAX_UNIX_PATH:
        raise ShimConfigError(f"unix socket path is {len(os.fsencode(p))} bytes, over the {MAX_UNIX_PATH}-byte limit: {p}")
    parent = p.parent
    if not parent.exists():
        parent.mkdir(mode=0o700, parents=True)
    st = parent.stat()
    if st.st_mode & 0o077:
        raise ShimConfigError(
            f"socket directory {parent} has mode {stat.S_IMODE(st.st_mode):#o}; it must be private (0700)")
    if st.st_uid != os.getuid():
        raise ShimConfigError(f"socket directory {parent} is owned by uid {st.st_uid}, not by us ({os.getuid()})")
    if p.exists() or p.is_symlink():
        if not stat.S_ISSOCK(p.lstat().st_mode):
            raise ShimConfigError(f"{p} exists and is not a socket; refusing to replace it")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.settimeout(0.5)
            probe.connect(str(p))
        except OSError:
            p.unlink()  # stale: nobody listens
        else:
            raise ShimConfigError(f"a server is already listening on {p}")
        finally:
            probe.close()
    return p


def secure_socket(path: Path) -> None:
    os.chmod(path, 0o600)
