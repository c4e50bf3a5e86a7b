"""Crash-safety net: a run-dir record of the namespaces each live Underlay owns.

Before an Underlay creates anything it writes ``<run_dir>/<prefix><runid>.json`` naming
every namespace it is about to create, with its pid and that process's start time. The
record is removed once teardown has left nothing behind. A run that was killed leaves
its record; :func:`hvsim.network.reclaim.cleanup_stale` removes the namespaces of records
whose owner is dead.
"""
from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import psutil


log = logging.getLogger("hvsim.network")

DEFAULT_RUN_DIR = "/run/hvsim/network"


def run_dir(override: str | os.PathLike[str] | None = None) -> Path:
    return Path(override or os.environ.get("HVSIM_NET_RUN_DIR") or DEFAULT_RUN_DIR)


def _proc_start(pid: int) -> float | None:
    try:
        return psutil.Process(pid).create_time()
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return None


@dataclass
class Record:
    runid: str
    prefix: str
    pid: int
    pid_start: float | None
    created: float
    namespaces: list[str]

    @classmethod
    def for_this_process(cls, runid: str, prefix: str, namespaces: list[str]) -> Record:
        pid = os.getpid()
        return cls(runid=runid, prefix=prefix, pid=pid, pid_start=_proc_start(pid),
                   created=time.time(), namespaces=list(namespaces))

    def owner_alive(self) -> bool:
        start = _proc_start(self.pid)
        if start is None:
            return False
        # a recycled pid belongs to a process that started later than our owner
        return self.pid_start is None or abs(start - self.pid_start) < 1.0


def record_path(directory: Path, prefix: str, runid: str) -> Path:
    return directory / f"{prefix}{runid}.json"


def write_record(directory: Path, rec: Record) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = record_path(directory, rec.prefix, rec.runid)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(asdict(rec)))
    os.replace(tmp, path)
    return path


def read_record(path: Path) -> Record | None:
    try:
        data = json.loads(path.read_text())
        return Record(**data)
    except (OSError, ValueError, TypeError) as exc:
        log.warning("ignoring unreadable underlay record %s: %s", path, exc)
        return None
