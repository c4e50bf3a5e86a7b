"""Host side of the ``dirty`` heartbeat stream (virtio-serial port ``org.hvsim.heartbeat``).

Each beat is "HB <seq> <guest_monotonic_ns> <pages_dirtied>" every 10 ms. The monitor records the
host arrival time of every beat, so gaps (downtime as the guest's clients see it) and lost beats
(sequence holes) can be measured, also across a migration (``attach`` the destination's socket too).
"""
from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class Beat:
    seq: int
    guest_ns: int
    host_t: float
    dirtied: int


@dataclass
class HeartbeatStats:
    beats: int
    lost: int
    duplicates: int
    max_gap_ms: float
    max_gap_at: float
    first_seq: int
    last_seq: int


@dataclass
class HeartbeatMonitor:
    beats: list[Beat] = field(default_factory=list)
    _tasks: list[asyncio.Task[None]] = field(default_factory=list)
    _writers: list[asyncio.StreamWriter] = field(default_factory=list)

    async def attach(self, socket_path: Path, timeout: float = 10.0) -> None:
        """Start reading beats from a VM's heartbeat socket (may be called again after migration)."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                reader, writer = await asyncio.open_unix_connection(str(socket_path))
                break
            except (FileNotFoundError, ConnectionRefusedError):
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.05)
        self._writers.append(writer)
        self._tasks.append(asyncio.create_task(self._read(reader)))

    async def _read(self, reader: asyncio.StreamReader) -> None:
        while True:
            line = await reader.readline()
            if not line:
                return
            now = time.monotonic()
            parts = line.split()
            if len(parts) == 4 and parts[0] == b"HB":
                try:
                    self.beats.append(Beat(int(parts[1]), int(parts[2]), now, int(parts[3])))
                except ValueError:
                    continue

    async def wait_beats(self, n: int, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        start = len(self.beats)
        while len(self.beats) - start < n:
            if time.monotonic() > deadline:
                raise TimeoutError(f"only {len(self.beats) - start} of {n} heartbeats in {timeout}s")
            await asyncio.sleep(0.02)

    def stats(self, since: float = 0.0) -> HeartbeatStats:
        beats = [b for b in self.beats if b.host_t >= since]
        if not beats:
            return HeartbeatStats(0, 0, 0, 0.0, 0.0, -1, -1)
        seqs = sorted({b.seq for b in beats})
        lost = (seqs[-1] - seqs[0] + 1) - len(seqs)
        dup = len(beats) - len(seqs)
        gap, at = 0.0, 0.0
        for a, b in zip(beats, beats[1:]):
            if b.host_t - a.host_t > gap:
                gap, at = b.host_t - a.host_t, a.host_t
        return HeartbeatStats(len(beats), lost, dup, gap * 1000, at, seqs[0], seqs[-1])

    async def close(self) -> None:
        for w in self._writers:
            w.close()
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks.clear()
        self._writers.clear()
