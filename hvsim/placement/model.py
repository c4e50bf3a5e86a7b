"""Placement model: domains, hosts, resource groups, rules, current placement.

Everything here is plain data. Levels are data too: a problem names its levels from the coarsest
to the finest (``["datacenter", "rack", "host"]``); ``host`` is always the finest level and is
appended when missing. Each host gives its domain at every other level (``{"datacenter": "dc1",
"rack": "r1"}``); a domain is identified by ``(level, name)`` and a name must have one parent.

Errors (``hvsim.placement.errors``)::

    ProblemError (InputError)        bad input; .errors is a list of (field, message)
     +-- RuleConflictError           required rules that can never hold together, found when defined
     +-- ProblemTooLargeError        beyond a documented size limit (hvsim.placement.limits)

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
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import ClassVar

from . import limits as L
from .errors import ProblemError, ProblemTooLargeError, RuleConflictError, key, show

HOST_LEVEL = "host"
DEFAULT_LEVELS = ("datacenter", "rack", HOST_LEVEL)
RESOURCE_LABELS = {"memory_mib": "memory", "vcpus": "vcpus"}

Errors = list[tuple[str, str]]

__all__ = [
    "HOST_LEVEL", "DEFAULT_LEVELS", "RESOURCE_LABELS", "ProblemError", "RuleConflictError", "ProblemTooLargeError",
    "Host", "VM", "Group", "Rule", "Affinity", "AntiAffinity", "DomainAffinity", "DomainAntiAffinity", "Spread",
    "MaxPerDomain", "ReserveHosts", "ReserveAmount", "RULE_KINDS", "MovePolicy", "Objective", "Topology",
    "Problem", "validate_base", "validate_rule", "validate_group", "check_sizes", "check_model_size",
    "eligible_hosts", "eligible_map", "find_conflicts", "model_estimate",
]


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
        """``count`` identical VMs named ``NAME-0``, ``NAME-1``, ... (at most ``limits.MAX_VMS``)."""
        if isinstance(count, bool) or not isinstance(count, int) or not 0 <= count <= L.MAX_VMS:
            raise ProblemTooLargeError([("count", f"must be an integer in 0..{L.MAX_VMS}, got {show(count)}")])
        return cls(name, [VM(f"{name}-{i}", name, dict(demand)) for i in range(start, start + count)])


# --------------------------------------------------------------------------------------------
# Rules


@dataclass
class Rule:
    name: str
    required: bool = True
    weight: int = 1
    kind: ClassVar[str] = "rule"
    label: ClassVar[str] = "rule"

    @property
    def groups_named(self) -> tuple[str, ...]:
        """The groups the rule names (none for reservations, which apply to every VM)."""
        return ()

    @property
    def level_named(self) -> str | None:
        return None

    def describe(self) -> str:
        return f"{self.label} {self.name}"


@dataclass
class _GroupLevelRule(Rule):
    groups: tuple[str, ...] = ()
    level: str = HOST_LEVEL

    @property
    def groups_named(self) -> tuple[str, ...]:
        return tuple(self.groups)

    @property
    def level_named(self) -> str | None:
        return self.level

    def describe(self) -> str:
        return f"{self.label} {self.name}@{self.level}"


@dataclass
class Affinity(_GroupLevelRule):
    kind: ClassVar[str] = "affinity"
    label: ClassVar[str] = "affinity"


@dataclass
class AntiAffinity(_GroupLevelRule):
    kind: ClassVar[str] = "anti_affinity"
    label: ClassVar[str] = "anti-affinity"


@dataclass
class DomainRule(Rule):
    groups: tuple[str, ...] = ()
    domains: tuple[str, ...] = ()  # "level:name" (or a bare name when unambiguous)

    @property
    def groups_named(self) -> tuple[str, ...]:
        return tuple(self.groups)


@dataclass
class DomainAffinity(DomainRule):
    kind: ClassVar[str] = "domain_affinity"
    label: ClassVar[str] = "domain-affinity"


@dataclass
class DomainAntiAffinity(DomainRule):
    kind: ClassVar[str] = "domain_anti_affinity"
    label: ClassVar[str] = "domain-anti-affinity"


@dataclass
class Spread(_GroupLevelRule):
    max_skew: int = 1
    min_domains: int = 1
    kind: ClassVar[str] = "spread"
    label: ClassVar[str] = "spread"


@dataclass
class MaxPerDomain(_GroupLevelRule):
    max: int = 1
    kind: ClassVar[str] = "max_per_domain"
    label: ClassVar[str] = "max-per-domain"


@dataclass
class ReserveHosts(Rule):
    hosts: tuple[str, ...] = ()
    kind: ClassVar[str] = "reserve_hosts"
    label: ClassVar[str] = "reserved"


@dataclass
class ReserveAmount(Rule):
    level: str = HOST_LEVEL
    amount: dict[str, int] = field(default_factory=dict)
    domains: tuple[str, ...] = ()  # empty: every domain at level
    kind: ClassVar[str] = "reserve_amount"
    label: ClassVar[str] = "reserve"

    @property
    def level_named(self) -> str | None:
        return self.level

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

    def __init__(self, levels: tuple[str, ...], hosts: list[Host]) -> None:
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
        self._inside: dict[tuple[str, ...], frozenset[int]] = {}

    def resolve(self, ref: str) -> tuple[str, str]:
        """``"rack:r1"`` or a bare unique name -> ``(level, name)``; raises KeyError with a reason."""
        if ":" in ref:
            lv, _, name = ref.partition(":")
            if lv not in self.members:
                raise KeyError(f"unknown level {show(lv)} in domain {show(ref)}")
            if name not in self.members[lv]:
                raise KeyError(f"unknown domain {show(ref)}")
            return lv, name
        found = [(lv, ref) for lv in self.levels if ref in self.members[lv]]
        if not found:
            raise KeyError(f"unknown domain {show(ref)}")
        if len(found) > 1:
            raise KeyError(f"domain {ref!r} is ambiguous ({', '.join(f'{a}:{b}' for a, b in found)}); write LEVEL:NAME")
        return found[0]

    def hosts_in(self, refs: Iterable[str]) -> frozenset[int]:
        """Hosts inside any of the domains ``refs`` (cached per tuple of references)."""
        key = tuple(refs)
        got = self._inside.get(key)
        if got is None:
            out: set[int] = set()
            for ref in key:
                lv, name = self.resolve(ref)
                out.update(self.members[lv][name])
            got = self._inside[key] = frozenset(out)
        return got


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

    def share_topology(self, other: Problem) -> None:
        """Use ``other``'s index (its hosts and levels must be this problem's): snapshots of one
        cluster share it instead of rebuilding it."""
        self._topo = other.topology

    def group(self, name: str) -> Group:
        for g in self.groups:
            if g.name == name:
                return g
        raise KeyError(name)

    def vms(self) -> Iterator[VM]:
        for g in self.groups:
            yield from g.vms

    def rule(self, name: str) -> Rule:
        for r in self.rules:
            if r.name == name:
                return r
        raise KeyError(name)

    # -- validation
    def validate(self) -> Problem:
        """Raise ProblemError naming every offending field, ProblemTooLargeError beyond a
        documented limit, or RuleConflictError for required rules that contradict each other.
        Returns self."""
        errors = validate_base(self)
        if errors:
            raise ProblemError(errors)
        check_model_size(self)
        conflicts = find_conflicts(self)
        if conflicts:
            raise RuleConflictError([(f"rules ({', '.join(names)})", msg) for names, msg in conflicts],
                                    [names for names, _ in conflicts])
        return self


# --------------------------------------------------------------------------------------------
# Validation (limits: hvsim.placement.limits)


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _check_int(errors: Errors, where: str, v: object, lo: int, hi: int) -> bool:
    if not (isinstance(v, int) and not isinstance(v, bool) and lo <= v <= hi):
        errors.append((where, f"must be an integer in {lo}..{hi}, got {show(v)}"))
        return False
    return True


def _check_name(errors: Errors, where: str, v: object, what: str = "name") -> bool:
    if not isinstance(v, str):
        errors.append((where, f"{what} must be a string, got {show(v)}"))
        return False
    if not v:
        errors.append((where, f"empty {what}"))
        return False
    if len(v) > L.MAX_NAME_LEN:
        errors.append((where, f"{what} longer than {L.MAX_NAME_LEN} characters ({len(v)})"))
        return False
    return True


def _check_resources(errors: Errors, where: str, res: object, what: str) -> None:
    if not isinstance(res, Mapping):
        errors.append((where, f"must be a mapping of resource name to {what}, got {show(res)}"))
        return
    if len(res) > L.MAX_RESOURCES:
        errors.append((where, f"{len(res)} resources (at most {L.MAX_RESOURCES})"))
        return
    for r, v in res.items():
        if not _check_name(errors, f"{where}.{key(r)}", r, "resource name"):
            continue
        if not _is_int(v):
            errors.append((f"{where}.{r}", f"must be an integer, got {show(v)}"))
        elif v < 0:
            errors.append((f"{where}.{r}", f"negative {what} {v}"))
        elif v > L.MAX_AMOUNT:
            errors.append((f"{where}.{r}", f"{what} {show(v)} is above the limit {L.MAX_AMOUNT}"))


def check_sizes(p: Problem) -> Errors:
    """Counts, before looking at anything inside (each a documented limit)."""
    errors: Errors = []
    n_vms = sum(len(g.vms) for g in p.groups)
    refs = sum(len(r.groups_named) + len(getattr(r, "domains", ())) + len(getattr(r, "hosts", ())) for r in p.rules)
    for what, n, lim in (("hosts", len(p.hosts), L.MAX_HOSTS), ("groups", len(p.groups), L.MAX_GROUPS),
                         ("groups[].vms", n_vms, L.MAX_VMS), ("rules", len(p.rules), L.MAX_RULES),
                         ("levels", len(p.levels), L.MAX_LEVELS), ("current", len(p.current), L.MAX_VMS),
                         ("rules[].groups/domains/hosts", refs, L.MAX_RULE_REFS)):
        if n > lim:
            errors.append((what, f"{n} entries: at most {lim} (a documented limit)"))
    return errors


def validate_base(p: Problem) -> Errors:
    errors = check_sizes(p)
    if errors:
        return errors
    for i, lv in enumerate(p.levels):
        _check_name(errors, f"levels[{i}]", lv, "level name")
    if errors:
        return errors
    if len(set(p.levels)) != len(p.levels):
        errors.append(("levels", f"duplicate level in {list(p.levels)}"))
    if not p.hosts:
        errors.append(("hosts", "no hosts"))
    seen: set[str] = set()
    parent: dict[tuple[str, str], tuple[str, ...]] = {}
    for i, h in enumerate(p.hosts):
        w = f"hosts[{i}]"
        if _check_name(errors, f"{w}.name", h.name):
            if h.name in seen:
                errors.append((f"{w}.name", f"duplicate host {h.name!r}"))
            seen.add(h.name)
        _check_resources(errors, f"{w}.capacity", h.capacity, "capacity")
        if not isinstance(h.overcommit, Mapping) or len(h.overcommit) > L.MAX_RESOURCES:
            errors.append((f"{w}.overcommit", f"must be a number or a mapping of at most {L.MAX_RESOURCES} "
                                              f"resources to ratios, got {show(h.overcommit)}"))
        else:
            for res, ratio in h.overcommit.items():
                ok = isinstance(ratio, (int, float)) and not isinstance(ratio, bool) \
                    and not (isinstance(ratio, float) and not math.isfinite(ratio))
                if not ok or not 0 < ratio <= L.MAX_OVERCOMMIT:
                    errors.append((f"{w}.overcommit.{key(res)}",
                                   f"must be a finite number in (0, {L.MAX_OVERCOMMIT:g}], got {show(ratio)}"))
        if not isinstance(h.domain, Mapping):
            errors.append((f"{w}.domain", f"must be a mapping of level to domain name, got {show(h.domain)}"))
            continue
        for lv in h.domain:
            if lv not in p.levels or lv == HOST_LEVEL:
                errors.append((f"{w}.domain.{key(lv)}",
                               f"unknown level {show(lv)} (levels: {', '.join(p.levels[:-1])})"))
        path: tuple[str, ...] = ()
        for lv in p.levels[:-1]:
            d = h.domain.get(lv)
            if d is None or d == "":
                errors.append((f"{w}.domain.{lv}", "missing domain for this level"))
                break
            if not _check_name(errors, f"{w}.domain.{lv}", d, "domain name"):
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
        errors.extend(validate_group(g, f"groups[{i}]", gnames, vnames))
    rnames: set[str] = set()
    for i, r in enumerate(p.rules):
        w = f"rules[{i}]"
        if not isinstance(r, Rule):
            errors.append((w, f"must be a rule, got {show(r)}"))
            continue
        if _check_name(errors, f"{w}.name", r.name):
            if r.name in rnames:
                errors.append((f"{w}.name", f"duplicate rule {r.name!r}"))
            rnames.add(r.name)
            w = f"rules[{i}] ({r.name})"
        errors.extend(validate_rule(r, w, gnames, topo))
    for vm_name, host in p.current.items():
        if not isinstance(vm_name, str) or vm_name not in vnames:
            errors.append((f"current.{key(vm_name)}", f"unknown VM {show(vm_name)}"))
        if not isinstance(host, str) or host not in topo.host_index:
            errors.append((f"current.{key(vm_name)}", f"unknown host {show(host)}"))
    if not isinstance(p.moves.allowed, bool):
        errors.append(("moves.allowed", f"must be true or false, got {show(p.moves.allowed)}"))
    if p.moves.max is not None:
        _check_int(errors, "moves.max", p.moves.max, 0, L.MAX_VMS)
    if p.objective.mode not in ("balance", "pack"):
        errors.append(("objective.mode", f"must be 'balance' or 'pack', got {show(p.objective.mode)}"))
    if len(p.objective.resources) > L.MAX_RESOURCES:
        errors.append(("objective.resources", f"{len(p.objective.resources)} resources (at most {L.MAX_RESOURCES})"))
    else:
        for j, res in enumerate(p.objective.resources):
            _check_name(errors, f"objective.resources[{j}]", res, "resource name")
    return errors


def validate_group(g: Group, w: str, gnames: set[str], vnames: set[str]) -> Errors:
    """A group's fields; ``gnames``/``vnames`` (names seen so far) get its names added."""
    errors: Errors = []
    if _check_name(errors, f"{w}.name", g.name):
        if g.name in gnames:
            errors.append((f"{w}.name", f"duplicate group {g.name!r}"))
        gnames.add(g.name)
    if not g.vms:
        errors.append((f"{w}.vms", f"group {show(g.name)} has no VMs"))
    for j, vm in enumerate(g.vms):
        if _check_name(errors, f"{w}.vms[{j}].name", vm.name):
            if vm.name in vnames:
                errors.append((f"{w}.vms[{j}].name", f"duplicate VM {vm.name!r}"))
            vnames.add(vm.name)
        if vm.group != g.name:
            errors.append((f"{w}.vms[{j}].group", f"VM {show(vm.name)} says group {show(vm.group)}"))
        _check_resources(errors, f"{w}.vms[{j}].demand", vm.demand, "demand")
    return errors


