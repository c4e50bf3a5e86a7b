"""Where the guest-observed downtime goes: the heartbeat gap explained by QMP event timestamps.

QEMU stamps every QMP event with its own clock (``timestamp``: host wall time when it happened);
the heartbeat monitor stamps every beat with our monotonic clock when it arrived. With the offset
between the two clocks, the largest gap of the heartbeat stream splits into:

- ``before_stop_ms``: last beat before the gap -> source ``STOP`` (the beat period: the guest's
  last beat came up to 10 ms before the stop; measurement granularity);
- ``stop_and_copy_ms``: source ``STOP`` -> source ``MIGRATION completed``: QEMU's stop-and-copy,
  the remaining RAM and the device state written into the socket (close to the downtime QEMU
  reports); after a postcopy switch-over: ``STOP`` -> destination ``RESUME`` (the switch-over
  package crossed and loaded; ``drain_and_load_ms`` is then 0);
- ``drain_and_load_ms``: -> destination ``RESUME``: the bytes still in flight cross the shaped link
  (socket buffers and the tbf queue), the destination loads the device state and starts the vCPUs;
- ``resume_to_beat_ms``: destination ``RESUME`` -> first beat: the guest runs again, its heartbeat
  thread is scheduled, the beat crosses virtio-serial and our socket (after a postcopy switch-over
  this is the stall: the guest faults in the pages it touches first, one round trip each).

The parts add up to the gap (the remainder, ``unexplained_ms``, is what the clocks' offset and the
events' own delivery add). Pure logic; :class:`EventRecorder` collects the events.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Any

from qmp_bridge import QMPSession

from ..guest.heartbeat import Beat


def event_time(ev: dict[str, Any]) -> float | None:
    ts = ev.get("timestamp") or {}
    try:
        return float(ts["seconds"]) + float(ts["microseconds"]) / 1e6
    except (KeyError, TypeError, ValueError):
        return None


@dataclass
class EventRecorder:
    """Records the named QMP events of one session with QEMU's timestamps, converted to our
    monotonic clock. ``close()`` ends the subscription."""
    side: str
    events: list[tuple[float, str, dict[str, Any]]] = field(default_factory=list)
    _sub: Any = None
    _offset: float = field(default_factory=lambda: time.time() - time.monotonic())

    def start(self, qmp: QMPSession, names: tuple[str, ...] = ("STOP", "RESUME", "MIGRATION")) -> EventRecorder:
        wanted = frozenset(names)

        def record(ev: dict[str, Any]) -> None:
            t = event_time(ev)
            mono = (t - self._offset) if t is not None else time.monotonic()
            self.events.append((mono, str(ev.get("event")), dict(ev.get("data") or {})))
        self._sub = qmp.events.subscribe(f"gap-{self.side}", filter=lambda ev: ev.get("event") in wanted,
                                         callback=record)
        return self

    def first(self, name: str, after: float = 0.0, status: str | None = None) -> float | None:
        for t, n, data in self.events:
            if n == name and t >= after and (status is None or data.get("status") == status):
                return t
        return None

    def last(self, name: str, before: float, status: str | None = None) -> float | None:
        found = None
        for t, n, data in self.events:
            if n == name and t <= before and (status is None or data.get("status") == status):
                found = t
        return found

    def close(self) -> None:
        if self._sub is not None:
            self._sub.close()
            self._sub = None


@dataclass
class GapBreakdown:
    gap_ms: float                      # the switch-over's gap (the one around the source's STOP)
    before_stop_ms: float | None
    stop_and_copy_ms: float | None
    drain_and_load_ms: float | None
    resume_to_beat_ms: float | None
    unexplained_ms: float | None
    postcopy: bool
    largest_gap_ms: float | None = None     # the stream's largest gap, if it was not the switch-over's
    largest_gap_at_s: float | None = None   # ... and when it ended, seconds before the STOP

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def largest_gap(beats: list[Beat], since: float = 0.0) -> tuple[Beat, Beat] | None:
    bs = [b for b in beats if b.host_t >= since]
    best: tuple[Beat, Beat] | None = None
    for a, b in zip(bs, bs[1:]):
        if best is None or b.host_t - a.host_t > best[1].host_t - best[0].host_t:
            best = (a, b)
    return best


def explain_gap(beats: list[Beat], src: EventRecorder, dst: EventRecorder, since: float = 0.0,
                postcopy: bool = False) -> GapBreakdown | None:
    """Split the switch-over's heartbeat gap (the one around the source's STOP; the largest gap
    since ``since`` without a STOP) by the source's and destination's events. A larger gap
    elsewhere (a guest or host stall during precopy) is reported beside it."""
    pair = largest_gap(beats, since)
    if pair is None:
        return None
    largest = pair
    stop_any = src.first("STOP", after=since)
    if stop_any is not None:
        bs = [b for b in beats if b.host_t >= since]
        around = next(((a, b) for a, b in zip(bs, bs[1:]) if a.host_t <= stop_any <= b.host_t), None)
        if around is not None:
            pair = around
    b0, b1 = pair
    ms = 1000.0
    stop = src.first("STOP", after=b0.host_t - 0.5)
    resume = dst.first("RESUME", after=stop if stop is not None else b0.host_t - 0.5)
    done = None
    if postcopy:
        done = resume           # postcopy: the package (device state) arrives, the destination resumes
    elif stop is not None:
        done = src.first("MIGRATION", stop, "completed")
    parts = {
        "before_stop_ms": (stop - b0.host_t) * ms if stop is not None else None,
        "stop_and_copy_ms": (done - stop) * ms if stop is not None and done is not None else None,
        "drain_and_load_ms": (resume - done) * ms if resume is not None and done is not None else None,
        "resume_to_beat_ms": (b1.host_t - resume) * ms if resume is not None else None,
    }
    gap = (b1.host_t - b0.host_t) * ms
    known = [v for v in parts.values() if v is not None]
    unexplained = gap - sum(known) if len(known) == len(parts) else None
    lg = (largest[1].host_t - largest[0].host_t) * ms
    other = largest is not pair and lg > gap
    return GapBreakdown(gap_ms=round(gap, 1), postcopy=postcopy,
                        largest_gap_ms=round(lg, 1) if other else None,
                        largest_gap_at_s=round((stop - largest[1].host_t), 3) if other and stop is not None else None,
                        unexplained_ms=None if unexplained is None else round(unexplained, 1),
                        **{k: (None if v is None else round(v, 1)) for k, v in parts.items()})
