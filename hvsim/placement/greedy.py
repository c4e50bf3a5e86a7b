"""Greedy baseline: one VM at a time, filters then weighers, in the style of Nova's
FilterScheduler and the Kubernetes scheduler framework.

For each VM (VMs that may not move first, then groups in order): every filter, a small named
unit, may eliminate hosts; the first filter to reject a host is charged with it, so a VM that
fits nowhere gets "0/12 hosts: 8 anti-affinity web-db@rack, 4 memory". The surviving hosts are
ranked by the weighers (preferred-rule penalty, staying put, balance or packing) and the best
wins. It never undoes a choice, which is why it misses placements that exist (see the hard
family in bench/placement.py); whatever it returns is checked by the independent checker.

A deadline (``time.perf_counter()`` value) is checked host by host: the scheduler stops there
and returns what it placed so far.
"""
from __future__ import annotations

import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, field
from typing import Any

from .errors import PlacementError
from .model import (HOST_LEVEL, RESOURCE_LABELS, VM, Affinity, AntiAffinity, DomainAffinity, DomainAntiAffinity,
                    DomainRule, MaxPerDomain, Problem, ReserveAmount, ReserveHosts, Rule, Spread, eligible_map)


class _OutOfTime(PlacementError):
    """The deadline passed in the middle of a VM (internal to ``schedule``)."""


@dataclass
class HostReport:
    """Why a VM found no host: how many hosts each filter eliminated."""
    vm: str
    group: str
    total: int
    fits: int
    eliminated: dict[str, int] = field(default_factory=dict)

    @property
    def text(self) -> str:
        parts = ", ".join(f"{n} {lbl}" for lbl, n in sorted(self.eliminated.items(), key=lambda x: (-x[1], x[0])))
        return f"{self.fits}/{self.total} hosts" + (f": {parts}" if parts else "")

    def to_dict(self) -> dict[str, Any]:
        return {"vm": self.vm, "group": self.group, "total": self.total, "fits": self.fits,
                "eliminated": dict(self.eliminated), "text": self.text}


class State:
    """What is placed so far, with the per-rule counters filters and weighers read."""

    def __init__(self, p: Problem) -> None:
        self.p = p
        topo = self.topo = p.topology
        self.free = [dict(e) for e in topo.effective]
        self.assignment: dict[str, str] = {}
        self.moves = 0
        self.rules_of: dict[str, list[Rule]] = defaultdict(list)
        for r in p.rules:
            for g in r.groups_named:
                self.rules_of[g].append(r)
        self.dcount: dict[str, Counter[str]] = defaultdict(Counter)                   # rule -> domain -> VMs
        self.dgroups: dict[str, dict[str, Counter[str]]] = defaultdict(lambda: defaultdict(Counter))  # rule -> d -> g
        self.version = 0
        self.soft_reservations: list[SoftReservation] = []
        self._low: dict[str, tuple[int, int]] = {}
        # free capacity per domain, for the levels and resources reservations look at
        self.dfree: dict[str, dict[str, Counter[str]]] = {}
        for r in p.rules:
            if isinstance(r, ReserveAmount) and r.level not in self.dfree:
                lvl: dict[str, Counter[str]] = defaultdict(Counter)
                for h, fr in enumerate(self.free):
                    lvl[self.dom(r.level, h)].update(fr)
                self.dfree[r.level] = lvl
        n = len(p.hosts)
        for r in p.rules:
            if r.required:
                continue
            if isinstance(r, ReserveAmount):
                self.soft_reservations.append(ReserveAmountFilter(r))
            elif isinstance(r, ReserveHosts):
                self.soft_reservations.append(
                    SoftHostsFilter(r, set(range(n)) - {self.topo.host_index[x] for x in r.hosts}))

    def low(self, rule: Rule, domains: Iterable[str], min_domains: int = 0) -> int:
        """Lowest count of the rule's VMs over ``domains`` (0 while fewer than ``min_domains``
        of them are used), cached until the next placement."""
        got = self._low.get(rule.name)
        if got is None or got[0] != self.version:
            cnt = self.dcount[rule.name]
            vals = [cnt.get(d, 0) for d in domains]
            used = sum(1 for v in vals if v)
            got = self._low[rule.name] = (self.version, 0 if used < min_domains else min(vals, default=0))
        return got[1]

    def inside(self, rule: DomainRule) -> AbstractSet[int]:
        """Hosts inside a domain rule's domains (cached by the topology)."""
        return self.topo.hosts_in(rule.domains)

    def dom(self, level: str, h: int) -> str:
        return self.topo.domain_of[level][h]

    def place(self, vm: VM, h: int) -> None:
        for r, a in vm.demand.items():
            self.free[h][r] = self.free[h].get(r, 0) - a
        for lv, doms in self.dfree.items():
            doms[self.dom(lv, h)].subtract(vm.demand)
        self.assignment[vm.name] = self.p.hosts[h].name
        was = self.p.current.get(vm.name)
        if was is not None and was != self.p.hosts[h].name:
            self.moves += 1
        for rule in self.rules_of[vm.group]:
            d = self.dom(rule.level_named or HOST_LEVEL, h)
            self.dcount[rule.name][d] += 1
            self.dgroups[rule.name][d][vm.group] += 1
        self.version += 1