def validate_rule(r: Rule, w: str, gnames: set[str], topo: Topology) -> Errors:
    errors: Errors = []
    if not isinstance(r.required, bool):
        errors.append((f"{w}.required", f"must be true or false, got {show(r.required)}"))
    _check_int(errors, f"{w}.weight", r.weight, 1, L.MAX_WEIGHT)
    groups = r.groups_named
    if isinstance(r, (_GroupLevelRule, DomainRule)):
        if not groups:
            errors.append((f"{w}.groups", "the rule names no group"))
        if len(set(groups)) != len(groups):
            errors.append((f"{w}.groups", f"duplicate group in {show(list(groups))}"))
        for j, g in enumerate(groups):
            if g not in gnames:
                errors.append((f"{w}.groups[{j}]", f"unknown group {show(g)}"))
    level = r.level_named
    if level is not None and level not in topo.members:
        errors.append((f"{w}.level", f"unknown level {show(level)} (levels: {', '.join(topo.levels)})"))
    if isinstance(r, DomainRule) and not r.domains:
        errors.append((f"{w}.domains", "the rule names no domain"))
    if isinstance(r, (DomainRule, ReserveAmount)):
        for j, d in enumerate(r.domains):
            if not isinstance(d, str):
                errors.append((f"{w}.domains[{j}]", f"must be a string, got {show(d)}"))
                continue
            try:
                lv, _ = topo.resolve(d)
            except KeyError as exc:
                errors.append((f"{w}.domains[{j}]", exc.args[0]))
                continue
            if isinstance(r, ReserveAmount) and lv != r.level:
                errors.append((f"{w}.domains[{j}]", f"domain {show(d)} is not at the rule's level {show(r.level)}"))
    if isinstance(r, Spread):
        _check_int(errors, f"{w}.max_skew", r.max_skew, 0, L.MAX_VMS)
        _check_int(errors, f"{w}.min_domains", r.min_domains, 1, L.MAX_HOSTS)
    if isinstance(r, MaxPerDomain):
        _check_int(errors, f"{w}.max", r.max, 1, L.MAX_VMS)
    if isinstance(r, ReserveHosts):
        if not r.hosts:
            errors.append((f"{w}.hosts", "the rule names no host"))
        for j, h in enumerate(r.hosts):
            if not isinstance(h, str) or h not in topo.host_index:
                errors.append((f"{w}.hosts[{j}]", f"unknown host {show(h)}"))
    if isinstance(r, ReserveAmount):
        if not r.amount:
            errors.append((f"{w}.amount", "the rule reserves nothing"))
        _check_resources(errors, f"{w}.amount", r.amount, "amount")
    return errors


