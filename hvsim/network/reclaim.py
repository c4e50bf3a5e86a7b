"""Reclaim what dead earlier runs left behind: one function for every entry point.

A run killed with SIGKILL (or a crashed machine's earlier boot) cannot clean up after itself. What
it leaves, and how each piece is known to be its own:

===========  ==============================================  ======================================
what         where                                           owner check
===========  ==============================================  ======================================
power        cgroup v2 ``hvsim/<pid>.<start>.<host>``         the pid and start time in its name
domains      (every process of an emulated host: powered     (:func:`hvsim.core.power.reclaim_stale`)
             off, then removed)
namespaces   ``hvs-*`` named in a record under               the record's pid and its start time
             ``/run/hvsim/network`` (their veths and tbf     (:class:`~hvsim.network.records.Record`)
             qdiscs go with them)
processes    inside those namespaces; orphans (reparented    same record / the run dir's owner
             to init) using a stale run dir
records      the ``.json`` files themselves                  same record
run dirs     ``$TMPDIR/hvsim-*`` with an ``owner`` file      the owner file's pid and start time
             (:func:`hvsim.core.cluster.reclaim_stale_run_dirs`)
===========  ==============================================  ======================================

Nothing whose owner is alive is touched, and namespaces no record names are never removed (they
are reported as ``skipped``). :func:`reclaim_stale` is what ``hvsim cleanup`` runs and what every
command that creates namespaces, run directories or processes (``hvsim vm run``, ``vm migrate``,
``lab``, the benchmarks) runs first.
"""
from __future__ import annotations

import asyncio
import logging
import os
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..core import power
from ..core.cluster import reclaim_stale_run_dirs
from . import netns as nsutil
from . import records

log = logging.getLogger("hvsim.network.reclaim")

KINDS = ("power domain", "namespace", "process", "record", "run dir")


@dataclass(frozen=True)
class Reclaimed:
    kind: str                  # one of KINDS
    name: str                  # namespace name, pid, record or directory path
    owner_pid: int | None      # the dead process that made it
    detail: str = ""


@dataclass
class ReclaimReport:
    removed: list[Reclaimed] = field(default_factory=list)
    failed: list[Reclaimed] = field(default_factory=list)    # could not be removed (detail says why)
    skipped: list[Reclaimed] = field(default_factory=list)   # looks like ours but is left alone (detail says why)

    @property
    def items(self) -> list[Reclaimed]:
        return self.removed

    def extend(self, other: ReclaimReport) -> None:
        self.removed += other.removed
        self.failed += other.failed
        self.skipped += other.skipped

    def summary(self) -> str:
        counts = Counter(r.kind for r in self.removed)
        parts = [f"{counts[k]} {k}{'s' if counts[k] != 1 else ''}" for k in KINDS if counts[k]]
        text = ", ".join(parts) or "nothing"
        if self.failed:
            text += f" ({len(self.failed)} could not be removed)"
        return text

    def to_dict(self) -> dict[str, Any]:
        return {"removed": [asdict(r) for r in self.removed], "failed": [asdict(r) for r in self.failed],
                "skipped": [asdict(r) for r in self.skipped]}


async def _qdiscs(ns: str) -> list[str]:
    try:
        return [f"{q.get('kind')} on {q.get('dev')}" for q in await nsutil.tc_json("qdisc", "show", netns=ns)
                if q.get("kind") == "tbf"]
    except Exception as exc:  # noqa: BLE001 - only for the report
        log.debug("qdiscs of %s: %s", ns, exc)
        return []


async def reclaim_network(prefix: str = "hvs-", directory: str | os.PathLike[str] | None = None) -> ReclaimReport:
    """Namespaces (with their processes, links and qdiscs) and records of underlays whose owner is
    dead: only those named in a record under ``directory`` whose names start with ``prefix``."""
    d = records.run_dir(directory)
    report = ReclaimReport()
    if not d.is_dir():
        return report
    named: set[str] = set()
    for path in sorted(d.glob(f"{prefix}*.json")):
        rec = records.read_record(path)
        if rec is None:
            report.skipped.append(Reclaimed("record", str(path), None, "unreadable"))
            continue
        named.update(rec.namespaces)
        if rec.owner_alive():
            continue
        existing = set(nsutil.list_netns())
        ours = [n for n in rec.namespaces if n.startswith(prefix) and n in existing]
        details = {ns: await _qdiscs(ns) for ns in ours}
        for name in ours:
            for pid in await nsutil.kill_netns_pids(name):
                report.removed.append(Reclaimed("process", str(pid), rec.pid, f"inside {name}"))
        if ours:
            await nsutil.ip(batch=[f"netns del {n}" for n in ours], force=True, check=False)
        left = set(nsutil.list_netns()) & set(ours)
        for n in ours:
            entry = Reclaimed("namespace", n, rec.pid, ", ".join(details[n]) or "no qdiscs")
            (report.failed if n in left else report.removed).append(entry)
        if left:
            log.error("stale underlay %s: could not remove %s", rec.runid, sorted(left))
            report.failed.append(Reclaimed("record", str(path), rec.pid, "kept: its namespaces are still there"))
        else:
            path.unlink(missing_ok=True)
            report.removed.append(Reclaimed("record", str(path), rec.pid, f"underlay {rec.runid}"))
            log.info("removed stale underlay %s (pid %d): %s", rec.runid, rec.pid, ours)
    for n in nsutil.list_netns():
        if n.startswith(prefix) and n not in named:
            report.skipped.append(Reclaimed("namespace", n, None, "no record names it: not ours to remove"))
    return report


def reclaim_run_dirs(base: Path | None = None) -> ReclaimReport:
    report = ReclaimReport()
    for s in reclaim_stale_run_dirs(base):
        for pid in s.killed:
            report.removed.append(Reclaimed("process", str(pid), s.owner_pid, f"orphan using {s.path}"))
        if s.users:
            report.skipped.append(Reclaimed("run dir", str(s.path), s.owner_pid,
                                            f"still used by pid {', '.join(map(str, s.users))}"))
        elif s.removed:
            report.removed.append(Reclaimed("run dir", str(s.path), s.owner_pid))
        else:
            report.failed.append(Reclaimed("run dir", str(s.path), s.owner_pid, "could not be removed"))
    return report


def reclaim_power_domains() -> ReclaimReport:
    report = ReclaimReport()
    for path in power.reclaim_stale():
        owner = Path(path).name.split(".", 1)[0]
        report.removed.append(Reclaimed("power domain", path, int(owner) if owner.isdigit() else None,
                                        "powered off"))
    return report


async def reclaim_stale(prefix: str = "hvs-", net_run_dir: str | os.PathLike[str] | None = None,
                        run_dir_base: Path | None = None) -> ReclaimReport:
    """Everything dead earlier runs left: host power domains first (every process of a dead owner's
    hosts), then network namespaces and records (with the processes inside), then run directories.
    See the module docstring."""
    report = await asyncio.to_thread(reclaim_power_domains)
    report.extend(await reclaim_network(prefix, net_run_dir))
    report.extend(await asyncio.to_thread(reclaim_run_dirs, run_dir_base))
    return report


async def cleanup_stale(prefix: str = "hvs-", directory: str | os.PathLike[str] | None = None) -> list[str]:
    """Remove namespaces left by dead runs: only those named in a record under ``directory``
    whose names start with ``prefix`` and whose owning pid is no longer alive.
    Returns the namespace names removed (the whole report: :func:`reclaim_network`)."""
    report = await reclaim_network(prefix, directory)
    return [r.name for r in report.removed if r.kind == "namespace"]