# ------------------------------------------------------------------------------------------ filters


class Filter:
    """A host filter. ``label`` is what a host it rejects is charged to."""
    label = "filter"

    def passes(self, st: State, vm: VM, h: int) -> bool:
        raise NotImplementedError


class HostSetFilter(Filter):
    """Required domain affinity / anti-affinity and host reservations: a fixed set of hosts."""

    def __init__(self, label: str, allowed: AbstractSet[int]) -> None:
        self.label, self.allowed = label, allowed

    def passes(self, st: State, vm: VM, h: int) -> bool:
        return h in self.allowed


class CapacityFilter(Filter):
    def __init__(self, resource: str) -> None:
        self.resource = resource
        self.label = RESOURCE_LABELS.get(resource, resource)

    def passes(self, st: State, vm: VM, h: int) -> bool:
        return st.free[h].get(self.resource, 0) >= vm.demand.get(self.resource, 0)


class RuleFilter(Filter):
    def __init__(self, rule: Rule) -> None:
        self.label = rule.describe()


class AffinityFilter(RuleFilter):
    def __init__(self, rule: Affinity) -> None:
        super().__init__(rule)
        self.rule = rule

    def passes(self, st: State, vm: VM, h: int) -> bool:
        used = st.dcount[self.rule.name]
        return not used or used.get(st.dom(self.rule.level, h), 0) > 0


class AntiAffinityFilter(RuleFilter):
    def __init__(self, rule: AntiAffinity) -> None:
        super().__init__(rule)
        self.rule = rule

    def passes(self, st: State, vm: VM, h: int) -> bool:
        d = st.dom(self.rule.level, h)
        if len(self.rule.groups) == 1:
            return st.dcount[self.rule.name].get(d, 0) == 0
        there = st.dgroups[self.rule.name].get(d)
        return not there or all(g == vm.group or n == 0 for g, n in there.items())


class MaxPerDomainFilter(RuleFilter):
    def __init__(self, rule: MaxPerDomain) -> None:
        super().__init__(rule)
        self.rule = rule

    def passes(self, st: State, vm: VM, h: int) -> bool:
        return st.dcount[self.rule.name].get(st.dom(self.rule.level, h), 0) < self.rule.max


class SpreadFilter(RuleFilter):
    """Kubernetes PodTopologySpread: placing in d must keep count(d) + 1 - global min <= max
    skew (at least 1); while fewer than min_domains domains are used, the global min counts as 0."""

    def __init__(self, rule: Spread, domains: list[str]) -> None:
        super().__init__(rule)
        self.rule = rule
        self.domains = domains

    def passes(self, st: State, vm: VM, h: int) -> bool:
        low = st.low(self.rule, self.domains, self.rule.min_domains)
        # one VM at a time, a skew of 0 cannot hold in between: allow 1 then, the checker judges the end
        return st.dcount[self.rule.name].get(st.dom(self.rule.level, h), 0) + 1 - low <= max(1, self.rule.max_skew)