def _classes(g: Group) -> int:
    """Distinct demand vectors among the group's VMs (the solver's classes)."""
    if not g.vms:
        return 0
    first = g.vms[0].demand
    if all(v.demand == first for v in g.vms):
        return 1
    return len({tuple(sorted(v.demand.items())) for v in g.vms})


def model_estimate(p: Problem) -> tuple[int, int]:
    """(cells, terms) of the CP-SAT model of ``p`` with every VM a variable (the explanation
    model, the larger one): cells = VM classes x hosts; terms = cells + for every rule the cells
    of the groups it names (a reservation: all cells)."""
    per = {g.name: _classes(g) for g in p.groups}
    total = sum(per.values())
    n = len(p.hosts)
    terms = cells = total * n
    for r in p.rules:
        gs = r.groups_named
        terms += (sum(per.get(g, 0) for g in gs) if gs else total) * n
    return cells, terms


def check_model_size(p: Problem) -> None:
    """ProblemTooLargeError when the model estimate is beyond the limits."""
    cells, terms = model_estimate(p)
    errors: Errors = []
    if cells > L.MAX_MODEL_CELLS:
        errors.append(("groups", f"the model would have {cells} (VM class, host) cells: at most "
                                 f"{L.MAX_MODEL_CELLS} (hosts x distinct VM demands per group; a documented limit)"))
    if terms > L.MAX_MODEL_TERMS:
        errors.append(("rules", f"the model would have about {terms} terms: at most {L.MAX_MODEL_TERMS} "
                                f"(hosts x VM classes named per rule; a documented limit)"))
    if errors:
        raise ProblemTooLargeError(errors)


