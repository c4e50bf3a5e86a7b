"""What the kernel says about processes: liveness by pid (and start time), and which processes hold
files open under a directory (so nothing is deleted under a live process); ending leftover processes
by pid and start time (never a recycled pid)."""
from __future__ import annotations

import contextlib
import os
import signal
import time
from pathlib import Path


def start_time(pid: int) -> str:
    """The process's start time in clock ticks since boot ('' if there is no such process)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return ""


def alive(pid: int, started: str | None = None) -> bool:
    """True if ``pid`` runs and is not a zombie (and, given ``started``, is the same process)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    fields = stat.rsplit(")", 1)[1].split()
    if fields[0] == "Z":
        return False
    return started is None or fields[19] == started


def holders(directory: Path) -> dict[int, list[str]]:
    """Live processes that hold a file under ``directory`` open: pid -> paths."""
    base = str(Path(directory).resolve()) + os.sep
    found: dict[int, list[str]] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        pid = int(entry.name)
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if target.startswith(base):
                found.setdefault(pid, []).append(target)
    return {pid: paths for pid, paths in found.items() if alive(pid)}


def ppid(pid: int) -> int:
    """The parent's pid (1 for an orphan reparented to init; -1 if there is no such process)."""
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return -1


def users(directory: Path) -> list[int]:
    """Live processes (not this one) whose command line, working directory or open files refer to
    ``directory`` (e.g. a QEMU whose sockets and logs are in a run dir)."""
    base = str(Path(directory).resolve())
    prefix = base + os.sep
    found = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        pid = int(entry.name)
        try:
            args = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
            links = [os.readlink(f"/proc/{pid}/cwd")]
            for fd in os.listdir(f"/proc/{pid}/fd"):
                with contextlib.suppress(OSError):
                    links.append(os.readlink(f"/proc/{pid}/fd/{fd}"))
        except OSError:
            continue
        if (any(a == base or prefix in a for a in args) or any(t == base or t.startswith(prefix) for t in links)) \
                and alive(pid):
            found.append(pid)
    return found


def terminate(pids: list[int], grace_s: float = 2.0) -> list[int]:
    """SIGTERM, then SIGKILL after ``grace_s``, each pid that is still the process it was when called
    (start time checked, so a recycled pid is never hit). Returns the pids signalled."""
    starts = {pid: start_time(pid) for pid in pids}
    hit: list[int] = []
    for sig in (signal.SIGTERM, signal.SIGKILL):
        live = [p for p, st in starts.items() if st and alive(p, st)]
        if not live:
            break
        for pid in live:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
                if pid not in hit:
                    hit.append(pid)
        deadline = time.monotonic() + grace_s
        while time.monotonic() < deadline and any(alive(p, starts[p]) for p in live):
            time.sleep(0.05)
    return hit
