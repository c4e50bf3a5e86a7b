"""What migrations learn about their own costs, owned by the cluster (``costs_of(cluster)``),
serialisable so a manager can persist it.

``fixed``: the fixed part of the downtime (stop, device state load, resume, heartbeat period), an EWMA
of (guest-observed downtime - bytes sent while stopped / bandwidth) of completed precopy migrations.
``postcopy_stall``: the guest resumes on the destination ~0.1 s after the stop, then stalls while the
pages it touches first (kernel, the writer's own pages) are fetched one fault at a time; learnt from
completed postcopy migrations (600-1200 ms measured here at 200 Mbit/s).

Both are also kept per guest size (``by_size``: MiB of guest RAM -> the two costs), because the
stall and the device state grow with the guest; ``fixed_for(mib)`` / ``postcopy_stall_for(mib)``
answer from the guest's size when that size was seen, else from the overall value. ``bandwidth``
keeps the link goodput last measured between two hosts (bytes/s, "a->b"); ``working_set`` the
writable working set a migration of a VM saw (the dirty set at a bitmap sync that stayed clearly
under dirty rate x pass time: the writer had come round), for the next plan of that VM.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol


@dataclass
class LearnedCost:
    """An EWMA of samples in ms, starting at ``initial_ms``."""
    initial_ms: float
    alpha: float = 0.5
    value_ms: float | None = None
    samples: int = 0

    def get(self) -> float:
        return self.initial_ms if self.value_ms is None else self.value_ms

    def learn(self, sample_ms: float) -> None:
        sample_ms = max(0.0, min(sample_ms, 2000.0))
        self.value_ms = sample_ms if self.value_ms is None else \
            self.alpha * sample_ms + (1 - self.alpha) * self.value_ms
        self.samples += 1

    def to_dict(self) -> dict[str, Any]:
        return {"initial_ms": self.initial_ms, "alpha": self.alpha, "value_ms": self.value_ms, "samples": self.samples}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> LearnedCost:
        return cls(float(d["initial_ms"]), float(d["alpha"]), None if d["value_ms"] is None else float(d["value_ms"]),
                   int(d["samples"]))


FIXED_INITIAL_MS = 60.0
STALL_INITIAL_MS = 800.0


@dataclass
class SizeCosts:
    fixed: LearnedCost = field(default_factory=lambda: LearnedCost(FIXED_INITIAL_MS))
    postcopy_stall: LearnedCost = field(default_factory=lambda: LearnedCost(STALL_INITIAL_MS))

    def to_dict(self) -> dict[str, Any]:
        return {"fixed": self.fixed.to_dict(), "postcopy_stall": self.postcopy_stall.to_dict()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SizeCosts:
        return cls(LearnedCost.from_dict(d["fixed"]), LearnedCost.from_dict(d["postcopy_stall"]))


@dataclass
class MigrationCosts:
    fixed: LearnedCost = field(default_factory=lambda: LearnedCost(FIXED_INITIAL_MS))
    postcopy_stall: LearnedCost = field(default_factory=lambda: LearnedCost(STALL_INITIAL_MS))
    by_size: dict[int, SizeCosts] = field(default_factory=dict)
    bandwidth: dict[str, float] = field(default_factory=dict)     # "src->dst" -> bytes/s
    working_set: dict[str, int] = field(default_factory=dict)     # vm name -> writable working set seen (bytes)
    # a ratio, not ms: bytes QEMU sent while stopped / the pending bytes the plan stopped with
    switch_fill: LearnedCost = field(default_factory=lambda: LearnedCost(1.0))

    def _size(self, mib: int) -> SizeCosts:
        return self.by_size.setdefault(int(mib), SizeCosts())

    def fixed_for(self, mib: int | None) -> float:
        s = self.by_size.get(int(mib)) if mib is not None else None
        return s.fixed.get() if s is not None and s.fixed.samples else self.fixed.get()

    def postcopy_stall_for(self, mib: int | None) -> float:
        s = self.by_size.get(int(mib)) if mib is not None else None
        return s.postcopy_stall.get() if s is not None and s.postcopy_stall.samples else self.postcopy_stall.get()

    def learn_fixed(self, mib: int, sample_ms: float) -> None:
        self.fixed.learn(sample_ms)
        self._size(mib).fixed.learn(sample_ms)

    def learn_postcopy_stall(self, mib: int, sample_ms: float) -> None:
        self.postcopy_stall.learn(sample_ms)
        self._size(mib).postcopy_stall.learn(sample_ms)

    def to_dict(self) -> dict[str, Any]:
        return {"fixed": self.fixed.to_dict(), "postcopy_stall": self.postcopy_stall.to_dict(),
                "by_size": {str(k): v.to_dict() for k, v in self.by_size.items()},
                "bandwidth": dict(self.bandwidth), "working_set": dict(self.working_set),
                "switch_fill": self.switch_fill.to_dict()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> MigrationCosts:
        return cls(LearnedCost.from_dict(d["fixed"]), LearnedCost.from_dict(d["postcopy_stall"]),
                   {int(k): SizeCosts.from_dict(v) for k, v in (d.get("by_size") or {}).items()},
                   {str(k): float(v) for k, v in (d.get("bandwidth") or {}).items()},
                {str(k): int(v) for k, v in (d.get("working_set") or {}).items()},
                LearnedCost.from_dict(d["switch_fill"]) if d.get("switch_fill") else LearnedCost(1.0))


class _HasExtensions(Protocol):
    def extension(self, key: str, factory: Any) -> Any: ...


def costs_of(cluster: _HasExtensions) -> MigrationCosts:
    """The cluster's learned migration costs (created on first use)."""
    costs: MigrationCosts = cluster.extension("migration.costs", lambda _c: MigrationCosts())
    return costs