# --------------------------------------------------------------------------------------------
# Contradictions between required rules, found when the rules are defined


def _finer_or_equal(topo: Topology, a: str, b: str) -> bool:
    """Level a is the same as or finer than level b (sharing an a-domain implies sharing b)."""
    return topo.level_index[a] >= topo.level_index[b]


def eligible_map(p: Problem, groups: Iterable[str] | None = None) -> dict[str, tuple[set[int], list[str]]]:
    """For each group (default: all), the hosts it may use under its required domain rules and
    required host reservations, and the names of the rules that restricted it (in rule order).
    One pass over the rules."""
    topo = p.topology
    names = list(dict.fromkeys(g.name for g in p.groups)) if groups is None else list(dict.fromkeys(groups))
    want = set(names)
    out: dict[str, tuple[set[int], list[str]]] = {g: (set(range(len(p.hosts))), []) for g in names}
    reserved: set[int] = set()
    reserve_names: list[tuple[int, str]] = []
    own: dict[str, list[tuple[int, str]]] = {g: [] for g in names}
    for i, r in enumerate(p.rules):
        if not r.required:
            continue
        if isinstance(r, ReserveHosts):
            reserved.update(topo.host_index[h] for h in r.hosts if h in topo.host_index)
            reserve_names.append((i, r.name))
        elif isinstance(r, DomainRule):
            targets = [g for g in r.groups if g in want]
            if not targets:
                continue
            inside = topo.hosts_in(r.domains)
            for g in targets:
                allowed = out[g][0]
                if isinstance(r, DomainAntiAffinity):
                    allowed -= inside
                else:
                    allowed &= inside
                own[g].append((i, r.name))
    for g in names:
        allowed, used = out[g]
        allowed -= reserved
        used.extend(n for _, n in sorted(own[g] + reserve_names))
    return out


