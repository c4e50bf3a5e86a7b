"""Independent checker: how many required-rule violations and how much preferred penalty a
placement has. Written from the rule definitions in docs/placement.md, sharing nothing with the
solvers but the problem data (it does not use the solvers' indexes or model.Topology), so that
a solver bug cannot hide behind the same bug here.

Violation counts per rule kind (a preferred rule's penalty is weight x violations):

- affinity: number of distinct domains used by the rule's VMs, minus one
- anti_affinity, one group: sum over domains of max(0, VMs there - 1)
- anti_affinity, several groups: number of domains holding VMs of two or more of the groups
- domain_affinity / domain_anti_affinity: VMs outside / inside the listed domains
- spread: max(0, skew - max_skew) + max(0, min_domains - domains used), skew over the domains
  that hold at least one host the groups may use (required domain rules, required reservations)
- max_per_domain: sum over domains of max(0, VMs there - max)
- reserve_hosts: reserved hosts holding a VM
- reserve_amount: (domain, resource) pairs with less than the amount free

Beyond rules, every VM must be placed on a known host, hosts must not exceed capacity x
overcommit, VMs that cannot move must stay, and moves must be within the limit; each breach
counts as one required violation.

Cost: VMs are counted per (group, level, domain) once, so a rule costs the number of domains its
groups use, not the number of their VMs (bounded by the model-size limits, hvsim.placement.limits).
"""
from __future__ import annotations

import math
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from .model import (Affinity, AntiAffinity, DomainAffinity, DomainRule, Host, MaxPerDomain, Problem, ReserveAmount,
                    ReserveHosts, Rule, Spread)


@dataclass
class RuleCheck:
    name: str
    kind: str
    required: bool
    violations: int
    penalty: int


@dataclass
class CheckReport:
    required_violations: int = 0
    preferred_penalty: int = 0
    moves: int = 0
    rules: list[RuleCheck] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)  # capacity, unplaced, illegal moves

    @property
    def ok(self) -> bool:
        return self.required_violations == 0

    def violated(self) -> list[str]:
        return [r.name for r in self.rules if r.required and r.violations]

    def to_dict(self) -> dict[str, Any]:
        return {"required_violations": self.required_violations, "preferred_penalty": self.preferred_penalty,
                "moves": self.moves, "problems": list(self.problems),
                "rules": [{"name": r.name, "kind": r.kind, "required": r.required, "violations": r.violations,
                           "penalty": r.penalty} for r in self.rules if r.violations]}


def _dom(host_obj: Host, level: str) -> str:
    return host_obj.name if level == "host" else host_obj.domain[level]


def _effective(h: Host, res: str) -> int:
    return math.floor(h.capacity.get(res, 0) * h.overcommit.get(res, 1.0) + 1e-9)


def _loads(placed: Mapping[str, str], vm_demand: Mapping[str, Mapping[str, int]]) -> dict[str, dict[str, int]]:
    """Host -> resource -> demand of the VMs placed there."""
    out: dict[str, dict[str, int]] = {}
    for v, h in placed.items():
        acc = out.get(h)
        if acc is None:
            acc = out[h] = {}
        for res, a in vm_demand[v].items():
            acc[res] = acc.get(res, 0) + a
    return out


