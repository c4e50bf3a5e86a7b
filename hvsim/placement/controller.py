"""PlacementController: the current placement of a cluster, and group placement on request.

Independent of QEMU: the cluster tells it the hosts (name, vCPUs, memory MiB, overcommit, domain
path such as ``{"datacenter": "dc1", "rack": "r1"}``), asks it where a new group's VMs go, starts
them there, and tells it when VMs go away.

Concurrency: requests that change the placement or the rules (``place_group``, ``add_rule``,
``add_host``) are serialised by one ``asyncio.Lock``, so two groups created at once are placed one
after the other, each against the placement the other committed (Nova's "affinity policy
violated with parallel requests" cannot happen). The solve itself runs in a worker thread.
``release`` is synchronous and may run while a solve is in flight (it only frees capacity, but
it can change spread counts), so the new placement is checked again by the independent checker
against the live state before it is committed, and solved again if that check fails.

Call everything from the event loop's thread.
"""
from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable, Mapping
from typing import Any

from .check import CheckReport, check
from .cpsat import SolverOptions
from .errors import ProblemError, RuleConflictError, show
from .model import (HOST_LEVEL, Group, Host, MovePolicy, Objective, Problem, ReserveAmount, ReserveHosts, Rule,
                    check_model_size, check_sizes, find_conflicts, validate_base, validate_group, validate_rule)
from .schema import group_from_dict, rule_from_dict
from .result import PlacementRefused, PlacementResult
from .solver import solve

log = logging.getLogger(__name__)

__all__ = ["PlacementController", "PlacementRefused", "host_from_spec"]


def host_from_spec(spec: Host | Mapping[str, Any]) -> Host:
    """A Host from ``{"name", "vcpus", "memory_mib", "overcommit", "domain"}`` (flat) or from
    ``{"name", "capacity", "overcommit", "domain"}``. A scalar overcommit applies to vCPUs.
    Raises ProblemError for a spec that is not one of those shapes (values are checked by the
    problem's validation)."""
    if isinstance(spec, Host):
        return spec
    if not isinstance(spec, Mapping):
        raise ProblemError([("host", f"must be a mapping or a Host, got {show(spec)}")])
    s = dict(spec)
    name = s.get("name")
    where = f"host {show(name)}"
    if not isinstance(name, str):
        raise ProblemError([(f"{where}.name", f"must be a string, got {show(name)}")])
    oc = s.get("overcommit", {} if "capacity" in s else 1.0)
    if isinstance(oc, (int, float)) and not isinstance(oc, bool):
        oc = {"vcpus": oc}
    if not isinstance(oc, Mapping) or not isinstance(s.get("domain", {}), Mapping):
        raise ProblemError([(f"{where}.overcommit/domain", f"must be mappings, got {show(oc)}, "
                                                           f"{show(s.get('domain'))}")])
    domain = dict(s.get("domain") or {})
    if "capacity" in s:
        cap = s["capacity"]
        if not isinstance(cap, Mapping):
            raise ProblemError([(f"{where}.capacity", f"must be a mapping, got {show(cap)}")])
        return Host(name, dict(cap), dict(oc), domain)
    missing = [k for k in ("vcpus", "memory_mib") if k not in s]
    if missing:
        raise ProblemError([(where, f"missing {', '.join(missing)}")])
    extra = {k: v for k, v in s.items() if k not in ("name", "vcpus", "memory_mib", "overcommit", "domain")}
    return Host(name, {"vcpus": s["vcpus"], "memory_mib": s["memory_mib"], **extra}, dict(oc), domain)


