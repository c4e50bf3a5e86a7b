"""The network prober: UDP probes every millisecond to an echo peer, echo gaps, duplicates, TCP.

:class:`Prober` runs ``udpprobe`` (images/src/udpprobe.c) inside a namespace (a third host's
endpoint); the peer runs ``udpecho`` (in a guest: ``vm.exec("udpecho -d -q")``; in a namespace
endpoint: :class:`EchoServer`). Why a static C program and not an asyncio loop: a probe every
1 ms for the length of a migration needs sub-millisecond send jitter on a 2-core host that is
busy with QEMU; the C prober sends on an absolute schedule (``clock_nanosleep``), can run
SCHED_FIFO, and reports its own lateness, so a gap it shows is the network's, not the prober's.
Its times are CLOCK_MONOTONIC, the clock of :func:`time.monotonic_ns`, so a test can ask what
happened after an instant it recorded (:meth:`ProbeReport.lost_after`).
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import signal
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hvbase.aio import wait_for
from hvbase.aio import stop_process
from ..core.cluster import images_dir
from . import netns as nsutil
from .errors import ProbeError


def tool(name: str) -> Path:
    """A static helper built by ``make images`` (udpecho, udpprobe)."""
    path = images_dir() / "bin" / name
    if not path.is_file():
        raise ProbeError(f"{path} missing: run `make images`")
    return path


@dataclass(frozen=True)
class TcpReport:
    ok: bool
    sent: int
    echoed: int
    max_stall_ms: float
    error: str


@dataclass(frozen=True)
class ProbeReport:
    sent: int
    received: int
    lost: int
    duplicates: int
    interval_us: int
    max_gap_ms: float                      # network blackout: the largest gap between echoes
    max_gap_from_ns: int
    max_gap_to_ns: int
    first_send_ns: int
    last_send_ns: int
    max_send_late_ms: float                # the prober's own lateness (0.x ms when healthy)
    realtime: bool
    rtt_ms: dict[str, float]
    gaps: tuple[tuple[int, int], ...]      # (from_ns, to_ns) of every echo gap >= the threshold
    lost_ranges: tuple[tuple[int, int, int, int], ...]   # (first seq, last seq, first send ns, last send ns)
    tcp: TcpReport | None = None
    raw: dict[str, Any] = field(default_factory=dict, repr=False)

    @classmethod
    def parse(cls, data: dict[str, Any]) -> ProbeReport:
        tcp = data.get("tcp")
        return cls(sent=int(data["sent"]), received=int(data["received"]), lost=int(data["lost"]),
                   duplicates=int(data["duplicates"]), interval_us=int(data["interval_us"]),
                   max_gap_ms=float(data["max_gap_ms"]), max_gap_from_ns=int(data["max_gap_from_ns"]),
                   max_gap_to_ns=int(data["max_gap_to_ns"]), first_send_ns=int(data["first_send_ns"]),
                   last_send_ns=int(data["last_send_ns"]), max_send_late_ms=float(data["max_send_late_ms"]),
                   realtime=bool(data.get("realtime", False)), rtt_ms=dict(data["rtt_ms"]),
                   gaps=tuple((int(a), int(b)) for a, b in data["gaps"]),
                   lost_ranges=tuple((int(a), int(b), int(c), int(d)) for a, b, c, d in data["lost_ranges"]),
                   tcp=TcpReport(**tcp) if tcp else None, raw=data)

    def lost_after(self, t_ns: int) -> int:
        """How many probes sent at or after ``t_ns`` (time.monotonic_ns()) got no echo."""
        n = 0
        interval = self.interval_us * 1000
        for first, last, t_first, t_last in self.lost_ranges:
            if t_last < t_ns:
                continue
            if t_first >= t_ns:
                n += last - first + 1
            else:   # the range straddles t_ns: probes are ``interval`` apart
                n += min(last - first + 1, (t_last - t_ns) // interval + 1)
        return n

    def gaps_after(self, t_ns: int) -> list[float]:
        """Echo gaps (ms, >= the listing threshold) that started at or after ``t_ns``."""
        return [(b - a) / 1e6 for a, b in self.gaps if a >= t_ns]

    def summary(self) -> str:
        tcp = "" if self.tcp is None else f", tcp {'ok' if self.tcp.ok else 'BROKEN ' + self.tcp.error}"
        return (f"{self.sent} probes, {self.received} echoed, {self.lost} lost, {self.duplicates} duplicates, "
                f"max gap {self.max_gap_ms:.1f} ms (prober late <= {self.max_send_late_ms:.1f} ms){tcp}")


class Prober:
    """``udpprobe`` in namespace ``netns`` against ``target:port``; ``stop()`` returns the report."""

    def __init__(self, netns: str, target: str, port: int = 7777, *, interval_us: int = 1000,
                 tcp: bool = True, realtime: bool = True, gap_ms: float = 5.0, wait_ms: int = 300,
                 raw: str | Path | None = None) -> None:
        self.netns = netns
        self.argv = [str(tool("udpprobe")), "-t", target, "-p", str(port), "-i", str(interval_us),
                     "-w", str(wait_ms), "-g", str(gap_ms)] + (["-T"] if tcp else []) + (["-R"] if realtime else [])
        if raw is not None:      # one line per probe: seq send_ns first_echo_ns echoes (for plots)
            self.argv += ["-r", str(raw)]
        self._proc: asyncio.subprocess.Process | None = None

    async def __aenter__(self) -> Prober:
        await self.start()
        return self

    async def __aexit__(self, *exc: Any) -> None:
        if self._proc is not None and self._proc.returncode is None:
            await stop_process(self._proc, timeout=2)

    async def start(self, timeout: float = 10.0) -> None:
        if self._proc is not None:
            raise ProbeError("prober already started")
        self._proc = await asyncio.create_subprocess_exec(
            *nsutil.argv_in(self.netns, self.argv), stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        assert self._proc.stdout is not None
        try:
            line = await wait_for(self._proc.stdout.readline(), timeout)
        except BaseException:
            await stop_process(self._proc, timeout=1)
            raise
        if b'"ready"' not in line:
            err = b""
            if self._proc.stderr is not None:
                with contextlib.suppress(TimeoutError):
                    err = await wait_for(self._proc.stderr.read(), 2)
            await stop_process(self._proc, timeout=1)
            raise ProbeError(f"udpprobe in {self.netns} did not start: {line!r} {err.decode(errors='replace')}")

    async def stop(self, timeout: float = 30.0) -> ProbeReport:
        """SIGINT the prober (it drains late echoes and the TCP stream, then reports)."""
        proc = self._proc
        if proc is None:
            raise ProbeError("prober was not started")
        if proc.returncode is None:
            proc.send_signal(signal.SIGINT)
        try:
            out, err = await wait_for(proc.communicate(), timeout)
        except BaseException:
            await stop_process(proc, timeout=1)
            raise
        lines = [ln for ln in out.decode(errors="replace").splitlines() if ln.startswith("{")]
        if proc.returncode != 0 or not lines:
            raise ProbeError(f"udpprobe failed (exit {proc.returncode}): {err.decode(errors='replace')[-500:]}")
        try:
            return ProbeReport.parse(json.loads(lines[-1]))
        except (ValueError, KeyError, TypeError) as exc:
            raise ProbeError(f"udpprobe report unreadable: {lines[-1][:300]!r}") from exc


class EchoServer:
    """``udpecho`` (UDP + TCP echo) inside namespace ``netns``; stopped on exit."""

    def __init__(self, netns: str, port: int = 7777, *, bind: str = "0.0.0.0", realtime: bool = True) -> None:
        self.netns = netns
        self.argv = [str(tool("udpecho")), "-q", "-p", str(port), "-b", bind] + (["-R"] if realtime else [])
        self._proc: asyncio.subprocess.Process | None = None

    async def __aenter__(self) -> EchoServer:
        self._proc = await asyncio.create_subprocess_exec(
            *nsutil.argv_in(self.netns, self.argv), stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.DEVNULL)
        assert self._proc.stdout is not None
        line = await wait_for(self._proc.stdout.readline(), 10)
        if b"listening" not in line:
            await stop_process(self._proc, timeout=1)
            raise ProbeError(f"udpecho in {self.netns} did not start: {line!r}")
        return self

    async def __aexit__(self, *exc: Any) -> None:
        if self._proc is not None:
            await stop_process(self._proc, timeout=2)