class SoftReservation(RuleFilter):
    """A preferred reservation: a host it rejects costs the rule's weight (a weigher, not a filter)."""
    rule: Rule


class ReserveAmountFilter(SoftReservation):
    def __init__(self, rule: ReserveAmount) -> None:
        super().__init__(rule)
        self.rule = self.amount_rule = rule
        self.doms = None if not rule.domains else {d.split(":", 1)[-1] for d in rule.domains}

    def passes(self, st: State, vm: VM, h: int) -> bool:
        r = self.amount_rule
        d = st.dom(r.level, h)
        if self.doms is not None and d not in self.doms:
            return True
        free = st.dfree[r.level][d]
        return all(free[res] - vm.demand.get(res, 0) >= amt for res, amt in r.amount.items() if vm.demand.get(res, 0))


class SoftHostsFilter(SoftReservation):
    def __init__(self, rule: ReserveHosts, allowed: AbstractSet[int]) -> None:
        super().__init__(rule)
        self.rule = rule
        self.allowed = allowed

    def passes(self, st: State, vm: VM, h: int) -> bool:
        return h in self.allowed


class MoveBudgetFilter(Filter):
    label = "move limit"

    def passes(self, st: State, vm: VM, h: int) -> bool:
        lim = st.p.moves.max
        was = st.p.current.get(vm.name)
        return was is None or lim is None or st.moves < lim or st.p.hosts[h].name == was


# ------------------------------------------------------------------------------------------ weighers


def preferred_delta(st: State, vm: VM, h: int) -> int:
    """Preferred-rule penalty this placement adds (weighted), as the checker would count it."""
    total = 0
    for r in st.rules_of[vm.group]:
        if r.required:
            continue
        d = st.dom(r.level_named or HOST_LEVEL, h)
        cnt = st.dcount[r.name]
        if isinstance(r, Affinity):
            bad = bool(cnt) and cnt.get(d, 0) == 0
        elif isinstance(r, AntiAffinity):
            if len(r.groups) == 1:
                bad = cnt.get(d, 0) > 0
            else:
                there: Counter[str] = st.dgroups[r.name].get(d, Counter())
                others = any(n for g, n in there.items() if g != vm.group)
                mixed = sum(1 for n in there.values() if n) >= 2
                bad = others and not mixed
        elif isinstance(r, DomainRule):
            inside = h in st.inside(r)
            bad = inside != isinstance(r, DomainAffinity)
        elif isinstance(r, MaxPerDomain):
            bad = cnt.get(d, 0) >= r.max
        elif isinstance(r, Spread):
            bad = cnt.get(d, 0) + 1 - st.low(r, st.topo.members[r.level]) > r.max_skew
        else:
            bad = False
        total += r.weight if bad else 0
    for f in st.soft_reservations:  # preferred reservations apply to every group
        if not f.passes(st, vm, h):
            total += f.rule.weight
    return total


def balance_score(st: State, vm: VM, h: int) -> float:
    """Least-allocated: mean free fraction after placing (higher is better)."""
    eff = st.topo.effective[h]
    fr = [(st.free[h].get(r, 0) - a) / eff[r] for r, a in vm.demand.items() if a and eff.get(r)]
    return sum(fr) / len(fr) if fr else 0.0


Weigher = Callable[[State, VM, int], float]


def weighers(p: Problem) -> list[tuple[str, Weigher]]:
    """(name, score) pairs, most important first; a higher score wins, ties go to the host
    listed first."""
    def stay(st: State, vm: VM, h: int) -> float:
        return 1.0 if st.p.current.get(vm.name) == st.p.hosts[h].name else 0.0

    def pref(st: State, vm: VM, h: int) -> float:
        return -preferred_delta(st, vm, h)

    def pack(st: State, vm: VM, h: int) -> float:
        return -balance_score(st, vm, h)

    fill: tuple[str, Weigher] = ("pack", pack) if p.objective.mode == "pack" else ("balance", balance_score)
    return [("preferred-rules", pref), ("stay", stay), fill]


# ------------------------------------------------------------------------------------------ scheduler