class PlacementController:
    def __init__(self, hosts: Iterable[Host | Mapping[str, Any]], *, levels: Iterable[str] | None = None,
                 rules: Iterable[Rule | Mapping[str, Any]] = (), objective: Objective | None = None,
                 solver: str = "cpsat", options: SolverOptions | None = None, explain_time_s: float = 2.0,
                 max_attempts: int = 3) -> None:
        hs = [host_from_spec(h) for h in hosts]
        if levels is None:
            levels = [lv for lv in (hs[0].domain if hs else {})] + [HOST_LEVEL]
        self._problem = Problem(hs, [], [self._rule(r) for r in rules], tuple(levels), {}, MovePolicy(False),
                                objective or Objective())
        errors = validate_base(self._problem)
        if errors:
            raise ProblemError(errors)
        self.solver = solver
        # interactive: answer within a second with the best placement found (status feasible + gap
        # when the optimum is not proven by then); every placement still passes the checker
        self.options = options or SolverOptions(time_limit_s=1.0)
        self.explain_time_s = explain_time_s
        self.max_attempts = max_attempts
        self._lock = asyncio.Lock()
        # penalty (weight x violations) of preferred rules on groups that are all placed: the
        # solver's constant term, kept between placements (a new group does not change them);
        # any other change of the placement, the rules or the hosts drops them all
        self._constants: dict[str, int] = {}
        self._generation = 0

    def _changed(self) -> None:
        self._constants.clear()
        self._generation += 1

    @classmethod
    def from_problem(cls, problem: Problem, placement: Mapping[str, str] | None = None,
                     **kw: Any) -> PlacementController:
        """A controller holding ``problem``'s hosts, groups and rules with every VM placed as in
        ``placement`` (default: ``problem.current``). Refused (ProblemError) when the problem is
        invalid or the placement is incomplete or breaks a required rule."""
        problem.validate()
        c = cls(problem.hosts, levels=problem.levels, objective=problem.objective, **kw)
        current = dict(placement if placement is not None else problem.current)
        p = Problem(problem.hosts, [Group(g.name, list(g.vms)) for g in problem.groups], list(problem.rules),
                    problem.levels, current, MovePolicy(False), problem.objective)
        rep = check(p, current)
        if not rep.ok:
            raise ProblemError([("placement", f"{rep.required_violations} required violations: "
                                              f"{'; '.join(rep.problems[:3] + rep.violated()[:3])}")])
        c._problem = p
        return c

    # ------------------------------------------------------------------ views
    @property
    def placement(self) -> dict[str, str]:
        """VM name -> host name, a copy."""
        return dict(self._problem.current)

    @property
    def hosts(self) -> list[Host]:
        return list(self._problem.hosts)

    @property
    def groups(self) -> dict[str, list[str]]:
        return {g.name: [v.name for v in g.vms] for g in self._problem.groups}

    @property
    def rules(self) -> list[Rule]:
        return list(self._problem.rules)

    def problem(self) -> Problem:
        """A snapshot of the cluster as a placement problem (current placement fixed)."""
        return self._snapshot()

    def check(self) -> CheckReport:
        """Independent check of the whole current placement."""
        p = self._problem
        return check(p, p.current)

    def host_of(self, vm: str) -> str:
        return self._problem.current[vm]

    # ------------------------------------------------------------------ changes
    @staticmethod
    def _rule(r: Rule | Mapping[str, Any]) -> Rule:
        return r if isinstance(r, Rule) else rule_from_dict(r)

    def _snapshot(self, group: Group | None = None, rules: Iterable[Rule] = ()) -> Problem:
        p = self._problem
        groups = [Group(g.name, list(g.vms)) for g in p.groups]  # copies: release() may run meanwhile
        if group is not None:
            groups.append(group)
        snap = Problem(p.hosts, groups, list(p.rules) + list(rules), p.levels, dict(p.current), MovePolicy(False),
                       p.objective)
        snap.share_topology(p)
        return snap

    def _validate_additions(self, snap: Problem, group: Group | None, rules: list[Rule]) -> None:
        errors: list[tuple[str, str]] = []
        gnames = {g.name for g in snap.groups}
        if group is not None:
            if sum(1 for g in snap.groups if g.name == group.name) > 1:
                errors.append(("group.name", f"group {group.name!r} already exists"))
            known = {v.name for g in snap.groups[:-1] for v in g.vms}
            if not group.vms:
                errors.append(("group.vms", f"group {group.name!r} has no VMs"))
            for j, vm in enumerate(group.vms):
                if vm.name in known:
                    errors.append((f"group.vms[{j}].name", f"VM {vm.name!r} already exists"))
            errors.extend(validate_group(group, "group", set(), set()))
        errors.extend(check_sizes(snap))  # the totals (documented limits) with the additions
        have = {r.name for r in self._problem.rules}
        for i, rule in enumerate(rules):
            w = f"rules[{i}] ({rule.name})"
            if rule.name in have:
                errors.append((f"{w}.name", f"rule {rule.name!r} already exists"))
            have.add(rule.name)
            errors.extend(validate_rule(rule, w, gnames, snap.topology))
        if errors:
            raise ProblemError(errors)
        check_model_size(snap)
        new_groups = {group.name} if group is not None else set()
        conflicts = find_conflicts(snap, only=[r.name for r in rules], groups=new_groups)
        if conflicts:
            raise RuleConflictError([(f"rules ({', '.join(n)})", m) for n, m in conflicts], [n for n, _ in conflicts])

    async def place_group(self, group: Group | Mapping[str, Any], rules: Iterable[Rule | Mapping[str, Any]] = (), *,
                          solver: str | None = None, raise_on_refusal: bool = False) -> PlacementResult:
        """Place every VM of a new group (and add ``rules``, which may name it) or refuse with an
        explanation. On success the placement is committed: ``placement`` shows the new VMs.
        Bad input or rules contradicting the existing ones raise ProblemError at once."""
        g = group if isinstance(group, Group) else group_from_dict(group)
        new_rules = [self._rule(r) for r in rules]
        async with self._lock:
            result: PlacementResult | None = None
            for attempt in range(self.max_attempts):
                snap = self._snapshot(g, new_rules)
                self._validate_additions(snap, g, new_rules)
                touched = [r.name for r in snap.rules if g.name in r.groups_named
                           or isinstance(r, (ReserveHosts, ReserveAmount))]
                constants, generation = dict(self._constants), self._generation  # (the solve fills its copy)
                result = await asyncio.to_thread(
                    solve, snap, solver or self.solver, options=self.options, explain_time_s=self.explain_time_s,
                    check_rules=touched, check_hosts=[], constants=constants)
                if not result.ok:
                    break
                if self._commit(g, new_rules, result):
                    if generation == self._generation:
                        self._keep_constants(constants, new_rules)
                    break
                log.info("placement of %s went stale during the solve (attempt %d); solving again", g.name, attempt + 1)
            else:
                result = PlacementResult("failed", result.solver if result else "",
                                         message="placement kept going stale")
        assert result is not None
        if not result.ok and raise_on_refusal:
            raise PlacementRefused(result)
        return result

    def _keep_constants(self, constants: dict[str, int], new_rules: list[Rule]) -> None:
        """Keep what the solve computed, except for rules on groups the new rules name (a new
        required domain rule changes which domains a spread counts) or after a new reservation."""
        if any(isinstance(r, (ReserveHosts, ReserveAmount)) for r in new_rules):
            return
        named = {g for r in new_rules for g in r.groups_named}
        by_name = {r.name: r for r in self._problem.rules}
        self._constants = {n: v for n, v in constants.items()
                           if n in by_name and not named.intersection(by_name[n].groups_named)}

    def _commit(self, g: Group, rules: list[Rule], result: PlacementResult) -> bool:
        """Check the new VMs against the live state (releases may have happened) and commit."""
        mine = {v.name: result.assignment[v.name] for v in g.vms}
        merged = self._snapshot(g, rules)
        merged.current.update(mine)
        touched = [r.name for r in merged.rules if g.name in r.groups_named
                   or isinstance(r, (ReserveHosts, ReserveAmount))]
        rep = check(merged, merged.current, rules=touched, hosts=set(mine.values()))
        if not rep.ok:
            return False
        merged.share_topology(self._problem)
        self._problem = merged
        result.assignment = mine
        return True

    async def add_rule(self, rule: Rule | Mapping[str, Any]) -> None:
        """Add a rule on existing groups. Refused (ProblemError) if it contradicts another rule or
        if the current placement breaks it (required rules only)."""
        r = self._rule(rule)
        async with self._lock:
            snap = self._snapshot(None, [r])
            self._validate_additions(snap, None, [r])
            if r.required:
                rep = check(snap, snap.current, rules=[r.name], hosts=[])
                if not rep.ok:
                    raise ProblemError([(f"rule ({r.name})", f"the current placement breaks it "
                                                             f"({rep.required_violations} violations)")])
            self._problem = snap
            self._changed()

    def remove_rule(self, name: str) -> None:
        p = self._problem
        p.rules = [r for r in p.rules if r.name != name]
        self._changed()

    async def add_host(self, host: Host | Mapping[str, Any]) -> None:
        h = host_from_spec(host)
        async with self._lock:
            p = self._problem
            np = Problem(p.hosts + [h], p.groups, p.rules, p.levels, p.current, MovePolicy(False), p.objective)
            errors = validate_base(np)
            if errors:
                raise ProblemError(errors)
            self._problem = np
            self._changed()

    def release(self, vm_name: str) -> list[str]:
        """Forget a VM (it was destroyed). When it was the last of its group, the group goes too,
        with the rules that name it; their names are returned."""
        p = self._problem
        if vm_name not in p.current:
            raise KeyError(f"unknown VM {vm_name!r}")
        del p.current[vm_name]
        self._changed()
        for i, g in enumerate(p.groups):
            if any(v.name == vm_name for v in g.vms):
                rest = [v for v in g.vms if v.name != vm_name]
                if rest:
                    p.groups[i] = Group(g.name, rest)  # copy on write: snapshots keep theirs
                    return []
                return self._drop_group(g.name)
        return []

    def note_moved(self, vm_name: str, host: str) -> bool:
        """A VM of a placed group now runs on ``host`` (it migrated, or was restarted elsewhere):
        follow it. Returns False (and changes nothing) for a VM this controller does not place.
        A move that breaks a required rule is logged (it already happened; the checker counts it)."""
        p = self._problem
        if vm_name not in p.current:
            return False
        if host not in {h.name for h in p.hosts}:
            raise ProblemError([("host", f"VM {vm_name!r} moved to unknown host {host!r}")])
        p.current[vm_name] = host
        self._changed()
        rep = check(p, p.current)
        if not rep.ok:
            log.warning("VM %s moved to %s: the placement now breaks required rules: %s", vm_name, host,
                        "; ".join(rep.violated()[:5]))
        return True

    def release_group(self, name: str) -> list[str]:
        """Forget a whole group; returns the names of the rules dropped with it."""
        p = self._problem
        g = p.group(name)
        for v in g.vms:
            p.current.pop(v.name, None)
        self._changed()
        return self._drop_group(name)

    def _drop_group(self, name: str) -> list[str]:
        p = self._problem
        p.groups = [g for g in p.groups if g.name != name]
        dropped = [r.name for r in p.rules if name in r.groups_named]
        p.rules = [r for r in p.rules if name not in r.groups_named]
        self._changed()
        if dropped:
            log.info("group %s released; dropped its rules %s", name, ", ".join(dropped))
        return dropped
