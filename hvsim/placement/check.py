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
"""
from __future__ import annotations

import math
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Any
from collections.abc import Iterable, Mapping

from .model import Problem, Rule


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


def _dom(host_obj: Any, level: str) -> str:
    return host_obj.name if level == "host" else host_obj.domain[level]


def _host_in(host_obj: Any, refs: Iterable[str], levels: tuple[str, ...]) -> bool:
    for ref in refs:
        if ":" in ref:
            level, name = ref.split(":", 1)
            if _dom(host_obj, level) == name:
                return True
        else:
            if any(_dom(host_obj, lv) == ref for lv in levels):
                return True
    return False


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
    load: dict[str, Counter] = defaultdict(Counter)
    for v, h in placed.items():
        if host_set is None or h in host_set:
            load[h].update(vm_demand[v])
    for h, used in load.items():
        host = hosts_by_name[h]
        for res, amount in used.items():
            cap = math.floor(host.capacity.get(res, 0) * host.overcommit.get(res, 1.0) + 1e-9)
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
    by_group: dict[str, list[tuple[str, Any]]] = defaultdict(list)
    for v, h in placed.items():
        by_group[vm_group[v]].append((v, hosts_by_name[h]))
    limits: dict[str, list[Rule]] = defaultdict(list)  # group -> required rules limiting its hosts
    for r in problem.rules:
        if r.required and r.kind in ("domain_affinity", "domain_anti_affinity"):
            for g in r.groups:
                limits[g].append(r)
    reserved = {h for r in problem.rules if r.required and r.kind == "reserve_hosts" for h in r.hosts}
    for rule in problem.rules:
        if wanted is not None and rule.name not in wanted:
            continue
        mine = [x for g in getattr(rule, "groups", ()) for x in by_group.get(g, ())]
        n = _violations(problem, rule, mine, placed, vm_group, vm_demand, hosts_by_name, limits, reserved)
        pen = 0 if rule.required else n * rule.weight
        rep.rules.append(RuleCheck(rule.name, rule.kind, rule.required, n, pen))
        if rule.required:
            rep.required_violations += n
        else:
            rep.preferred_penalty += pen
    return rep


def _violations(p: Problem, rule: Rule, mine: list[tuple[str, Any]], placed: Mapping[str, str],
                vm_group: Mapping[str, str], vm_demand: Mapping[str, Mapping[str, int]],
                hosts_by_name: Mapping[str, Any], limits: Mapping[str, list[Rule]], reserved: set[str]) -> int:
    kind = rule.kind
    groups = set(getattr(rule, "groups", ()))

    if kind == "affinity":
        used = {_dom(h, rule.level) for _, h in mine}
        return max(0, len(used) - 1)
    if kind == "anti_affinity":
        if len(groups) == 1:
            per = Counter(_dom(h, rule.level) for _, h in mine)
            return sum(c - 1 for c in per.values() if c > 1)
        who: dict[str, set[str]] = defaultdict(set)
        for v, h in mine:
            who[_dom(h, rule.level)].add(vm_group[v])
        return sum(1 for gs in who.values() if len(gs) >= 2)
    if kind == "domain_affinity":
        return sum(1 for _, h in mine if not _host_in(h, rule.domains, p.levels))
    if kind == "domain_anti_affinity":
        return sum(1 for _, h in mine if _host_in(h, rule.domains, p.levels))
    if kind == "max_per_domain":
        per = Counter(_dom(h, rule.level) for _, h in mine)
        return sum(c - rule.max for c in per.values() if c > rule.max)
    if kind == "spread":
        domains = {_dom(h, rule.level) for h in p.hosts if any(_may_use(p, limits.get(g, ()), reserved, h) for g in groups)}
        per = Counter(_dom(h, rule.level) for _, h in mine)
        domains |= set(per)
        counts = [per.get(d, 0) for d in domains]
        skew = (max(counts) - min(counts)) if counts else 0
        used = sum(1 for c in counts if c > 0)
        return max(0, skew - rule.max_skew) + max(0, rule.min_domains - used)
    if kind == "reserve_hosts":
        busy = set(placed.values())
        return sum(1 for h in rule.hosts if h in busy)
    if kind == "reserve_amount":
        free: dict[str, Counter] = defaultdict(Counter)
        for h in p.hosts:
            d = _dom(h, rule.level)
            for res in rule.amount:
                free[d][res] += math.floor(h.capacity.get(res, 0) * h.overcommit.get(res, 1.0) + 1e-9)
        for v, hn in placed.items():
            d = _dom(hosts_by_name[hn], rule.level)
            for res in rule.amount:
                free[d][res] -= vm_demand[v].get(res, 0)
        wanted = None
        if rule.domains:
            wanted = {ref.split(":", 1)[-1] for ref in rule.domains}
        return sum(1 for d, f in free.items() if wanted is None or d in wanted
                   for res, amt in rule.amount.items() if f[res] < amt)
    raise ValueError(f"checker does not know rule kind {kind!r}")


def _may_use(p: Problem, limits: Iterable[Rule], reserved: set[str], host: Any) -> bool:
    """May a group with these required domain rules use this host?"""
    if host.name in reserved:
        return False
    for r in limits:
        inside = _host_in(host, r.domains, p.levels)
        if inside != (r.kind == "domain_affinity"):
            return False
    return True
