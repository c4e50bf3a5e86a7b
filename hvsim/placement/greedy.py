"""Greedy baseline: one VM at a time, filters then weighers, in the style of Nova's
FilterScheduler and the Kubernetes scheduler framework.

For each VM (VMs that may not move first, then groups in order): every filter, a small named
unit, may eliminate hosts; the first filter to reject a host is charged with it, so a VM that
fits nowhere gets "0/12 hosts: 8 anti-affinity web-db@rack, 4 memory". The surviving hosts are
ranked by the weighers (preferred-rule penalty, staying put, balance or packing) and the best
wins. It never undoes a choice, which is why it misses placements that exist (see the hard
family in bench/placement.py); whatever it returns is checked by the independent checker.
"""
from __future__ import annotations

import time

from collections import Counter, defaultdict
from dataclasses import dataclass, field
from collections.abc import Callable, Iterable

from .model import HOST_LEVEL, RESOURCE_LABELS, Problem, Rule, VM, eligible_hosts


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

    def to_dict(self) -> dict:
        return {"vm": self.vm, "group": self.group, "total": self.total, "fits": self.fits,
                "eliminated": dict(self.eliminated), "text": self.text}


class State:
    """What is placed so far, with the per-rule counters filters and weighers read."""

    def __init__(self, p: Problem):
        self.p = p
        topo = self.topo = p.topology
        self.free = [dict(e) for e in topo.effective]
        self.assignment: dict[str, str] = {}
        self.moves = 0
        self.rules_of: dict[str, list[Rule]] = defaultdict(list)
        for r in p.rules:
            for g in getattr(r, "groups", ()):
                self.rules_of[g].append(r)
        self.dcount: dict[str, Counter] = defaultdict(Counter)                   # rule -> domain -> VMs
        self.dgroups: dict[str, dict[str, Counter]] = defaultdict(lambda: defaultdict(Counter))  # rule -> d -> g
        self.version = 0
        self._inside: dict[str, set[int]] = {}
        self.soft_reservations: list[RuleFilter] = []
        self._low: dict[str, tuple[int, int]] = {}
        # free capacity per domain, for the levels and resources reservations look at
        self.dfree: dict[str, dict[str, Counter]] = {}
        for r in p.rules:
            if r.kind == "reserve_amount" and r.level not in self.dfree:
                lvl: dict[str, Counter] = defaultdict(Counter)
                for h, fr in enumerate(self.free):
                    lvl[self.dom(r.level, h)].update(fr)
                self.dfree[r.level] = lvl
        n = len(p.hosts)
        for r in p.rules:
            if r.required:
                continue
            if r.kind == "reserve_amount":
                self.soft_reservations.append(ReserveAmountFilter(r))
            elif r.kind == "reserve_hosts":
                f = HostSetFilter(r.describe(), set(range(n)) - {self.topo.host_index[x] for x in r.hosts})
                f.rule = r  # type: ignore[attr-defined]
                self.soft_reservations.append(f)  # type: ignore[arg-type]

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

    def inside(self, rule: Rule) -> set[int]:
        """Hosts inside a domain rule's domains (cached)."""
        got = self._inside.get(rule.name)
        if got is None:
            got = self._inside[rule.name] = self.topo.hosts_in(rule.domains)
        return got

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
        for r in self.rules_of[vm.group]:
            lv = getattr(r, "level", HOST_LEVEL)
            d = self.dom(lv, h)
            self.dcount[r.name][d] += 1
            self.dgroups[r.name][d][vm.group] += 1
        self.version += 1


# ------------------------------------------------------------------------------------------ filters


class Filter:
    """A host filter. ``label`` is what a host it rejects is charged to."""
    label = "filter"

    def passes(self, st: State, vm: VM, h: int) -> bool:
        raise NotImplementedError


class HostSetFilter(Filter):
    """Required domain affinity / anti-affinity and host reservations: a fixed set of hosts."""

    def __init__(self, label: str, allowed: set[int]):
        self.label, self.allowed = label, allowed

    def passes(self, st, vm, h):
        return h in self.allowed


class CapacityFilter(Filter):
    def __init__(self, resource: str):
        self.resource = resource
        self.label = RESOURCE_LABELS.get(resource, resource)

    def passes(self, st, vm, h):
        return st.free[h].get(self.resource, 0) >= vm.demand.get(self.resource, 0)


class RuleFilter(Filter):
    def __init__(self, rule: Rule):
        self.rule = rule
        self.label = rule.describe()


class AffinityFilter(RuleFilter):
    def passes(self, st, vm, h):
        used = st.dcount[self.rule.name]
        return not used or used.get(st.dom(self.rule.level, h), 0) > 0


class AntiAffinityFilter(RuleFilter):
    def passes(self, st, vm, h):
        d = st.dom(self.rule.level, h)
        if len(self.rule.groups) == 1:
            return st.dcount[self.rule.name].get(d, 0) == 0
        there = st.dgroups[self.rule.name].get(d)
        return not there or all(g == vm.group or n == 0 for g, n in there.items())


class MaxPerDomainFilter(RuleFilter):
    def passes(self, st, vm, h):
        return st.dcount[self.rule.name].get(st.dom(self.rule.level, h), 0) < self.rule.max