class _Index:
    """The checker's own view of the placement: hosts per domain, VMs per (group, level,
    domain), load per (level, domain, resource)."""

    def __init__(self, p: Problem, placed: Mapping[str, str], vm_group: Mapping[str, str],
                 vm_demand: Mapping[str, Mapping[str, int]], hosts_by_name: Mapping[str, Host]) -> None:
        self.p = p
        self.placed = placed
        self.hosts_by_name = hosts_by_name
        self.vm_demand = vm_demand
        self.per_group_host: dict[str, Counter[str]] = defaultdict(Counter)  # group -> host -> VMs
        for v, h in placed.items():
            self.per_group_host[vm_group[v]][h] += 1
        self._counts: dict[tuple[str, str], Counter[str]] = {}
        self._members: dict[str, dict[str, set[str]]] = {}
        self._inside: dict[tuple[str, ...], frozenset[str]] = {}
        self._free: dict[tuple[str, str], dict[str, int]] = {}
        self._host_load: dict[str, dict[str, int]] | None = None
        self._allowed: dict[str, frozenset[str]] = {}
        self._allowed_doms: dict[tuple[str, str], frozenset[str]] = {}
        self.limits: dict[str, list[DomainRule]] = defaultdict(list)  # group -> required domain rules
        for r in p.rules:
            if r.required and isinstance(r, DomainRule):
                for g in r.groups:
                    self.limits[g].append(r)
        self.reserved = {h for r in p.rules if r.required and isinstance(r, ReserveHosts) for h in r.hosts}

    def counts(self, group: str, level: str) -> Counter[str]:
        """Domain at ``level`` -> VMs of ``group`` there."""
        key = (group, level)
        got = self._counts.get(key)
        if got is None:
            got = Counter()
            for h, n in self.per_group_host.get(group, Counter()).items():
                got[_dom(self.hosts_by_name[h], level)] += n
            self._counts[key] = got
        return got

    def members(self, level: str) -> dict[str, set[str]]:
        got = self._members.get(level)
        if got is None:
            got = defaultdict(set)
            for h in self.p.hosts:
                got[_dom(h, level)].add(h.name)
            self._members[level] = got
        return got

    def inside(self, refs: Iterable[str]) -> frozenset[str]:
        """Names of the hosts inside any of the domains ``refs`` ("level:name" or a bare name
        at any level)."""
        key = tuple(refs)
        got = self._inside.get(key)
        if got is None:
            out: set[str] = set()
            for ref in key:
                if ":" in ref:
                    level, name = ref.split(":", 1)
                    if level in self.p.levels:
                        out |= self.members(level).get(name, set())
                else:
                    for lv in self.p.levels:
                        out |= self.members(lv).get(ref, set())
            got = self._inside[key] = frozenset(out)
        return got

    def allowed(self, group: str) -> frozenset[str]:
        """Hosts the group may use under its required domain rules and required reservations."""
        got = self._allowed.get(group)
        if got is None:
            hosts = {h.name for h in self.p.hosts} - self.reserved
            for r in self.limits.get(group, ()):
                inside = self.inside(r.domains)
                if isinstance(r, DomainAffinity):
                    hosts &= inside
                else:
                    hosts -= inside
            got = self._allowed[group] = frozenset(hosts)
        return got

    def allowed_domains(self, group: str, level: str) -> frozenset[str]:
        """Domains at ``level`` holding a host the group may use."""
        key = (group, level)
        got = self._allowed_doms.get(key)
        if got is None:
            got = self._allowed_doms[key] = frozenset(_dom(self.hosts_by_name[h], level) for h in self.allowed(group))
        return got

    def free(self, level: str, domain: str, resources: Iterable[str]) -> dict[str, int]:
        """Free amount of each resource in a domain (capacity x overcommit minus placed demand)."""
        out = {}
        for res in resources:
            key = (level, res)
            table = self._free.get(key)
            if table is None:
                if self._host_load is None:
                    self._host_load = _loads(self.placed, self.vm_demand)
                table = defaultdict(int)
                for h in self.p.hosts:
                    table[_dom(h, level)] += _effective(h, res) - self._host_load.get(h.name, {}).get(res, 0)
                self._free[key] = table
            out[res] = table.get(domain, 0)
        return out


