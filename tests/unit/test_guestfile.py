"""The guest file write (hvsim.core.guestfile) run against the guest's own userland: busybox's sh
and applets (the guest image's), here on the host in a temporary directory. A file arrives whole
with its mode, nothing of the transfer is left behind, a corrupted part leaves nothing at the
path, and paths and modes that arrive from outside are refused naming the problem."""
from __future__ import annotations

import asyncio
import hashlib
import os
import shutil
from pathlib import Path

import pytest

from hvbase.aio import wait_for
from hvsim.core.agent import ExecResult
from hvsim.core.errors import AgentError, InputError
from hvsim.core.guestfile import PART, check_guest_path, check_mode, write_guest_file

BUSYBOX = shutil.which("busybox")
APPLETS = ("sh", "cat", "base64", "gunzip", "sha256sum", "chmod", "mv", "rm", "mkdir", "printf")


def guest_shell(tmp: Path) -> tuple[list[str], object]:
    """An exec function running busybox sh with only busybox's applets on PATH (what the guest
    has), and the commands it ran."""
    bindir = tmp / "bb"
    bindir.mkdir()
    assert BUSYBOX is not None, "busybox-static is not installed (make setup installs it)"
    for a in APPLETS:
        (bindir / a).symlink_to(BUSYBOX)
    ran: list[str] = []

    async def exec_fn(command: str, timeout: float = 60.0, check: bool = False) -> ExecResult:
        ran.append(command)
        p = await asyncio.create_subprocess_exec(str(bindir / "sh"), "-c", command, env={"PATH": str(bindir)},
                                                 stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        out, err = await wait_for(p.communicate(), timeout)
        r = ExecResult(command, p.returncode or 0, out.decode(), err.decode())
        return r.check() if check else r
    return ran, exec_fn


async def test_a_file_arrives_whole_with_its_mode_and_nothing_else_is_left(tmp_path: Path) -> None:
    ran, exec_fn = guest_shell(tmp_path)
    data = os.urandom(3 << 20)                 # incompressible: many parts
    dest = tmp_path / "dir" / "agent.bin"
    dest.parent.mkdir()
    w = await write_guest_file(exec_fn, str(dest), data, 0o700)   # type: ignore[arg-type]
    assert dest.read_bytes() == data and (dest.stat().st_mode & 0o7777) == 0o700
    assert w.size == len(data) and w.sha256 == hashlib.sha256(data).hexdigest()
    assert sorted(os.listdir(dest.parent)) == ["agent.bin"]          # no .part, no .parts
    parts = [c for c in ran if c.startswith("printf %s ")]
    assert len(parts) > 30 and all(len(c) < PART + 200 for c in parts)  # each under sh's argument limit
    # written again over an existing file: replaced, still whole
    w2 = await write_guest_file(exec_fn, str(dest), b"small\n", 0o600)  # type: ignore[arg-type]
    assert dest.read_bytes() == b"small\n" and (dest.stat().st_mode & 0o7777) == 0o600 and w2.size == 6


async def test_a_corrupted_part_leaves_nothing_at_the_path(tmp_path: Path) -> None:
    _, exec_fn = guest_shell(tmp_path)
    dest = tmp_path / "f"
    calls = {"n": 0}

    async def corrupting(command: str, timeout: float = 60.0, check: bool = False) -> ExecResult:
        if command.startswith("printf %s ") and calls["n"] == 0:
            calls["n"] += 1
            body = command[len("printf %s "):]
            b64, _, rest = body.partition(" > ")
            # another valid base64 text of the same length: gunzip or the digest must catch it
            command = "printf %s " + b64[:100] + ("A" if b64[100] != "A" else "B") + b64[101:] + " > " + rest
        return await exec_fn(command, timeout=timeout, check=check)   # type: ignore[operator]
    with pytest.raises(AgentError):
        await write_guest_file(corrupting, str(dest), os.urandom(300 << 10), 0o600)
    assert calls["n"] == 1
    assert os.listdir(tmp_path) == ["bb"]       # no file, no half-written .part, no parts


@pytest.mark.parametrize("path, why", [
    ("relative/x", "must be absolute"), ("/a/../etc/passwd", "component '..'"), ("/a//b", "component ''"),
    ("/a/b/", "trailing /"), ("/a/b c", "component 'b c'"), ("/a/$(reboot)", "not allowed"), ("", "non-empty"),
    ("/a\nb", "not allowed"), ("/" + "a" * 1100, "at most 1024"), (None, "non-empty string"),
])
def test_bad_guest_paths_are_refused_naming_the_problem(path: object, why: str) -> None:
    with pytest.raises(InputError, match=why.replace("(", r"\(").replace(")", r"\)").replace("$", r"\$")):
        check_guest_path(path)


def test_modes() -> None:
    assert check_mode(0o4755) == 0o4755
    for bad in (-1, 0o10000, True, "0700", 1.0):
        with pytest.raises(InputError, match="file mode"):
            check_mode(bad)


async def test_a_file_over_the_limit_is_refused_before_anything_runs(tmp_path: Path) -> None:
    ran, exec_fn = guest_shell(tmp_path)
    with pytest.raises(InputError, match="at most"):
        await write_guest_file(exec_fn, "/x", bytes(65 << 20))  # type: ignore[arg-type]
    assert ran == []
