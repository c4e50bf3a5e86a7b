"""The power domain of an emulated host: a cgroup (v2) holding every process of that host (its QEMUs
and user-level drivers). A guest outlives the process that manages it (a host agent may restart),
but never its host: powering the host off kills the whole group at once (``cgroup.kill``).

    dom = PowerDomain.create("host-a")        # /sys/fs/cgroup/<unified>/hvsim/<owner pid>.<start>.host-a
    QemuProcess(..., detached=True, cgroup=dom.path)   # the child joins it between fork and exec
    dom.power_off()                           # every process of the host is SIGKILLed, then reaped
    dom.remove()

The directory name records its owner (the process that created the emulated host) by pid and start
time, so :func:`reclaim_stale` can power off and remove the domains of owners that died.
"""
from __future__ import annotations

import logging
import os
import re
import time
from pathlib import Path

from . import procfs
from .errors import HvsimError, SpecError

log = logging.getLogger("hvsim.core.power")

_NAME = re.compile(r"^[a-z0-9][a-z0-9_.-]{0,63}$")


class PowerError(HvsimError):
    """The power domain could not be created, powered off or removed."""


def cgroup2_root() -> Path:
    """Where cgroup v2 is mounted (the unified hierarchy): PowerError if nowhere."""
    with open("/proc/mounts") as f:
        mounts = [line.split() for line in f]
    found = [Path(m[1]) for m in mounts if len(m) > 2 and m[2] == "cgroup2"]
    if not found:
        raise PowerError("no cgroup v2 hierarchy is mounted (hvsim needs one for host power domains)")
    return min(found, key=lambda p: len(str(p)))


def base() -> Path:
    return cgroup2_root() / "hvsim"


class PowerDomain:
    def __init__(self, path: Path) -> None:
        self.path = path

    @classmethod
    def create(cls, host: str) -> PowerDomain:
        if not _NAME.match(host):
            raise SpecError(f"power domain name {host!r} is invalid")
        me = os.getpid()
        path = base() / f"{me}.{procfs.start_time(me)}.{host}"
        try:
            path.mkdir(parents=True, exist_ok=False)
        except FileExistsError:
            raise PowerError(f"power domain {path} exists already") from None
        except OSError as exc:
            raise PowerError(f"cannot create power domain {path}: {exc}") from exc
        return cls(path)

    @property
    def name(self) -> str:
        return self.path.name.split(".", 2)[-1]

    def pids(self) -> list[int]:
        try:
            return [int(x) for x in (self.path / "cgroup.procs").read_text().split()]
        except FileNotFoundError:
            return []

    def power_off(self, timeout: float = 10.0) -> list[int]:
        """SIGKILL every process of the host (cgroup.kill) and wait until none is left."""
        victims = self.pids()
        if not self.path.exists():
            return []
        (self.path / "cgroup.kill").write_text("1")
        deadline = time.monotonic() + timeout
        while self.pids() or any(procfs.alive(p) for p in victims):
            if time.monotonic() > deadline:
                raise PowerError(f"power domain {self.name}: processes survived power-off: {self.pids()}")
            time.sleep(0.02)
        log.info("power domain %s: powered off (%d processes)", self.name, len(victims))
        return victims

    def populated(self) -> bool:
        """Whether any process (a dying one included) still belongs to the domain."""
        try:
            events = (self.path / "cgroup.events").read_text()
        except FileNotFoundError:
            return False
        return "populated 1" in events

    def remove(self, timeout: float = 10.0) -> None:
        """Power off (if anything runs) and delete the domain. Idempotent."""
        if not self.path.exists():
            return
        self.power_off(timeout)
        deadline = time.monotonic() + timeout
        while self.populated():      # killed processes leave the group only once they finished exiting
            if time.monotonic() > deadline:
                raise PowerError(f"power domain {self.name}: still populated {timeout:g} s after power-off")
            time.sleep(0.02)
        try:
            self.path.rmdir()
        except OSError as exc:
            raise PowerError(f"cannot remove power domain {self.path}: {exc}") from exc

    def __repr__(self) -> str:
        return f"<PowerDomain {self.path}>"


def reclaim_stale() -> list[str]:
    """Power off and remove the domains whose owner process is gone; returns their paths."""
    try:
        root = base()
    except PowerError:
        return []
    removed = []
    for d in root.iterdir() if root.exists() else ():
        m = re.match(r"^(\d+)\.(\d+)\.", d.name)
        if not d.is_dir() or m is None:      # the cgroup's own control files, or not ours
            continue
        if procfs.alive(int(m.group(1)), m.group(2)):
            continue
        try:
            PowerDomain(d).remove()
            removed.append(str(d))
        except PowerError as exc:
            log.error("stale power domain %s: %s", d, exc)
    return removed