def check(problem: Problem, assignment: Mapping[str, str], rules: Iterable[str] | None = None,
          hosts: Iterable[str] | None = None) -> CheckReport:
    """Check ``assignment`` (VM name -> host name) against ``problem``.

    ``rules`` restricts the rule checks to those names, ``hosts`` the capacity checks to those
    hosts (both: everything when None); placement, move and capacity checks always run on
    what is asked."""
    rep = CheckReport()
    hosts_by_name = {h.name: h for h in problem.hosts}
    vm_group: dict[str, str] = {}
    vm_demand: dict[str, Mapping[str, int]] = {}
    for g in problem.groups:
        for vm in g.vms:
            vm_group[vm.name] = g.name
            vm_demand[vm.name] = vm.demand

    # placement
    for name in vm_group:
        h = assignment.get(name)
        if h is None:
            rep.problems.append(f"VM {name} is not placed")
        elif h not in hosts_by_name:
            rep.problems.append(f"VM {name} is on unknown host {h}")
    for name in assignment:
        if name not in vm_group:
            rep.problems.append(f"unknown VM {name} in placement")
    placed = {v: h for v, h in assignment.items() if v in vm_group and h in hosts_by_name}

    # capacity
    host_set = set(hosts) if hosts is not None else None
    load = _loads({v: h for v, h in placed.items() if host_set is None or h in host_set}, vm_demand)
    for h, used in load.items():
        host = hosts_by_name[h]
        for res, amount in used.items():
            cap = _effective(host, res)
            if amount > cap:
                rep.problems.append(f"host {h}: {res} {amount} > {cap}")

    # moves
    for v, was in problem.current.items():
        now = assignment.get(v)
        if now is not None and now != was:
            rep.moves += 1
            if not problem.moves.allowed:
                rep.problems.append(f"VM {v} moved {was} -> {now} but moves are not allowed")
    if problem.moves.allowed and problem.moves.max is not None and rep.moves > problem.moves.max:
        rep.problems.append(f"{rep.moves} moves > limit {problem.moves.max}")
    rep.required_violations += len(rep.problems)

    # rules
    wanted = set(rules) if rules is not None else None
    index = _Index(problem, placed, vm_group, vm_demand, hosts_by_name)
    for rule in problem.rules:
        if wanted is not None and rule.name not in wanted:
            continue
        n = _violations(index, rule)
        pen = 0 if rule.required else n * rule.weight
        rep.rules.append(RuleCheck(rule.name, rule.kind, rule.required, n, pen))
        if rule.required:
            rep.required_violations += n
        else:
            rep.preferred_penalty += pen
    return rep


def _total(ix: _Index, groups: tuple[str, ...], level: str) -> Counter[str]:
    """Domain -> VMs of ``groups`` there (not to be changed: may be the index's own counter)."""
    if len(groups) == 1:
        return ix.counts(groups[0], level)
    out: Counter[str] = Counter()
    for g in groups:
        out.update(ix.counts(g, level))
    return out


def _violations(ix: _Index, rule: Rule) -> int:
    if isinstance(rule, Affinity):
        per = _total(ix, rule.groups, rule.level)
        return max(0, sum(1 for c in per.values() if c > 0) - 1)
    if isinstance(rule, AntiAffinity):
        if len(rule.groups) == 1:
            return sum(c - 1 for c in ix.counts(rule.groups[0], rule.level).values() if c > 1)
        who: Counter[str] = Counter()
        for g in set(rule.groups):
            who.update(d for d, c in ix.counts(g, rule.level).items() if c > 0)
        return sum(1 for n in who.values() if n >= 2)
    if isinstance(rule, DomainRule):
        inside = ix.inside(rule.domains)
        n_in = sum(c for g in rule.groups for h, c in ix.per_group_host.get(g, Counter()).items() if h in inside)
        if isinstance(rule, DomainAffinity):
            return sum(sum(ix.per_group_host.get(g, Counter()).values()) for g in rule.groups) - n_in
        return n_in
    if isinstance(rule, MaxPerDomain):
        per = _total(ix, rule.groups, rule.level)
        return sum(c - rule.max for c in per.values() if c > rule.max)
    if isinstance(rule, Spread):
        domains: set[str] = set()
        for g in rule.groups:
            domains |= ix.allowed_domains(g, rule.level)
        per = _total(ix, rule.groups, rule.level)
        domains |= {d for d, c in per.items() if c > 0}
        counts = [per.get(d, 0) for d in domains]
        skew = (max(counts) - min(counts)) if counts else 0
        used = sum(1 for c in counts if c > 0)
        return max(0, skew - rule.max_skew) + max(0, rule.min_domains - used)
    if isinstance(rule, ReserveHosts):
        busy = set(ix.placed.values())
        return sum(1 for h in rule.hosts if h in busy)
    if isinstance(rule, ReserveAmount):
        doms = set(ix.members(rule.level))
        if rule.domains:
            doms &= {ref.split(":", 1)[-1] for ref in rule.domains}
        out = 0
        for d in doms:
            free = ix.free(rule.level, d, rule.amount)
            out += sum(1 for res, amt in rule.amount.items() if free[res] < amt)
        return out
    raise ValueError(f"checker does not know rule kind {rule.kind!r}")