def filters_for(p: Problem, group: str, resources: Iterable[str]) -> list[Filter]:
    topo = p.topology
    n = len(p.hosts)
    out: list[Filter] = []
    for r in p.rules:
        if not r.required:
            continue
        if isinstance(r, ReserveHosts):
            out.append(HostSetFilter(r.describe(), set(range(n)) - {topo.host_index[x] for x in r.hosts}))
        elif isinstance(r, DomainRule) and group in r.groups:
            inside = topo.hosts_in(r.domains)
            out.append(HostSetFilter(r.describe(), set(range(n)) - inside if isinstance(r, DomainAntiAffinity)
                                     else inside))
    out += [CapacityFilter(r) for r in resources]
    spreads = [r for r in p.rules if r.required and isinstance(r, Spread) and group in r.groups]
    elig = eligible_map(p, [g for r in spreads for g in r.groups]) if spreads else {}
    for r in p.rules:
        if not r.required:
            continue
        if isinstance(r, ReserveAmount):
            out.append(ReserveAmountFilter(r))
        if group not in r.groups_named:
            continue
        if isinstance(r, Affinity):
            out.append(AffinityFilter(r))
        elif isinstance(r, AntiAffinity):
            out.append(AntiAffinityFilter(r))
        elif isinstance(r, MaxPerDomain):
            out.append(MaxPerDomainFilter(r))
        elif isinstance(r, Spread):
            hosts: set[int] = set()
            for g in r.groups:
                hosts |= elig[g][0]
            out.append(SpreadFilter(r, sorted({topo.domain_of[r.level][x] for x in hosts})))
    if p.moves.allowed and p.moves.max is not None:
        out.append(MoveBudgetFilter())
    return out


@dataclass
class GreedyOutcome:
    assignment: dict[str, str]
    placed_all: bool
    failure: HostReport | None = None
    timed_out: bool = False


def host_report(st: State, vm: VM, filters: list[Filter],
                deadline: float | None = None) -> tuple[list[int], HostReport]:
    """Run the filters for one VM: surviving hosts and who eliminated the others."""
    ok: list[int] = []
    elim: Counter[str] = Counter()
    for h in range(len(st.p.hosts)):
        if deadline is not None and time.perf_counter() > deadline:
            raise _OutOfTime("deadline")
        for f in filters:
            if not f.passes(st, vm, h):
                elim[f.label] += 1
                break
        else:
            ok.append(h)
    return ok, HostReport(vm.name, vm.group, len(st.p.hosts), len(ok), dict(elim))


def schedule(p: Problem, vms: Iterable[VM] | None = None, state: State | None = None, *,
             deadline: float | None = None) -> GreedyOutcome:
    """Place VMs one at a time. VMs that may not move are put back where they are first.
    ``deadline`` (a ``time.perf_counter()`` value): stop there and return what is placed so far
    (``placed_all`` False, ``timed_out`` True, no failure report): a partial warm start for the
    exact solver."""
    st = state or State(p)
    hidx = st.topo.host_index
    all_vms = list(vms) if vms is not None else [v for g in p.groups for v in g.vms]
    if state is None and not p.moves.allowed:
        rest = []
        for vm in all_vms:
            h = hidx.get(p.current.get(vm.name, ""))
            if h is None:
                rest.append(vm)
            else:
                st.place(vm, h)
        all_vms = rest
    resources = sorted({r for v in all_vms for r, a in v.demand.items() if a > 0})
    flt: dict[str, list[Filter]] = {}
    ws = weighers(p)
    try:
        for vm in all_vms:
            if deadline is not None and time.perf_counter() > deadline:
                raise _OutOfTime("deadline")
            fs = flt.get(vm.group)
            if fs is None:
                fs = flt[vm.group] = filters_for(p, vm.group, resources)
            ok, rep = host_report(st, vm, fs, deadline)
            if not ok:
                return GreedyOutcome(dict(st.assignment), False, rep)
            best = max(ok, key=lambda h: (tuple(w(st, vm, h) for _, w in ws), -h))  # noqa: B023
            st.place(vm, best)
    except _OutOfTime:
        return GreedyOutcome(dict(st.assignment), False, timed_out=True)
    return GreedyOutcome(dict(st.assignment), True)
