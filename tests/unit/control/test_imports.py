"""Data-disk imports (hvsim.control.imports): only regular files inside the import directory, at
most the disk's size; the copy keeps the bytes (holes stay holes) and extends to the disk's size."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from hvsim.control.errors import ControlInputError
from hvsim.control.imports import copy_image, resolve_import


@pytest.fixture
def root(tmp_path: Path) -> Path:
    r = tmp_path / "images"
    (r / "sub").mkdir(parents=True)
    (r / "sub" / "ok.img").write_bytes(b"x" * 4096)
    (r / "empty.img").write_bytes(b"")
    (r / "big.img").write_bytes(b"y" * ((1 << 20) + 1))
    (r / "dir.img").mkdir()
    os.mkfifo(r / "fifo.img")
    (tmp_path / "secret").write_bytes(b"s" * 10)
    os.symlink(tmp_path / "secret", r / "out.img")
    os.symlink(r / "sub" / "ok.img", r / "in.img")
    return r


def test_a_regular_file_inside_is_accepted(root: Path) -> None:
    assert resolve_import(root, "sub/ok.img", 1) == (root / "sub" / "ok.img").resolve()
    assert resolve_import(root, "in.img", 1) == (root / "sub" / "ok.img").resolve()   # a symlink that stays inside


@pytest.mark.parametrize(("rel", "disk", "why"), [
    ("../secret", 1, "'..'"), ("sub/../../secret", 1, "'..'"), ("/etc/passwd", 1, "relative path"),
    ("./sub/ok.img", 1, "'..' and '.'"), ("out.img", 1, "leaves the import directory"),
    ("dir.img", 1, "not a regular file"), ("fifo.img", 1, "not a regular file"), ("empty.img", 1, "empty"),
    ("big.img", 1, "more than the disk"), ("nope.img", 1, "not found"), ("sub/ok.img", 0, "disk size"),
    ("a b", 1, "relative path"), ("", 1, "relative path"),
])
def test_everything_else_is_refused_naming_why(root: Path, rel: str, disk: int, why: str) -> None:
    with pytest.raises(ControlInputError, match=why):
        resolve_import(root, rel, disk)


def test_no_import_directory_refuses_every_import(root: Path) -> None:
    with pytest.raises(ControlInputError, match="no import directory configured"):
        resolve_import(None, "sub/ok.img", 1)


def test_copy_keeps_the_bytes_and_extends_to_the_disk(tmp_path: Path) -> None:
    src = tmp_path / "src.img"
    data = os.urandom(8192) + b"\0" * (3 << 20) + os.urandom(100)
    src.write_bytes(data)
    dst = tmp_path / "ds" / "vm" / "disk0.img"
    copy_image(src, dst, 8)
    got = dst.read_bytes()
    assert len(got) == 8 << 20 and got[:len(data)] == data and got[len(data):] == b"\0" * ((8 << 20) - len(data))
    assert dst.stat().st_mode & 0o777 == 0o600
    assert os.stat(dst).st_blocks * 512 < 2 << 20           # the zero MiBs stayed holes
    assert not (dst.parent / "disk0.img.part").exists()
