"""The short measurement a plan is predicted from, taken before the first byte of the migration.

- **Guest memory** (:func:`sample_guest`): 4096 guest pages chosen at random (fixed seed) are read
  from QEMU's own memory (``/proc/<qemu pid>/mem`` at the host address QEMU reports for guest-physical
  1 MiB, HMP ``gpa2hva``; read only, hashed, never kept) at t0 and after 0.25, 0.5, 1 and 2 s.
  Non-zero pages at t0 estimate what must cross at least once; the pages changed since t0 give the
  curve of distinct bytes dirtied over the window: its slope while it grows in proportion is the
  dirty rate, and where it flattens the writer's working set ended (the working set). QEMU's own
  ``calc-dirty-rate`` is not used: its windows are whole seconds (a 16 MiB working set rewritten at
  27 MiB/s saturates in one), its result is whole MiB/s, and its ``dirty-bitmap`` mode crashed QEMU
  7.2 under TCG (SIGSEGV) here; ``pmemsave`` (one file per read) took 3-8 ms a call here, too slow for
  sub-second windows.
- **vCPU load**: the guest's vCPU threads' CPU time (``/proc/<qemu>/task/<tid>/stat``, thread ids
  from ``query-cpus-fast``) over the long window, the share auto-converge's throttle competes with.
- **Link** (:func:`probe_link`): one TCP stream from the source host's namespace to the
  destination's for ~0.8 s (two short ``python3`` processes started with ``ip netns exec``); the
  goodput after the first 0.25 s (tbf's burst) is the link's.
"""
from __future__ import annotations

import asyncio
import json
import logging
import os
import random
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hvbase.aio import wait_for
from qmp_bridge import QEMUBridgeError, QMPSession

from hvbase.aio import stop_process
from .errors import MigrationError

log = logging.getLogger("hvsim.migration")

PAGE = 4096
MIB = 2**20
LOW_MEM_LIMIT = 3 << 30          # below-4G RAM of a PC guest ends at or before 3-3.5 GiB


@dataclass(frozen=True)
class GuestSample:
    nonzero_fraction: float
    touched_bytes: int
    dirty_rate: float                 # bytes/s: distinct pages changed per second (window ``rate_window_s``)
    wss_bytes: int | None             # the working set when the longest window saw it end
    curve: list[tuple[float, int]]    # (window s, distinct bytes changed since the first read)
    rate_window_s: float
    vcpu_load: float | None
    sampled_pages: int
    took_s: float

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


class SurveyError(MigrationError):
    """The guest's memory could not be sampled (the plan then uses what was learnt before)."""


_HVA_RE = re.compile(r"Host virtual address for (0x[0-9a-f]+) \((\S+)\) is (0x[0-9a-f]+)")


async def _hva(qmp: QMPSession, gpa: int) -> int:
    out = await qmp.execute("human-monitor-command", {"command-line": f"gpa2hva {gpa:#x}"}, timeout=5)
    m = _HVA_RE.search(str(out))
    if m is None or int(m.group(1), 16) != gpa:
        raise SurveyError(f"unexpected gpa2hva answer for {gpa:#x}: {str(out).strip()!r}")
    return int(m.group(3), 16)


def _vcpu_cpu_s(pid: int, tids: list[int]) -> float | None:
    tick = os.sysconf("SC_CLK_TCK")
    total = 0.0
    try:
        for tid in tids:
            fields = Path(f"/proc/{pid}/task/{tid}/stat").read_text().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / tick     # utime, stime
    except (OSError, IndexError, ValueError):
        return None
    return total


def _read_round(fd: int, base: int, pages: list[int]) -> tuple[float, list[int], int]:
    """(mid time, a hash per page, zero pages) of one pass over the sampled pages."""
    t0 = time.monotonic()
    hashes, zero = [], 0
    for p in pages:
        b = os.pread(fd, PAGE, base + p * PAGE)
        if len(b) != PAGE:
            raise SurveyError(f"short read of guest page {p} ({len(b)} bytes)")
        if b == _ZERO:
            zero += 1
        hashes.append(hash(b))
    return (t0 + time.monotonic()) / 2, hashes, zero


_ZERO = bytes(PAGE)


