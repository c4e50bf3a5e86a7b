"""Sizing the reserved failover capacity (pure functions, no I/O).

What must fail over is the management host plus every protected VM; the candidate hosts are where
the reservation is held (another datacenter, or hosts kept free in this one). Two sizings of the
same set are computed so the overhead of the usual method is visible:

- **ours** (:func:`size_reservation`): pack the items (largest memory first, best fit) onto the
  candidate hosts and reserve, *per host*, exactly what was packed there. The reservation is a set
  of ``reserve_amount`` placement rules at host level (one per host used): ordinary placements
  keep that much free on each of those hosts, so the packing stays feasible whatever else is
  placed (no fragmentation), and the total held is exactly the sum of the demands.
- **slots** (:func:`slot_sizing`, vSphere HA's "slot policy"): a slot is the largest vCPU count x
  the largest memory among the items; every item takes one slot; reserved = slots needed x slot.
  With heterogeneous VMs (one large, many small) slots waste a lot.

    plan = size_reservation([Demand("db", 4, 8192), Demand("web", 1, 512)], Demand("manager", 2, 2048),
                            [Capacity("h3", 8, 16384)])
    plan.rules()      # [{"name": "ha-reserve-h3", "kind": "reserve_amount", "level": "host", ...}]
    plan.overhead     # {"vcpus": ..., "memory_mib": ...} slots minus ours
"""
from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

RULE_PREFIX = "ha-reserve-"
MANAGEMENT = "(management)"


@dataclass(frozen=True)
class Demand:
    """What one item that must fail over needs."""
    name: str
    vcpus: int
    memory_mib: int

    def __post_init__(self) -> None:
        if self.vcpus < 0 or self.memory_mib < 0:
            raise ValueError(f"{self.name}: negative demand ({self.vcpus} vCPU, {self.memory_mib} MiB)")


@dataclass(frozen=True)
class Capacity:
    """A candidate host's effective capacity (overcommit applied)."""
    name: str
    vcpus: int
    memory_mib: int


@dataclass
class SlotPlan:
    """vSphere-HA-style slot sizing of the same items."""
    slot_vcpus: int
    slot_memory_mib: int
    slots_needed: int
    slots_available: int                 # on the candidate hosts
    hosts_needed: int | None             # fewest candidate hosts holding the slots (None: they do not)
    reserved_vcpus: int
    reserved_memory_mib: int

    @property
    def fits(self) -> bool:
        return self.slots_available >= self.slots_needed

    def to_dict(self) -> dict[str, Any]:
        return {"slot": {"vcpus": self.slot_vcpus, "memory_mib": self.slot_memory_mib},
                "slots_needed": self.slots_needed, "slots_available": self.slots_available, "fits": self.fits,
                "hosts_needed": self.hosts_needed, "reserved": {"vcpus": self.reserved_vcpus,
                                                                "memory_mib": self.reserved_memory_mib}}


@dataclass
class ReservationPlan:
    items: list[Demand]
    assignment: dict[str, str]                         # item -> candidate host
    per_host: dict[str, tuple[int, int]]               # host -> (vCPUs, MiB) reserved there
    unplaced: list[str]                                # items no candidate host can hold
    slots: SlotPlan
    level: str = "host"
    notes: list[str] = field(default_factory=list)

    @property
    def fits(self) -> bool:
        return not self.unplaced

    @property
    def reserved_vcpus(self) -> int:
        return sum(v for v, _ in self.per_host.values())

    @property
    def reserved_memory_mib(self) -> int:
        return sum(m for _, m in self.per_host.values())

    @property
    def overhead(self) -> dict[str, int]:
        """How much more slot sizing reserves than this plan (vCPUs, MiB)."""
        return {"vcpus": self.slots.reserved_vcpus - self.reserved_vcpus,
                "memory_mib": self.slots.reserved_memory_mib - self.reserved_memory_mib}

    def rules(self, prefix: str = RULE_PREFIX) -> list[dict[str, Any]]:
        """The placement rules that hold this reservation (hvsim.placement's JSON form, with a name)."""
        return [{"name": f"{prefix}{h}"[:32], "kind": "reserve_amount", "required": True, "level": "host",
                 "domains": [f"host:{h}"], "amount": {"vcpus": v, "memory_mib": m}}
                for h, (v, m) in sorted(self.per_host.items()) if v or m]

    def to_dict(self) -> dict[str, Any]:
        ov = self.overhead
        pct = {k: (round(100.0 * ov[k] / ours, 1) if ours else None)
               for k, ours in (("vcpus", self.reserved_vcpus), ("memory_mib", self.reserved_memory_mib))}
        return {"items": [{"name": d.name, "vcpus": d.vcpus, "memory_mib": d.memory_mib} for d in self.items],
                "fits": self.fits, "unplaced": list(self.unplaced), "assignment": dict(self.assignment),
                "reserved": {"vcpus": self.reserved_vcpus, "memory_mib": self.reserved_memory_mib},
                "per_host": {h: {"vcpus": v, "memory_mib": m} for h, (v, m) in sorted(self.per_host.items())},
                "rules": self.rules(), "slots": self.slots.to_dict(),
                "overhead": {**ov, "percent": pct}, "notes": list(self.notes)}


