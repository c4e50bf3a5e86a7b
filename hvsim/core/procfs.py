"""What the kernel says about processes: liveness by pid (and start time), and which processes hold
files open under a directory (so nothing is deleted under a live process)."""
from __future__ import annotations

import os
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
