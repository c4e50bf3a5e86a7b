"""Progress snapshots of a migration, built from QMP ``query-migrate`` (pure logic)."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .state import MigrationState

PAGE = 4096


@dataclass(frozen=True)
class Observation:
    """One ``query-migrate`` sample as the policies see it (times in seconds since ``migrate``)."""
    t: float
    status: str                       # QEMU's status: setup, active, postcopy-active, device, completed, ...
    passes: int                       # dirty-sync-count: 1 during the bulk pass, +1 per bitmap sync
    transferred: int                  # bytes sent so far
    remaining: int                    # dirty bytes not yet sent (as of the last sync)
    total: int                        # guest RAM bytes
    dirty_rate: float                 # bytes/s dirtied, as measured by QEMU at the last sync
    mbps: float                       # QEMU's own throughput estimate
    expected_downtime_ms: float | None
    normal_bytes: int = 0             # non-zero pages sent
    downtime_limit_ms: float | None = None
    throttle_pct: int = 0
    postcopy_requests: int = 0
    bandwidth: float | None = None    # bytes/s measured by the engine over the last samples (None until known)
    predicted_downtime_ms: float | None = None  # the engine/policy's own prediction, filled by the engine
    uld_pending_bytes: int = 0        # user-level-driver state the destination does not hold yet (engine)
    uld_fixed_ms: float = 0.0         # estimated quiesce + checkpoint + restore cost of the ULDs (engine)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def observation_from_qmp(info: dict[str, Any], t: float, downtime_limit_ms: float | None = None,
                         bandwidth: float | None = None) -> Observation:
    ram = info.get("ram") or {}
    page = int(ram.get("page-size") or PAGE)
    return Observation(
        t=t, status=str(info.get("status", "none")),
        passes=int(ram.get("dirty-sync-count", 0) or 0),
        transferred=int(ram.get("transferred", 0) or 0),
        remaining=int(ram.get("remaining", 0) or 0),
        total=int(ram.get("total", 0) or 0),
        dirty_rate=float(ram.get("dirty-pages-rate", 0) or 0) * page,
        mbps=float(ram.get("mbps", 0.0) or 0.0),
        expected_downtime_ms=(float(info["expected-downtime"]) if "expected-downtime" in info else None),
        normal_bytes=int(ram.get("normal-bytes", 0) or 0),
        downtime_limit_ms=downtime_limit_ms,
        throttle_pct=int(info.get("cpu-throttle-percentage", 0) or 0),
        postcopy_requests=int(ram.get("postcopy-requests", 0) or 0),
        bandwidth=bandwidth,
    )


@dataclass(frozen=True)
class ProgressSnapshot:
    """One live progress sample of a migration (what the async iterator yields)."""
    state: MigrationState
    elapsed_s: float
    passes: int
    transferred: int
    remaining: int
    total: int
    dirty_rate: float            # bytes/s
    bandwidth: float | None      # bytes/s measured over the link
    mbps: float                  # QEMU's own estimate
    expected_downtime_ms: float | None   # QEMU's
    predicted_downtime_ms: float | None  # the policy's (or ours for policies without one)
    status: str


@dataclass
class BandwidthMeter:
    """Link bandwidth from successive ``transferred`` samples: an EWMA of the rate over windows
    of at least ``min_window`` seconds (short windows are dominated by socket-buffer bursts)."""
    min_window: float = 0.4
    alpha: float = 0.5
    value: float | None = None
    _t0: float | None = None
    _b0: int = 0
    samples: list[float] = field(default_factory=list)

    def update(self, t: float, transferred: int) -> float | None:
        if self._t0 is None:
            self._t0, self._b0 = t, transferred
            return self.value
        dt = t - self._t0
        if dt < self.min_window:
            return self.value
        rate = (transferred - self._b0) / dt
        self._t0, self._b0 = t, transferred
        if rate <= 0:
            return self.value
        self.samples.append(rate)
        self.value = rate if self.value is None else self.alpha * rate + (1 - self.alpha) * self.value
        return self.value
