"""Placement model: domains, hosts, resource groups, rules, current placement.

Everything here is plain data. Levels are data too: a problem names its levels from the coarsest
to the finest (``["datacenter", "rack", "host"]``); ``host`` is always the finest level and is
appended when missing. Each host gives its domain at every other level (``{"datacenter": "dc1",
"rack": "r1"}``); a domain is identified by ``(level, name)`` and a name must have one parent.

Errors::

    ProblemError (ValueError)        bad input; .errors is a list of (field, message)
     +-- RuleConflictError           required rules that can never hold together, found when defined

Rules (each has a unique ``name``; ``required`` rules are hard, preferred ones cost
``weight`` x violations, see docs/placement.md for the exact violation counts):

=====================  ========================================================================
kind                   meaning
=====================  ========================================================================
affinity               all VMs of the listed groups share one domain at ``level``
anti_affinity          one group: no two of its VMs share a domain at ``level``;
                       several groups: no domain at ``level`` holds VMs of two of them
domain_affinity        the groups' VMs run only on hosts inside ``domains``
domain_anti_affinity   the groups' VMs never run on hosts inside ``domains``
spread                 across ``level``: max count - min count <= ``max_skew``, and at least
                       ``min_domains`` domains used
max_per_domain         at most ``max`` VMs of the groups in any domain at ``level``
reserve_hosts          ``hosts`` are kept free of VMs
reserve_amount         every domain at ``level`` (or the listed ``domains``) keeps ``amount`` free
=====================  ========================================================================
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any
from collections.abc import Iterable, Mapping

HOST_LEVEL = "host"
DEFAULT_LEVELS = ("datacenter", "rack", HOST_LEVEL)
RESOURCE_LABELS = {"memory_mib": "memory", "vcpus": "vcpus"}


class ProblemError(ValueError):
    """Invalid problem. ``errors`` lists ``(field, message)``; ``str()`` names every field."""

    def __init__(self, errors: list[tuple[str, str]]):
        self.errors = list(errors)
        super().__init__("; ".join(f"{f}: {m}" if f else m for f, m in self.errors))


class RuleConflictError(ProblemError):
    """Required rules that contradict each other; ``rules`` names them."""

    def __init__(self, errors: list[tuple[str, str]], rules: list[tuple[str, ...]]):
        super().__init__(errors)
        self.rules = rules


# --------------------------------------------------------------------------------------------
# Hosts, VMs, groups


@dataclass
class Host:
    name: str
    capacity: dict[str, int]
    overcommit: dict[str, float] = field(default_factory=dict)
    domain: dict[str, str] = field(default_factory=dict)  # level -> domain name (not "host")

    @classmethod
    def make(cls, name: str, vcpus: int, memory_mib: int, overcommit: float | Mapping[str, float] = 1.0,
             domain: Mapping[str, str] | None = None, **resources: int) -> Host:
        """Convenience constructor. A scalar ``overcommit`` applies to vCPUs only (memory is
        never overcommitted implicitly); pass a mapping to overcommit other resources."""
        oc = dict(overcommit) if isinstance(overcommit, Mapping) else {"vcpus": float(overcommit)}
        cap = {"vcpus": vcpus, "memory_mib": memory_mib, **resources}
        return cls(name, cap, oc, dict(domain or {}))

    def effective(self, resource: str) -> int:
        """Schedulable amount of ``resource``: floor(capacity x overcommit)."""
        return int(math.floor(self.capacity.get(resource, 0) * self.overcommit.get(resource, 1.0) + 1e-9))


@dataclass
class VM:
    name: str
    group: str
    demand: dict[str, int]


@dataclass
class Group:
    name: str
    vms: list[VM]

    @classmethod
    def uniform(cls, name: str, count: int, demand: Mapping[str, int], start: int = 0) -> Group:
        """``count`` identical VMs named ``NAME-0``, ``NAME-1``, ..."""
        return cls(name, [VM(f"{name}-{i}", name, dict(demand)) for i in range(start, start + count)])


# --------------------------------------------------------------------------------------------
# Rules


@dataclass
class Rule:
    name: str
    required: bool = True
    weight: int = 1
    kind = "rule"
    label = "rule"

    @property
    def groups_named(self) -> tuple[str, ...]:
        return tuple(getattr(self, "groups", ()))

    def describe(self) -> str:
        return f"{self.label} {self.name}"


@dataclass
class Affinity(Rule):
    groups: tuple[str, ...] = ()
    level: str = HOST_LEVEL
    kind = "affinity"
    label = "affinity"

    def describe(self) -> str:
        return f"{self.label} {self.name}@{self.level}"


@dataclass
class AntiAffinity(Affinity):
    kind = "anti_affinity"
    label = "anti-affinity"


@dataclass
class DomainAffinity(Rule):
    groups: tuple[str, ...] = ()
    domains: tuple[str, ...] = ()  # "level:name" (or a bare name when unambiguous)
    kind = "domain_affinity"
    label = "domain-affinity"


@dataclass
class DomainAntiAffinity(DomainAffinity):
    kind = "domain_anti_affinity"
    label = "domain-anti-affinity"


@dataclass
class Spread(Rule):
    groups: tuple[str, ...] = ()
    level: str = HOST_LEVEL
    max_skew: int = 1
    min_domains: int = 1
    kind = "spread"
    label = "spread"

    def describe(self) -> str:
        return f"{self.label} {self.name}@{self.level}"


@dataclass
class MaxPerDomain(Rule):
    groups: tuple[str, ...] = ()
    level: str = HOST_LEVEL
    max: int = 1
    kind = "max_per_domain"
    label = "max-per-domain"

    def describe(self) -> str:
        return f"{self.label} {self.name}@{self.level}"


@dataclass
class ReserveHosts(Rule):
    hosts: tuple[str, ...] = ()
    kind = "reserve_hosts"
    label = "reserved"


@dataclass
class ReserveAmount(Rule):
    level: str = HOST_LEVEL
    amount: dict[str, int] = field(default_factory=dict)
    domains: tuple[str, ...] = ()  # empty: every domain at level
    kind = "reserve_amount"
    label = "reserve"

    def describe(self) -> str:
        return f"{self.label} {self.name}@{self.level}"


RULE_KINDS: dict[str, type[Rule]] = {c.kind: c for c in (Affinity, AntiAffinity, DomainAffinity, DomainAntiAffinity,
                                                        Spread, MaxPerDomain, ReserveHosts, ReserveAmount)}


@dataclass
class MovePolicy:
    allowed: bool = False
    max: int | None = None  # None: unlimited when allowed


@dataclass
class Objective:
    mode: str = "balance"  # balance | pack
    resources: tuple[str, ...] = ()  # empty: every resource some VM demands


# --------------------------------------------------------------------------------------------
# Problem


class Topology:
    """Index of hosts and domains: which hosts are in which domain at each level."""

    def __init__(self, levels: tuple[str, ...], hosts: list[Host]):
        self.levels = levels
        self.hosts = hosts
        self.host_index = {h.name: i for i, h in enumerate(hosts)}
        self.level_index = {lv: i for i, lv in enumerate(levels)}
        # level -> domain name -> host indices (in host order)
        self.members: dict[str, dict[str, list[int]]] = {lv: {} for lv in levels}
        # level -> host index -> domain name
        self.domain_of: dict[str, list[str]] = {lv: [] for lv in levels}
        for i, h in enumerate(hosts):
            for lv in levels:
                d = h.name if lv == HOST_LEVEL else h.domain.get(lv, "")
                self.domain_of[lv].append(d)
                self.members[lv].setdefault(d, []).append(i)
        self.resources = sorted({r for h in hosts for r in h.capacity})
        self.effective = [{r: h.effective(r) for r in h.capacity} for h in hosts]

    def resolve(self, ref: str) -> tuple[str, str]:
        """``"rack:r1"`` or a bare unique name -> ``(level, name)``; raises KeyError with a reason."""
        if ":" in ref:
            lv, _, name = ref.partition(":")
            if lv not in self.members:
                raise KeyError(f"unknown level {lv!r} in domain {ref!r}")
            if name not in self.members[lv]:
                raise KeyError(f"unknown domain {ref!r}")
            return lv, name
        found = [(lv, ref) for lv in self.levels if ref in self.members[lv]]
        if not found:
            raise KeyError(f"unknown domain {ref!r}")
        if len(found) > 1:
            raise KeyError(f"domain {ref!r} is ambiguous ({', '.join(f'{a}:{b}' for a, b in found)}); write LEVEL:NAME")
        return found[0]

    def hosts_in(self, refs: Iterable[str]) -> set[int]:
        out: set[int] = set()
        for ref in refs:
            lv, name = self.resolve(ref)
            out.update(self.members[lv][name])
        return out


@dataclass
class Problem:
    hosts: list[Host]
    groups: list[Group]
    rules: list[Rule] = field(default_factory=list)
    levels: tuple[str, ...] = DEFAULT_LEVELS
    current: dict[str, str] = field(default_factory=dict)  # vm -> host
    moves: MovePolicy = field(default_factory=MovePolicy)
    objective: Objective = field(default_factory=Objective)

    def __post_init__(self) -> None:
        self.levels = tuple(self.levels)
        if not self.levels or self.levels[-1] != HOST_LEVEL:
            self.levels = tuple(lv for lv in self.levels if lv != HOST_LEVEL) + (HOST_LEVEL,)
        self._topo: Topology | None = None

    # -- indexes (rebuilt on demand; call invalidate() after mutating hosts or levels)
    @property
    def topology(self) -> Topology:
        if self._topo is None:
            self._topo = Topology(self.levels, self.hosts)
        return self._topo

    def invalidate(self) -> None:
        self._topo = None

    def group(self, name: str) -> Group:
        for g in self.groups:
            if g.name == name:
                return g
        raise KeyError(name)

    def vms(self) -> Iterable[VM]:
        for g in self.groups:
            yield from g.vms

    def rule(self, name: str) -> Rule:
        for r in self.rules:
            if r.name == name:
                return r
        raise KeyError(name)

    # -- validation
    def validate(self) -> Problem:
        """Raise ProblemError naming every offending field, or RuleConflictError for required
        rules that contradict each other. Returns self."""
        errors = validate_base(self)
        if errors:
            raise ProblemError(errors)
        conflicts = find_conflicts(self)
        if conflicts:
            raise RuleConflictError([(f"rules ({', '.join(names)})", msg) for names, msg in conflicts],
                                    [names for names, _ in conflicts])
        return self


def _check_resources(errors: list, where: str, res: Mapping[str, Any], what: str) -> None:
    if not isinstance(res, Mapping):
        errors.append((where, f"must be a mapping of resource name to {what}"))
        return
    for r, v in res.items():
        if isinstance(v, bool) or not isinstance(v, int):
            errors.append((f"{where}.{r}", f"must be an integer, got {v!r}"))
        elif v < 0:
            errors.append((f"{where}.{r}", f"negative {what} {v}"))


def validate_base(p: Problem) -> list[tuple[str, str]]:
    errors: list[tuple[str, str]] = []
    if len(set(p.levels)) != len(p.levels):
        errors.append(("levels", f"duplicate level in {list(p.levels)}"))
    if not p.hosts:
        errors.append(("hosts", "no hosts"))
    seen: set[str] = set()
    parent: dict[tuple[str, str], tuple[str, ...]] = {}
    for i, h in enumerate(p.hosts):
        w = f"hosts[{i}]"
        if not h.name:
            errors.append((f"{w}.name", "empty name"))
        if h.name in seen:
            errors.append((f"{w}.name", f"duplicate host {h.name!r}"))
        seen.add(h.name)
        _check_resources(errors, f"{w}.capacity", h.capacity, "capacity")
        for r, ratio in (h.overcommit or {}).items():
            if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or ratio <= 0:
                errors.append((f"{w}.overcommit.{r}", f"must be a positive number, got {ratio!r}"))
        for lv in h.domain:
            if lv not in p.levels or lv == HOST_LEVEL:
                errors.append((f"{w}.domain.{lv}", f"unknown level {lv!r} (levels: {', '.join(p.levels[:-1])})"))
        path: tuple[str, ...] = ()
        for lv in p.levels[:-1]:
            d = h.domain.get(lv)
            if not d:
                errors.append((f"{w}.domain.{lv}", "missing domain for this level"))
                break
            prev = parent.setdefault((lv, d), path)
            if prev != path:
                errors.append((f"{w}.domain.{lv}", f"domain {lv}:{d} has two parents {'/'.join(prev) or '-'} and "
                                                     f"{'/'.join(path) or '-'}; names must be unique within a level"))
            path = path + (d,)
    if errors:
        return errors  # the rest needs a sound topology
    topo = p.topology
    gnames: set[str] = set()
    vnames: set[str] = set()
    for i, g in enumerate(p.groups):
        w = f"groups[{i}]"
        if not g.name:
            errors.append((f"{w}.name", "empty name"))
        if g.name in gnames:
            errors.append((f"{w}.name", f"duplicate group {g.name!r}"))
        gnames.add(g.name)
        if not g.vms:
            errors.append((f"{w}.vms", f"group {g.name!r} has no VMs"))
        for j, vm in enumerate(g.vms):
            if vm.name in vnames:
                errors.append((f"{w}.vms[{j}].name", f"duplicate VM {vm.name!r}"))
            vnames.add(vm.name)
            if vm.group != g.name:
                errors.append((f"{w}.vms[{j}].group", f"VM {vm.name!r} says group {vm.group!r}"))
            _check_resources(errors, f"{w}.vms[{j}].demand", vm.demand, "demand")
    rnames: set[str] = set()
    for i, r in enumerate(p.rules):
        w = f"rules[{i}]"
        if not r.name:
            errors.append((f"{w}.name", "empty name"))
        elif r.name in rnames:
            errors.append((f"{w}.name", f"duplicate rule {r.name!r}"))
        rnames.add(r.name)
        w = f"rules[{i}] ({r.name})"
        errors.extend(validate_rule(r, w, gnames, topo))
    for vm, host in p.current.items():
        if vm not in vnames:
            errors.append((f"current.{vm}", f"unknown VM {vm!r}"))
        if host not in topo.host_index:
            errors.append((f"current.{vm}", f"unknown host {host!r}"))
    if p.moves.max is not None and (isinstance(p.moves.max, bool) or not isinstance(p.moves.max, int)
                                    or p.moves.max < 0):
        errors.append(("moves.max", f"must be a non-negative integer or null, got {p.moves.max!r}"))
    if p.objective.mode not in ("balance", "pack"):
        errors.append(("objective.mode", f"must be 'balance' or 'pack', got {p.objective.mode!r}"))
    return errors


def validate_rule(r: Rule, w: str, gnames: set[str], topo: Topology) -> list[tuple[str, str]]:
    errors: list[tuple[str, str]] = []
    if isinstance(r.weight, bool) or not isinstance(r.weight, int) or r.weight < 1:
        errors.append((f"{w}.weight", f"must be an integer >= 1, got {r.weight!r}"))
    if hasattr(r, "groups"):
        if not r.groups:
            errors.append((f"{w}.groups", "the rule names no group"))
        if len(set(r.groups)) != len(r.groups):
            errors.append((f"{w}.groups", f"duplicate group in {list(r.groups)}"))
        for j, g in enumerate(r.groups):
            if g not in gnames:
                errors.append((f"{w}.groups[{j}]", f"unknown group {g!r}"))
    if hasattr(r, "level") and r.level not in topo.members:
        errors.append((f"{w}.level", f"unknown level {r.level!r} (levels: {', '.join(topo.levels)})"))
    if isinstance(r, DomainAffinity) and not r.domains:
        errors.append((f"{w}.domains", "the rule names no domain"))
    if hasattr(r, "domains"):
        for j, d in enumerate(r.domains):
            try:
                topo.resolve(d)
            except KeyError as exc:
                errors.append((f"{w}.domains[{j}]", exc.args[0]))
    if isinstance(r, Spread):
        for fld, lo in (("max_skew", 0), ("min_domains", 1)):
            v = getattr(r, fld)
            if isinstance(v, bool) or not isinstance(v, int) or v < lo:
                errors.append((f"{w}.{fld}", f"must be an integer >= {lo}, got {v!r}"))
    if isinstance(r, MaxPerDomain) and (isinstance(r.max, bool) or not isinstance(r.max, int) or r.max < 1):
        errors.append((f"{w}.max", f"must be an integer >= 1, got {r.max!r}"))
    if isinstance(r, ReserveHosts):
        if not r.hosts:
            errors.append((f"{w}.hosts", "the rule names no host"))
        for j, h in enumerate(r.hosts):
            if h not in topo.host_index:
                errors.append((f"{w}.hosts[{j}]", f"unknown host {h!r}"))
    if isinstance(r, ReserveAmount):
        for j, d in enumerate(r.domains):
            try:
                if topo.resolve(d)[0] != r.level:
                    errors.append((f"{w}.domains[{j}]", f"domain {d!r} is not at the rule's level {r.level!r}"))
            except KeyError:
                pass  # reported above
        if not r.amount:
            errors.append((f"{w}.amount", "the rule reserves nothing"))
        _check_resources(errors, f"{w}.amount", r.amount, "amount")
    return errors


# --------------------------------------------------------------------------------------------
# Contradictions between required rules, found when the rules are defined


def _finer_or_equal(topo: Topology, a: str, b: str) -> bool:
    """Level a is the same as or finer than level b (sharing an a-domain implies sharing b)."""
    return topo.level_index[a] >= topo.level_index[b]


def eligible_hosts(p: Problem, group: str) -> tuple[set[int], list[str]]:
    """Hosts a group may use under its required domain rules and required host reservations,
    and the names of the rules that restricted it."""
    topo = p.topology
    allowed = set(range(len(p.hosts)))
    used: list[str] = []
    for r in p.rules:
        if not r.required:
            continue
        if isinstance(r, DomainAntiAffinity) and group in r.groups:
            allowed -= topo.hosts_in(r.domains)
            used.append(r.name)
        elif isinstance(r, DomainAffinity) and group in r.groups:
            allowed &= topo.hosts_in(r.domains)
            used.append(r.name)
        elif isinstance(r, ReserveHosts):
            allowed -= {topo.host_index[h] for h in r.hosts}
            used.append(r.name)
    return allowed, used


def find_conflicts(p: Problem, only: Iterable[str] | None = None,
                   groups: Iterable[str] | None = None) -> list[tuple[tuple[str, ...], str]]:
    """Sets of required rules that can never hold together, whatever the capacity.

    With ``only`` (rule names), report just the conflicts involving those rules, and check host
    eligibility just for ``groups``: the incremental check when rules or a group are added."""
    topo = p.topology
    sizes = {g.name: len(g.vms) for g in p.groups}
    req = [r for r in p.rules if r.required]
    focus = set(only) if only is not None else None
    out: list[tuple[tuple[str, ...], str]] = []

    def pairs():
        if focus is None:
            return ((a, b) for a in req for b in req)
        mine = [r for r in req if r.name in focus]
        return [(a, b) for a in req for b in (req if a.name in focus else mine)]

    for a, b in pairs():
        if a.kind != "affinity" or not _finer_or_equal(topo, a.level, getattr(b, "level", HOST_LEVEL)):
            continue
        ga = set(a.groups)
        if b.kind == "anti_affinity":
            gb = set(b.groups)
            if len(b.groups) >= 2 and len(ga & gb) >= 2:
                both = sorted(ga & gb)
                out.append(((a.name, b.name), f"required affinity {a.name}@{a.level} puts {', '.join(both)} "
                                              f"together; required anti-affinity {b.name}@{b.level} keeps them apart"))
            elif len(b.groups) == 1 and b.groups[0] in ga and sizes.get(b.groups[0], 0) >= 2:
                out.append(((a.name, b.name), f"required affinity {a.name}@{a.level} puts all of {b.groups[0]} in "
                                              f"one {a.level}; required anti-affinity {b.name}@{b.level} separates "
                                              f"its VMs"))
        elif b.kind == "max_per_domain":
            n = sum(sizes.get(g, 0) for g in ga & set(b.groups))
            if n > b.max:
                out.append(((a.name, b.name), f"required affinity {a.name}@{a.level} puts {n} VMs of "
                                              f"{', '.join(sorted(ga & set(b.groups)))} in one {b.level}; "
                                              f"{b.name} allows at most {b.max}"))
        elif b.kind == "spread" and b.min_domains >= 2 and set(b.groups) <= ga:
            out.append(((a.name, b.name), f"required affinity {a.name}@{a.level} keeps {', '.join(b.groups)} in "
                                          f"one {b.level}; spread {b.name} needs {b.min_domains}"))
    check_groups = [g.name for g in p.groups] if groups is None and focus is None else list(groups or ())
    if focus is not None:  # groups named by the new rules may lose hosts too
        check_groups += [g for r in req if r.name in focus for g in getattr(r, "groups", ())]
        if any(r.kind == "reserve_hosts" for r in req if r.name in focus):
            check_groups = [g.name for g in p.groups]
    for g in dict.fromkeys(check_groups):
        allowed, used = eligible_hosts(p, g)
        if not allowed and used:
            out.append((tuple(used), f"group {g}: no host is allowed by its required domain rules and reservations"))
    for r in req:
        if r.kind != "spread" or (focus is not None and r.name not in focus
                                  and not set(r.groups) & set(check_groups)):
            continue
        hosts: set[int] = set()
        names: list[str] = [r.name]
        for g in r.groups:
            allowed, used = eligible_hosts(p, g)
            hosts |= allowed
            names += [u for u in used if u not in names]
        doms = {topo.domain_of[r.level][h] for h in hosts}
        if r.min_domains > len(doms):
            out.append((tuple(names), f"spread {r.name} needs {r.min_domains} {r.level} domains; only {len(doms)} "
                                      f"allowed"))
        total = sum(sizes.get(g, 0) for g in r.groups)
        if r.min_domains > total:
            out.append(((r.name,), f"spread {r.name} needs {r.min_domains} {r.level} domains for only {total} VMs"))
    return out