class SpreadFilter(RuleFilter):
    """Kubernetes PodTopologySpread: placing in d must keep count(d) + 1 - global min <= max
    skew (at least 1); while fewer than min_domains domains are used, the global min counts as 0."""

    def __init__(self, rule, domains: list[str]):
        super().__init__(rule)
        self.domains = domains

    def passes(self, st, vm, h):
        low = st.low(self.rule, self.domains, self.rule.min_domains)
        # one VM at a time, a skew of 0 cannot hold in between: allow 1 then, the checker judges the end
        return st.dcount[self.rule.name].get(st.dom(self.rule.level, h), 0) + 1 - low <= max(1, self.rule.max_skew)


class ReserveAmountFilter(RuleFilter):
    def __init__(self, rule):
        super().__init__(rule)
        self.doms = None if not rule.domains else {d.split(":", 1)[-1] for d in rule.domains}

    def passes(self, st, vm, h):
        d = st.dom(self.rule.level, h)
        if self.doms is not None and d not in self.doms:
            return True
        free = st.dfree[self.rule.level][d]
        return all(free[r] - vm.demand.get(r, 0) >= amt for r, amt in self.rule.amount.items() if vm.demand.get(r, 0))


class MoveBudgetFilter(Filter):
    label = "move limit"

    def passes(self, st, vm, h):
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
        k = r.kind
        d = st.dom(getattr(r, "level", HOST_LEVEL), h)
        cnt = st.dcount[r.name]
        if k == "affinity":
            bad = bool(cnt) and cnt.get(d, 0) == 0
        elif k == "anti_affinity":
            if len(r.groups) == 1:
                bad = cnt.get(d, 0) > 0
            else:
                there = st.dgroups[r.name].get(d, {})
                others = any(n for g, n in there.items() if g != vm.group)
                mixed = sum(1 for n in there.values() if n) >= 2
                bad = others and not mixed
        elif k in ("domain_affinity", "domain_anti_affinity"):
            inside = h in st.inside(r)
            bad = inside != (k == "domain_affinity")
        elif k == "max_per_domain":
            bad = cnt.get(d, 0) >= r.max
        elif k == "spread":
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


def weighers(p: Problem) -> list[tuple[str, Callable[[State, VM, int], float]]]:
    """(name, score) pairs, most important first; a higher score wins, ties go to the host
    listed first."""
    stay = ("stay", lambda st, vm, h: 1.0 if st.p.current.get(vm.name) == st.p.hosts[h].name else 0.0)
    pref = ("preferred-rules", lambda st, vm, h: -preferred_delta(st, vm, h))
    if p.objective.mode == "pack":
        fill = ("pack", lambda st, vm, h: -balance_score(st, vm, h))
    else:
        fill = ("balance", balance_score)
    return [pref, stay, fill]


# ------------------------------------------------------------------------------------------ scheduler


def filters_for(p: Problem, group: str, resources: Iterable[str]) -> list[Filter]:
    topo = p.topology
    out: list[Filter] = []
    for r in p.rules:
        if not r.required:
            continue
        if r.kind == "reserve_hosts":
            out.append(HostSetFilter(r.describe(), set(range(len(p.hosts))) - {topo.host_index[x] for x in r.hosts}))
        elif r.kind in ("domain_affinity", "domain_anti_affinity") and group in r.groups:
            inside = topo.hosts_in(r.domains)
            out.append(HostSetFilter(r.describe(), inside if r.kind == "domain_affinity"
                                     else set(range(len(p.hosts))) - inside))
    out += [CapacityFilter(r) for r in resources]
    for r in p.rules:
        if not r.required:
            continue
        if r.kind == "reserve_amount":
            out.append(ReserveAmountFilter(r))
        if group not in getattr(r, "groups", ()):
            continue
        if r.kind == "affinity":
            out.append(AffinityFilter(r))
        elif r.kind == "anti_affinity":
            out.append(AntiAffinityFilter(r))
        elif r.kind == "max_per_domain":
            out.append(MaxPerDomainFilter(r))
        elif r.kind == "spread":
            hosts: set[int] = set()
            for g in r.groups:
                hosts |= eligible_hosts(p, g)[0]
            out.append(SpreadFilter(r, sorted({topo.domain_of[r.level][x] for x in hosts})))
    if p.moves.allowed and p.moves.max is not None:
        out.append(MoveBudgetFilter())
    return out


@dataclass
class GreedyOutcome:
    assignment: dict[str, str]
    placed_all: bool
    failure: HostReport | None = None


def host_report(st: State, vm: VM, filters: list[Filter]) -> tuple[list[int], HostReport]:
    """Run the filters for one VM: surviving hosts and who eliminated the others."""
    ok: list[int] = []
    elim: Counter = Counter()
    for h in range(len(st.p.hosts)):
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
    (``placed_all`` False, no failure report): a partial warm start for the exact solver."""
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
    for vm in all_vms:
        if deadline is not None and time.perf_counter() > deadline:
            return GreedyOutcome(dict(st.assignment), False)
        fs = flt.get(vm.group)
        if fs is None:
            fs = flt[vm.group] = filters_for(p, vm.group, resources)
        ok, rep = host_report(st, vm, fs)
        if not ok:
            return GreedyOutcome(dict(st.assignment), False, rep)
        best = max(ok, key=lambda h: (tuple(w(st, vm, h) for _, w in ws), -h))
        st.place(vm, best)
    return GreedyOutcome(dict(st.assignment), True)