def eligible_hosts(p: Problem, group: str) -> tuple[set[int], list[str]]:
    """Hosts a group may use under its required domain rules and required host reservations,
    and the names of the rules that restricted it."""
    return eligible_map(p, [group])[group]


def find_conflicts(p: Problem, only: Iterable[str] | None = None, groups: Iterable[str] | None = None,
                   limit: int = 100) -> list[tuple[tuple[str, ...], str]]:
    """Sets of required rules that can never hold together, whatever the capacity (at most
    ``limit`` of them).

    With ``only`` (rule names), report just the conflicts involving those rules, and check host
    eligibility just for ``groups``: the incremental check when rules or a group are added."""
    topo = p.topology
    sizes = {g.name: len(g.vms) for g in p.groups}
    req = [r for r in p.rules if r.required]
    position = {id(r): i for i, r in enumerate(req)}
    focus = set(only) if only is not None else None
    out: list[tuple[tuple[str, ...], str]] = []
    by_group: dict[str, list[Rule]] = {}
    for r in req:
        if isinstance(r, (AntiAffinity, MaxPerDomain, Spread)):
            for g in r.groups:
                by_group.setdefault(g, []).append(r)

    for a in req:
        if not isinstance(a, Affinity):
            continue
        ga = set(a.groups)
        cands = {id(b): b for g in a.groups for b in by_group.get(g, ())}
        for b in sorted(cands.values(), key=lambda x: position[id(x)]):
            if len(out) >= limit:
                return out
            if focus is not None and a.name not in focus and b.name not in focus:
                continue
            if not isinstance(b, (AntiAffinity, MaxPerDomain, Spread)) or not _finer_or_equal(topo, a.level, b.level):
                continue
            gb = set(b.groups)
            if isinstance(b, AntiAffinity):
                if len(b.groups) >= 2 and len(ga & gb) >= 2:
                    both = sorted(ga & gb)
                    out.append(((a.name, b.name), f"required affinity {a.name}@{a.level} puts {', '.join(both)} "
                                                  f"together; required anti-affinity {b.name}@{b.level} keeps them "
                                                  f"apart"))
                elif len(b.groups) == 1 and b.groups[0] in ga and sizes.get(b.groups[0], 0) >= 2:
                    out.append(((a.name, b.name), f"required affinity {a.name}@{a.level} puts all of {b.groups[0]} "
                                                  f"in one {a.level}; required anti-affinity {b.name}@{b.level} "
                                                  f"separates its VMs"))
            elif isinstance(b, MaxPerDomain):
                n = sum(sizes.get(g, 0) for g in ga & gb)
                if n > b.max:
                    out.append(((a.name, b.name), f"required affinity {a.name}@{a.level} puts {n} VMs of "
                                                  f"{', '.join(sorted(ga & gb))} in one {b.level}; "
                                                  f"{b.name} allows at most {b.max}"))
            elif b.min_domains >= 2 and gb <= ga:
                out.append(((a.name, b.name), f"required affinity {a.name}@{a.level} keeps {', '.join(b.groups)} in "
                                              f"one {b.level}; spread {b.name} needs {b.min_domains}"))
    check_groups = [g.name for g in p.groups] if groups is None and focus is None else list(groups or ())
    if focus is not None:  # groups named by the new rules may lose hosts too
        check_groups += [g for r in req if r.name in focus for g in r.groups_named]
        if any(isinstance(r, ReserveHosts) for r in req if r.name in focus):
            check_groups = [g.name for g in p.groups]
    spreads = [r for r in req if isinstance(r, Spread)
               and (focus is None or r.name in focus or set(r.groups) & set(check_groups))]
    elig = eligible_map(p, list(check_groups) + [g for r in spreads for g in r.groups])
    for g in dict.fromkeys(check_groups):
        if len(out) >= limit:
            return out
        allowed, used = elig[g]
        if not allowed and used:
            out.append((tuple(used), f"group {g}: no host is allowed by its required domain rules and reservations"))
    for r in spreads:
        if len(out) >= limit:
            return out
        hosts: set[int] = set()
        names: list[str] = [r.name]
        for g in r.groups:
            allowed, used = elig[g]
            hosts |= allowed
            names += [u for u in used if u not in names]
        dom_of = topo.domain_of[r.level]
        doms = {dom_of[h] for h in hosts}
        if r.min_domains > len(doms):
            out.append((tuple(names), f"spread {r.name} needs {r.min_domains} {r.level} domains; only {len(doms)} "
                                      f"allowed"))
        total = sum(sizes.get(g, 0) for g in r.groups)
        if r.min_domains > total:
            out.append(((r.name,), f"spread {r.name} needs {r.min_domains} {r.level} domains for only {total} VMs"))
    return out

