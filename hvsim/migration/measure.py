"""What one migration measured (item 4 of issue 3)."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

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

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def summary(self) -> str:
        def f(v: float | None, unit: str) -> str:
            return "-" if v is None else f"{v:.0f} {unit}"
        return (f"{self.vm} {self.source}->{self.destination} [{self.policy}] {self.outcome}: "
                f"total {self.total_s or 0:.1f} s, downtime qemu {f(self.downtime_ms_qemu, 'ms')} / "
                f"guest {f(self.downtime_ms_guest, 'ms')} (predicted {f(self.predicted_downtime_ms, 'ms')}), "
                f"{self.bytes / 2**20:.1f} MiB sent for {self.touched_bytes / 2**20:.1f} MiB touched, "
                f"{self.passes} passes" + (", postcopy" if self.postcopy else ""))