async def sample_guest(qmp: QMPSession, qemu_pid: int, ram_bytes: int, *, pages: int = 4096,
                       windows: tuple[float, ...] = (0.25, 0.5, 1.0, 2.0), seed: int = 1) -> GuestSample:
    """Sample the guest's memory and vCPU load (see the module docstring); takes ``windows[-1]``
    plus ~0.2 s. Raises SurveyError if the guest's RAM cannot be located or read."""
    t_start = time.monotonic()
    low = min(ram_bytes, LOW_MEM_LIMIT)
    base = await _hva(qmp, MIB) - MIB
    end = low - PAGE
    if await _hva(qmp, end) != base + end:
        raise SurveyError("the guest's low RAM is not one contiguous block in QEMU's address space")
    rnd = random.Random(seed)
    n = min(pages, (low - MIB) // PAGE)
    sample = sorted(rnd.sample(range(MIB // PAGE, low // PAGE), n))
    tids: list[int] = []
    try:
        cpus = await qmp.execute("query-cpus-fast")
        tids = [int(c["thread-id"]) for c in cpus if "thread-id" in c]
    except (QEMUBridgeError, KeyError, TypeError, ValueError) as exc:
        log.info("no vCPU thread ids: %s", exc)
    try:
        fd = os.open(f"/proc/{qemu_pid}/mem", os.O_RDONLY)
    except OSError as exc:
        raise SurveyError(f"cannot read QEMU's memory (pid {qemu_pid}): {exc}") from exc
    try:
        cpu0, tc0 = _vcpu_cpu_s(qemu_pid, tids) if tids else None, time.monotonic()
        t0, h0, zero = await asyncio.to_thread(_read_round, fd, base, sample)
        curve: list[tuple[float, int]] = []
        for w in windows:
            wait = t0 + w - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)
            t, h, _ = await asyncio.to_thread(_read_round, fd, base, sample)
            changed = sum(1 for a, b in zip(h0, h) if a != b)
            curve.append((round(t - t0, 3), int(changed * PAGE * ram_bytes / (n * PAGE))))
        cpu1, tc1 = _vcpu_cpu_s(qemu_pid, tids) if tids else None, time.monotonic()
    except OSError as exc:
        raise SurveyError(f"reading the guest's memory failed: {exc}") from exc
    finally:
        os.close(fd)
    rate, rate_w = rate_from_curve(curve)
    wss = wss_from_curve(curve, rate)
    load = None
    if cpu0 is not None and cpu1 is not None and tc1 > tc0:
        load = max(0.0, min(1.0, (cpu1 - cpu0) / (tc1 - tc0) / max(1, len(tids))))
    frac = 1 - zero / n if n else 1.0
    return GuestSample(nonzero_fraction=round(frac, 4), touched_bytes=int(frac * ram_bytes), dirty_rate=rate,
                       wss_bytes=wss, curve=curve, rate_window_s=rate_w, vcpu_load=load, sampled_pages=n,
                       took_s=round(time.monotonic() - t_start, 3))


def rate_from_curve(curve: list[tuple[float, int]]) -> tuple[float, float]:
    """Dirty rate from the distinct-bytes curve: the slope from the first window to the longest
    one that still grows in proportion (before the working set ends). The slope, not bytes / time:
    a guest's hot background pages (timers, the kernel's own) are all dirty within the first
    window and would inflate a short window's average. (bytes/s, window s)."""
    if not curve:
        return 0.0, 0.0
    best = curve[0]
    for (t_a, c_a), (t_b, c_b) in zip(curve, curve[1:]):
        if c_a > 0 and c_b < 0.8 * c_a * t_b / t_a:
            break                       # saturating: the working set ends within t_b
        best = (t_b, c_b)
        if t_b >= 1.0:
            break
    t0, c0 = curve[0]
    if best[0] > t0 and best[1] >= c0:
        return (best[1] - c0) / (best[0] - t0), best[0]
    return (c0 / t0 if t0 > 0 else 0.0), t0


def wss_from_curve(curve: list[tuple[float, int]], rate: float) -> int | None:
    """The working set, if the longest window found clearly fewer distinct pages than the rate implies."""
    if not curve or rate <= 0:
        return None
    t, c = curve[-1]
    return int(c) if c < 0.8 * rate * t else None


_RECEIVER = r"""
import json, socket, sys, time
s = socket.socket(); s.bind((sys.argv[1], 0)); s.listen(1); s.settimeout(10)
print(s.getsockname()[1], flush=True)
c, _ = s.accept(); c.settimeout(10)
t0 = time.monotonic(); marks = []; n = 0
while True:
    b = c.recv(1 << 16)
    if not b: break
    n += len(b); marks.append((time.monotonic() - t0, n))
print(json.dumps(marks[::16] + marks[-1:]), flush=True)
"""

_SENDER = r"""
import socket, sys, time
c = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=10)
buf = b"\x5a" * (1 << 16); end = time.monotonic() + float(sys.argv[3])
while time.monotonic() < end: c.sendall(buf)
c.close()
"""


def _in_ns(netns: str | None, argv: list[str]) -> list[str]:
    return (["ip", "netns", "exec", netns] if netns else []) + argv


async def probe_link(src_netns: str | None, dst_netns: str | None, dst_addr: str, seconds: float = 0.8,
                     skip_s: float = 0.25) -> float | None:
    """Goodput (bytes/s) of one TCP stream from the source host to the destination, measured after
    ``skip_s`` (tbf's burst); None if the probe failed (logged)."""
    recv = await asyncio.create_subprocess_exec(
        *_in_ns(dst_netns, [sys.executable, "-c", _RECEIVER, dst_addr]),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    send: asyncio.subprocess.Process | None = None
    try:
        assert recv.stdout is not None
        line = await wait_for(recv.stdout.readline(), 10)
        port = int(line)
        send = await asyncio.create_subprocess_exec(
            *_in_ns(src_netns, [sys.executable, "-c", _SENDER, dst_addr, str(port), str(seconds)]),
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE)
        await wait_for(send.wait(), seconds + 10)
        out = await wait_for(recv.stdout.readline(), 10)
        await wait_for(recv.wait(), 10)
        marks = [(float(t), int(n)) for t, n in json.loads(out)]
    except (TimeoutError, ValueError, OSError) as exc:
        log.warning("link probe %s -> %s failed: %r", src_netns, dst_addr, exc)
        return None
    finally:
        for p in (send, recv):
            if p is not None and p.returncode is None:
                await stop_process(p)
    after = [(t, n) for t, n in marks if t >= skip_s]
    if len(after) < 2 or after[-1][0] - after[0][0] < 0.2:
        return None
    return (after[-1][1] - after[0][1]) / (after[-1][0] - after[0][0])
