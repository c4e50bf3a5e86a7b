"""What one migration measured: the result record, guest-observed downtime from the heartbeat
stream, and what a completed migration teaches the cluster's cost model."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from ..guest.heartbeat import HeartbeatMonitor
from .costs import MigrationCosts

from .policies.base import Decision


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

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def summary(self) -> str:
        def f(v: float | None, unit: str) -> str:
            return "-" if v is None else f"{v:.0f} {unit}"
        return (f"{self.vm} {self.source}->{self.destination} [{self.policy}] {self.outcome}: "
                f"total {self.total_s or 0:.1f} s, downtime qemu {f(self.downtime_ms_qemu, 'ms')} / "
                f"guest {f(self.downtime_ms_guest, 'ms')} (predicted {f(self.predicted_downtime_ms, 'ms')}), "
                f"{self.bytes / 2**20:.1f} MiB sent for {self.touched_bytes / 2**20:.1f} MiB touched, "
                f"{self.passes} passes" + (", postcopy" if self.postcopy else "") + self._uld_summary())

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


def learn_costs(costs: MigrationCosts, result: MigrationResult, ram: dict[str, Any], bandwidth: float | None) -> None:
    """Fold a completed migration into the cluster's learned costs: the fixed part of a precopy
    switch-over (guest downtime minus the bytes sent while stopped over the bandwidth), or the
    guest's stall after a postcopy switch-over."""
    if result.downtime_ms_guest is None:
        return
    uld_ms = float(result.uld.get("downtime_ms") or 0.0)   # the ULDs' part is predicted on its own
    if not result.postcopy and bandwidth and ram.get("downtime-bytes") is not None:
        costs.fixed.learn(result.downtime_ms_guest - uld_ms - int(ram["downtime-bytes"]) / bandwidth * 1000)
    if result.postcopy and result.heartbeat_beats > 0:
        costs.postcopy_stall.learn(result.downtime_ms_guest)
