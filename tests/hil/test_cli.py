"""The `hvsim` command line against real guests and a real shim (issue 9): a refused or failed
operation is one line and exit 1, output the agent truncated is flagged on stderr, --stream gives
all of it, and the guest command's exit code is passed through."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from hvsim.core.agent import MAX_OUTPUT
from hvsim.drivers.shim.process import ShimProcess

pytestmark = pytest.mark.hil

REPO = Path(__file__).resolve().parents[2]
HVSIM = [sys.executable, "-c", "import sys; from hvsim.cli import main; sys.argv[0] = 'hvsim'; main()"]


def hvsim(*args: str, timeout: float = 240) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([*HVSIM, *args], capture_output=True, cwd=REPO, timeout=timeout)


def error_lines(r: subprocess.CompletedProcess[bytes]) -> list[str]:
    err = r.stderr.decode(errors="replace")
    assert "Traceback" not in err, err
    return [ln for ln in err.splitlines() if ln.startswith("hvsim: error:")]


def test_vm_run_timeout_is_one_line_exit_1() -> None:
    r = hvsim("vm", "run", "sleep 100000", "--timeout", "8")
    lines = error_lines(r)
    assert r.returncode == 1, r.stderr
    assert lines == ["hvsim: error: guest: guest command 'sleep 100000' timed out after 8.0s"], r.stderr


def test_vm_run_more_memory_than_the_machine_has_is_refused_before_qemu_starts() -> None:
    r = hvsim("vm", "run", "--memory", "1000000000", "true")
    lines = error_lines(r)
    assert r.returncode == 1, r.stderr
    assert len(lines) == 1 and "memory" in lines[0] and "available" in lines[0], r.stderr


def test_vm_run_flags_truncated_output_and_streams_all_of_it() -> None:
    size = MAX_OUTPUT + 611_392                                  # 9 000 000 bytes
    r = hvsim("vm", "run", f"head -c {size} /dev/zero")
    assert r.returncode == 0, r.stderr
    assert len(r.stdout) == MAX_OUTPUT
    notes = [ln for ln in r.stderr.decode().splitlines() if ln.startswith("hvsim: note:")]
    assert notes == [f"hvsim: note: stdout truncated: the guest agent keeps {MAX_OUTPUT} bytes, the command wrote "
                     f"{size} (use --stream for all of it)"]
    s = hvsim("vm", "run", "--stream", f"head -c {size} /dev/zero; echo -n tail >&2; exit 3")
    assert s.returncode == 3, s.stderr                           # the guest command's own exit code
    assert s.stdout == bytes(size) and s.stderr.startswith(b"tail")
    assert b"hvsim: note" not in s.stderr


async def test_shim_stats_and_prefetch_against_a_live_shim(tmp_path: Path) -> None:
    sock_dir = Path("/tmp") / f"hvs-cli-{tmp_path.name[-8:]}"
    sock_dir.mkdir(mode=0o700)
    try:
        async with ShimProcess(sock_dir / "s.sock", sock_dir / "b.img", size=1 << 20) as shim:
            r = subprocess.run([*HVSIM, "shim", "stats", "--control", str(shim.control_path)], capture_output=True,
                               cwd=REPO, timeout=60)
            assert r.returncode == 0, r.stderr
            assert json.loads(r.stdout)["tracked_pages"] == 0
            p = subprocess.run([*HVSIM, "shim", "prefetch", "--control", str(shim.control_path), "--budget-bytes",
                                "4096", "--wait"], capture_output=True, cwd=REPO, timeout=60)
            assert p.returncode == 0, p.stderr
            bad = subprocess.run([*HVSIM, "shim", "stats", "--control", str(shim.control_path), "--export", "nope"],
                                 capture_output=True, cwd=REPO, timeout=60)
            assert bad.returncode == 1 and len(error_lines(bad)) == 1 and b"nope" in bad.stderr, bad.stderr
    finally:
        for f in sock_dir.iterdir():
            f.unlink()
        sock_dir.rmdir()
