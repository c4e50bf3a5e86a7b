"""A VM's files in the declared datastore: everything of VM ``NAME`` lives in ``DATASTORE/NAME/``
(``disk0.img``; after a clone snapshot ``disk0.active`` and the qcow2 tops ``disk0-top-*.qcow2``; a
clone's ``disk0-overlay.qcow2``; see :class:`hvsim.control.hostagent.HostAgent`). Pure file logic,
no QEMU: what undefining a VM removes, and which clones still stand on a VM's frozen image.

**Removal** (:func:`remove_vm_files`) renames ``DATASTORE/NAME`` to a hidden
``DATASTORE/.NAME.deleting-XXXXXX`` first (one atomic step: from then on a new VM of that name finds
no file of the old one, even if the agent dies mid-way) and then deletes the renamed tree without
following any symbolic link (``shutil.rmtree``'s fd-based walk: a link inside is removed, never its
target). ``DATASTORE/NAME`` being itself a link (or a plain file) is unlinked, its target untouched.
Leftovers of an interrupted removal are deleted by :func:`sweep_deleting` (the agent at start).

**Clones** (:func:`clones_of`): a clone's overlay names its backing file in its qcow2 header; a
VM whose directory holds the backing file of another directory's qcow2 is a base that must not go.
"""
from __future__ import annotations

import os
import secrets
import shutil
import stat
import struct
from pathlib import Path

from hvsim.core.model import NAME_RE

from .errors import ControlError, ControlInputError

QCOW2_MAGIC = b"QFI\xfb"
DELETING = ".deleting-"
MAX_BACKING = 4096


def vm_dir(datastore: Path, vm: str) -> Path:
    """``DATASTORE/vm`` for a valid VM name (ControlInputError otherwise: no ``..``, no ``/``)."""
    if not isinstance(vm, str) or not NAME_RE.match(vm):
        raise ControlInputError("name", f"{vm!r} is not a VM name")
    return Path(datastore) / vm


def qcow2_backing(path: Path) -> str | None:
    """The backing file a qcow2 image's header names (None: not qcow2, or no backing file). The
    file is opened without following a link."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return None
        head = os.pread(fd, 20, 0)
        if len(head) < 20 or head[:4] != QCOW2_MAGIC:
            return None
        offset, size = struct.unpack(">QI", head[8:20])
        if offset == 0 or size == 0 or size > MAX_BACKING:
            return None
        name = os.pread(fd, size, offset)
        return name.decode("utf-8", "replace") if len(name) == size else None
    finally:
        os.close(fd)


def _inside(backing: str, image: Path, base: Path) -> bool:
    p = Path(backing)
    if not p.is_absolute():
        p = image.parent / p
    return Path(os.path.normpath(p)).parent == Path(os.path.normpath(base))


def clones_of(datastore: Path, vm: str) -> list[str]:
    """The VMs (other directories of the datastore) whose qcow2 images have a backing file in
    ``vm``'s directory: clones standing on its frozen image. Links are not followed."""
    base = vm_dir(datastore, vm)
    out: list[str] = []
    try:
        entries = sorted(os.scandir(datastore), key=lambda e: e.name)
    except FileNotFoundError:
        return []
    for d in entries:
        if d.name == vm or d.name.startswith(".") or not d.is_dir(follow_symlinks=False):
            continue
        try:
            files = sorted(os.scandir(d.path), key=lambda e: e.name)
        except OSError:
            continue
        for f in files:
            if f.name.endswith(".qcow2") and f.is_file(follow_symlinks=False):
                backing = qcow2_backing(Path(f.path))
                if backing is not None and _inside(backing, Path(f.path), base):
                    out.append(d.name)
                    break
    return out


def _rmtree(path: Path) -> None:
    if not shutil.rmtree.avoids_symlink_attacks:      # pragma: no cover (Linux has the fd-based walk)
        raise ControlError(f"cannot remove {path} safely on this platform (no fd-based rmtree)")
    shutil.rmtree(path)


def remove_vm_files(datastore: Path, vm: str) -> list[str]:
    """Delete ``vm``'s datastore directory (see the module docstring). Returns the names removed
    (relative to the VM's directory; ``[]``: there was nothing, which is not an error: a retried
    removal succeeds)."""
    d = vm_dir(datastore, vm)
    try:
        st = os.lstat(d)
    except FileNotFoundError:
        return []
    if not stat.S_ISDIR(st.st_mode):          # a link or a file under the VM's name: the name goes, no target
        d.unlink()
        return [f"{vm} ({'link' if stat.S_ISLNK(st.st_mode) else 'file'})"]
    names = sorted(str(p.relative_to(d)) for p in _walk(d))
    gone = d.with_name(f".{vm}{DELETING}{secrets.token_hex(3)}")
    os.rename(d, gone)                         # atomic: the VM's name holds nothing of it from here on
    _fsync_dir(d.parent)
    _rmtree(gone)
    _fsync_dir(d.parent)
    return names


def _walk(d: Path) -> list[Path]:
    out: list[Path] = []
    for root, dirs, files in os.walk(d, followlinks=False):
        out += [Path(root) / n for n in files]
        out += [Path(root) / n for n in dirs if os.path.islink(Path(root) / n)]
    return out


def sweep_deleting(datastore: Path) -> list[str]:
    """Delete what an interrupted :func:`remove_vm_files` left (``.NAME.deleting-*``)."""
    out: list[str] = []
    try:
        entries = list(os.scandir(datastore))
    except FileNotFoundError:
        return out
    for e in entries:
        if e.name.startswith(".") and DELETING in e.name and e.is_dir(follow_symlinks=False):
            _rmtree(Path(e.path))
            out.append(e.name)
    return out


def _fsync_dir(d: Path) -> None:
    fd = os.open(d, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