def _items(protected: Iterable[Demand], management: Demand | None) -> list[Demand]:
    items = list(protected)
    names = [d.name for d in items]
    if len(set(names)) != len(names):
        raise ValueError("protected VM names repeat")
    if management is not None and (management.vcpus or management.memory_mib):
        items.insert(0, Demand(MANAGEMENT if management.name in names else management.name, management.vcpus,
                               management.memory_mib))
    return items


def slot_sizing(items: Sequence[Demand], candidates: Sequence[Capacity]) -> SlotPlan:
    """vSphere HA slot policy over ``items``: slot = (max vCPUs, max MiB); one slot each."""
    sv = max((d.vcpus for d in items), default=0)
    sm = max((d.memory_mib for d in items), default=0)
    n = len(items)

    def slots_on(c: Capacity) -> int:
        if not items:
            return 0
        return min(c.vcpus // sv if sv else n, c.memory_mib // sm if sm else n)

    per = sorted((slots_on(c) for c in candidates), reverse=True)
    hosts_needed: int | None = None
    got = 0
    if n == 0:
        hosts_needed = 0
    else:
        for i, s in enumerate(per, 1):
            got += s
            if got >= n:
                hosts_needed = i
                break
    return SlotPlan(sv, sm, n, sum(per), hosts_needed, n * sv, n * sm)


def size_reservation(protected: Iterable[Demand], management: Demand | None,
                     candidates: Sequence[Capacity]) -> ReservationPlan:
    """Our sizing (see the module docstring): best-fit decreasing onto ``candidates``, reserve per
    host what was packed there. Items no host can hold are listed in ``unplaced`` (the plan then
    does not cover them: the caller reports it)."""
    items = _items(protected, management)
    if len({c.name for c in candidates}) != len(candidates):
        raise ValueError("candidate host names repeat")
    free = {c.name: [c.vcpus, c.memory_mib] for c in candidates}
    order = {c.name: i for i, c in enumerate(candidates)}
    assignment: dict[str, str] = {}
    unplaced: list[str] = []
    for d in sorted(items, key=lambda d: (-d.memory_mib, -d.vcpus, d.name)):
        fit = [h for h, (v, m) in free.items() if v >= d.vcpus and m >= d.memory_mib]
        if not fit:
            unplaced.append(d.name)
            continue
        # best fit: the host left with the least memory (then vCPUs), ties in the order given
        h = min(fit, key=lambda h: (free[h][1] - d.memory_mib, free[h][0] - d.vcpus, order[h]))
        free[h][0] -= d.vcpus
        free[h][1] -= d.memory_mib
        assignment[d.name] = h
    per_host: dict[str, tuple[int, int]] = {}
    for d in items:
        where = assignment.get(d.name)
        if where is not None:
            v, m = per_host.get(where, (0, 0))
            per_host[where] = (v + d.vcpus, m + d.memory_mib)
    notes = []
    if unplaced:
        notes.append(f"{len(unplaced)} item(s) fit on no candidate host: {', '.join(unplaced)}")
    return ReservationPlan(items, assignment, per_host, unplaced, slot_sizing(items, candidates), notes=notes)
