"""What one migration measured: the result record, guest-observed downtime from the heartbeat
stream, and what a completed migration teaches the cluster's cost model."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from ..guest.heartbeat import HeartbeatMonitor
from .costs import MigrationCosts

from .policies.base import Decision
from .progress import Observation


@dataclass
class MigrationResult:
    vm: str
    policy: str
    source: str
    destination: str
    outcome: str                         # completed | failed | timeout | cancelled
    error: str | None = None
    total_s: float | None = None         # `migrate` issued -> destination running (or -> rolled back)
    setup_s: float | None = None         # destination QEMU start + incoming listen (+ dirty-rate sample)
    downtime_ms_qemu: float | None = None
    downtime_ms_guest: float | None = None   # largest gap of the `dirty` heartbeat stream (None: no beats)
    bytes: int = 0                       # bytes QEMU sent (ram.transferred)
    touched_bytes: int = 0               # guest RAM minus the zero pages QEMU found (what must move once)
    passes: int = 0                      # dirty-sync-count
    predicted_downtime_ms: float | None = None   # the prediction in force when the source was stopped
    postcopy: bool = False
    heartbeat_beats: int = 0
    heartbeat_lost: int | None = None
    policy_params: dict[str, Any] = field(default_factory=dict)
    decisions: list[Decision] = field(default_factory=list)
    uld: dict[str, Any] = field(default_factory=dict)   # user-level drivers moved: mode, rounds, bytes, breakdown
    contract: dict[str, Any] | None = None       # the caller's budgets
    plan: dict[str, Any] | None = None           # the plan predicted before the first byte (Plan.to_dict())
    plan_error: dict[str, float | None] | None = None  # (predicted - actual) / actual, total_s and downtime_ms
    contract_met: bool | None = None             # guest-observed downtime and total time within the budgets
    gap: dict[str, Any] | None = None            # the guest-observed gap explained (GapBreakdown.to_dict())
    survey: dict[str, Any] | None = None         # the raw measurement the plan came from
    recovery: list[dict[str, Any]] = field(default_factory=list)   # postcopy recovery steps, if any

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def summary(self) -> str:
        def f(v: float | None, unit: str) -> str:
            return "-" if v is None else f"{v:.0f} {unit}"
        return (f"{self.vm} {self.source}->{self.destination} [{self.policy}] {self.outcome}: "
                f"total {self.total_s or 0:.1f} s, downtime qemu {f(self.downtime_ms_qemu, 'ms')} / "
                f"guest {f(self.downtime_ms_guest, 'ms')} (predicted {f(self.predicted_downtime_ms, 'ms')}), "
                f"{self.bytes / 2**20:.1f} MiB sent for {self.touched_bytes / 2**20:.1f} MiB touched, "
                f"{self.passes} passes" + (", postcopy" if self.postcopy else "") + self._uld_summary()
                + (f"; plan {self.plan['chosen']['label']}" if self.plan else "")
                + (f", contract {'met' if self.contract_met else 'missed'}" if self.contract_met is not None else ""))

    def _uld_summary(self) -> str:
        u = self.uld
        if not u or not u.get("components"):
            return ""
        ms = u.get("downtime_ms")
        return (f"; ULDs {u['mode']} {', '.join(u['components'])}: {u.get('bytes', 0) / 2**20:.1f} MiB state"
                + (f", {ms:.0f} ms of the downtime" if ms is not None else ""))


def guest_downtime_ms(heartbeat: HeartbeatMonitor, since: float) -> tuple[float | None, int, int | None]:
    """(largest heartbeat gap in ms or None, beats, lost beats or None) since ``since``."""
    hb = heartbeat.stats(since=since) if heartbeat.beats else None
    if hb is None:
        return None, 0, None
    return (hb.max_gap_ms if hb.beats >= 2 else None), hb.beats, hb.lost


def learn_costs(costs: MigrationCosts, result: MigrationResult, ram: dict[str, Any], bandwidth: float | None,
                guest_mib: int) -> None:
    """Fold a completed migration into the cluster's learned costs, for guests of this size: the
    fixed part of a precopy switch-over (guest downtime minus the bytes sent while stopped over the
    bandwidth), or the guest's stall after a postcopy switch-over; and the link's goodput."""
    if bandwidth:
        costs.bandwidth[f"{result.source}->{result.destination}"] = float(bandwidth)
        costs.bandwidth[f"{result.destination}->{result.source}"] = float(bandwidth)
    if result.downtime_ms_guest is None:
        return
    uld_ms = float(result.uld.get("downtime_ms") or 0.0)   # the ULDs' part is predicted on its own
    if not result.postcopy and bandwidth and ram.get("downtime-bytes") is not None:
        costs.learn_fixed(guest_mib, result.downtime_ms_guest - uld_ms - int(ram["downtime-bytes"]) / bandwidth * 1000)
    if result.postcopy and result.heartbeat_beats > 0 and not result.recovery:
        costs.learn_postcopy_stall(guest_mib, result.downtime_ms_guest)


def working_set_seen(samples: list[Observation]) -> int | None:
    """The writable working set a precopy showed. A writer at D dirties min(W, D x tau) during a
    pass of tau seconds: D is the largest dirty set per second of the previous pass over the syncs
    (the short passes are not yet saturated), and a sync whose dirty set stayed under
    0.8 x D x tau had the writer come round its whole set: that set is W. None if no sync showed it."""
    starts: list[Observation] = []
    for o in samples:
        if o.status != "active":
            continue
        if not starts or o.passes > starts[-1].passes:
            starts.append(o)
    pairs = [(cur.remaining, cur.t - prev.t) for prev, cur in zip(starts, starts[1:])
             if cur.passes >= 2 and cur.remaining > 0 and cur.t - prev.t > 0.2]
    if len(pairs) < 2:
        return None
    rate = max(d / tau for d, tau in pairs)
    seen = [d for d, tau in pairs if d < 0.8 * rate * tau]
    return max(seen) if seen else None
